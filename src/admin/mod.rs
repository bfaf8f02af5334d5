//! The admin HTTP port: `/healthz` (process alive), `/readyz` (a key list is loaded,
//! so Checks give real answers) and `/metrics` (Prometheus text format).
//!
//! Nothing here prints a key, a fingerprint or the MQTT password.

pub mod metrics;
mod process;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::keys::KeyStore;
use crate::keys::sync::now_ms;
use crate::mqtt::MqttStatus;
use crate::outbox::Outbox;
use metrics::Metrics;

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
        process::render() + &s.metrics.render(),
    )
}

pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
