//! The broker connection: TLS verified against a CA generated here, refused (with a
//! clear reason) when the broker's certificate is not trusted, and login errors; each
//! over MQTT 3.1.1 and MQTT 5 alike.

use std::time::Duration;

use crate::support::keymeter::{Keymeter, billing, http_status};
use crate::support::{Mosquitto, TestPki, wait_until};
use keymeter::Config;
use keymeter::config::{MqttProtocol, Secret};
use keymeter::keys::KeyEntry;

const WAIT: Duration = Duration::from_secs(15);

/// Every protocol keymeter speaks: what works over one must work over the other.
const PROTOCOLS: [MqttProtocol; 2] = [MqttProtocol::V311, MqttProtocol::V5];

fn tls_config(port: u16, ca: Option<&std::path::Path>) -> Config {
    let mut c = Config::for_local_broker("127.0.0.1", port);
    c.mqtt.tls.enabled = true;
    c.mqtt.tls.ca_file = ca.map(|p| p.to_path_buf());
    c
}

/// Waits until keymeter counts a failed broker connection.
async fn connection_error_counted(keymeter: &Keymeter) {
    wait_until("a connection error is counted", WAIT, || async {
        keymeter
            .metric("keymeter_mqtt_connection_errors_total")
            .await
            >= 1.0
    })
    .await;
}

/// Waits until keymeter reports a failed connection and returns the `/readyz` body.
async fn refused(keymeter: &Keymeter) -> String {
    connection_error_counted(keymeter).await;
    let (code, body) = keymeter.readyz().await;
    assert_eq!(code, 503, "no keys can have arrived: {body}");
    assert_eq!(keymeter.metric("keymeter_mqtt_connected").await, 0.0);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_test_ca_connects_and_syncs_keys() {
    let pki = TestPki::generate();
    let broker = Mosquitto::start_with_tls(&pki).await;
    let _billing = billing(broker.port(), vec![KeyEntry::ok("app-1", "sk-tls")]).await;
    for protocol in PROTOCOLS {
        let mut config = tls_config(broker.tls_port().unwrap(), Some(&pki.ca_cert));
        config.mqtt.protocol = protocol;
        let keymeter = Keymeter::start_ready(config).await;
        assert_eq!(keymeter.metric("keymeter_mqtt_connected").await, 1.0);
        assert!(keymeter.readyz().await.1.contains("mqtt: connected"));
        assert_eq!(
            http_status(&keymeter.check(&[("api-key", "sk-tls")]).await),
            200,
            "{protocol:?}"
        );
        keymeter.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_broker_certificates_are_refused_with_a_clear_error() {
    let pki = TestPki::generate();
    let broker = Mosquitto::start_with_tls(&pki).await;
    let _billing = billing(broker.port(), vec![KeyEntry::ok("app-1", "sk-tls")]).await;
    let port = broker.tls_port().unwrap();

    for protocol in PROTOCOLS {
        // Without the test CA: system roots do not know it.
        let mut config = tls_config(port, None);
        config.mqtt.protocol = protocol;
        let keymeter = Keymeter::start(config).await;
        let body = refused(&keymeter).await;
        assert!(
            body.contains("TLS handshake with the broker failed"),
            "{protocol:?}: {body}"
        );
        assert!(body.contains("UnknownIssuer"), "{protocol:?}: {body}");
        keymeter.stop().await;

        // With an unrelated CA.
        let mut config = tls_config(port, Some(&pki.other_ca_cert));
        config.mqtt.protocol = protocol;
        let keymeter = Keymeter::start(config).await;
        let body = refused(&keymeter).await;
        assert!(body.contains("UnknownIssuer"), "{protocol:?}: {body}");
        keymeter.stop().await;
    }

    // The explicit opt-out connects (and is logged as a warning at start-up).
    let mut insecure = tls_config(port, None);
    insecure.mqtt.tls.insecure_skip_verify = true;
    let keymeter = Keymeter::start_ready(insecure).await;
    assert_eq!(keymeter.metric("keymeter_mqtt_connected").await, 1.0);
    keymeter.stop().await;
}

/// A certificate from the trusted CA, but for another host name: refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_for_another_host_name_is_refused() {
    let mut pki = TestPki::generate();
    pki.server_cert = pki.wrong_name_cert.clone();
    pki.server_key = pki.wrong_name_key.clone();
    let broker = Mosquitto::start_with_tls(&pki).await;
    let port = broker.tls_port().unwrap();
    let keymeter = Keymeter::start(tls_config(port, Some(&pki.ca_cert))).await;
    let body = refused(&keymeter).await;
    assert!(
        body.contains("TLS handshake with the broker failed"),
        "{body}"
    );
    assert!(
        body.contains("certificate not valid for name \"127.0.0.1\""),
        "{body}"
    );
    keymeter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_is_refused_with_a_wrong_password_and_works_with_the_right_one() {
    let broker = Mosquitto::start_with_password("keymeter", "right-password").await;
    for protocol in PROTOCOLS {
        let mut config = Config::for_local_broker("127.0.0.1", broker.port());
        config.mqtt.protocol = protocol;
        config.mqtt.username = "keymeter".into();
        config.mqtt.password = Secret("wrong-password".into());
        let keymeter = Keymeter::start(config.clone()).await;
        let body = refused(&keymeter).await;
        assert!(
            body.contains("bad username or password") || body.contains("not authorized"),
            "{protocol:?}: {body}"
        );
        assert!(!body.contains("wrong-password"), "{body}");
        let (_, metrics) = keymeter.admin_get("/metrics").await;
        assert!(!metrics.contains("password"), "no password in metrics");
        keymeter.stop().await;

        config.mqtt.password = Secret("right-password".into());
        let keymeter = Keymeter::start(config).await;
        wait_until("connected with the right password", WAIT, || async {
            keymeter.metric("keymeter_mqtt_connected").await == 1.0
        })
        .await;
        keymeter.stop().await;
    }
}

/// A broker whose TLS certificate is not trusted: the error shows on /readyz, and
/// Checks keep answering from the keys keymeter already has (fail-static).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_broker_leaves_checks_answering_from_the_key_store() {
    let pki = TestPki::generate();
    let broker = Mosquitto::start_with_tls(&pki).await;
    let dir = crate::support::TestDir::new("failstatic");
    let keys = dir.path().join("keys.json");
    crate::support::keymeter::write_keys(&keys, vec![KeyEntry::ok("app-1", "sk-local")]);
    let mut config = tls_config(broker.tls_port().unwrap(), Some(&pki.other_ca_cert));
    config.keys.file = Some(keys);
    let keymeter = Keymeter::start_ready(config).await;
    connection_error_counted(&keymeter).await;
    let (code, body) = keymeter.readyz().await;
    assert_eq!(code, 200, "keys are loaded: {body}");
    assert!(
        body.contains("TLS handshake with the broker failed"),
        "{body}"
    );
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-local")]).await),
        200
    );
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-other")]).await),
        401
    );
    keymeter.stop().await;
}
