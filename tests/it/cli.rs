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
    for needle in ["--config", "dev", "KEYMETER_CONFIG"] {
        assert!(out.contains(needle), "--help mentions {needle}:\n{out}");
    }
    // Every environment override, in --help and in the README's list.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for var in keymeter::config::env_override_names() {
        assert!(out.contains(var), "--help mentions {var}:\n{out}");
        assert!(
            readme.contains(&format!("`{var}`")),
            "the README lists {var}"
        );
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
        ("[mqtt]\nhost = \"b\"\nport = x\n", "line 3, column 8"),
        // What a start would stumble on, found without starting.
        (
            "[mqtt]\nhost = \"b\"\n[outbox]\ndir = \"/proc/version/outbox\"\n",
            "outbox.dir",
        ),
        (
            "[mqtt]\nhost = \"b\"\n[keys]\nfile = \"/nonexistent/keys.json\"\n",
            "keys.file",
        ),
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

#[test]
fn check_config_reads_the_keys_file_and_the_grpc_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.json");
    std::fs::write(
        &keys,
        r#"{"keys": [{"app_id": "a", "api_key": "", "status": "ok"}]}"#,
    )
    .unwrap();
    let base = format!(
        "[mqtt]\nhost = \"b\"\n[outbox]\ndir = \"{}\"\n",
        dir.path().join("outbox").display()
    );
    let (_d, path) = write_config(&format!("{base}[keys]\nfile = \"{}\"\n", keys.display()));
    let o = keymeter(&["--config", &path, "--check-config"], &[]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("keys.file"), "{}", stderr(&o));
    assert!(!dir.path().join("outbox").exists(), "nothing is created");

    // A certificate with another certificate's key.
    let cert = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let ((a_cert, a_key), (_, b_key)) = (cert("a"), cert("b"));
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let tls = |key: &str| {
        format!(
            "{base}[listen]\ngrpc = \"127.0.0.1:9191\"\n[listen.grpc_tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            write("cert.pem", &a_cert),
            write("key.pem", key)
        )
    };
    let (_d, path) = write_config(&tls(&b_key));
    let o = keymeter(&["--config", &path, "--check-config"], &[]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("listen.grpc_tls.key_file"),
        "{}",
        stderr(&o)
    );
    let (_d, path) = write_config(&tls(&a_key));
    let o = keymeter(&["--config", &path, "--check-config"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
}
