//! The `keymeter` binary as a child process, as operators run it: a config file on
//! loopback ports, a plain-text local broker. For tests of signals, restarts and logs;
//! everything else runs keymeter in-process (`keymeter.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::ChildGuard;

/// Writes `keymeter.toml` into `dir`: `[listen]` on `grpc` and `admin` (loopback),
/// `[mqtt]` to a plain-text broker on `broker_port` plus the `mqtt_extra` lines, then
/// `rest` (`[keys]`, `[outbox]`, `[log]` ...). Returns its path.
pub fn write_config(
    dir: &Path,
    (grpc, admin): (u16, u16),
    broker_port: u16,
    mqtt_extra: &str,
    rest: &str,
) -> PathBuf {
    let path = dir.join("keymeter.toml");
    let toml = format!(
        "[listen]\ngrpc = \"127.0.0.1:{grpc}\"\nadmin = \"127.0.0.1:{admin}\"\n\
         [mqtt]\nhost = \"127.0.0.1\"\nport = {broker_port}\n{mqtt_extra}\n\
         [mqtt.tls]\nenabled = false\n\
         {rest}"
    );
    std::fs::write(&path, toml).unwrap();
    path
}

/// `keymeter --config CONFIG`, without `RUST_LOG` so the file's log level applies.
pub fn command(config: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keymeter"));
    command.arg("--config").arg(config).env_remove("RUST_LOG");
    command
}

/// Waits until the process's `/readyz` on `admin` answers 200 (failing with its logs
/// if it exits or `timeout` passes).
pub async fn wait_ready(process: &mut ChildGuard, admin: u16, timeout: Duration) {
    let url = format!("http://127.0.0.1:{admin}/readyz");
    process
        .wait_for_http_ok("keymeter /readyz returns 200", &url, timeout)
        .await;
}
