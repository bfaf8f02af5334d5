//! Smoke tests of the integration-test harness itself (tests/it/support) and of
//! deploy/envoy/envoy.yaml: real Envoy, real mosquitto, no keymeter involved.

use std::process::Command;
use std::time::Duration;

use crate::support::{
    Backend, ChildGuard, Envoy, EnvoyPorts, Mosquitto, MqttTestClient, TestDir, TestPki,
    deploy_config_path, free_port, http_client, local_config_path, mqtt_options, port_accepts,
    tls_transport, validate_envoy_config,
};
use rumqttc::ConnectionError;

const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// Subscribe, publish from a second client, receive it.
async fn assert_roundtrip(port: u16) {
    let mut subscriber = MqttTestClient::connect(mqtt_options("smoke-sub", port)).await;
    subscriber.subscribe("smoke/roundtrip").await;
    let publisher = MqttTestClient::connect(mqtt_options("smoke-pub", port)).await;
    publisher.publish("smoke/roundtrip", "hello").await;
    let message = subscriber.recv(RECV_TIMEOUT).await;
    assert_eq!(message.topic, "smoke/roundtrip");
    assert_eq!(&message.payload[..], b"hello");
}

#[test]
fn deploy_envoy_config_validates() {
    validate_envoy_config(deploy_config_path());
}

#[test]
fn local_mode_envoy_config_validates() {
    validate_envoy_config(local_config_path());
}

/// Every Envoy bootstrap anywhere under deploy/ passes `envoy --mode validate`, so none
/// of them can rot unnoticed.
#[test]
fn every_envoy_config_in_deploy_validates() {
    fn walk(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, found);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml")
                && std::fs::read_to_string(&path)
                    .unwrap()
                    .lines()
                    .any(|l| l.starts_with("static_resources:"))
            {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy"),
        &mut found,
    );
    assert!(
        found.contains(&deploy_config_path()) && found.contains(&local_config_path()),
        "deploy/envoy/envoy.yaml and envoy-local.yaml are found: {found:?}"
    );
    for path in &found {
        validate_envoy_config(path);
    }
    println!("validated {} Envoy configs: {found:?}", found.len());
}

#[test]
fn child_guard_kills_process_on_drop() {
    let dir = TestDir::new("guard");
    let mut command = Command::new("sleep");
    command.arg("1000");
    let guard = ChildGuard::spawn("sleep", command, dir.path());
    let pid = guard.pid().expect("running");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(guard);
    // Killed and reaped: the pid no longer exists (not even as a zombie).
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[tokio::test]
async fn mosquitto_plain_roundtrip_survives_stop_and_start_again() {
    let mut broker = Mosquitto::start().await;
    let port = broker.port();
    assert_eq!(broker.tls_port(), None);
    assert_roundtrip(port).await;

    broker.stop().await;
    assert!(
        !port_accepts(port).await,
        "port {port} still open after stop"
    );
    let refused = MqttTestClient::try_connect(mqtt_options("smoke-down", port)).await;
    assert!(matches!(refused, Err(ConnectionError::Io(_))));

    broker.start_again().await;
    assert_eq!(broker.port(), port);
    assert_roundtrip(port).await;
}

#[tokio::test]
async fn mosquitto_tls_trusts_only_the_test_ca() {
    let pki = TestPki::generate();
    let broker = Mosquitto::start_with_tls(&pki).await;
    let tls_port = broker.tls_port().expect("TLS listener");
    assert_ne!(tls_port, broker.port());

    let mut trusted = mqtt_options("smoke-tls", tls_port);
    trusted.set_transport(tls_transport(&pki.ca_cert));
    let mut client = MqttTestClient::connect(trusted).await;
    client.subscribe("smoke/tls").await;
    client.publish("smoke/tls", "over tls").await;
    assert_eq!(&client.recv(RECV_TIMEOUT).await.payload[..], b"over tls");

    let mut untrusted = mqtt_options("smoke-tls-untrusted", tls_port);
    untrusted.set_transport(tls_transport(&pki.other_ca_cert));
    match MqttTestClient::try_connect(untrusted).await {
        Err(ConnectionError::Tls(_)) => {}
        Err(other) => panic!("expected a TLS error, got {other:?}"),
        Ok(_) => panic!("connected to a broker whose cert is signed by an untrusted CA"),
    }

    // The plain listener is still there next to the TLS one.
    assert_roundtrip(broker.port()).await;
}

#[tokio::test]
async fn mosquitto_password_file_refuses_anonymous_and_wrong_password() {
    let broker = Mosquitto::start_with_password("keymeter", "s3cret").await;
    let port = broker.port();

    let anonymous = MqttTestClient::try_connect(mqtt_options("smoke-anon", port)).await;
    assert!(
        matches!(anonymous, Err(ConnectionError::ConnectionRefused(_))),
        "anonymous login was not refused"
    );

    let mut wrong = mqtt_options("smoke-wrong", port);
    wrong.set_credentials("keymeter", "nope");
    let wrong = MqttTestClient::try_connect(wrong).await;
    assert!(
        matches!(wrong, Err(ConnectionError::ConnectionRefused(_))),
        "wrong password was not refused"
    );

    let mut right = mqtt_options("smoke-right", port);
    right.set_credentials("keymeter", "s3cret");
    let mut client = MqttTestClient::connect(right).await;
    client.subscribe("smoke/auth").await;
    client.publish("smoke/auth", "ok").await;
    assert_eq!(&client.recv(RECV_TIMEOUT).await.payload[..], b"ok");
}

#[tokio::test]
async fn backend_echoes_and_records_requests() {
    let backend = Backend::start().await;
    let body: serde_json::Value = http_client()
        .get(backend.url("/direct?q=1"))
        .header("x-test", "yes")
        .send()
        .await
        .expect("call backend")
        .json()
        .await
        .expect("JSON body");
    assert_eq!(body["path"], "/direct?q=1");
    assert_eq!(body["headers"]["x-test"], "yes");
    let requests = backend.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "GET");
    assert_eq!(requests[0].header("X-Test"), Some("yes"));
}

#[tokio::test]
async fn envoy_fails_closed_without_keymeter() {
    let backend = Backend::start().await;
    let envoy = Envoy::start(EnvoyPorts {
        // Nothing listens here: the ext_authz cluster is down.
        keymeter_grpc: free_port(),
        backend: backend.port(),
    })
    .await;

    let response = http_client()
        .get(envoy.url("/v1/anything"))
        .header("api-key", "sk-test-0001")
        .send()
        .await
        .expect("request through envoy");
    assert_ne!(
        response.status(),
        200,
        "ext_authz down must not let requests through"
    );
    // status_on_error: ServiceUnavailable (not the default 403).
    assert_eq!(response.status(), 503);
    assert!(backend.requests().is_empty(), "request reached the backend");
    assert_eq!(envoy.stat("http.ingress_http.ext_authz.error").await, 1);
}
