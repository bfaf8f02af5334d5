//! The one MQTT connection of the process (the billing SDK's "singleton"): TLS by
//! default, reconnect with capped backoff, key sync subscription, key-list requests
//! after every (re)connect, and heartbeats.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use crate::config::{Config, TlsConfig, Topics};
use crate::keys::KeyStore;
use crate::keys::sync::{apply_billing_message, now_ms};
use crate::outbox::Outbox;

/// Requests queued towards the event loop: above the largest record window
/// (`outbox.max_inflight`, a u16) plus key requests and heartbeats. Only the
/// connection task itself queues requests, so this is never filled by others.
const CLIENT_QUEUE: usize = 65_536 + 64;
/// First reconnect delay; doubles up to `mqtt.reconnect_max_secs`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// How long a stopping keymeter waits for PUBACKs of records already sent.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);
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
    #[error("cannot start the broker connection thread: {0}")]
    Thread(std::io::Error),
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

/// Starts the connection task and the key-update applier. Both stop when `shutdown`
/// is cancelled. With an `outbox`, the connection task also publishes its records.
pub fn start(
    config: &Config,
    keys: Arc<KeyStore>,
    metrics: Arc<Metrics>,
    outbox: Option<Outbox>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Result<MqttLink, MqttSetupError> {
    let mut opts = options(config)?;
    // Room for the record window plus key requests.
    opts.set_inflight(config.outbox.max_inflight.saturating_add(8));
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
    let (client, eventloop) = AsyncClient::new(opts, CLIENT_QUEUE);
    let status = Arc::new(MqttStatus::default());

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

    let connection = Connection {
        client: client.clone(),
        status: status.clone(),
        metrics,
        topics: config.topics.clone(),
        target: format!("{}:{}", m.host, m.port),
        max_backoff: Duration::from_secs(m.reconnect_max_secs),
        heartbeat_every: Duration::from_secs(m.heartbeat_interval_secs),
        keys_retry_every: Duration::from_secs(m.keys_request_retry_secs),
        updates: updates_tx,
        publisher: outbox.map(|outbox| Publisher {
            outbox,
            window: usize::from(config.outbox.max_inflight),
            sent: VecDeque::new(),
            unacked: HashMap::new(),
        }),
        draining: false,
    };
    // The connection runs on a thread (and runtime) of its own: under heavy gRPC load
    // the server's workers have long queues of access-log messages, and a PUBACK
    // waiting behind them keeps the in-flight window full and the broker idle. Its
    // own thread is woken by the kernel as soon as the broker answers.
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("keymeter-mqtt".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(connection.run(eventloop, shutdown)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the broker connection's runtime")
                }
            }
            let _ = stopped_tx.send(());
        })
        .map_err(MqttSetupError::Thread)?;
    tracker.spawn(async move {
        let _ = stopped_rx.await;
    });
    Ok(MqttLink { client, status })
}

/// What an outgoing PUBLISH was, so its PUBACK can be matched to a record.
enum Sent {
    Record { seq: u64, at: Instant },
    Other,
}

/// Publishes outbox records, at most `window` unacknowledged at a time, and acks
/// them in the outbox when the broker's PUBACK arrives.
///
/// rumqttc assigns packet ids inside its event loop and reports each as
/// `Outgoing::Publish(pkid)` in request order. Every publish of this connection is
/// requested from the connection task itself, so `sent` (request order) lines up
/// with those events. On a connection error rumqttc drops everything unacknowledged
/// (clean session), and so do we: the records go back to the outbox and are sent
/// again, with the same record id, after the reconnect.
struct Publisher {
    outbox: Outbox,
    window: usize,
    sent: VecDeque<Sent>,
    unacked: HashMap<u16, Sent>,
}

impl Publisher {
    fn in_flight(&self) -> usize {
        self.sent.len() + self.unacked.len()
    }
}

