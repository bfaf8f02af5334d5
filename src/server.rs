//! Wiring: builds every part from the configuration, serves until shutdown, then
//! waits for every task to finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accesslog::AccessLogServer;
use crate::admin::{self, AdminLimits, AdminState};
use crate::authz::{AuthzService, CheckServer};
use crate::clock::now_ms;
use crate::config::{Config, FsyncMode, GrpcTlsConfig, PeerAllowList};
use crate::keys::{KeyStore, sync};
use crate::listen;
use crate::metrics::Metrics;
use crate::metrics::label::Listener;
use crate::mqtt;
use crate::outbox::{FsyncPolicy, Outbox, OutboxConfig};
use crate::peers::PeerGate;
use crate::proto::v1::usage_server::UsageServer;
use crate::report::{IdempotencyKeys, ReportService};
use crate::usage::recorder::Recorder;
use crate::xds::{self, FilterSettings, XdsServer};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// HTTP/2 flow-control windows of the gRPC listener.
const GRPC_CONNECTION_WINDOW: u32 = 4 << 20;
const GRPC_STREAM_WINDOW: u32 = 1 << 20;
/// Streams one gRPC connection may have open at once: Envoy's default circuit breaker
/// allows 1024 requests to a cluster, so one Envoy never needs more; a client that
/// wants more opens another connection, which the connection cap counts.
const GRPC_MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Streams the client reset before keymeter accepted them, pending at once, past which
/// h2 calls the client abusive (HTTP/2 rapid reset) and ends the connection: as many as
/// it may have open, since Envoy resets every Check it timed out at once (h2's
/// default of 20 made keymeter end busy Envoys' connections, access-log stream and all).
const GRPC_MAX_PENDING_RESETS: usize = GRPC_MAX_CONCURRENT_STREAMS as usize;
/// Streams keymeter reset because the client broke the protocol, over a connection's
/// life, past which it ends the connection (HTTP/2 "MadeYouReset"): an honest Envoy
/// causes none. hyper's default, which tonic would otherwise switch off.
const GRPC_MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// gRPC service names reported through grpc.health.v1.
const AUTHZ_SERVICE: &str = "envoy.service.auth.v3.Authorization";

/// Already-bound listeners, so tests can bind `127.0.0.1:0` and read the ports.
pub struct Listeners {
    pub grpc: TcpListener,
    pub admin: TcpListener,
    /// The Report API's own listener (`listen.report`); without it the Report API is
    /// served on `grpc`.
    pub report: Option<TcpListener>,
}

impl Listeners {
    /// Binds the addresses from the configuration.
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        Ok(Listeners {
            grpc: TcpListener::bind(config.listen.grpc).await?,
            admin: TcpListener::bind(config.listen.admin).await?,
            report: match config.listen.report {
                Some(addr) => Some(TcpListener::bind(addr).await?),
                None => None,
            },
        })
    }
}

/// Opens the outbox off the async workers: replaying a large outbox reads files.
async fn open_outbox(config: &Config) -> Result<Outbox, RunError> {
    let o = &config.outbox;
    let settings = OutboxConfig {
        dir: o.dir.clone(),
        max_bytes: o.max_bytes,
        segment_bytes: o.segment_bytes,
        fsync: match o.fsync {
            FsyncMode::Batch => FsyncPolicy::EveryBatch,
            FsyncMode::Interval => {
                FsyncPolicy::Interval(std::time::Duration::from_millis(o.fsync_interval_ms))
            }
        },
    };
    let dir = o.dir.clone();
    tokio::task::spawn_blocking(move || Outbox::open(settings))
        .await
        .map_err(|e| RunError::Outbox(dir.clone(), std::io::Error::other(e)))?
        .map_err(|e| RunError::Outbox(dir, e))
}

/// The Report API's remembered idempotency keys, beside the outbox they describe.
async fn open_idempotency_keys(config: &Config) -> Result<IdempotencyKeys, RunError> {
    let path = config.outbox.dir.join(IDEMPOTENCY_FILE);
    let retention_ms = i64::try_from(config.usage.report_idempotency_secs)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000);
    let dir = config.outbox.dir.clone();
    tokio::task::spawn_blocking(move || IdempotencyKeys::open(&path, retention_ms, now_ms()))
        .await
        .map_err(|e| RunError::Outbox(dir.clone(), std::io::Error::other(e)))?
        .map_err(|e| RunError::Outbox(dir, e))
}

/// File of the Report API's idempotency keys, in the outbox directory.
const IDEMPOTENCY_FILE: &str = "report-idempotency-keys";

