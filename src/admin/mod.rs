//! The admin HTTP port: `/healthz` (process alive), `/readyz` (a key list is loaded,
//! so Checks give real answers) and `/metrics` (Prometheus text format).
//!
//! Nothing here prints a key, a fingerprint or the MQTT password.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::clock::now_ms;
use crate::keys::KeyStore;
use crate::listen::Acceptor;
use crate::metrics::Metrics;
use crate::metrics::label::Listener;
use crate::mqtt::MqttStatus;
use crate::outbox::Outbox;

#[derive(Clone)]
pub struct AdminState {
    pub keys: Arc<KeyStore>,
    pub metrics: Arc<Metrics>,
    pub mqtt: Arc<MqttStatus>,
    pub outbox: Outbox,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// Ready once a key list is loaded. A lost broker connection does not make keymeter
/// unready: Checks keep answering from the key store (fail-static); the body says so.
async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let ready = s.keys.is_loaded();
    let view = s.keys.view();
    let mqtt = if s.mqtt.is_connected() {
        "connected".to_string()
    } else {
        match s.mqtt.last_error() {
            Some(e) => format!("disconnected ({e})"),
            None => "connecting".to_string(),
        }
    };
    let body = format!(
        "{}\nkeys: {} ({} blocked){}\nmqtt: {mqtt}\n",
        if ready { "ready" } else { "not ready" },
        view.len(),
        view.blocked(),
        if ready {
            ""
        } else {
            ", no key list loaded yet"
        },
    );
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    let st = s.outbox.stats();
    let m = &s.metrics;
    m.outbox_pending_records.set(st.pending_records as i64);
    m.outbox_inflight_records.set(st.inflight_records as i64);
    m.outbox_pending_bytes.set(st.pending_bytes as i64);
    m.outbox_disk_bytes.set(st.disk_bytes as i64);
    m.outbox_budget_bytes.set(st.max_bytes as i64);
    let age = st
        .oldest_pending_created_ms
        .map_or(0.0, |t| ((now_ms() - t).max(0) as f64) / 1000.0);
    m.outbox_oldest_age_seconds.set(age);
    m.set_outbox_totals(st.corrupt_bytes_total, st.fsync_errors_total);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::process::render() + &s.metrics.render(),
    )
}

/// Limits of the admin listener (`listen.admin_*`).
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Open connections at most.
    pub max_connections: usize,
    /// A connection that has not sent a whole request head within this time is closed.
    pub header_read_timeout: Duration,
}

/// Serves the admin port until `shutdown`.
///
/// Built on hyper directly, for two limits `axum::serve` lacks: a request head must
/// arrive within `header_read_timeout` (a client sending its headers a byte at a time
/// is cut off), and at most `max_connections` are open, so that a slowloris cannot run
/// the process out of file descriptors and keep Envoy from connecting to the gRPC
/// port. At the cap, a new connection displaces one still waiting for a request head,
/// the oldest of the client address that holds the most: waiting connections are what
/// a slowloris holds, while a probe or scrape sends its request at once and keeps its
/// place. Only when every connection is busy answering is a new one refused.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    limits: AdminLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut acceptor = Acceptor::new(listener, Listener::Admin, &state.metrics);
    let router = router(state);
    let slots = Slots::new(limits.max_connections);
    let connections = TaskTracker::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            stream = acceptor.accept() => stream,
        };
        let peer = stream.peer_addr().map(|a| a.ip()).ok();
        let slot = match slots.admit(peer) {
            Admission::Admitted(slot) => slot,
            Admission::Displaced(closed) => {
                // Wait for the displaced connection to be gone: the cap bounds the
                // open sockets, and its task runs (as do the others queued) before
                // the next accept, so a flood of new connections cannot displace a
                // probe before it was read.
                closed.cancelled().await;
                match slots.admit(peer) {
                    Admission::Admitted(slot) => slot,
                    _ => {
                        acceptor.refuse(stream, limits.max_connections);
                        continue;
                    }
                }
            }
            Admission::Full => {
                acceptor.refuse(stream, limits.max_connections);
                continue;
            }
        };
        let service = {
            let slot = slot.state.clone();
            let router = router.clone();
            service_fn(move |request: Request<Incoming>| {
                let mut router = router.clone();
                let slot = slot.clone();
                slot.phase.store(BUSY, Ordering::Release);
                async move {
                    let response = router.call(request).await;
                    slot.phase.store(WAITING, Ordering::Release);
                    response
                }
            })
        };
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            {
                let mut connection = std::pin::pin!(connection);
                // The first poll reads (and answers) what the client sent already.
                let first = std::future::poll_fn(|cx| Poll::Ready(connection.as_mut().poll(cx)));
                if first.await.is_pending() {
                    let _ = slot.state.phase.compare_exchange(
                        NEW,
                        WAITING,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    let evicted = slot.state.evict.clone();
                    tokio::select! {
                        _ = connection.as_mut() => {}
                        _ = evicted.cancelled() => {}
                        _ = shutdown.cancelled() => {
                            // Finish an answer in progress; an idle connection closes at once.
                            connection.as_mut().graceful_shutdown();
                            tokio::select! {
                                _ = connection.as_mut() => {}
                                _ = evicted.cancelled() => {}
                            }
                        }
                    }
                }
            }
            // The socket is closed: free the place.
            drop(slot);
        });
    }
    // Stop listening, then close what waits for a request head (it would keep the
    // shutdown waiting for up to the header timeout).
    drop(acceptor);
    slots.evict_waiting();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// A connection's phase: accepted, its task not run yet. Never displaced, so that a
