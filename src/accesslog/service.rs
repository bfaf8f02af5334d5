//! The gRPC service for `envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs`,
//! reading raw message bytes: tonic hands each message over undecoded and `wire.rs`
//! decodes it entry by entry. The stream is ended only by the transport (a reset, a
//! broken gRPC frame, a message over the size limit), never by what a message holds.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::{ClientStreamingService, Grpc, NamedService};
use tonic::{Request, Response, Status, Streaming};

use super::wire::{decode_entry, decode_message};
use super::{Outcome, Rules, Skipped, entry_outcome};
use crate::config::{CheckConfig, UsageConfig};
use crate::grpc::BoxFuture;
use crate::keys::KeyStore;
use crate::metrics::Metrics;
use crate::outbox::Durability;
use crate::usage::recorder::{Ingress, Recorder};

const STREAM_PATH: &str = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs";

/// How long a stream is still read after shutdown starts: Envoy's entries already on
/// the wire become records instead of being dropped with the connection.
const READ_AFTER_SHUTDOWN: std::time::Duration = std::time::Duration::from_millis(300);

/// Turns access-log messages into records.
pub struct AccessLog {
    keys: Arc<KeyStore>,
    recorder: Arc<Recorder>,
    check: CheckConfig,
    usage: UsageConfig,
    shutdown: CancellationToken,
}

/// The `AccessLogService` gRPC service.
#[derive(Clone)]
pub struct AccessLogServer {
    inner: Arc<AccessLog>,
    max_message_bytes: usize,
}

impl AccessLogServer {
    pub fn new(
        keys: Arc<KeyStore>,
        recorder: Arc<Recorder>,
        check: CheckConfig,
        usage: UsageConfig,
        max_message_bytes: usize,
        shutdown: CancellationToken,
    ) -> Self {
        AccessLogServer {
            inner: Arc::new(AccessLog {
                keys,
                recorder,
                check,
                usage,
                shutdown,
            }),
            max_message_bytes,
        }
    }
}

impl AccessLog {
    fn metrics(&self) -> &Metrics {
        self.recorder.metrics()
    }

    /// One message: every entry that decodes is judged, every one that does not is
    /// skipped and counted. Records are written to the outbox as one batch.
    async fn handle(&self, bytes: &[u8], node: &mut String) {
        let metrics = self.metrics();
        let (message, broken) = decode_message(bytes);
        if let Some(id) = &message.node_id {
            node.clone_from(&id.to_string());
            tracing::info!(node = %node, log_name = %message.log_name.as_deref().unwrap_or(""),
                "access-log stream identified");
        }
        if let Some(at) = broken {
            metrics.access_log_messages_malformed.inc();
            tracing::warn!(
                node = %node,
                offset = at.offset,
                bytes = bytes.len(),
                entries_before = message.http_entries.len(),
                "access-log message does not decode past this byte; its entries before it are used, the rest cannot be read"
            );
        }
        metrics.tcp_entries.inc_by(message.tcp_entries as u64);
        let skipped = message.http_entries_malformed;
        metrics
            .http_entries
            .inc_by((message.http_entries.len() + skipped) as u64);
        metrics.access_log_entries_skipped(Skipped::Malformed, skipped as u64);

        let rules = Rules {
            check: &self.check,
            usage: &self.usage,
        };
        let namespaces = rules.namespaces();
        let mut records = Vec::new();
        {
            let view = self.keys.view();
            for raw in &message.http_entries {
                let entry = match decode_entry(raw, &namespaces) {
                    Ok(entry) => entry,
                    Err(at) => {
                        metrics.access_log_entries_skipped(Skipped::Malformed, 1);
                        tracing::warn!(node = %node, offset = at.offset, bytes = raw.len(),
                            "access-log entry does not decode; skipped");
                        continue;
                    }
                };
                match entry_outcome(&entry, &view, &rules) {
                    Outcome::NotBilled(why) => metrics.entry_not_billed(why),
                    Outcome::Declared(d) => {
                        for reason in d.rejected {
                            self.recorder.reject(
                                reason,
                                Ingress::AccessLog,
                                &d.app_id,
                                &entry.path,
                            );
                        }
                        for problem in d.metadata_dropped {
                            self.recorder.metadata_dropped(
                                problem,
                                Ingress::AccessLog,
                                &d.app_id,
                                &entry.path,
                            );
                        }
                        records.extend(d.records);
                    }
                }
            }
        }
        // Written (not yet fsynced) is enough here: it survives a keymeter crash, and
        // Envoy would not resend the entry anyway.
        let _ = self.recorder.record(&records, Durability::Written).await;
    }

    /// At shutdown: takes what Envoy already sent (buffered in the connection) before
    /// the stream is dropped, so those entries still become records.
    async fn drain(&self, stream: &mut Streaming<Bytes>, node: &mut String) {
        let deadline = tokio::time::Instant::now() + READ_AFTER_SHUTDOWN;
        while let Ok(Ok(Some(message))) = tokio::time::timeout_at(deadline, stream.message()).await
        {
            self.handle(&message, node).await;
        }
        tracing::debug!(node = %node, "access-log stream drained for shutdown");
    }

    async fn stream(&self, request: Request<Streaming<Bytes>>) -> Result<Bytes, Status> {
        let peer = request.remote_addr();
        let mut stream = request.into_inner();
        let metrics = self.metrics();
        metrics.access_log_streams.inc();
        metrics.access_log_streams_opened.inc();
        let _gauge = StreamGauge(metrics);
        tracing::info!(peer = ?peer, "access-log stream connected");
        let mut node = String::new();
        loop {
            let message = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    self.drain(&mut stream, &mut node).await;
                    break;
                }
                m = stream.message() => m,
            };
            match message {
                Ok(Some(bytes)) => self.handle(&bytes, &mut node).await,
                Ok(None) => break,
                Err(status) => {
                    // Only the transport gets here: content never ends a stream.
                    metrics.access_log_stream_errors.inc();
                    tracing::warn!(node = %node, error = %status, "access-log stream failed");
                    return Err(status);
                }
            }
        }
        tracing::info!(node = %node, "access-log stream closed");
        // An empty StreamAccessLogsResponse.
        Ok(Bytes::new())
    }
}

/// Decrements the stream gauge however the stream ends.
struct StreamGauge<'a>(&'a Metrics);

impl Drop for StreamGauge<'_> {
    fn drop(&mut self) {
        self.0.access_log_streams.dec();
    }
}

impl NamedService for AccessLogServer {
    const NAME: &'static str = "envoy.service.accesslog.v3.AccessLogService";
}

struct StreamLogs(Arc<AccessLog>);

impl ClientStreamingService<Bytes> for StreamLogs {
    type Response = Bytes;
    type Future = BoxFuture<Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { inner.stream(request).await.map(Response::new) })
    }
}

impl<B> tower_service::Service<http::Request<B>> for AccessLogServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != STREAM_PATH {
            return crate::grpc::unimplemented();
        }
        let inner = self.inner.clone();
        let max = self.max_message_bytes;
        Box::pin(async move {
            let mut grpc =
                Grpc::new(crate::grpc::RawCodec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.client_streaming(StreamLogs(inner), request).await)
        })
    }
}
