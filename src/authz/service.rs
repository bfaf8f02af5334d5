//! The gRPC service for `envoy.service.auth.v3.Authorization/Check`, serving raw
//! protobuf bytes: the request goes to [`AuthzService::check_bytes`] undecoded and the
//! answer comes back already encoded (see `wire.rs` for why).

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use std::net::IpAddr;
use std::time::Instant;

use bytes::Bytes;
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
use prost::Message;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use super::answers::Answers;
use super::guard::InvalidKeyGuard;
use super::{Asker, Decision, decide, find_key, wire};
use crate::config::CheckConfig;
use crate::grpc::{BoxFuture, RawCodec};
use crate::keys::KeyStore;
use crate::metrics::Metrics;

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// The Check: scan, decide, answer, count.
pub struct AuthzService {
    keys: Arc<KeyStore>,
    metrics: Arc<Metrics>,
    config: CheckConfig,
    answers: Answers,
    guard: Option<Arc<InvalidKeyGuard>>,
}

impl AuthzService {
    pub fn new(keys: Arc<KeyStore>, metrics: Arc<Metrics>, config: CheckConfig) -> Self {
        AuthzService {
            keys,
            metrics,
            answers: Answers::new(&config),
            guard: config
                .invalid_key_limit
                .as_ref()
                .map(|limit| Arc::new(InvalidKeyGuard::new(limit))),
            config,
        }
    }

    /// Decides one encoded `CheckRequest` and returns the encoded `CheckResponse`.
    /// Every outcome is an answer, even bytes that are not a CheckRequest (a deny,
    /// 400): an error would leave the decision to Envoy's `failure_mode_allow`.
    pub fn check_bytes(&self, request: &[u8]) -> Bytes {
        let started = Instant::now();
        let Ok(view) = wire::scan(request) else {
            self.metrics.checks.malformed.inc();
            return self.answers.malformed();
        };
        let key = find_key(&self.config, |name| view.header(name));
        let keys = self.keys.view();
        let asker = self.asker(self.client_address(&view));
        let response = match decide(key, &keys, asker) {
            Decision::Allow {
                app_id,
                fingerprint,
            } => {
                self.metrics.checks.allowed.inc();
                self.answers.allow(app_id, fingerprint)
            }
            Decision::MissingKey => {
                self.metrics.checks.missing_key.inc();
                self.answers.missing_key()
            }
            Decision::InvalidKey => {
                self.metrics.checks.invalid_key.inc();
                self.answers.invalid_key()
            }
            Decision::RateLimited { retry_after } => {
                self.metrics.checks.rate_limited.inc();
                self.answers.too_many(retry_after)
            }
            Decision::Blocked { reason } => {
                self.metrics.checks.blocked_key.inc();
                self.answers.blocked(reason)
            }
        };
        self.metrics
            .check_duration
            .observe(started.elapsed().as_secs_f64());
        response
    }

    /// [`Self::check_bytes`] on prost types: for tests and tools, not the hot path.
    pub fn check(&self, request: &CheckRequest) -> CheckResponse {
        let answer = self.check_bytes(&request.encode_to_vec());
        CheckResponse::decode(answer).expect("keymeter encodes valid CheckResponses")
    }

    /// The address the brute-force guard counts this request by: the configured
    /// client-address header (Envoy's `x-envoy-external-address`), else the peer.
    fn client_address(&self, view: &wire::CheckView<'_>) -> Option<IpAddr> {
        let header = &self
            .config
            .invalid_key_limit
            .as_ref()?
            .client_address_header;
        (!header.is_empty())
            .then(|| view.header(header)?.trim().parse().ok())
            .flatten()
            .or_else(|| view.source_ip())
    }

    /// The brute-force guard's view of `client`, when the guard is on.
    fn asker(&self, client: Option<IpAddr>) -> Option<Asker<'_>> {
        Some(Asker {
            guard: self.guard.as_deref()?,
            client: client?,
            now: Instant::now(),
        })
    }

    /// The brute-force guard, to share with the Report API: one count per address.
    pub fn guard(&self) -> Option<Arc<InvalidKeyGuard>> {
        self.guard.clone()
    }
}

/// The `Authorization` gRPC service.
#[derive(Clone)]
pub struct CheckServer {
    inner: Arc<AuthzService>,
    max_message_bytes: usize,
}

impl CheckServer {
    pub fn new(inner: AuthzService, max_message_bytes: usize) -> CheckServer {
        CheckServer {
            inner: Arc::new(inner),
            max_message_bytes,
        }
    }
}

impl NamedService for CheckServer {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

struct Check(Arc<AuthzService>);

impl UnaryService<Bytes> for Check {
    type Response = Bytes;
    type Future = Ready<Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        // Decided synchronously: an in-memory lookup, nothing to await.
        ready(Ok(Response::new(self.0.check_bytes(request.get_ref()))))
    }
}

