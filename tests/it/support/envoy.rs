//! A real Envoy started from `deploy/envoy/envoy.yaml` (or a custom config).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::process::{ChildGuard, TestDir};
use super::{STARTUP_TIMEOUT, envoy_bin, http_client, port_accepts};

/// Where the upstreams of the deployed config live in a test.
#[derive(Debug, Clone, Copy)]
pub struct EnvoyPorts {
    /// keymeter's gRPC port (ext_authz `Check`, health).
    pub keymeter_grpc: u16,
    /// The HTTP/1.1 backend behind the proxy (see `Backend`).
    pub backend: u16,
}

/// Port numbers in `deploy/envoy/envoy.yaml`, each present exactly once.
const DEPLOY_LISTENER_PORT: u16 = 10000;
const DEPLOY_KEYMETER_PORT: u16 = 9191;
const DEPLOY_BACKEND_PORT: u16 = 8080;
const DEPLOY_ADMIN_PORT: u16 = 9901;

pub fn deploy_config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/envoy.yaml")
}

/// `deploy/envoy/envoy.yaml` adapted to a test: upstream ports replaced, and
/// the listener and admin on port 0 of 127.0.0.1. Port 0 lets the kernel pick
/// (no race with other tests); [`Envoy`] reads the real ports back from the
/// admin API. Handy as a base for [`Envoy::start_with_config`] when a test
/// needs a tweaked config.
pub fn render_deploy_config(ports: EnvoyPorts) -> String {
    render_config_file(&deploy_config_path(), ports)
}

/// `deploy/envoy/envoy-local.yaml`: local enforcement (api_key_auth fed over ECDS).
pub fn local_config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/envoy/envoy-local.yaml")
}

/// `deploy/envoy/envoy-local.yaml` adapted to a test like [`render_deploy_config`].
pub fn render_local_config(ports: EnvoyPorts) -> String {
    render_config_file(&local_config_path(), ports)
}

/// A shipped config with the ports of the test (see [`render_deploy_config`]).
fn render_config_file(path: &Path, ports: EnvoyPorts) -> String {
    let name = path.display();
    let yaml = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {name}: {e}"));
    let replacements = [
        (DEPLOY_LISTENER_PORT, 0),
        (DEPLOY_KEYMETER_PORT, ports.keymeter_grpc),
        (DEPLOY_BACKEND_PORT, ports.backend),
        (DEPLOY_ADMIN_PORT, 0),
    ];
    let mut seen = [0usize; 4];
    // One pass over whole lines, so a new port can never be re-replaced.
    let out: String = yaml
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            let indent = &line[..line.len() - trimmed.len()];
            for (i, (from, to)) in replacements.iter().enumerate() {
                if trimmed == format!("port_value: {from}") {
                    seen[i] += 1;
                    return format!("{indent}port_value: {to}\n");
                }
            }
            // Tests never expose the listener beyond loopback.
            if trimmed == "address: 0.0.0.0" {
                return format!("{indent}address: 127.0.0.1\n");
            }
            format!("{line}\n")
        })
        .collect();
    for (i, (from, _)) in replacements.iter().enumerate() {
        assert_eq!(
            seen[i], 1,
            "{name} must contain `port_value: {from}` exactly once"
        );
    }
    out
}

/// Variations of the deployed config for tests; `Default` is the config as deployed.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeployConfigOptions {
    /// Leave out the `envoy.filters.http.header_to_metadata` filter: usage
    /// headers then reach the client and the access log's
    /// `response.response_headers` instead of dynamic metadata.
    pub without_header_to_metadata: bool,
    /// Send the access log to a test's own `AccessLogService` on
    /// 127.0.0.1:`port` (an added cluster `access_log_capture`, plain HTTP/2)
    /// instead of keymeter; ext_authz still goes to keymeter.
    pub access_log_port: Option<u16>,
}

