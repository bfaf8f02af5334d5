//! MQTT client side for tests: TLS configs and a small subscribe/publish client
//! (e.g. to play the billing system against keymeter through mosquitto).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Packet, Publish, QoS, TlsConfiguration,
    Transport,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::mpsc;

use super::STARTUP_TIMEOUT;

/// A rustls client config that trusts only the CA in `ca_pem` (ring provider,
/// since the crate builds rustls without a process-wide default provider).
pub fn rustls_client_config(ca_pem: &Path) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_pem)
        .unwrap_or_else(|e| panic!("read {}: {e}", ca_pem.display()));
    for cert in certs {
        roots.add(cert.expect("parse CA PEM")).expect("add CA");
    }
    assert!(!roots.is_empty(), "no certificate in {}", ca_pem.display());
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A rumqttc TLS transport trusting only the CA in `ca_pem`.
pub fn tls_transport(ca_pem: &Path) -> Transport {
    Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(rustls_client_config(
        ca_pem,
    ))))
}

/// Options for 127.0.0.1:`port` with a client id unique in this process
/// (mosquitto disconnects the older of two clients with the same id).
pub fn mqtt_options(name: &str, port: u16) -> MqttOptions {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = format!(
        "{name}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(5));
    options
}

/// A connected MQTT client whose event loop runs in the background.
/// Received publishes are queued for [`MqttTestClient::recv`]. After a
/// connection loss it reconnects, but (clean session) must re-subscribe.
pub struct MqttTestClient {
    client: AsyncClient,
    publishes: mpsc::UnboundedReceiver<Publish>,
    sub_acks: mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl MqttTestClient {
    /// Connects and waits for the broker's ConnAck; panics on failure.
    pub async fn connect(options: MqttOptions) -> MqttTestClient {
        let target = format!("{:?}", options.broker_address());
        Self::try_connect(options)
            .await
            .unwrap_or_else(|e| panic!("MQTT connect to {target} failed: {e}"))
    }

    /// Connects and waits for ConnAck; the first connection error is returned
    /// (TLS rejected, bad credentials, nothing listening, ...).
    pub async fn try_connect(options: MqttOptions) -> Result<MqttTestClient, ConnectionError> {
        let (client, mut event_loop) = AsyncClient::new(options, 100);
        let connected: Result<(), ConnectionError> = tokio::time::timeout(STARTUP_TIMEOUT, async {
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) = event_loop.poll().await? {
                    return Ok(());
                }
            }
        })
        .await
        .expect("no ConnAck nor error from the broker in time");
        connected?;

        let (publish_tx, publishes) = mpsc::unbounded_channel();
        let (sub_ack_tx, sub_acks) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match event_loop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = publish_tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = sub_ack_tx.send(());
                    }
                    Ok(_) => {}
                    // Broker gone: back off a little; the next poll reconnects.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Ok(MqttTestClient {
            client,
            publishes,
            sub_acks,
            task,
        })
    }

    /// Subscribes with QoS 1 and waits for the SubAck, so that a message
    /// published afterwards is guaranteed to be delivered.
    pub async fn subscribe(&mut self, topic: &str) {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
        tokio::time::timeout(Duration::from_secs(10), self.sub_acks.recv())
            .await
            .unwrap_or_else(|_| panic!("no SubAck for {topic}"))
            .expect("event loop ended");
    }

    /// Publishes with QoS 1 (queued; sent by the background event loop).
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("queue PUBLISH");
    }

    /// The next received message; panics after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Publish {
        tokio::time::timeout(timeout, self.publishes.recv())
            .await
            .unwrap_or_else(|_| panic!("no MQTT message within {timeout:?}"))
            .expect("event loop ended")
    }

    pub fn client(&self) -> &AsyncClient {
        &self.client
    }
}

impl Drop for MqttTestClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}