impl<B> tower_service::Service<http::Request<B>> for CheckServer
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
        if request.uri().path() != CHECK_PATH {
            return crate::grpc::unimplemented();
        }
        let inner = self.inner.clone();
        let max = self.max_message_bytes;
        Box::pin(async move {
            let mut grpc = Grpc::new(RawCodec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.unary(Check(inner), request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::answers::{
        GRPC_PERMISSION_DENIED, GRPC_RESOURCE_EXHAUSTED, GRPC_UNAUTHENTICATED,
    };
    use super::super::{METADATA_APP_ID, METADATA_KEY_FINGERPRINT};
    use super::*;
    use crate::authz::tests::{headers, store};
    use envoy_types::ext_authz::v3::pb::{DeniedHttpResponse, HeaderValueOption, HttpResponse};
    use envoy_types::pb::google::protobuf::value::Kind;

    fn request(pairs: &[(&str, &str)]) -> CheckRequest {
        use envoy_types::pb::envoy::service::auth::v3::{
            AttributeContext,
            attribute_context::{HttpRequest, Request as AttrRequest},
        };
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttrRequest {
                    http: Some(HttpRequest {
                        headers: headers(pairs),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    fn service(config: CheckConfig) -> AuthzService {
        AuthzService::new(Arc::new(store()), Arc::new(Metrics::new()), config)
    }

    fn denied(r: &CheckResponse) -> &DeniedHttpResponse {
        match r.http_response.as_ref().unwrap() {
            HttpResponse::DeniedResponse(d) => d,
            other => panic!("not denied: {other:?}"),
        }
    }

    fn header_of<'a>(headers: &'a [HeaderValueOption], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == name)
            .map(|h| h.value.as_str())
    }

    #[test]
    fn deny_answers_carry_status_json_and_never_the_key() {
        let svc = service(CheckConfig::default());
        for (key, http, grpc, error) in [
            (None, 401, GRPC_UNAUTHENTICATED, "missing_api_key"),
            (
                Some("sk-nope"),
                401,
                GRPC_UNAUTHENTICATED,
                "invalid_api_key",
            ),
            (
                Some("sk-blocked"),
                403,
                GRPC_PERMISSION_DENIED,
                "blocked_api_key",
            ),
        ] {
            let pairs: Vec<(&str, &str)> = key.iter().map(|k| ("api-key", *k)).collect();
            let r = svc.check(&request(&pairs));
            assert_eq!(r.status.as_ref().unwrap().code, grpc);
            let d = denied(&r);
            assert_eq!(d.status.as_ref().unwrap().code, http);
            let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
            assert_eq!(body["error"], error);
            assert!(body["message"].is_string());
            assert_eq!(
                header_of(&d.headers, "content-type"),
                Some("application/json")
            );
            assert_eq!(
                header_of(&d.headers, "www-authenticate").is_some(),
                http == 401
            );
            if let Some(k) = key {
                assert!(!d.body.contains(k));
            }
        }
        let r = svc.check(&request(&[("api-key", "sk-blocked")]));
        assert!(denied(&r).body.contains("balance"));
        let r = svc.check(&request(&[]));
        assert!(
            denied(&r)
                .body
                .contains("the api-key header or the apikey header"),
            "{}",
            denied(&r).body
        );
    }

    #[test]
    fn allow_sets_app_id_header_and_metadata() {
        let svc = service(CheckConfig::default());
        let r = svc.check(&request(&[("api-key", "sk-good")]));
        assert_eq!(r.status.as_ref().unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = &r.http_response else {
            panic!("not ok: {r:?}")
        };
        assert_eq!(header_of(&ok.headers, "x-billing-app-id"), Some("app-1"));
        assert!(ok.headers_to_remove.is_empty());
        let md = &r.dynamic_metadata.as_ref().unwrap().fields;
        assert_eq!(
            md[METADATA_APP_ID].kind,
            Some(Kind::StringValue("app-1".into()))
        );
        let Some(Kind::StringValue(fp)) = &md[METADATA_KEY_FINGERPRINT].kind else {
            panic!()
        };
        assert_eq!(fp, &crate::keys::fingerprint("sk-good"));
    }

    #[test]
    fn brute_force_guard_answers_429_to_invalid_keys_only() {
        use envoy_types::pb::envoy::config::core::v3::{
            Address, SocketAddress, address::Address as Kind,
        };
        use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
        let svc = service(CheckConfig {
            invalid_key_limit: Some(crate::config::InvalidKeyLimit {
                max_attempts: 3,
                window_secs: 60,
                max_clients: 100,
                ..Default::default()
            }),
            ..CheckConfig::default()
        });
        let from = |ip: &str, key: &str| {
            let mut r = request(&[("api-key", key)]);
            r.attributes.as_mut().unwrap().source = Some(Peer {
                address: Some(Address {
                    address: Some(Kind::SocketAddress(SocketAddress {
                        address: ip.into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            });
            r
        };
        let code = |r: &CheckResponse| match r.http_response.as_ref().unwrap() {
            HttpResponse::DeniedResponse(d) => d.status.as_ref().unwrap().code,
            HttpResponse::OkResponse(_) => 200,
            other => panic!("unexpected {other:?}"),
        };
        for _ in 0..3 {
            assert_eq!(code(&svc.check(&from("203.0.113.9", "sk-nope"))), 401);
        }
        let limited = svc.check(&from("203.0.113.9", "sk-nope"));
        assert_eq!(code(&limited), 429);
        assert_eq!(
            limited.status.as_ref().unwrap().code,
            GRPC_RESOURCE_EXHAUSTED
        );
        let d = denied(&limited);
        let retry: u64 = header_of(&d.headers, "retry-after")
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry));
        assert!(d.body.contains("too_many_invalid_keys"));
        // The same address with a valid key, and another address, are unaffected.
        assert_eq!(code(&svc.check(&from("203.0.113.9", "sk-good"))), 200);
        assert_eq!(code(&svc.check(&from("203.0.113.10", "sk-nope"))), 401);
        assert_eq!(svc.metrics.checks.rate_limited.get(), 1);
    }

    #[test]
    fn strip_key_header_removes_every_key_header() {
        let svc = service(CheckConfig {
            strip_key_header: true,
            ..CheckConfig::default()
        });
        let r = svc.check(&request(&[("apikey", "sk-good")]));
        let Some(HttpResponse::OkResponse(ok)) = &r.http_response else {
            panic!()
        };
        assert_eq!(ok.headers_to_remove, ["api-key", "apikey"]);
    }
}
