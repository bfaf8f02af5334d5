//! The one MQTT connection of the process (the billing SDK's "singleton"): TLS by
//! default, reconnect with capped backoff, key sync subscription, key-list requests
//! after every (re)connect, and heartbeats.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS, Transport};
use rustls::ClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::metrics::Metrics;
use crate::config::{Config, TlsConfig};
use crate::keys::KeyStore;
use crate::keys::sync::{apply_billing_message, now_ms};

/// Requests queued towards the event loop; publishers wait (never drop) when full.
const CLIENT_QUEUE: usize = 256;
/// First reconnect delay; doubles up to `mqtt.reconnect_max_secs`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Key update messages waiting to be parsed; the event loop waits when it is full.
const KEY_UPDATE_QUEUE: usize = 16;

/// Connection state as `/readyz` and logs report it.
#[derive(Default)]
pub struct MqttStatus {
    connected: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// A key list was requested and no `keys_update` has arrived since.
    awaiting_keys: AtomicBool,
}

impl MqttStatus {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// The last connection error, if the connection is not up.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set(&self, connected: bool, error: Option<String>) {
        self.connected.store(connected, Ordering::Release);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }
}

/// A handle to the connection: the client to publish with and its status.
#[derive(Clone)]
pub struct MqttLink {
    pub client: AsyncClient,
    pub status: Arc<MqttStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error("mqtt.tls: {0}")]
    Tls(String),
}

/// Builds the broker connection options, TLS included. Fails on unreadable or invalid
/// certificate files so that a bad path stops start-up instead of every connection.
pub fn options(config: &Config) -> Result<MqttOptions, MqttSetupError> {
    let m = &config.mqtt;
    let mut opts = MqttOptions::new(config.client_id(), m.host.clone(), m.port);
    opts.set_keep_alive(Duration::from_secs(m.keep_alive_secs));
    // Key lists can be large; bigger-than-configured messages are still rejected (and
    // counted) by the parser, this only keeps the connection from failing first.
    opts.set_max_packet_size(
        config.keys.max_update_bytes.saturating_mul(2).max(1 << 20),
        1 << 20,
    );
    opts.set_clean_session(true);
    if !m.username.is_empty() || !m.password.expose().is_empty() {
        opts.set_credentials(m.username.clone(), m.password.expose().to_string());
    }
    if m.tls.enabled {
        let tls = tls_config(&m.tls)?;
        opts.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
        ));
    }
    Ok(opts)
}

/// rustls client config: TLS 1.2+, system roots or the configured CA, optional client
/// certificate, or (explicit opt-out) no verification at all.
pub fn tls_config(tls: &TlsConfig) -> Result<ClientConfig, MqttSetupError> {
    let err = |what: &str, e: &dyn std::fmt::Display| MqttSetupError::Tls(format!("{what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("protocol versions", &e))?;
    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &tls.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| err(&format!("ca_file {}", path.display()), &e))?;
                let (added, _) = roots.add_parsable_certificates(certs);
                if added == 0 {
                    return Err(MqttSetupError::Tls(format!(
                        "ca_file {}: no usable CA certificate",
                        path.display()
                    )));
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err(MqttSetupError::Tls(
                        "no system trust roots found; set mqtt.tls.ca_file".into(),
                    ));
                }
            }
        }
        builder.with_root_certificates(roots)
    };
    match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| err(&format!("client_cert_file {}", cert.display()), &e))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| err(&format!("client_key_file {}", key.display()), &e))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| err("client certificate", &e))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// Accepts any broker certificate (`insecure_skip_verify`); signatures are still
