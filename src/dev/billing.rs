//! A stand-in for the billing system, for the dev mode and the tests.
//!
//! It is an ordinary MQTT client of whatever broker it is pointed at, and speaks the
//! billing system's side of the wire contract (README, "For the billing system"): it
//! answers every `billing/keys/request` with the full key list on
//! `billing/keys/update`, and records what arrives on `billing/report` and
//! `billing/heartbeat`.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::clock::now_ms;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use serde_json::Value;
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Topics;
use crate::dev::broker::MAX_PACKET_SIZE;
use crate::keys::{KeyEntry, KeyUpdate};

/// How long `start` waits for the broker to accept the subscriptions.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publish waits for its PUBACK (it stays queued across a reconnect).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before polling again after a connection error: polling again is what reconnects.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(250);
/// How long `stop` lets the event loop send DISCONNECT before cancelling it.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);
/// rumqttc request channel: publishes are serialised (one in flight), so this only
/// needs room for a subscribe, a disconnect and that publish.
const REQUEST_CHANNEL_CAPACITY: usize = 16;
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Distinguishes stand-ins of one process in their client ids.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Where the stand-in connects and what it answers with.
#[derive(Debug, Clone)]
pub struct StandInOptions {
    pub host: String,
    pub port: u16,
    pub topics: Topics,
    /// The key list answered on every `keys_request`.
    pub keys: Vec<KeyEntry>,
    /// Print each report to stdout as one line `<report topic> <json>` (dev mode).
    pub print_reports: bool,
}

/// Why a stand-in operation failed. Small and cloneable: it is handed between tasks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StandInError {
    #[error(
        "billing stand-in not subscribed within {timeout:?} (last connection error: {last_error})"
    )]
    StartTimeout {
        timeout: Duration,
        last_error: String,
    },
    #[error("broker rejected the billing stand-in's subscription to {0}")]
    SubscribeRejected(String),
    #[error("publish not acknowledged by the broker within {0:?}")]
    AckTimeout(Duration),
    #[error("connection to the broker lost before the publish was acknowledged")]
    ConnectionLost,
    #[error("MQTT client rejected the request (invalid topic, or the stand-in stopped)")]
    ClientClosed,
}

/// A running stand-in. Dropping it stops its tasks (the connection closes without a
/// DISCONNECT); [`BillingStandIn::stop`] disconnects cleanly and waits for them.
pub struct BillingStandIn {
    shared: Arc<Shared>,
    client: AsyncClient,
    client_id: String,
    cancel: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for BillingStandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BillingStandIn")
            .field("client_id", &self.client_id)
            .field("keys_requests", &self.keys_requests())
            .field("heartbeats", &self.heartbeats())
            .finish_non_exhaustive()
    }
}

/// State shared by the handle, the event-loop task and the responder task.
struct Shared {
    topics: Topics,
    print_reports: bool,
    keys: Mutex<Vec<KeyEntry>>,
    reports: Mutex<Vec<Value>>,
    /// Number of reports recorded; `wait_for_reports` waits on it.
    report_count: watch::Sender<usize>,
    unparsable_reports: AtomicUsize,
    keys_requests: AtomicUsize,
    heartbeats: AtomicUsize,
    /// Requests not yet answered, and the bell that wakes the responder task.
    unanswered_requests: AtomicUsize,
    request_bell: Notify,
    /// Held from handing a publish to rumqttc until its PUBACK: with one publish in
    /// flight, the next `Outgoing::Publish(pkid)` event is unambiguously ours.
    publish_lock: tokio::sync::Mutex<()>,
    ack: Mutex<Option<AckWaiter>>,
    /// `None` until the first SUBACK; then whether the broker granted every filter.
    subscribed: watch::Sender<Option<Result<(), StandInError>>>,
    last_error: Mutex<String>,
}

struct AckWaiter {
    /// Set when rumqttc put the publish on the wire.
    pkid: Option<u16>,
    done: oneshot::Sender<Result<(), StandInError>>,
}

