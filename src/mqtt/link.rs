//! The connection task: connects and reconnects with capped backoff, subscribes to
//! key updates, asks for the key list after every (re)connect, sends heartbeats, and
//! feeds the publisher's records to the broker. Every request to rumqttc goes through
//! [`InFlight`], which matches PUBACKs to records.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::MqttStatus;
use super::inflight::{Drift, InFlight, Message, Sent};
use super::protocol::{Client, Event, EventLoop, Refusal};
use super::publisher::Publisher;
use crate::clock::now_ms;
use crate::config::Topics;
use crate::metrics::Metrics;

/// First reconnect delay; doubles up to `mqtt.reconnect_max_secs`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// How long a stopping keymeter waits for PUBACKs of records already sent.
const PUBACK_WAIT_AT_SHUTDOWN: Duration = Duration::from_secs(2);
pub use crate::metrics::label::Ignored;

pub use crate::metrics::label::Published;

/// Why the session must start over although the connection did not fail.
struct Restart(String);

impl From<Drift> for Restart {
    fn from(d: Drift) -> Restart {
        Restart(format!("PUBACK bookkeeping lost track ({d})"))
    }
}

pub(super) struct Connection {
    pub(super) out: InFlight<Client>,
    pub(super) status: Arc<MqttStatus>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) topics: Topics,
    pub(super) target: String,
    pub(super) max_backoff: Duration,
    pub(super) heartbeat_every: Duration,
    pub(super) keys_retry_every: Duration,
    pub(super) updates: mpsc::Sender<Vec<u8>>,
    pub(super) publisher: Publisher,
    /// Records the broker refused since it last accepted one.
    pub(super) refusals_in_a_row: u64,
    /// Shutting down: only acknowledgements are awaited, nothing new is sent.
    pub(super) draining: bool,
}

