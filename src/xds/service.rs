//! The gRPC service for
//! `envoy.service.extension.v3.ExtensionConfigDiscoveryService/StreamExtensionConfigs`
//! (state of the world), one task per Envoy stream.
//!
//! The protocol, per stream: Envoy asks for the resource by name (nonce empty) and gets
//! the newest version. It answers each response with a request carrying that
//! response's nonce: an ACK (`version_info` = the version, no `error_detail`) or a NACK
//! (`error_detail` set, `version_info` = what it still runs). keymeter keeps at most one
//! response unanswered per stream: a version that appears meanwhile is sent after the
//! answer, and several versions that appear meanwhile become one (the newest). A NACKed
//! version is not sent again; the next change makes a new one. Requests with an older
//! nonce are stale and ignored.
//!
//! The resource holds raw keys, so with mTLS allow-lists this service takes the same
//! identities as Check and the access log (`listen.grpc_tls.allow.envoy`).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{BufMut, Bytes};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::server::{Grpc, NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use super::{FilterSettings, TYPED_EXTENSION_CONFIG_TYPE, Version, Versions};
use crate::grpc::{BoxFuture, RawCodec};
use crate::metrics::{Metrics, XdsMetrics};

const STREAM_PATH: &str =
    "/envoy.service.extension.v3.ExtensionConfigDiscoveryService/StreamExtensionConfigs";

/// Envoy's NACK text is logged up to this many bytes.
const MAX_LOGGED_ERROR: usize = 512;

/// A response in pieces, written one after the other (see [`Version::frame`]).
pub struct Frame([Bytes; 3]);

/// Writes [`Frame`]s; reads request bytes undecoded (decoded per request, so a bad one
/// is answered rather than failing in the codec).
#[derive(Clone, Copy, Default)]
struct FrameCodec;

