//! The connection task: connects and reconnects with capped backoff, subscribes to
//! key updates, asks for the key list after every (re)connect, sends heartbeats, and
//! feeds the publisher's records to the broker.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectReturnCode, Event, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::MqttStatus;
use super::publisher::Publisher;
use crate::admin::metrics::Metrics;
use crate::config::Topics;
use crate::keys::sync::now_ms;

/// First reconnect delay; doubles up to `mqtt.reconnect_max_secs`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// How long a stopping keymeter waits for PUBACKs of records already sent.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

pub(super) struct Connection {
    pub(super) client: AsyncClient,
    pub(super) status: Arc<MqttStatus>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) topics: Topics,
    pub(super) target: String,
    pub(super) max_backoff: Duration,
    pub(super) heartbeat_every: Duration,
    pub(super) keys_retry_every: Duration,
    pub(super) updates: mpsc::Sender<Vec<u8>>,
    pub(super) publisher: Publisher,
    /// Shutting down: only acknowledgements are awaited, nothing new is sent.
    pub(super) draining: bool,
}

impl Connection {
    /// The one task that polls the event loop and makes every publish.
    pub(super) async fn run(
        mut self,
        mut eventloop: rumqttc::EventLoop,
        shutdown: CancellationToken,
    ) {
        let mut backoff = INITIAL_BACKOFF;
        let mut failures: u64 = 0;
        let mut heartbeat = tokio::time::interval(self.heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut keys_retry = tokio::time::interval(self.keys_retry_every);
        keys_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keys_retry.reset(); // the first request goes out on ConnAck
        loop {
            let connected = self.status.is_connected();
            let can_send = connected && self.publisher.has_room();
            let outbox = self.publisher.outbox.clone();
            let unsent = async move { outbox.unsent_available().await };
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
        let in_flight = |c: &Connection| c.publisher.in_flight();
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
                self.publisher.on_published(pkid);
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some((_, at)) = self.publisher.on_puback(ack.pkid) {
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
        self.publisher.connection_lost();
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
        self.publisher
            .fill_window(&self.client, &self.topics.report);
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
        self.publisher.track_other();
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
