//! The `keymeter` binary's command line: help, configuration errors with exit code 64
//! naming the key, and the hint towards dev mode.

use std::process::{Command, Output};

fn keymeter(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keymeter"));
    cmd.args(args).env_remove("KEYMETER_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run keymeter")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_config(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keymeter.toml");
    std::fs::write(&path, text).unwrap();
    let p = path.to_string_lossy().into_owned();
    (dir, p)
}

#[test]
fn help_lists_the_config_flag_dev_mode_and_env_overrides() {
    let o = keymeter(&["--help"], &[]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for needle in ["--config", "dev", "KEYMETER_MQTT_PASSWORD"] {
        assert!(out.contains(needle), "--help mentions {needle}:\n{out}");
    }
}

#[test]
fn no_config_is_a_usage_error_pointing_at_dev_mode() {
    let o = keymeter(&[], &[]);
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("keymeter dev"), "{}", stderr(&o));
}

#[test]
fn config_without_a_broker_is_an_error_pointing_at_dev_mode() {
    let (_d, path) = write_config("[log]\nformat = \"json\"\n");
    let o = keymeter(&["--config", &path], &[]);
    assert_eq!(o.status.code(), Some(64));
    let e = stderr(&o);
    assert!(e.contains("`mqtt`") && e.contains("keymeter dev"), "{e}");
}

#[test]
fn bad_values_exit_64_naming_the_key() {
    let cases = [
        ("[mqtt]\nhost = \"b\"\nport = \"x\"\n", "mqtt.port"),
        ("[mqtt]\nhost = \"b\"\ncolour = 1\n", "colour"),
        (
            "[mqtt]\nhost = \"b\"\n[check]\nkey_headers = []\n",
            "check.key_headers",
        ),
        (
            "[mqtt]\nhost = \"b\"\n[mqtt.tls]\nca_file = \"/nonexistent.pem\"\n",
            "mqtt.tls.ca_file",
        ),
        (
            "[mqtt]\nhost = \"b\"\n[log]\nformat = \"xml\"\n",
            "log.format",
        ),
        ("[mqtt\nhost = ", "not valid TOML"),
        (
            "[listen]\ngrpc_max_connections = 0\n[mqtt]\nhost = \"b\"\n",
            "listen.grpc_max_connections",
        ),
        (
            "[listen]\nadmin_max_connections = 0\n[mqtt]\nhost = \"b\"\n",
            "listen.admin_max_connections",
        ),
        (
            "[listen]\ngrpc_keepalive_interval_secs = 0\n[mqtt]\nhost = \"b\"\n",
            "listen.grpc_keepalive_interval_secs",
        ),
        (
            "[listen]\ngrpc_keepalive_timeout_secs = 601\n[mqtt]\nhost = \"b\"\n",
            "listen.grpc_keepalive_timeout_secs",
        ),
        (
            "[listen]\nadmin_header_read_timeout_ms = 10\n[mqtt]\nhost = \"b\"\n",
            "listen.admin_header_read_timeout_ms",
        ),
    ];
    for (text, key) in cases {
        let (_d, path) = write_config(text);
        let o = keymeter(&["--config", &path, "--check-config"], &[]);
        assert_eq!(o.status.code(), Some(64), "{text}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(key),
            "error for {text:?} names {key}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn environment_overrides_are_validated_and_secrets_not_echoed() {
    let (_d, path) = write_config("[mqtt]\nhost = \"b\"\n[mqtt.tls]\nenabled = false\n");
    let o = keymeter(
        &["--config", &path, "--check-config"],
        &[
            ("KEYMETER_MQTT_PORT", "eighty"),
            ("KEYMETER_MQTT_PASSWORD", "hunter2"),
        ],
    );
    assert_eq!(o.status.code(), Some(64));
    let e = stderr(&o);
    assert!(e.contains("KEYMETER_MQTT_PORT"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
    let o = keymeter(
        &["--config", &path, "--check-config"],
        &[("KEYMETER_MQTT_PASSWORD", "hunter2")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("hunter2"));
}

#[test]
fn the_example_config_is_valid_apart_from_its_example_paths() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/keymeter.example.toml"
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    // --check-config parses the CA: an empty file is refused, a real CA passes.
    std::fs::write(&ca, "").unwrap();
    let text = example.replace("/etc/keymeter/tls/broker-ca.pem", &ca.to_string_lossy());
    let path = dir.path().join("k.toml");
    std::fs::write(&path, text).unwrap();
    let o = keymeter(
        &["--config", &path.to_string_lossy(), "--check-config"],
        &[],
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(stderr(&o).contains("ca_file"), "{}", stderr(&o));

    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = params
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    let text = example.replace("/etc/keymeter/tls/broker-ca.pem", &ca.to_string_lossy());
    let path = dir.path().join("k.toml");
    std::fs::write(&path, text).unwrap();
    let o = keymeter(
        &["--config", &path.to_string_lossy(), "--check-config"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}