impl Codec for FrameCodec {
    type Encode = Frame;
    type Decode = Bytes;
    type Encoder = FrameCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> FrameCodec {
        FrameCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for FrameCodec {
    type Item = Frame;
    type Error = Status;

    fn encode(&mut self, item: Frame, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        for piece in item.0 {
            dst.put(piece);
        }
        Ok(())
    }
}

struct Shared {
    settings: Arc<FilterSettings>,
    versions: Versions,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

/// The ECDS gRPC service.
#[derive(Clone)]
pub struct XdsServer {
    inner: Arc<Shared>,
    max_message_bytes: usize,
}

impl XdsServer {
    /// Serves `versions` as the resource `settings.resource_name`. Who may subscribe is
    /// the gRPC listener's `PeerGate` (`listen.grpc_tls.allow.envoy`).
    pub fn new(
        settings: Arc<FilterSettings>,
        versions: Versions,
        metrics: Arc<Metrics>,
        max_message_bytes: usize,
        shutdown: CancellationToken,
    ) -> XdsServer {
        XdsServer {
            inner: Arc::new(Shared {
                settings,
                versions,
                metrics,
                shutdown,
            }),
            max_message_bytes,
        }
    }
}

impl NamedService for XdsServer {
    const NAME: &'static str = "envoy.service.extension.v3.ExtensionConfigDiscoveryService";
}

/// A response sent and not yet answered.
struct Pending {
    nonce: String,
    version: Arc<Version>,
    sent: Instant,
}

/// One Envoy's stream.
#[derive(Default)]
struct StreamState {
    node: String,
    subscribed: bool,
    /// Send the newest version even if it was sent before (a new subscription).
    resend: bool,
    pending: Option<Pending>,
    last_sent: Option<String>,
    accepted: Option<String>,
    nonces: u64,
    warned_names: bool,
}

/// What a request did, for the caller to count and log.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    None,
    Ack,
    Nack,
    Stale,
    WrongType,
}

impl StreamState {
    fn on_request(&mut self, req: DiscoveryRequest, shared: &Shared) -> Answer {
        if self.node.is_empty()
            && let Some(node) = &req.node
        {
            self.node = node.id.clone();
            tracing::info!(node = %self.node, cluster = %node.cluster, names = ?req.resource_names, "xDS: Envoy subscribed");
        }
        if req.type_url != TYPED_EXTENSION_CONFIG_TYPE {
            tracing::warn!(node = %self.node, type_url = %req.type_url, "xDS: request for a type keymeter does not serve; ignored");
            return Answer::WrongType;
        }
        let m = &shared.metrics.xds;
        let mut answer = Answer::None;
        if !req.response_nonce.is_empty() {
            match self.pending.take() {
                Some(p) if p.nonce == req.response_nonce => {
                    if let Some(error) = &req.error_detail {
                        m.nacks.inc();
                        answer = Answer::Nack;
                        tracing::warn!(
                            node = %self.node,
                            rejected = %p.version.version,
                            keys = p.version.keys,
                            running = ?self.accepted,
                            code = error.code,
                            error = %truncated(&error.message),
                            "xDS: Envoy rejected the api_key_auth version (NACK); it keeps enforcing the one it runs"
                        );
                    } else {
                        m.acks.inc();
                        m.push_duration.observe(p.sent.elapsed().as_secs_f64());
                        answer = Answer::Ack;
                        tracing::info!(
                            node = %self.node,
                            version = %p.version.version,
                            keys = p.version.keys,
                            push_ms = p.sent.elapsed().as_secs_f64() * 1000.0,
                            since_change_ms = p.version.changed_at.elapsed().as_secs_f64() * 1000.0,
                            "xDS: Envoy accepted the api_key_auth version"
                        );
                        self.accepted = Some(p.version.version.clone());
                    }
                }
                other => {
                    // An answer to an older response: the protocol says ignore it.
                    self.pending = other;
                    return Answer::Stale;
                }
            }
        }
        let wants = req
            .resource_names
            .iter()
            .any(|n| *n == shared.settings.resource_name);
        if !wants && !req.resource_names.is_empty() && !self.warned_names {
            self.warned_names = true;
            tracing::warn!(
                node = %self.node,
                names = ?req.resource_names,
                serves = %shared.settings.resource_name,
                "xDS: Envoy asks for resources keymeter does not serve (check the filter's config_discovery name against xds.resource_name)"
            );
        }
        if req.response_nonce.is_empty() || wants != self.subscribed {
            self.resend = wants;
        }
        self.subscribed = wants;
        answer
    }

    /// The next response to send, if any: the newest version when subscribed, nothing
    /// unanswered, and it was not sent yet (or a new subscription asks for it).
    fn next_frame(&mut self, newest: Option<Arc<Version>>) -> Option<Frame> {
        if !self.subscribed || self.pending.is_some() {
            return None;
        }
        let version = newest?;
        if !self.resend && self.last_sent.as_deref() == Some(&version.version) {
            return None;
        }
        self.resend = false;
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        let frame = Frame(version.frame(&nonce));
        self.last_sent = Some(version.version.clone());
        self.pending = Some(Pending {
            nonce,
            version,
            sent: Instant::now(),
        });
        Some(frame)
    }
}

fn truncated(message: &str) -> &str {
    if message.len() <= MAX_LOGGED_ERROR {
        return message;
    }
    let mut end = MAX_LOGGED_ERROR;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Keeps the connected-Envoys gauge right however a stream ends.
struct Connected<'a>(&'a XdsMetrics);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.connected.dec();
    }
}

async fn serve(
    shared: Arc<Shared>,
    mut requests: Streaming<Bytes>,
    tx: mpsc::Sender<Result<Frame, Status>>,
) {
    let m = &shared.metrics.xds;
    m.connected.inc();
    let _connected = Connected(m);
    let mut versions = shared.versions.clone();
    versions.mark_unchanged();
    let mut state = StreamState::default();
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            message = requests.message() => match message {
                Ok(Some(bytes)) => match DiscoveryRequest::decode(bytes) {
                    Ok(req) => {
                        state.on_request(req, &shared);
                    }
                    Err(e) => {
                        tracing::warn!(node = %state.node, error = %e, "xDS: a request is not a DiscoveryRequest; closing the stream");
                        let _ = tx.send(Err(Status::invalid_argument("not a DiscoveryRequest"))).await;
                        break;
                    }
                },
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(node = %state.node, error = %status, "xDS stream failed");
                    break;
                }
            },
            changed = versions.changed() => if changed.is_err() { break },
        }
        let newest = versions.borrow_and_update().clone();
        if let Some(frame) = state.next_frame(newest) {
            if tx.send(Ok(frame)).await.is_err() {
                break;
            }
            m.pushes.inc();
        }
    }
    tracing::info!(node = %state.node, running = ?state.accepted, "xDS: Envoy stream closed");
}

struct Streams(Arc<Shared>);

impl StreamingService<Bytes> for Streams {
    type Response = Frame;
    type ResponseStream = ReceiverStream<Result<Frame, Status>>;
    type Future = BoxFuture<Result<Response<Self::ResponseStream>, Status>>;

