//! The real `keymeter` binary as an operator runs it: configuration file plus
//! environment overrides, JSON logs, SIGHUP reloads the keys file, SIGTERM stops it
//! cleanly, and no raw key ever reaches a log line.

mod support;

use std::time::Duration;

use keymeter::keys::KeyEntry;
use support::keymeter::{billing, check, http_status};
use support::{ChildGuard, Mosquitto, TestDir, binary, free_port, http_client};

const WAIT: Duration = Duration::from_secs(15);

async fn status(grpc: u16, key: &str) -> i32 {
    http_status(&check(grpc, &[("api-key", key)]).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_reloads_on_sighup_logs_json_and_stops_on_sigterm() {
    let dir = TestDir::new("process");
    let broker = Mosquitto::start().await;
    let _billing = billing(
        broker.port(),
        vec![KeyEntry::ok("app-1", "sk-from-billing")],
    )
    .await;
    let keys_file = dir.path().join("keys.json");
    binary::write_keys(&keys_file, vec![KeyEntry::ok("local", "sk-from-file")]);
    let config = dir.path().join("keymeter.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nhost = \"127.0.0.1\"\nport = 1\n[mqtt.tls]\nenabled = false\n\
             [keys]\nfile = \"{}\"\n# Only SIGHUP reloads within this test.\nfile_poll_interval_ms = 3600000\n\
             [log]\nformat = \"json\"\nlevel = \"debug\"\n",
            keys_file.display()
        ),
    )
    .unwrap();
    let (grpc, admin) = (free_port(), free_port());
    let mut cmd = binary::command(&config);
    // Deploy-time values from the environment win over the file.
    cmd.env("KEYMETER_MQTT_PORT", broker.port().to_string())
        .env("KEYMETER_GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
        .env("KEYMETER_ADMIN_LISTEN", format!("127.0.0.1:{admin}"));
    let mut keymeter = ChildGuard::spawn("keymeter", cmd, dir.path());
    let readyz = format!("http://127.0.0.1:{admin}/readyz");
    keymeter
        .wait_for("ready with keys from the broker", WAIT, || async {
            match http_client().get(&readyz).send().await {
                Ok(r) => r
                    .text()
                    .await
                    .unwrap_or_default()
                    .contains("mqtt: connected"),
                Err(_) => false,
            }
        })
        .await;
    keymeter
        .wait_for("billing keys applied", WAIT, || async {
            status(grpc, "sk-from-billing").await == 200
        })
        .await;
    assert_eq!(status(grpc, "sk-from-file").await, 200);
    assert_eq!(status(grpc, "sk-added-later").await, 401);

    binary::write_keys(
        &keys_file,
        vec![
            KeyEntry::ok("local", "sk-from-file"),
            KeyEntry::ok("local", "sk-added-later"),
        ],
    );
    keymeter.signal(libc::SIGHUP);
    keymeter
        .wait_for("SIGHUP reloads the keys file", WAIT, || async {
            status(grpc, "sk-added-later").await == 200
        })
        .await;

    let exit = keymeter.terminate(Duration::from_secs(10)).await;
    assert!(exit.success(), "SIGTERM is a clean stop: {exit}");

    let logs = std::fs::read_to_string(keymeter.stderr_log()).unwrap();
    let mut messages = Vec::new();
    for line in logs.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
        messages.push(v["message"].as_str().unwrap_or_default().to_string());
    }
    for expected in [
        "connected to the billing broker",
        "SIGHUP: reloading keys file",
        "SIGTERM received",
        "stopped",
    ] {
        assert!(
            messages.iter().any(|m| m == expected),
            "no log line {expected:?} in:\n{logs}"
        );
    }
    for key in ["sk-from-billing", "sk-from-file", "sk-added-later"] {
        assert!(!logs.contains(key), "raw key {key} in the logs:\n{logs}");
    }
}

/// `keymeter dev` as a newcomer runs it: from any directory, without `--keys` (the
/// sample keys are built in), and with a clean log: no ERROR line on a normal start
/// and stop, no colour codes when stderr is not a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_runs_anywhere_with_a_clean_log() {
    let cwd = TestDir::new("dev-anywhere");
    let (grpc, admin) = (free_port(), free_port());
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keymeter"));
    command
        .current_dir(cwd.path())
        .env_remove("RUST_LOG")
        .args(["dev", "--grpc", &format!("127.0.0.1:{grpc}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")]);
    let mut keymeter = ChildGuard::spawn("keymeter-dev", command, cwd.path());
    binary::wait_ready(&mut keymeter, admin, WAIT).await;
    assert_eq!(
        status(grpc, "sk-test-0001").await,
        200,
        "a built-in sample key"
    );
    assert_eq!(status(grpc, "sk-blocked").await, 403);
    let exit = keymeter.terminate(WAIT).await;
    assert!(exit.success(), "{exit:?}");
    let log = std::fs::read_to_string(keymeter.stderr_log()).unwrap();
    assert!(log.contains("NOT FOR PRODUCTION"), "{log}");
    assert!(log.contains("built-in samples"), "{log}");
    assert!(!log.contains(" ERROR "), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file: {log}");
}
