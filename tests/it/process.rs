//! The real `keymeter` binary as an operator runs it: configuration file plus
//! environment overrides, JSON logs, SIGHUP reloads the keys file, SIGTERM stops it
//! cleanly, and no raw key ever reaches a log line.

use std::time::{Duration, Instant};

use crate::support::keymeter::{billing, check, http_status};
use crate::support::{ChildGuard, Mosquitto, TestDir, binary, free_port, http_client};
use keymeter::keys::KeyEntry;

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
    crate::support::keymeter::write_keys(&keys_file, vec![KeyEntry::ok("local", "sk-from-file")]);
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

    crate::support::keymeter::write_keys(
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

/// Two processes on one outbox would corrupt it: a second keymeter configured with the
/// same `outbox.dir` refuses to start, names the first one's pid, and exits 75
/// (EX_TEMPFAIL) while the first keeps serving; once the first has stopped, it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_keymeter_on_the_same_outbox_exits_naming_the_first() {
    let dir = TestDir::new("outbox-lock");
    let outbox = dir.path().join("outbox");
    let keys_file = dir.path().join("keys.json");
    crate::support::keymeter::write_keys(&keys_file, vec![KeyEntry::ok("local", "sk-lock-test")]);
    let rest = format!(
        "[keys]\nfile = \"{}\"\n[outbox]\ndir = \"{}\"\n",
        keys_file.display(),
        outbox.display()
    );
    let first_ports = (free_port(), free_port());
    let first_dir = TestDir::new("outbox-lock-first");
    let config = binary::write_config(first_dir.path(), first_ports, 1, "", &rest);
    let mut first = ChildGuard::spawn("keymeter-first", binary::command(&config), dir.path());
    binary::wait_ready(&mut first, first_ports.1, WAIT).await;
    let first_pid = first.pid().unwrap();

    let second_ports = (free_port(), free_port());
    let second_dir = TestDir::new("outbox-lock-second");
    let config = binary::write_config(second_dir.path(), second_ports, 1, "", &rest);
    let mut second = ChildGuard::spawn("keymeter-second", binary::command(&config), dir.path());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = second.exit_status() {
            break status;
        }
        if Instant::now() > deadline {
            second.fail("is still running next to the first");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let logs = second.logs();
    assert_eq!(
        status.code(),
        Some(75),
        "exit code EX_TEMPFAIL: {status}\n{logs}"
    );
    for part in [
        format!("pid {first_pid}"),
        outbox.display().to_string(),
        "another keymeter".to_string(),
    ] {
        assert!(logs.contains(&part), "{part:?} missing in:\n{logs}");
    }
    // The first one did not notice.
    assert_eq!(
        http_status(&check(first_ports.0, &[("api-key", "sk-lock-test")]).await),
        200
    );

    let exit = first.terminate(WAIT).await;
    assert!(exit.success(), "{exit}");
    second.start();
    binary::wait_ready(&mut second, second_ports.1, WAIT).await;
    assert_eq!(
        http_status(&check(second_ports.0, &[("api-key", "sk-lock-test")]).await),
        200
    );
}