/// checked so the handshake itself stays sound.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Starts the connection: the event loop task, the key-update applier and the
/// heartbeat. All stop when `shutdown` is cancelled.
pub fn start(
    config: &Config,
    keys: Arc<KeyStore>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<MqttLink, MqttSetupError> {
    let opts = options(config)?;
    let m = &config.mqtt;
    if m.tls.enabled && m.tls.insecure_skip_verify {
        tracing::warn!(
            host = %m.host,
            "mqtt.tls.insecure_skip_verify is ON: the broker's certificate is NOT verified; \
             anyone on the network path can impersonate the billing broker"
        );
    } else if !m.tls.enabled {
        tracing::warn!(host = %m.host, "mqtt.tls.enabled is false: billing traffic and the MQTT password travel in clear text");
    }
    tracing::info!(host = %m.host, port = m.port, client_id = %opts.client_id(), tls = m.tls.enabled, "connecting to the billing broker");
    let (client, mut eventloop) = AsyncClient::new(opts, CLIENT_QUEUE);
    let status = Arc::new(MqttStatus::default());
    let link = MqttLink {
        client: client.clone(),
        status: status.clone(),
    };

    let (updates_tx, mut updates_rx) = mpsc::channel::<Vec<u8>>(KEY_UPDATE_QUEUE);
    {
        let keys = keys.clone();
        let metrics = metrics.clone();
        let max = config.keys.max_update_bytes;
        tracker.spawn(async move {
            // Parsing a large key list takes a while: keep it off the async workers,
            // one message at a time so updates apply in arrival order.
            while let Some(payload) = updates_rx.recv().await {
                let (k, m) = (keys.clone(), metrics.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    apply_billing_message(&k, &m, &payload, max)
                })
                .await;
            }
        });
    }

    let topics = config.topics.clone();
    let max_backoff = Duration::from_secs(m.reconnect_max_secs);
    let target = format!("{}:{}", m.host, m.port);
    {
        let client = client.clone();
        let status = status.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let mut backoff = INITIAL_BACKOFF;
            let mut failures: u64 = 0;
            loop {
                let event = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    e = eventloop.poll() => e,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if ack.code != ConnectReturnCode::Success {
                            continue; // rumqttc reports refusals as errors below
                        }
                        backoff = INITIAL_BACKOFF;
                        failures = 0;
                        status.set(true, None);
                        metrics.mqtt_connected.set(1);
                        metrics.mqtt_connections.inc();
                        tracing::info!(broker = %target, "connected to the billing broker");
                        // Clean session: subscribe again and ask for the full key list
                        // after every (re)connect. try_* so the loop never waits on itself.
                        if let Err(e) = client.try_subscribe(topics.keys_update.clone(), QoS::AtLeastOnce) {
                            tracing::error!(error = %e, "cannot queue key update subscription");
                        }
                        request_keys(&client, &topics.keys_request, &status);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topics.keys_update => {
                        status.awaiting_keys.store(false, Ordering::Release);
                        if updates_tx.send(p.payload.to_vec()).await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let was_connected = status.is_connected();
                        let message = describe(&e);
                        status.set(false, Some(message.clone()));
                        metrics.mqtt_connected.set(0);
                        metrics.mqtt_connection_errors.inc();
                        failures += 1;
                        // Loud on the first failure and on losing a connection, then
                        // once a minute-ish at the capped backoff.
                        if was_connected || failures == 1 || backoff >= max_backoff {
                            tracing::error!(broker = %target, error = %message, retry_in_ms = backoff.as_millis() as u64,
                                "billing broker connection failed; Checks keep answering from the key store");
                        } else {
                            tracing::debug!(broker = %target, error = %message, "billing broker connection failed");
                        }
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(max_backoff);
                    }
                }
            }
            status.set(false, None);
            metrics.mqtt_connected.set(0);
            let _ = client.try_disconnect();
        });
    }

    {
        let client = client.clone();
        let status = status.clone();
        let topics = config.topics.clone();
        let mut heartbeat = tokio::time::interval(Duration::from_secs(m.heartbeat_interval_secs));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(Duration::from_secs(m.keys_request_retry_secs));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        retry.reset(); // the first request goes out on ConnAck, not now
        tracker.spawn(async move {
            loop {
                let beat = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = heartbeat.tick() => true,
                    _ = retry.tick() => false,
                };
                if !status.is_connected() {
                    continue;
                }
                if !beat {
                    if status.awaiting_keys.load(Ordering::Acquire) {
                        tracing::warn!("no key list from the billing system since the last request; asking again");
                        request_keys(&client, &topics.keys_request, &status);
                    }
                    continue;
                }
                let beat =
                    serde_json::json!({ "type": "heartbeat", "timestamp": now_ms() }).to_string();
                if client
                    .try_publish(topics.heartbeat.clone(), QoS::AtMostOnce, false, beat)
                    .is_ok()
                {
                    metrics.heartbeats_sent.inc();
                }
            }
        });
    }
    Ok(link)
}

/// Publishes `{"timestamp": ...}` on the key request topic; the billing system answers
/// with the full list on the update topic.
fn request_keys(client: &AsyncClient, topic: &str, status: &MqttStatus) {
    let request = serde_json::json!({ "timestamp": now_ms() }).to_string();
    // try_publish: callers run inside the event loop's task and must never wait on it.
    match client.try_publish(topic.to_string(), QoS::AtLeastOnce, false, request) {
        Ok(()) => status.awaiting_keys.store(true, Ordering::Release),
        Err(e) => tracing::error!(error = %e, "cannot queue key list request"),
    }
}

/// A connection error in words an operator can act on.
fn describe(e: &rumqttc::ConnectionError) -> String {
    use rumqttc::ConnectionError as E;
    match e {
        E::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => {
            "broker refused the login: bad username or password".into()
        }
        E::ConnectionRefused(ConnectReturnCode::NotAuthorized) => {
            "broker refused the login: not authorized".into()
        }
        E::Tls(t) => format!("TLS handshake with the broker failed: {t}"),
        other => other.to_string(),
    }
}