/// Locks a std mutex, shrugging off poisoning: every critical section here is a plain
/// assignment or push, so the data stays consistent even if a holder panicked.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl BillingStandIn {
    /// Connects, subscribes (QoS 1) to the keys-request, report and heartbeat topics,
    /// and returns once the broker acknowledged the subscription.
    pub async fn start(opts: StandInOptions) -> Result<BillingStandIn, StandInError> {
        let client_id = format!(
            "billing-standin-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let mut mqtt = MqttOptions::new(client_id.clone(), opts.host, opts.port);
        // A persistent session, as the real billing consumer should have: the broker
        // queues reports for it while it reconnects.
        mqtt.set_keep_alive(KEEP_ALIVE)
            .set_clean_session(false)
            .set_max_packet_size(MAX_PACKET_SIZE, MAX_PACKET_SIZE);
        let (client, eventloop) = AsyncClient::new(mqtt, REQUEST_CHANNEL_CAPACITY);

        let shared = Arc::new(Shared {
            topics: opts.topics,
            print_reports: opts.print_reports,
            keys: Mutex::new(opts.keys),
            reports: Mutex::new(Vec::new()),
            report_count: watch::Sender::new(0),
            unparsable_reports: AtomicUsize::new(0),
            keys_requests: AtomicUsize::new(0),
            heartbeats: AtomicUsize::new(0),
            unanswered_requests: AtomicUsize::new(0),
            request_bell: Notify::new(),
            publish_lock: tokio::sync::Mutex::new(()),
            ack: Mutex::new(None),
            subscribed: watch::Sender::new(None),
            last_error: Mutex::new("none".into()),
        });
        let cancel = CancellationToken::new();
        let tasks = vec![
            tokio::spawn(run_event_loop(
                eventloop,
                client.clone(),
                shared.clone(),
                cancel.clone(),
            )),
            tokio::spawn(answer_key_requests(
                client.clone(),
                shared.clone(),
                cancel.clone(),
            )),
        ];
        // Built before waiting so that an early return drops it and stops the tasks.
        let stand_in = BillingStandIn {
            shared,
            client,
            client_id,
            cancel,
            tasks,
        };

        let mut subscribed = stand_in.shared.subscribed.subscribe();
        let outcome = tokio::time::timeout(START_TIMEOUT, subscribed.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|s| s.clone()));
        match outcome {
            Some(Ok(())) => {
                tracing::info!(client_id = %stand_in.client_id, "billing stand-in subscribed");
                Ok(stand_in)
            }
            Some(Err(e)) => Err(e),
            None => Err(StandInError::StartTimeout {
                timeout: START_TIMEOUT,
                last_error: lock(&stand_in.shared.last_error).clone(),
            }),
        }
    }

    /// The MQTT client id, `billing-standin-<pid>-<n>`.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Replaces the key list answered on later `keys_request` messages.
    pub fn set_keys(&self, keys: Vec<KeyEntry>) {
        *lock(&self.shared.keys) = keys;
    }

    /// The key list currently answered.
    pub fn keys(&self) -> Vec<KeyEntry> {
        lock(&self.shared.keys).clone()
    }

    /// Publishes an incremental `keys_update` now (QoS 1); returns after the PUBACK.
    pub async fn publish_update(&self, updates: Vec<KeyEntry>) -> Result<(), StandInError> {
        let payload = key_update_payload(updates);
        let topic = self.shared.topics.keys_update.clone();
        publish_acked(&self.client, &self.shared, topic, payload).await
    }

    /// Publishes any bytes (QoS 1) on any topic, for tests of malformed payloads;
    /// returns after the PUBACK.
    pub async fn publish_raw(&self, topic: &str, payload: Vec<u8>) -> Result<(), StandInError> {
        publish_acked(&self.client, &self.shared, topic.to_string(), payload).await
    }

    /// Every report received so far, in arrival order. Payloads that are not JSON are
    /// kept as a `Value::String` of their lossy UTF-8 (and counted, see
    /// [`BillingStandIn::unparsable_reports`]).
    pub fn reports(&self) -> Vec<Value> {
        lock(&self.shared.reports).clone()
    }

    /// Number of report payloads that were not valid JSON.
    pub fn unparsable_reports(&self) -> usize {
        self.shared.unparsable_reports.load(Ordering::Relaxed)
    }

    /// Number of `keys_request` messages received.
    pub fn keys_requests(&self) -> usize {
        self.shared.keys_requests.load(Ordering::Relaxed)
    }

    /// Number of heartbeat messages received.
    pub fn heartbeats(&self) -> usize {
        self.shared.heartbeats.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` reports were received or `timeout` passed, then returns
    /// every report received so far (fewer than `n` on timeout).
    pub async fn wait_for_reports(&self, n: usize, timeout: Duration) -> Vec<Value> {
        let mut count = self.shared.report_count.subscribe();
        // Err means timeout (the sender lives in `shared`, so it cannot close): either
        // way the caller gets what arrived.
        let _ = tokio::time::timeout(timeout, count.wait_for(|c| *c >= n)).await;
        self.reports()
    }

    /// Sends DISCONNECT (briefly waiting for it to go out), then stops the tasks.
    pub async fn stop(mut self) {
        let mut tasks = std::mem::take(&mut self.tasks).into_iter();
        if let Some(mut event_loop) = tasks.next() {
            // The event loop ends by itself once DISCONNECT is written.
            let ended = self.client.try_disconnect().is_ok()
                && tokio::time::timeout(DISCONNECT_GRACE, &mut event_loop)
                    .await
                    .is_ok();
            self.cancel.cancel();
            if !ended {
                let _ = event_loop.await;
            }
        }
        self.cancel.cancel();
        for task in tasks {
            let _ = task.await;
        }
    }
}

impl Drop for BillingStandIn {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn key_update_payload(updates: Vec<KeyEntry>) -> Vec<u8> {
    let update = KeyUpdate {
        updates,
        timestamp: now_ms(),
    };
    // Serialising plain strings and an integer cannot fail.
    serde_json::to_vec(&update).unwrap_or_default()
}

/// Publishes QoS 1 and waits for the broker's PUBACK. Publishes are serialised so the
/// PUBACK can be matched without access to rumqttc's internal packet-id table.
async fn publish_acked(
    client: &AsyncClient,
    shared: &Shared,
    topic: String,
    payload: Vec<u8>,
) -> Result<(), StandInError> {
    let _one_at_a_time = shared.publish_lock.lock().await;
    let (done, acked) = oneshot::channel();
    *lock(&shared.ack) = Some(AckWaiter { pkid: None, done });
    if client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .is_err()
    {
        lock(&shared.ack).take();
        return Err(StandInError::ClientClosed);
    }
    let outcome = match tokio::time::timeout(ACK_TIMEOUT, acked).await {
        Ok(Ok(result)) => result,
        // The event loop ended and dropped the waiter.
        Ok(Err(_)) => Err(StandInError::ClientClosed),
        Err(_) => Err(StandInError::AckTimeout(ACK_TIMEOUT)),
    };
    // On timeout the waiter is still there; the next publish must not inherit it. (One
    // that timed out while queued during an outage and goes out after the reconnect can
    // still complete the next waiter early; that waiter's own message follows it.)
    lock(&shared.ack).take();
    outcome
}

/// Answers each `keys_request` with the full key list, outside the event-loop task:
/// publishing from inside it could wait on a full request channel that only the event
/// loop drains.
async fn answer_key_requests(client: AsyncClient, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        // Notify keeps a permit, so a request arriving before this await is not missed.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = shared.request_bell.notified() => {}
        }
        while shared
            .unanswered_requests
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            let keys = lock(&shared.keys).clone();
            let count = keys.len();
            let topic = shared.topics.keys_update.clone();
            let publish = publish_acked(&client, &shared, topic, key_update_payload(keys));
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = publish => r,
            };
            match result {
                Ok(()) => tracing::debug!(keys = count, "billing stand-in sent the key list"),
                Err(e) => {
                    tracing::warn!(error = %e, "billing stand-in could not send the key list")
                }
            }
        }
    }
}

/// Polls the rumqttc event loop until cancelled; polling again after an error is what
/// reconnects, and every CONNACK (clean session) is followed by a fresh SUBSCRIBE.
async fn run_event_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let filters: Vec<SubscribeFilter> = [
        &shared.topics.keys_request,
        &shared.topics.report,
        &shared.topics.heartbeat,
    ]
    .into_iter()
    .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce))
    .collect();
    let mut subscribe_pkid = None;
    loop {
        let event = tokio::select! {
            _ = cancel.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                subscribe_pkid = None;
                // try_: the channel has room (one publish in flight at most), and an
                // awaiting send here could deadlock the loop that drains it.
                if let Err(e) = client.try_subscribe_many(filters.clone()) {
                    tracing::warn!(error = %e, "billing stand-in could not subscribe");
                }
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => subscribe_pkid = Some(pkid),
            Ok(Event::Incoming(Packet::SubAck(ack))) if Some(ack.pkid) == subscribe_pkid => {
                let rejected: Vec<&str> = ack
                    .return_codes
                    .iter()
                    .zip(&filters)
                    .filter(|(code, _)| matches!(code, SubscribeReasonCode::Failure))
                    .map(|(_, f)| f.path.as_str())
                    .collect();
                let result = if rejected.is_empty() {
                    Ok(())
                } else {
                    Err(StandInError::SubscribeRejected(rejected.join(", ")))
                };
                shared.subscribed.send_replace(Some(result));
            }
            Ok(Event::Incoming(Packet::Publish(p))) => shared.on_message(&p.topic, &p.payload),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(w) = lock(&shared.ack).as_mut()
                    && w.pkid.is_none()
                {
                    w.pkid = Some(pkid);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let mut slot = lock(&shared.ack);
                if slot.as_ref().is_some_and(|w| w.pkid == Some(ack.pkid))
                    && let Some(w) = slot.take()
                {
                    let _ = w.done.send(Ok(()));
                }
            }
            // Written by `stop`: nothing more to do.
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                // With a clean session rumqttc drops unacknowledged publishes on
                // reconnect, so one already on the wire is lost; one still queued
                // is sent after the reconnect and keeps waiting.
                {
                    let mut slot = lock(&shared.ack);
                    if slot.as_ref().is_some_and(|w| w.pkid.is_some())
                        && let Some(w) = slot.take()
                    {
                        let _ = w.done.send(Err(StandInError::ConnectionLost));
                    }
                }
                let reason = describe(&e);
                tracing::warn!(error = %reason, "billing stand-in lost its broker connection; retrying");
                *lock(&shared.last_error) = reason;
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(RECONNECT_BACKOFF) => {}
                }
            }
        }
    }
}

/// A log-safe description: `NotConnAck` would print a whole packet, payload included.
fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::NotConnAck(_) => {
            "broker answered CONNECT with a packet other than CONNACK".into()
        }
        other => other.to_string(),
    }
}

impl Shared {
    fn on_message(&self, topic: &str, payload: &[u8]) {
        if topic == self.topics.keys_request {
            self.keys_requests.fetch_add(1, Ordering::Relaxed);
            self.unanswered_requests.fetch_add(1, Ordering::AcqRel);
            self.request_bell.notify_one();
        } else if topic == self.topics.report {
            self.record_report(payload);
        } else if topic == self.topics.heartbeat {
            self.heartbeats.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn record_report(&self, payload: &[u8]) {
        let value = match serde_json::from_slice::<Value>(payload) {
            Ok(v) => v,
            Err(e) => {
                self.unparsable_reports.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, bytes = payload.len(), "billing stand-in got a report that is not JSON");
                Value::String(String::from_utf8_lossy(payload).into_owned())
            }
        };
        if self.print_reports {
            // The dev-mode user's view of what the billing system received; `Value`'s
            // Display is compact JSON, so this is always one line.
            println!("{} {}", self.topics.report, value);
        }
        let count = {
            let mut reports = lock(&self.reports);
            reports.push(value);
            reports.len()
        };
        self.report_count.send_replace(count);
    }
}
