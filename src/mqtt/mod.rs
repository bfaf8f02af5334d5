//! The one MQTT connection of the process (the billing SDK's "singleton"): TLS by
//! default, reconnect with capped backoff, key sync subscription, key-list requests
//! after every (re)connect, and heartbeats.
//!
//! - `protocol.rs`: MQTT 3.1.1 (the default, what the billing SDK speaks) and MQTT 5
//!   behind one face.
//! - `tls.rs`: the rustls configuration and the verifier of the explicit opt-out.
//! - `link.rs`: the connection itself: the reconnect and event loop, key requests,
//!   heartbeats.
//! - `inflight.rs`: every publish from its request to its PUBACK, the one place that
//!   knows which record a PUBACK acknowledges.
//! - `publisher.rs`: outbox records in flight until the broker acknowledges them.

mod inflight;
mod link;
mod protocol;
mod publisher;
mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, MqttProtocol};
use crate::keys::KeyStore;
use crate::keys::sync::apply_billing_message;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use inflight::InFlight;
use link::Connection;
pub use link::{Ignored, Published};
pub use protocol::{BrokerOptions, Refusal};
use publisher::Publisher;
pub use tls::tls_config;

/// Requests queued towards the event loop: above the largest record window
/// (`outbox.max_inflight`, a u16) plus key requests and heartbeats. Only the
/// connection task itself queues requests, so this is never filled by others.
const CLIENT_QUEUE: usize = 65_536 + 64;
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

/// A handle to the running connection. It offers no client: every request to the
/// broker is made by the connection task itself (see `inflight.rs` for why).
#[derive(Clone)]
pub struct MqttLink {
    pub status: Arc<MqttStatus>,
}

#[derive(Debug, thiserror::Error)]
pub enum MqttSetupError {
    #[error("mqtt.tls: {0}")]
    Tls(String),
    #[error("cannot start the broker connection thread: {0}")]
    Thread(std::io::Error),
}

/// Builds the broker connection options for the configured protocol, TLS included.
/// Fails on unreadable or invalid certificate files so that a bad path stops start-up
/// instead of every connection.
pub fn options(config: &Config) -> Result<BrokerOptions, MqttSetupError> {
    BrokerOptions::new(config)
}

/// Starts the connection task and the key-update applier. Both stop when `shutdown`
/// is cancelled. The connection task also publishes the `outbox`'s records.
pub fn start(
    config: &Config,
    keys: Arc<KeyStore>,
    metrics: Arc<Metrics>,
    outbox: Outbox,
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
    let protocol = match m.protocol {
        MqttProtocol::V311 => "3.1.1",
        MqttProtocol::V5 => "5",
    };
    tracing::info!(host = %m.host, port = m.port, client_id = %opts.client_id(), tls = m.tls.enabled, protocol, "connecting to the billing broker");
    let (client, eventloop) = opts.connect(CLIENT_QUEUE);
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
        out: InFlight::new(client, config.topics.clone()),
        status: status.clone(),
        metrics,
        topics: config.topics.clone(),
        target: format!("{}:{}", m.host, m.port),
        max_backoff: Duration::from_secs(m.reconnect_max_secs),
        heartbeat_every: Duration::from_secs(m.heartbeat_interval_secs),
        keys_retry_every: Duration::from_secs(m.keys_request_retry_secs),
        updates: updates_tx,
        publisher: Publisher::new(
            outbox,
            config.outbox.max_inflight,
            Duration::from_secs(m.reconnect_max_secs),
        ),
        refusals_in_a_row: 0,
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
    Ok(MqttLink { status })
}