/// Name of the http filter that moves `x-billing-*` response headers into metadata.
pub const HEADER_TO_METADATA_FILTER: &str = "envoy.filters.http.header_to_metadata";
/// Name of the access logger that streams to keymeter.
pub const GRPC_ACCESS_LOGGER: &str = "envoy.access_loggers.http_grpc";
/// The cluster that [`DeployConfigOptions::access_log_port`] adds.
pub const ACCESS_LOG_CAPTURE_CLUSTER: &str = "access_log_capture";

/// [`render_deploy_config`] without the header_to_metadata filter (see
/// [`DeployConfigOptions::without_header_to_metadata`]).
pub fn render_deploy_config_without_header_to_metadata(ports: EnvoyPorts) -> String {
    render_deploy_config_with(
        ports,
        DeployConfigOptions {
            without_header_to_metadata: true,
            ..Default::default()
        },
    )
}

/// [`render_deploy_config`] changed as `options` say. Edits are textual and
/// assert that what they edit exists, so a reshaped envoy.yaml fails loudly.
pub fn render_deploy_config_with(ports: EnvoyPorts, options: DeployConfigOptions) -> String {
    let mut yaml = render_deploy_config(ports);
    if options.without_header_to_metadata {
        yaml = remove_list_item(&yaml, &format!("- name: {HEADER_TO_METADATA_FILTER}"));
    }
    if let Some(port) = options.access_log_port {
        yaml = redirect_access_log(&yaml, port);
    }
    yaml
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// Removes the YAML list item that starts with the line `item` (trimmed)
/// and every following line indented deeper than its dash.
fn remove_list_item(yaml: &str, item: &str) -> String {
    let mut out = String::with_capacity(yaml.len());
    let mut removing: Option<usize> = None;
    let mut found = 0;
    for line in yaml.lines() {
        if let Some(indent) = removing {
            if line.trim().is_empty() || indent_of(line) > indent {
                continue;
            }
            removing = None;
        }
        if line.trim() == item {
            found += 1;
            removing = Some(indent_of(line));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    assert_eq!(found, 1, "expected `{item}` exactly once in envoy.yaml");
    out
}

/// Points the gRPC access logger at a new cluster for 127.0.0.1:`port`.
fn redirect_access_log(yaml: &str, port: u16) -> String {
    let mut out = String::with_capacity(yaml.len() + 1024);
    let mut logger_indent: Option<usize> = None;
    let (mut rewritten, mut added) = (0, 0);
    for line in yaml.lines() {
        let trimmed = line.trim();
        if let Some(indent) = logger_indent
            && !trimmed.is_empty()
            && indent_of(line) <= indent
        {
            logger_indent = None;
        }
        if trimmed == format!("- name: {GRPC_ACCESS_LOGGER}") {
            logger_indent = Some(indent_of(line));
        }
        if logger_indent.is_some() && trimmed == "cluster_name: keymeter" {
            let indent = &line[..indent_of(line)];
            out.push_str(&format!(
                "{indent}cluster_name: {ACCESS_LOG_CAPTURE_CLUSTER}\n"
            ));
            rewritten += 1;
            continue;
        }
        out.push_str(line);
        out.push('\n');
        if trimmed == "clusters:" {
            let item = " ".repeat(indent_of(line) + 2);
            out.push_str(&access_log_cluster(&item, port));
            added += 1;
        }
    }
    assert_eq!(rewritten, 1, "the access logger's `cluster_name: keymeter`");
    assert_eq!(added, 1, "`clusters:` in envoy.yaml");
    out
}

fn access_log_cluster(indent: &str, port: u16) -> String {
    let cluster = format!(
        r#"- name: {ACCESS_LOG_CAPTURE_CLUSTER}
  type: STATIC
  connect_timeout: 0.25s
  typed_extension_protocol_options:
    envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
      "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
      explicit_http_config:
        http2_protocol_options: {{}}
  load_assignment:
    cluster_name: {ACCESS_LOG_CAPTURE_CLUSTER}
    endpoints:
      - lb_endpoints:
          - endpoint:
              address:
                socket_address:
                  address: 127.0.0.1
                  port_value: {port}
"#
    );
    cluster.lines().map(|l| format!("{indent}{l}\n")).collect()
}

/// Runs `envoy --mode validate -c path` and asserts that it succeeds.
pub fn validate_envoy_config(path: impl AsRef<Path>) {
    let path = path.as_ref();
    if let Err(log) = envoy_accepts(path) {
        panic!("envoy rejected {}:\n{log}", path.display());
    }
}

/// `envoy --mode validate -c path`: `Err` with Envoy's output if Envoy rejects
/// the config. For tests that also show a broken config is refused.
pub fn envoy_accepts(path: &Path) -> Result<(), String> {
    let out = Command::new(envoy_bin())
        .args([
            "--mode",
            "validate",
            "--disable-hot-restart",
            "-l",
            "warning",
            "-c",
        ])
        .arg(path)
        .output()
        .expect("run envoy --mode validate");
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

pub struct Envoy {
    // Field order matters: the process must die before its dir is removed.
    _process: ChildGuard,
    admin_port: u16,
    /// `(listener name, bound port)`, in config order.
    listeners: Vec<(String, u16)>,
    _dir: TestDir,
}

impl Envoy {
    /// Envoy with the deployed config, routing to the given upstream ports.
    pub async fn start(ports: EnvoyPorts) -> Envoy {
        Self::start_with_config(render_deploy_config(ports)).await
    }

    /// Envoy with the local-mode config (`deploy/envoy/envoy-local.yaml`): it is
    /// `/ready` only once keymeter's first key list arrived (or the fetch timed out).
    pub async fn start_local(ports: EnvoyPorts) -> Envoy {
        Self::start_with_config(render_local_config(ports)).await
    }

    /// Envoy with any bootstrap config. It must have an `admin` section; ports
    /// may be fixed or 0 (the bound ports are read back from the admin API).
    /// Returns once `/ready` answers 200 and every listener accepts TCP.
    ///
    /// Log level is `warning`; set `ENVOY_LOG_LEVEL=debug` to see more.
    pub async fn start_with_config(yaml: String) -> Envoy {
        let dir = TestDir::new("envoy");
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, yaml).expect("write envoy.yaml");
        let admin_address_file = dir.path().join("admin-address.txt");
        let level = std::env::var("ENVOY_LOG_LEVEL").unwrap_or_else(|_| "warning".into());

        let mut command = Command::new(envoy_bin());
        command
            .arg("-c")
            .arg(&config_path)
            // Several Envoys run at once under `cargo test`: without this the
            // second one fails on the hot-restart shared memory (base id 0).
            .arg("--disable-hot-restart")
            .args(["-l", &level])
            // Envoy writes the bound admin address here once it listens.
            .arg("--admin-address-path")
            .arg(&admin_address_file);
        let mut process = ChildGuard::spawn("envoy", command, dir.path());

        let read_admin_port = || {
            std::fs::read_to_string(&admin_address_file)
                .ok()
                .and_then(|s| s.trim().rsplit_once(':')?.1.parse::<u16>().ok())
        };
        process
            .wait_for("envoy admin address file", STARTUP_TIMEOUT, || {
                std::future::ready(read_admin_port().is_some())
            })
            .await;
        let admin_port = read_admin_port().expect("admin port");

        let ready_url = format!("http://127.0.0.1:{admin_port}/ready");
        process
            .wait_for_http_ok("envoy /ready to return 200", &ready_url, STARTUP_TIMEOUT)
            .await;

        let listeners = match fetch_listeners(admin_port).await {
            Ok(listeners) => listeners,
            Err(e) => process.fail(&format!("reading /listeners: {e}")),
        };
        for (name, port) in &listeners {
            let port = *port;
            process
                .wait_for(
                    &format!("envoy listener {name} to accept on port {port}"),
                    STARTUP_TIMEOUT,
                    || port_accepts(port),
                )
                .await;
        }

        Envoy {
            _process: process,
            admin_port,
            listeners,
            _dir: dir,
        }
    }

    /// URL on the first listener, e.g. `url("/v1/chat")`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.listener_port())
    }

    /// Port of the first listener in the config.
    pub fn listener_port(&self) -> u16 {
        self.listeners.first().expect("config has no listener").1
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// GET an admin endpoint, returning the body (panics on non-2xx).
    pub async fn admin_get(&self, path: &str) -> String {
        let response = http_client()
            .get(self.admin_url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET admin {path}: {e}"));
        assert!(
            response.status().is_success(),
            "GET admin {path}: {}",
            response.status()
        );
        response.text().await.expect("admin body")
    }

    /// Value of one counter or gauge (e.g. `http.ingress_http.ext_authz.denied`);
    /// 0 if Envoy has not created it yet (stats appear lazily).
    pub async fn stat(&self, name: &str) -> u64 {
        let body = self.admin_get("/stats").await;
        body.lines()
            .filter_map(|line| line.split_once(": "))
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Whether every host of `cluster` currently passes active health checks.
    pub async fn cluster_healthy(&self, cluster: &str) -> bool {
        let body = self.admin_get("/clusters").await;
        let flags: Vec<&str> = body
            .lines()
            .filter(|l| l.starts_with(&format!("{cluster}::")) && l.contains("::health_flags::"))
            .filter_map(|l| l.rsplit("::").next())
            .collect();
        !flags.is_empty() && flags.iter().all(|f| *f == "healthy")
    }
}

async fn fetch_listeners(admin_port: u16) -> Result<Vec<(String, u16)>, String> {
    let url = format!("http://127.0.0.1:{admin_port}/listeners?format=json");
    let json: serde_json::Value = http_client()
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let statuses = json["listener_statuses"]
        .as_array()
        .ok_or_else(|| format!("unexpected /listeners answer: {json}"))?;
    statuses
        .iter()
        .map(|s| {
            let name = s["name"].as_str().unwrap_or_default().to_owned();
            let port = s["local_address"]["socket_address"]["port_value"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| format!("listener without TCP port: {s}"))?;
            Ok((name, port))
        })
        .collect()
}

/// [`render_deploy_config`] with more endpoints in the `keymeter` cluster, one per
/// port of `more_keymeter_grpc`, after the one at `ports.keymeter_grpc`: several
/// keymeter replicas behind one Envoy. Envoy balances both the ext_authz Checks and
/// the access-log streams over them (round robin), with the deployed health checks.
pub fn render_deploy_config_with_keymeter_replicas(
    ports: EnvoyPorts,
    more_keymeter_grpc: &[u16],
) -> String {
    let yaml = render_deploy_config(ports);
    let lines: Vec<&str> = yaml.lines().collect();
    let port_line = format!("port_value: {}", ports.keymeter_grpc);
    let at: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].trim() == port_line)
        .collect();
    assert_eq!(
        at.len(),
        1,
        "`{port_line}` exactly once in the rendered config"
    );
    let last = at[0];
    // `- endpoint:` / `address:` / `socket_address:` / `address: 127.0.0.1` / `port_value:`
    assert!(
        last >= 4 && lines[last - 4].trim() == "- endpoint:",
        "keymeter's endpoint is no longer shaped as expected in envoy.yaml"
    );
    let template = &lines[last - 4..last];
    let indent = &lines[last][..indent_of(lines[last])];
    let mut out = String::with_capacity(yaml.len() + 256 * more_keymeter_grpc.len());
    for (i, line) in lines.iter().enumerate() {
        out.push_str(line);
        out.push('\n');
        if i == last {
            for port in more_keymeter_grpc {
                for t in template {
                    out.push_str(t);
                    out.push('\n');
                }
                out.push_str(&format!("{indent}port_value: {port}\n"));
            }
        }
    }
    out
}