/// probe's request, already sent, is read before a flood of new connections can push
/// it out.
const NEW: u8 = 0;
/// Waiting for a request head (after the first read, or after an answer).
const WAITING: u8 = 1;
/// Answering a request.
const BUSY: u8 = 2;

/// The admin connections, oldest first, for the cap and its displacement rule.
struct Slots {
    max: usize,
    open: Mutex<VecDeque<Arc<SlotState>>>,
}

struct SlotState {
    /// The client's address: displacement starts with the address holding the most.
    peer: Option<IpAddr>,
    /// [`NEW`], [`WAITING`] or [`BUSY`].
    phase: AtomicU8,
    evict: CancellationToken,
    /// Cancelled once the connection is gone (its socket closed).
    closed: CancellationToken,
}

enum Admission {
    Admitted(Slot),
    /// At the cap, a waiting connection was told to close: admit again once this token
    /// says it did.
    Displaced(CancellationToken),
    /// At the cap and every connection busy answering.
    Full,
}

/// An admitted connection's place; freed when dropped.
struct Slot {
    slots: Arc<Slots>,
    state: Arc<SlotState>,
}

impl Slots {
    fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max,
            open: Mutex::new(VecDeque::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<SlotState>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection from `peer`. At the cap, a connection waiting for a
    /// request head is told to close instead, to make room: the oldest one of the
    /// address with the most connections (a slowloris client holds many; a kubelet or
    /// Prometheus, one or two), so one client cannot push the others out.
    fn admit(self: &Arc<Self>, peer: Option<IpAddr>) -> Admission {
        let mut open = self.lock();
        if open.len() >= self.max {
            let mut per_peer: HashMap<Option<IpAddr>, usize> = HashMap::new();
            for slot in open.iter() {
                *per_peer.entry(slot.peer).or_default() += 1;
            }
            // The first (oldest) waiting connection of the busiest address.
            let displaced = open
                .iter()
                .filter(|s| s.phase.load(Ordering::Acquire) == WAITING && !s.evict.is_cancelled())
                .fold(None::<&Arc<SlotState>>, |best, s| match best {
                    Some(b) if per_peer[&b.peer] >= per_peer[&s.peer] => Some(b),
                    _ => Some(s),
                });
            return match displaced {
                Some(displaced) => {
                    displaced.evict.cancel();
                    Admission::Displaced(displaced.closed.clone())
                }
                None => Admission::Full,
            };
        }
        let state = Arc::new(SlotState {
            peer,
            phase: AtomicU8::new(NEW),
            evict: CancellationToken::new(),
            closed: CancellationToken::new(),
        });
        open.push_back(state.clone());
        Admission::Admitted(Slot {
            slots: self.clone(),
            state,
        })
    }

    fn evict_waiting(&self) {
        for slot in self.lock().iter() {
            if slot.phase.load(Ordering::Acquire) != BUSY {
                slot.evict.cancel();
            }
        }
    }
}

impl Drop for Slot {
    /// Dropped after its connection (and socket), in the connection's task.
    fn drop(&mut self) {
        self.slots.lock().retain(|s| !Arc::ptr_eq(s, &self.state));
        self.state.closed.cancel();
    }
}