/// The server TLS settings; client certificates are required when a CA is set.
fn grpc_tls(tls: &GrpcTlsConfig) -> Result<ServerTlsConfig, RunError> {
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| RunError::GrpcTls(key, format!("{}: {e}", path.display())))
    };
    let identity = Identity::from_pem(
        read("cert_file", &tls.cert_file)?,
        read("key_file", &tls.key_file)?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca_file {
        config = config.client_ca_root(Certificate::from_pem(read("client_ca_file", ca)?));
    }
    Ok(config)
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("listen.grpc_tls.{0}: {1}")]
    GrpcTls(&'static str, String),
    #[error("outbox.dir {0}: {1}")]
    Outbox(std::path::PathBuf, std::io::Error),
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttSetupError),
    #[error("keys.file: {0}")]
    KeysFile(sync::Rejected),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("admin server: {0}")]
    Admin(#[from] std::io::Error),
}

/// Runs keymeter until `shutdown` resolves, then stops every task and returns.
pub async fn run(
    listeners: Listeners,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let token = CancellationToken::new();
    // An early return (a setup error) also stops whatever was already started.
    let _stop_on_return = token.clone().drop_guard();
    let tracker = TaskTracker::new();
    let metrics = Arc::new(Metrics::new());
    let keys = Arc::new(KeyStore::new());

    // Fail-static: the last list from the billing system answers until it speaks again.
    if let Some(path) = &config.keys.snapshot {
        sync::load_snapshot(&keys, &metrics, path);
        tracker.spawn(sync::run_snapshot_writer(
            keys.clone(),
            metrics.clone(),
            path.clone(),
            token.clone(),
        ));
    }
    if let Some(path) = &config.keys.file {
        // A broken file at start-up is an operator error worth stopping for.
        sync::load_keys_file(&keys, &metrics, path).map_err(RunError::KeysFile)?;
        tracker.spawn(sync::run_file_watcher(
            keys.clone(),
            metrics.clone(),
            path.clone(),
            std::time::Duration::from_millis(config.keys.file_poll_interval_ms),
            token.clone(),
        ));
    }

    let outbox = open_outbox(&config).await?;
    // Everything on disk is opened before anything serves: /readyz never says ready
    // while a start-up write is still under way.
    let idempotency_keys = open_idempotency_keys(&config).await?;
    let replayed = outbox.stats().replayed_on_open;
    metrics.outbox_replayed.inc_by(replayed);
    if replayed > 0 {
        tracing::info!(records = replayed, dir = %config.outbox.dir.display(), "outbox holds unpublished records from before; sending them");
    }
    let recorder = Arc::new(Recorder::new(
        outbox.clone(),
        metrics.clone(),
        config.usage.record_id_field.clone(),
    ));

    let link = mqtt::start(
        &config,
        keys.clone(),
        metrics.clone(),
        outbox.clone(),
        &tracker,
        token.clone(),
    )?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_not_serving::<CheckServer>().await;
    {
        let keys = keys.clone();
        let metrics = metrics.clone();
        let token = token.clone();
        let health = health.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = keys.wait_loaded() => {
                    metrics.ready.set(1);
                    health.set_serving::<CheckServer>().await;
                    tracing::info!(keys = keys.view().len(), "ready: answering Checks");
                }
            }
        });
    }

    let grpc_addr = listeners.grpc.local_addr()?;
    let admin_addr = listeners.admin.local_addr()?;
    let report_addr = listeners
        .report
        .as_ref()
        .map(|r| r.local_addr())
        .transpose()?;
    let l = &config.listen;
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, report = ?report_addr,
        service = AUTHZ_SERVICE, grpc_max_connections = l.grpc_max_connections,
        admin_max_connections = l.admin_max_connections, "keymeter listening");
    // The Report API's own listener has a cap of grpc_max_connections too.
    let grpc_listeners = 1 + usize::from(report_addr.is_some());
    listen::fit_open_file_limit(
        (grpc_listeners * l.grpc_max_connections + l.admin_max_connections) as u64,
    );

    let admin_task = tracker.spawn(admin::serve(
        listeners.admin,
        AdminState {
            keys: keys.clone(),
            metrics: metrics.clone(),
            mqtt: link.status.clone(),
            outbox: outbox.clone(),
        },
        AdminLimits {
            max_connections: l.admin_max_connections,
            header_read_timeout: Duration::from_millis(l.admin_header_read_timeout_ms),
        },
        token.clone(),
    ));

    let authz = AuthzService::new(keys.clone(), metrics.clone(), config.check.clone());
    let max_message = config.listen.max_message_bytes;
    let access_log = AccessLogServer::new(
        keys.clone(),
        recorder.clone(),
        config.check.clone(),
        config.usage.clone(),
        max_message,
        token.clone(),
    );
    let report = ReportService::new(
        keys.clone(),
        recorder,
        config.check.clone(),
        authz.guard(),
        &config.usage,
        config.client_id(),
        idempotency_keys,
    );
    let incoming = listen::GrpcIncoming::new(
        listeners.grpc,
        Listener::Grpc,
        listen::ConnectionCap::new(l.grpc_max_connections),
        listen::GRPC_HANDSHAKE_TIMEOUT,
        &metrics,
    );
    // Local enforcement: the key list pushed into Envoy's api_key_auth filter (ECDS).
    let xds_server = config.xds.enabled.then(|| {
        let settings = Arc::new(FilterSettings::new(&config.xds, &config.check));
        let (publish, versions) = tokio::sync::watch::channel(None);
        tracker.spawn(xds::run_pusher(
            keys.clone(),
            settings.clone(),
            std::time::Duration::from_millis(config.xds.push_interval_ms),
            metrics.clone(),
            publish,
            token.clone(),
        ));
        tracing::info!(resource = %settings.resource_name, "serving the key list to Envoy over ECDS (local enforcement)");
        XdsServer::new(
            settings,
            versions,
            metrics.clone(),
            max_message,
            token.clone(),
        )
    });
    // Checks are tiny and come many per connection: wide flow-control windows save
    // WINDOW_UPDATE round trips on a busy Envoy connection.
    let mut builder = tonic::transport::Server::builder()
        .initial_connection_window_size(Some(GRPC_CONNECTION_WINDOW))
        .initial_stream_window_size(Some(GRPC_STREAM_WINDOW))
        .max_concurrent_streams(GRPC_MAX_CONCURRENT_STREAMS)
        // Envoy resets Check streams it timed out or whose client went away. h2's
        // default answers more than 20 such resets pending at once with GOAWAY, which
        // also kills the access-log stream on the same connection (records lost).
        .http2_max_pending_accept_reset_streams(Some(GRPC_MAX_PENDING_RESETS))
        .http2_max_local_error_reset_streams(Some(GRPC_MAX_LOCAL_ERROR_RESETS))
        // A PING when a connection was quiet this long, closed when unanswered: an
        // Envoy that vanished without a FIN (node lost) frees its place under the cap.
        .http2_keepalive_interval(Some(Duration::from_secs(l.grpc_keepalive_interval_secs)))
        .http2_keepalive_timeout(Some(Duration::from_secs(l.grpc_keepalive_timeout_secs)));
    let mut allow = PeerAllowList::default();
    if let Some(tls) = &config.listen.grpc_tls {
        builder = builder.tls_config(grpc_tls(tls)?)?;
        let mutual = tls.client_ca_file.is_some();
        tracing::info!(mutual, envoy = ?tls.allow.envoy, report = ?tls.allow.report, "gRPC listener uses TLS");
        allow = tls.allow.clone();
    } else {
        for addr in std::iter::once(grpc_addr).chain(report_addr) {
            if !addr.ip().is_loopback() {
                tracing::warn!(listener = %addr, "gRPC listener is plaintext on a non-loopback address (listen.allow_plaintext): whoever reaches it can bill any key; keep it behind a NetworkPolicy or use mTLS");
            }
        }
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| RunError::Reflection(e.to_string()))?;
    let mut builder = builder.layer(PeerGate::new(allow, metrics.clone()));
    let report = UsageServer::new(report).max_decoding_message_size(max_message);
    // The Report API on its own listener (same TLS, allow-lists and limits), or beside
    // the Check and the access log.
    let (report_here, report_apart) = match listeners.report {
        None => (Some(report), None),
        Some(listener) => {
            tracing::info!(report = ?report_addr, "the Report API has its own listener (listen.report)");
            let incoming = listen::GrpcIncoming::new(
                listener,
                Listener::Report,
                listen::ConnectionCap::new(l.grpc_max_connections),
                listen::GRPC_HANDSHAKE_TIMEOUT,
                &metrics,
            );
            let server = builder
                .add_service(health_service.clone())
                .add_service(reflection.clone())
                .add_service(report)
                .serve_with_incoming_shutdown(incoming, token.clone().cancelled_owned());
            (None, Some(server))
        }
    };
    let grpc = builder
        .add_service(health_service)
        .add_service(reflection)
        .add_service(CheckServer::new(authz, max_message))
        .add_service(access_log)
        .add_optional_service(report_here)
        .add_optional_service(xds_server)
        .serve_with_incoming_shutdown(incoming, token.clone().cancelled_owned());
    let servers = async {
        match report_apart {
            Some(report) => tokio::try_join!(grpc, report).map(|_| ()),
            None => grpc.await,
        }
    };

    tokio::pin!(servers);
    let result = tokio::select! {
        r = &mut servers => r,
        _ = shutdown => {
            // Graceful: stop accepting, let in-flight Checks finish.
            token.cancel();
            servers.await
        }
    };
    tracing::info!("shutting down");
    token.cancel();
    tracker.close();
    tracker.wait().await;
    // Everything that appends has stopped: make the outbox durable for the next start.
    outbox.close().await;
    let left = outbox.stats();
    if left.pending_records > 0 {
        tracing::info!(
            records = left.pending_records,
            "unpublished records stay in the outbox for the next start"
        );
    }
    result?;
    match admin_task.await {
        Ok(r) => r?,
        Err(e) => tracing::error!(error = %e, "admin server task failed"),
    }
    tracing::info!("stopped");
    Ok(())
}