struct Connection {
    client: AsyncClient,
    status: Arc<MqttStatus>,
    metrics: Arc<Metrics>,
    topics: Topics,
    target: String,
    max_backoff: Duration,
    heartbeat_every: Duration,
    keys_retry_every: Duration,
    updates: mpsc::Sender<Vec<u8>>,
    publisher: Option<Publisher>,
    /// Shutting down: only acknowledgements are awaited, nothing new is sent.
    draining: bool,
}

impl Connection {
    /// The one task that polls the event loop and makes every publish.
    async fn run(mut self, mut eventloop: rumqttc::EventLoop, shutdown: CancellationToken) {
        let mut backoff = INITIAL_BACKOFF;
        let mut failures: u64 = 0;
        let mut heartbeat = tokio::time::interval(self.heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut keys_retry = tokio::time::interval(self.keys_retry_every);
        keys_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keys_retry.reset(); // the first request goes out on ConnAck
        loop {
            let connected = self.status.is_connected();
            let can_send = connected
                && self
                    .publisher
                    .as_ref()
                    .is_some_and(|p| p.in_flight() < p.window);
            let outbox = self.publisher.as_ref().map(|p| p.outbox.clone());
            let unsent = async move {
                match outbox {
                    Some(o) => o.unsent_available().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = eventloop.poll() => match event {
                    Ok(event) => {
                        if !self.on_event(event).await {
                            break;
                        }
                        if self.status.is_connected() {
                            backoff = INITIAL_BACKOFF;
                            failures = 0;
                        }
                    }
                    Err(e) => {
                        failures += 1;
                        self.on_error(&e, failures, backoff);
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(self.max_backoff);
                    }
                },
                _ = unsent, if can_send => self.fill_window(),
                _ = heartbeat.tick() => if connected { self.heartbeat() },
                _ = keys_retry.tick() => {
                    if connected && self.status.awaiting_keys.load(Ordering::Acquire) {
                        tracing::warn!("no key list from the billing system since the last request; asking again");
                        self.request_keys();
                    }
                }
            }
        }
        self.drain_in_flight(&mut eventloop).await;
        self.status.set(false, None);
        self.metrics.mqtt_connected.set(0);
        let _ = self.client.try_disconnect();
    }

    /// At shutdown, waits (at most [`SHUTDOWN_DRAIN`]) for the broker to acknowledge the
    /// records already sent, so the next start does not send them again. Nothing new is
    /// sent: records not yet sent stay in the outbox for the next start.
    async fn drain_in_flight(&mut self, eventloop: &mut rumqttc::EventLoop) {
        let in_flight = |c: &Connection| c.publisher.as_ref().map_or(0, Publisher::in_flight);
        let before = in_flight(self);
        if before == 0 || !self.status.is_connected() {
            return;
        }
        self.draining = true;
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
        while in_flight(self) > 0 {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(event)) => {
                    if !self.on_event(event).await {
                        break;
                    }
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let left = in_flight(self);
        tracing::info!(
            acknowledged = before - left.min(before),
            unacknowledged = left,
            "shutdown: waited for the broker's acknowledgements of records in flight"
        );
    }

    /// Handles one event; false stops the task.
    async fn on_event(&mut self, event: Event) -> bool {
        use rumqttc::Outgoing;
        match event {
            Event::Incoming(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                self.status.set(true, None);
                self.metrics.mqtt_connected.set(1);
                self.metrics.mqtt_connections.inc();
                tracing::info!(broker = %self.target, "connected to the billing broker");
                // Clean session: subscribe again and ask for the full key list after
                // every (re)connect. try_* so the task never waits on itself.
                if let Err(e) = self
                    .client
                    .try_subscribe(self.topics.keys_update.clone(), QoS::AtLeastOnce)
                {
                    tracing::error!(error = %e, "cannot queue key update subscription");
                }
                self.request_keys();
                self.fill_window();
            }
            Event::Incoming(Packet::Publish(p)) if p.topic == self.topics.keys_update => {
                self.status.awaiting_keys.store(false, Ordering::Release);
                self.metrics.key_request_pending.set(0);
                if self.updates.send(p.payload.to_vec()).await.is_err() {
                    return false;
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(p) = &mut self.publisher {
                    let sent = p.sent.pop_front();
                    if pkid != 0
                        && let Some(sent) = sent
                    {
                        p.unacked.insert(pkid, sent);
                    }
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(p) = &mut self.publisher
                    && let Some(Sent::Record { seq, at }) = p.unacked.remove(&ack.pkid)
                {
                    p.outbox.ack(seq);
                    self.metrics.records_published.inc();
                    self.metrics
                        .publish_latency
                        .observe(at.elapsed().as_secs_f64());
                }
                self.fill_window();
            }
            _ => {}
        }
        true
    }

    fn on_error(&mut self, e: &rumqttc::ConnectionError, failures: u64, backoff: Duration) {
        let was_connected = self.status.is_connected();
        let message = describe(e);
        self.status.set(false, Some(message.clone()));
        self.metrics.mqtt_connected.set(0);
        self.metrics.mqtt_connection_errors.inc();
        if let Some(p) = &mut self.publisher {
            // rumqttc starts a clean session: whatever was not acknowledged is gone
            // from it and must be sent again.
            p.sent.clear();
            p.unacked.clear();
            p.outbox.requeue_inflight();
        }
        // Loud on the first failure and on losing a connection, then at the capped
        // backoff only.
        if was_connected || failures == 1 || backoff >= self.max_backoff {
            tracing::error!(broker = %self.target, error = %message, retry_in_ms = backoff.as_millis() as u64,
                "billing broker connection failed; Checks keep answering from the key store");
        } else {
            tracing::debug!(broker = %self.target, error = %message, "billing broker connection failed");
        }
    }

    /// Hands outbox records to the client until the window is full.
    fn fill_window(&mut self) {
        if !self.status.is_connected() || self.draining {
            return;
        }
        let Some(p) = &mut self.publisher else {
            return;
        };
        let room = p.window.saturating_sub(p.in_flight());
        if room == 0 {
            return;
        }
        for record in p.outbox.take_unsent(room) {
            let result = self.client.try_publish(
                self.topics.report.clone(),
                QoS::AtLeastOnce,
                false,
                record.payload.to_vec(),
            );
            match result {
                Ok(()) => p.sent.push_back(Sent::Record {
                    seq: record.seq,
                    at: Instant::now(),
                }),
                Err(e) => {
                    // The request queue is sized above the window, so this means the
                    // event loop is gone; the records stay in the outbox.
                    tracing::error!(error = %e, "cannot queue a record for publishing");
                    p.sent.clear();
                    p.unacked.clear();
                    p.outbox.requeue_inflight();
                    return;
                }
            }
        }
    }

    fn heartbeat(&mut self) {
        let beat = serde_json::json!({ "type": "heartbeat", "timestamp": now_ms() }).to_string();
        if self
            .client
            .try_publish(self.topics.heartbeat.clone(), QoS::AtMostOnce, false, beat)
            .is_ok()
        {
            self.track_other();
            self.metrics.heartbeats_sent.inc();
        }
    }

    /// Publishes `{"timestamp": ...}` on the key request topic; the billing system
    /// answers with the full list on the update topic.
    fn request_keys(&mut self) {
        let request = serde_json::json!({ "timestamp": now_ms() }).to_string();
        match self.client.try_publish(
            self.topics.keys_request.clone(),
            QoS::AtLeastOnce,
            false,
            request,
        ) {
            Ok(()) => {
                self.track_other();
                self.status.awaiting_keys.store(true, Ordering::Release);
                self.metrics.key_request_pending.set(1);
            }
            Err(e) => tracing::error!(error = %e, "cannot queue key list request"),
        }
    }

    fn track_other(&mut self) {
        if let Some(p) = &mut self.publisher {
            p.sent.push_back(Sent::Other);
        }
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