impl Connection {
    /// The one task that polls the event loop and makes every request.
    pub(super) async fn run(mut self, mut eventloop: EventLoop, shutdown: CancellationToken) {
        let mut backoff = INITIAL_BACKOFF;
        let mut failures: u64 = 0;
        let mut heartbeat = tokio::time::interval(self.heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut keys_retry = tokio::time::interval(self.keys_retry_every);
        keys_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        keys_retry.reset(); // the first request goes out on ConnAck
        loop {
            let connected = self.status.is_connected();
            let can_send = connected && self.publisher.has_room(&self.out);
            let outbox = self.publisher.outbox().clone();
            let unsent = async move { outbox.unsent_available().await };
            let retry_at = self.publisher.retry_at();
            let retry = async move {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let step = tokio::select! {
                _ = shutdown.cancelled() => break,
                event = eventloop.poll() => match event {
                    Ok(event) => {
                        let step = self.on_event(event).await;
                        if self.status.is_connected() {
                            backoff = INITIAL_BACKOFF;
                            failures = 0;
                        }
                        step
                    }
                    Err(e) => {
                        failures += 1;
                        self.on_error(&mut eventloop, e, failures, backoff);
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(self.max_backoff);
                        Ok(true)
                    }
                },
                _ = unsent, if can_send => self.fill_window().map(|()| true),
                _ = retry, if connected => self.retry_refused().map(|()| true),
                _ = heartbeat.tick() => {
                    if connected {
                        self.heartbeat();
                    }
                    Ok(true)
                }
                _ = keys_retry.tick() => {
                    if connected && self.status.awaiting_keys.load(Ordering::Acquire) {
                        tracing::warn!("no key list from the billing system since the last request; asking again");
                        self.request_keys();
                    }
                    Ok(true)
                }
            };
            match step {
                Ok(true) => {}
                Ok(false) => break,
                Err(restart) => self.restart_session(&mut eventloop, restart),
            }
        }
        self.drain_in_flight(&mut eventloop).await;
        self.status.set(false, None);
        self.metrics.mqtt_connected.set(0);
        self.out.disconnect();
    }

    /// At shutdown, waits (at most [`PUBACK_WAIT_AT_SHUTDOWN`]) for the broker to acknowledge the
    /// records already sent, so the next start does not send them again. Nothing new is
    /// sent: records not yet sent stay in the outbox for the next start.
    async fn drain_in_flight(&mut self, eventloop: &mut EventLoop) {
        let before = self.out.records();
        if before == 0 || !self.status.is_connected() {
            return;
        }
        self.draining = true;
        let deadline = tokio::time::Instant::now() + PUBACK_WAIT_AT_SHUTDOWN;
        while self.out.records() > 0 {
            match tokio::time::timeout_at(deadline, eventloop.poll()).await {
                Ok(Ok(event)) => {
                    if !matches!(self.on_event(event).await, Ok(true)) {
                        break;
                    }
                }
                Ok(Err(_)) | Err(_) => break,
            }
        }
        let left = self.out.records();
        tracing::info!(
            acknowledged = before - left.min(before),
            unacknowledged = left,
            "shutdown: waited for the broker's acknowledgements of records in flight"
        );
    }

    /// Handles one event; `Ok(false)` stops the task.
    async fn on_event(&mut self, event: Event) -> Result<bool, Restart> {
        match event {
            Event::Connected => {
                self.status.set(true, None);
                self.metrics.mqtt_connected.set(1);
                self.metrics.mqtt_connections.inc();
                tracing::info!(broker = %self.target, "connected to the billing broker");
                // Clean session: subscribe again and ask for the full key list after
                // every (re)connect. try_* so the task never waits on itself.
                if let Err(e) = self.out.subscribe(&self.topics.keys_update) {
                    tracing::error!(error = %e, "cannot queue key update subscription");
                }
                self.request_keys();
                self.fill_window()?;
            }
            Event::Message {
                topic,
                payload,
                retain: true,
            } if topic == self.topics.keys_update => {
                // Stored on the broker by whoever once published it with the retain flag:
                // possibly long ago, possibly not the billing system. Only live updates
                // and answers to this connection's key list request apply.
                self.metrics.key_update_ignored(Ignored::Retained);
                tracing::warn!(topic = %topic, bytes = payload.len(),
                    "ignored a retained key update: a retained key list may be stale or planted \
                     (clear it on the broker: README \"Broker ACLs\")");
            }
            Event::Message {
                topic,
                payload,
                retain: false,
            } if topic == self.topics.keys_update => {
                self.status.awaiting_keys.store(false, Ordering::Release);
                self.metrics.key_request_pending.set(0);
                if self.updates.send(payload.to_vec()).await.is_err() {
                    return Ok(false);
                }
            }
            Event::Numbered(pkid) => self.out.on_numbered(pkid)?,
            Event::Acked { pkid, refused } => {
                match (self.out.on_acked(pkid)?, refused) {
                    (Sent::Record { seq, at, .. }, None) => {
                        self.publisher.acked(seq);
                        self.metrics.records_published.inc();
                        self.metrics
                            .publish_latency
                            .observe(at.elapsed().as_secs_f64());
                        if self.refusals_in_a_row > 0 {
                            tracing::info!(
                                refused = self.refusals_in_a_row,
                                "the broker accepts usage records again"
                            );
                            self.refusals_in_a_row = 0;
                        }
                    }
                    (Sent::Record { seq, payload, .. }, Some(refusal)) => {
                        self.record_refused(seq, payload, refusal);
                    }
                    (Sent::KeysRequest, Some(refusal)) => {
                        self.metrics
                            .publish_refused(Published::KeysRequest, refusal);
                        tracing::error!(topic = %self.topics.keys_request, reason = refusal.as_str(),
                            code = refusal.code(), retry_in_s = self.keys_retry_every.as_secs(),
                            "the broker refused the key list request: no key list will come \
                             (check the broker ACL, README \"Broker ACLs\")");
                    }
                    (Sent::KeysRequest, None) | (Sent::Heartbeat, _) => {}
                }
                self.fill_window()?;
            }
            Event::SubscribeRefused => {
                tracing::error!(topic = %self.topics.keys_update,
                    "the broker refused the key update subscription: no key change will arrive \
                     (check the broker ACL, README \"Broker ACLs\")");
            }
            Event::Message { .. } | Event::Other => {}
        }
        Ok(true)
    }

    fn on_error(
        &mut self,
        eventloop: &mut EventLoop,
        message: String,
        failures: u64,
        backoff: Duration,
    ) {
        let was_connected = self.status.is_connected();
        self.metrics.mqtt_connection_errors.inc();
        self.session_lost(eventloop, message.clone());
        // Loud on the first failure and on losing a connection, then at the capped
        // backoff only.
        if was_connected || failures == 1 || backoff >= self.max_backoff {
            tracing::error!(broker = %self.target, error = %message, retry_in_ms = backoff.as_millis() as u64,
                "billing broker connection failed; Checks keep answering from the key store");
        } else {
            tracing::debug!(broker = %self.target, error = %message, "billing broker connection failed");
        }
    }

    /// Drops the connection although it works, and starts a clean session: the records
    /// in flight are sent again (the consumer drops repeats by record id) rather than
    /// acknowledged on a guess.
    fn restart_session(&mut self, eventloop: &mut EventLoop, why: Restart) {
        tracing::error!(broker = %self.target, reason = %why.0,
            "starting a new broker session; records in flight are sent again");
        self.metrics.mqtt_connection_errors.inc();
        eventloop.disconnect_now();
        self.session_lost(eventloop, why.0);
    }

    /// The session is over (clean session: the broker forgets it too): rumqttc and
    /// `InFlight` forget what was in flight, and the records among it go back to the
    /// outbox, to be sent first in the next session.
    fn session_lost(&mut self, eventloop: &mut EventLoop, error: String) {
        self.status.set(false, Some(error));
        self.metrics.mqtt_connected.set(0);
        eventloop.forget_session();
        self.out.connection_lost();
        self.publisher.connection_lost();
    }

    /// The broker refused a record (MQTT 5): it stays in the outbox, is counted, and is
    /// published again later. Logged loudly once per run of refusals, never with its
    /// payload (it holds an API key).
    fn record_refused(&mut self, seq: u64, payload: Bytes, refusal: Refusal) {
        self.metrics.publish_refused(Published::Report, refusal);
        let retry_in = self.publisher.refused(seq, payload);
        self.refusals_in_a_row += 1;
        if self.refusals_in_a_row == 1 {
            tracing::error!(topic = %self.topics.report, reason = refusal.as_str(),
                code = refusal.code(), record = seq, retry_in_ms = retry_in.as_millis() as u64,
                "the broker refused a usage record; it stays in the outbox and is sent again \
                 (check the broker ACL, README \"Broker ACLs\")");
        } else {
            tracing::debug!(topic = %self.topics.report, reason = refusal.as_str(), record = seq,
                "the broker refused a usage record");
        }
    }

    /// Publishes the records the broker refused again.
    fn retry_refused(&mut self) -> Result<(), Restart> {
        if !self.status.is_connected() || self.draining {
            return Ok(());
        }
        let n = self
            .publisher
            .retry_refused(&mut self.out)
            .map_err(|e| Restart(format!("cannot queue a record for publishing: {e}")))?;
        tracing::warn!(
            records = n,
            refused_so_far = self.refusals_in_a_row,
            "publishing again the usage records the broker refused"
        );
        Ok(())
    }

    /// Hands outbox records to the client until the window is full.
    fn fill_window(&mut self) -> Result<(), Restart> {
        if !self.status.is_connected() || self.draining {
            return Ok(());
        }
        self.publisher
            .fill_window(&mut self.out)
            .map_err(|e| Restart(format!("cannot queue a record for publishing: {e}")))
    }

    fn heartbeat(&mut self) {
        let beat = serde_json::json!({ "type": "heartbeat", "timestamp": now_ms() }).to_string();
        if self
            .out
            .publish(Message::Heartbeat(Bytes::from(beat)))
            .is_ok()
        {
            self.metrics.heartbeats_sent.inc();
        }
    }

    /// Publishes `{"timestamp": ...}` on the key request topic; the billing system
    /// answers with the full list on the update topic.
    fn request_keys(&mut self) {
        let request = serde_json::json!({ "timestamp": now_ms() }).to_string();
        match self.out.publish(Message::KeysRequest(Bytes::from(request))) {
            Ok(()) => {
                self.status.awaiting_keys.store(true, Ordering::Release);
                self.metrics.key_request_pending.set(1);
            }
            Err(e) => tracing::error!(error = %e, "cannot queue key list request"),
        }
    }
}