    fn call(&mut self, request: Request<Streaming<Bytes>>) -> Self::Future {
        let shared = self.0.clone();
        Box::pin(async move {
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(serve(shared, request.into_inner(), tx));
            Ok(Response::new(ReceiverStream::new(rx)))
        })
    }
}

impl<B> tower_service::Service<http::Request<B>> for XdsServer
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
            // Delta and Fetch are not served: Envoy's ECDS uses the stream.
            return crate::grpc::unimplemented();
        }
        let inner = self.inner.clone();
        let max = self.max_message_bytes;
        Box::pin(async move {
            let mut grpc = Grpc::new(FrameCodec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.streaming(Streams(inner), request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::tests::settings;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::rpc::Status as RpcStatus;

    fn shared(versions: Versions) -> Shared {
        Shared {
            settings: Arc::new(settings()),
            versions,
            metrics: Arc::new(Metrics::new()),
            shutdown: CancellationToken::new(),
        }
    }

    fn request(version: &str, nonce: &str, nack: bool) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            node: Some(Node {
                id: "envoy-1".into(),
                ..Default::default()
            }),
            resource_names: vec!["keymeter.api_key_auth".into()],
            type_url: TYPED_EXTENSION_CONFIG_TYPE.into(),
            response_nonce: nonce.into(),
            error_detail: nack.then(|| RpcStatus {
                code: 3,
                message: "Proto constraint validation failed".into(),
                details: vec![],
            }),
            ..Default::default()
        }
    }

    fn version(keys: &[(&str, &str)]) -> Arc<Version> {
        Arc::new(super::super::encode(&settings(), keys.iter().copied(), Instant::now()).unwrap())
    }

    #[test]
    fn one_response_in_flight_acks_and_nacks_keep_the_last_accepted_version() {
        let (_tx, rx) = tokio::sync::watch::channel(None);
        let s = shared(rx);
        let mut st = StreamState::default();
        let v1 = version(&[("k1", "a")]);
        assert_eq!(st.on_request(request("", "", false), &s), Answer::None);
        assert_eq!(st.node, "envoy-1");
        assert!(
            st.next_frame(None).is_none(),
            "nothing to send before a version exists"
        );
        assert!(st.next_frame(Some(v1.clone())).is_some());
        let v2 = version(&[("k1", "a"), ("k2", "b")]);
        assert!(
            st.next_frame(Some(v2.clone())).is_none(),
            "one response in flight"
        );
        assert_eq!(
            st.on_request(request(&v1.version, "1", false), &s),
            Answer::Ack
        );
        assert_eq!(st.accepted.as_deref(), Some(v1.version.as_str()));
        assert_eq!(s.metrics.xds.acks.get(), 1);
        assert!(
            st.next_frame(Some(v2.clone())).is_some(),
            "the newer version after the ACK"
        );
        // Envoy rejects v2: v1 stays what it runs, v2 is not sent again.
        assert_eq!(
            st.on_request(request(&v1.version, "2", true), &s),
            Answer::Nack
        );
        assert_eq!(s.metrics.xds.nacks.get(), 1);
        assert_eq!(st.accepted.as_deref(), Some(v1.version.as_str()));
        assert!(
            st.next_frame(Some(v2.clone())).is_none(),
            "a NACKed version is not resent"
        );
        // A stale answer changes nothing.
        let v3 = version(&[("k3", "c")]);
        assert!(st.next_frame(Some(v3.clone())).is_some());
        assert_eq!(
            st.on_request(request(&v1.version, "2", false), &s),
            Answer::Stale
        );
        assert!(st.pending.is_some());
        assert_eq!(
            st.on_request(request(&v3.version, "3", false), &s),
            Answer::Ack
        );
        assert_eq!(st.accepted.as_deref(), Some(v3.version.as_str()));
    }

    #[test]
    fn only_the_served_name_and_type_are_answered() {
        let (_tx, rx) = tokio::sync::watch::channel(None);
        let s = shared(rx);
        let mut st = StreamState::default();
        let mut other = request("", "", false);
        other.resource_names = vec!["something.else".into()];
        st.on_request(other, &s);
        assert!(st.next_frame(Some(version(&[]))).is_none());
        let mut wrong = request("", "", false);
        wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert_eq!(st.on_request(wrong, &s), Answer::WrongType);
        st.on_request(request("", "", false), &s);
        assert!(st.next_frame(Some(version(&[]))).is_some());
    }

    #[test]
    fn a_long_error_is_cut_at_a_character_boundary() {
        let long = "é".repeat(400);
        let cut = truncated(&long);
        assert!(cut.len() <= MAX_LOGGED_ERROR);
        assert!(long.starts_with(cut));
    }
}
