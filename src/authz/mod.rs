//! ext_authz `Check`: is this request's API key valid right now?
//!
//! [`decide`] is the whole decision: a plain function over the in-memory key view, no
//! gRPC types, no I/O. [`AuthzService`] only converts. Every denial is an
//! `Ok(CheckResponse)` with a deny status: an `Err(Status)` is an *error* to Envoy,
//! which then applies `failure_mode_allow` and may let the request through.

pub mod guard;
mod service;
pub mod wire;

pub use service::CheckServer;
/// What a key header that cannot be read as one value (sent twice, not UTF-8) stands
/// for, wherever keys are read: it matches no key.
pub use wire::UNREADABLE as UNREADABLE_KEY;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use envoy_types::ext_authz::v3::pb::{
    CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue,
    HeaderValueOption, HttpResponse, HttpStatus,
};
use envoy_types::pb::google::rpc;
use prost::Message;

use crate::admin::metrics::Metrics;
use crate::config::CheckConfig;
use crate::keys::{Fingerprint, KeyStore, KeyView};

/// Dynamic-metadata field names the access log reads back (under the
/// `envoy.filters.http.ext_authz` namespace).
pub const METADATA_APP_ID: &str = "app_id";
pub const METADATA_KEY_FINGERPRINT: &str = "key_fp";

/// gRPC status codes carried inside a CheckResponse.
const GRPC_INVALID_ARGUMENT: i32 = 3;
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
const GRPC_UNAUTHENTICATED: i32 = 16;

/// The outcome of a Check (or of a Report API call's key), free of transport types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    Allow {
        app_id: &'a str,
        fingerprint: u64,
    },
    MissingKey,
    InvalidKey,
    Blocked {
        reason: &'a str,
    },
    /// An invalid key from an address over the brute-force guard's limit.
    RateLimited {
        retry_after: Duration,
    },
}

/// Who asks, for the brute-force guard: its address, and now.
#[derive(Clone, Copy)]
pub struct Asker<'g> {
    pub guard: &'g guard::InvalidKeyGuard,
    pub client: IpAddr,
    pub now: Instant,
}

/// Finds the key in request headers: `key_headers` in order (the first present and
/// non-empty one wins), then `authorization: Bearer <key>` if enabled. Only ASCII
/// spaces and tabs around a value are ignored, as HTTP itself does.
pub fn find_key<'h>(
    config: &CheckConfig,
    header: impl Fn(&str) -> Option<&'h str>,
) -> Option<&'h str> {
    for name in &config.key_headers {
        if let Some(v) = header(name).map(trim_ows)
            && !v.is_empty()
        {
            return Some(v);
        }
    }
    if config.accept_bearer
        && let Some(v) = header("authorization")
    {
        let v = trim_ows(v);
        if v.len() > 7 && v.is_char_boundary(7) && v[..7].eq_ignore_ascii_case("bearer ") {
            let key = trim_ows(&v[7..]);
            if !key.is_empty() {
                return Some(key);
            }
        }
    }
    None
}

/// HTTP's optional whitespace: spaces and tabs, nothing Unicode.
fn trim_ows(v: &str) -> &str {
    v.trim_matches([' ', '\t'])
}

/// The decision for a request whose key (if any) is `key`. An invalid key counts
/// against `asker`'s address with the brute-force guard (when it is on and the address
/// known), which may turn it into [`Decision::RateLimited`]; valid keys never touch it.
pub fn decide<'v>(key: Option<&str>, keys: &'v KeyView, asker: Option<Asker<'_>>) -> Decision<'v> {
    let Some(key) = key else {
        return Decision::MissingKey;
    };
    match keys.get(key) {
        None => match asker.and_then(|a| a.guard.on_invalid(a.client, a.now)) {
            Some(retry_after) => Decision::RateLimited { retry_after },
            None => Decision::InvalidKey,
        },
        Some(k) if k.blocked => Decision::Blocked { reason: k.reason },
        Some(k) => Decision::Allow {
            app_id: k.app_id,
            fingerprint: k.fingerprint,
        },
    }
}

/// Precomputed parts of every answer, so a Check allocates only what varies.
struct Answers {
    app_id_header: String,
    missing_key_message: String,
    headers_to_remove: Vec<String>,
    www_authenticate: String,
    /// The two common denials, encoded once.
    missing_key: Bytes,
    invalid_key: Bytes,
    /// The answer to bytes that are not a CheckRequest.
    malformed: Bytes,
}

pub struct AuthzService {
    keys: Arc<KeyStore>,
    metrics: Arc<Metrics>,
    config: CheckConfig,
    answers: Answers,
    guard: Option<Arc<guard::InvalidKeyGuard>>,
}

impl AuthzService {
    pub fn new(keys: Arc<KeyStore>, metrics: Arc<Metrics>, config: CheckConfig) -> Self {
        let answers = Answers {
            app_id_header: config.app_id_header.clone(),
            missing_key_message: missing_key_message(&config),
            headers_to_remove: if config.strip_key_header {
                let mut h = config.key_headers.clone();
                if config.accept_bearer {
                    h.push("authorization".into());
                }
                h
            } else {
                Vec::new()
            },
            www_authenticate: format!("ApiKey realm=\"{}\"", config.realm),
            missing_key: Bytes::new(),
            invalid_key: Bytes::new(),
            malformed: Bytes::new(),
        };
        let mut service = AuthzService {
            keys,
            metrics,
            config,
            answers,
            guard: None,
        };
        service.answers.missing_key = service
            .deny(
                401,
                GRPC_UNAUTHENTICATED,
                "missing_api_key",
                &service.answers.missing_key_message,
            )
            .encode_to_vec()
            .into();
        service.answers.invalid_key = service
            .deny(
                401,
                GRPC_UNAUTHENTICATED,
                "invalid_api_key",
                "the API key is not valid",
            )
            .encode_to_vec()
            .into();
        service.answers.malformed = service
            .deny(
                400,
                GRPC_INVALID_ARGUMENT,
                "malformed_check_request",
                "the authorization request could not be read",
            )
            .encode_to_vec()
            .into();
        service.guard = service
            .config
            .invalid_key_limit
            .as_ref()
            .map(|limit| Arc::new(guard::InvalidKeyGuard::new(limit)));
        service
    }

    /// Decides one encoded `CheckRequest` and returns the encoded `CheckResponse`.
    /// Every outcome is an answer, even bytes that are not a CheckRequest (a deny,
    /// 400): an error would leave the decision to Envoy's `failure_mode_allow`.
    pub fn check_bytes(&self, request: &[u8]) -> Bytes {
        let started = Instant::now();
        let Ok(view) = wire::scan(request) else {
            self.metrics.checks.malformed.inc();
            return self.answers.malformed.clone();
        };
        let key = find_key(&self.config, |name| view.header(name));
        let keys = self.keys.view();
        let asker = self.asker(self.client_address(&view));
        let response: Bytes = match decide(key, &keys, asker) {
            Decision::Allow {
                app_id,
                fingerprint,
            } => {
                self.metrics.checks.allowed.inc();
                let fingerprint = Fingerprint::new(fingerprint);
                wire::encode_allow(
                    &self.answers.app_id_header,
                    &self.answers.headers_to_remove,
                    [
                        (METADATA_APP_ID, app_id),
                        (METADATA_KEY_FINGERPRINT, fingerprint.as_str()),
                    ],
                    app_id,
                    // A client must not be able to choose its own app id.
                    HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                )
                .into()
            }
            Decision::MissingKey => {
                self.metrics.checks.missing_key.inc();
                self.answers.missing_key.clone()
            }
            Decision::InvalidKey => {
                self.metrics.checks.invalid_key.inc();
                self.answers.invalid_key.clone()
            }
            Decision::RateLimited { retry_after } => {
                self.metrics.checks.rate_limited.inc();
                self.too_many(retry_after).encode_to_vec().into()
            }
            Decision::Blocked { reason } => {
                self.metrics.checks.blocked_key.inc();
                let message = if reason.is_empty() {
                    "the API key is blocked".to_string()
                } else {
                    format!("the API key is blocked: {reason}")
                };
                self.deny(403, GRPC_PERMISSION_DENIED, "blocked_api_key", &message)
                    .encode_to_vec()
                    .into()
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
    pub fn guard(&self) -> Option<Arc<guard::InvalidKeyGuard>> {
        self.guard.clone()
    }

    fn too_many(&self, wait: Duration) -> CheckResponse {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut r = self.deny(
            429,
            GRPC_RESOURCE_EXHAUSTED,
            "too_many_invalid_keys",
            &format!("too many invalid API keys from this address; retry after {secs} s"),
        );
        if let Some(HttpResponse::DeniedResponse(d)) = &mut r.http_response {
            d.headers
                .push(header_option("retry-after", &secs.to_string()));
        }
        r
    }

    fn deny(&self, http: i32, grpc: i32, error: &str, message: &str) -> CheckResponse {
        let body = serde_json::json!({ "error": error, "message": message }).to_string();
        let mut headers = vec![header_option("content-type", "application/json")];
        if http == 401 {
            headers.push(header_option(
                "www-authenticate",
                &self.answers.www_authenticate,
            ));
        }
        CheckResponse {
            status: Some(rpc::Status {
                code: grpc,
                message: error.to_string(),
                ..Default::default()
            }),
            dynamic_metadata: None,
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: http }),
                headers,
                body,
            })),
        }
    }
}

/// Tells the client where the key goes, from the configured header names.
pub(crate) fn missing_key_message(config: &CheckConfig) -> String {
    let mut places: Vec<String> = config
        .key_headers
        .iter()
        .map(|h| format!("the {h} header"))
        .collect();
    if config.accept_bearer {
        places.push("an authorization: Bearer header".into());
    }
    let places = match places.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => "a request header".into(),
    };
    format!("an API key is required in {places}")
}

fn header_option(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.to_string(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyEntry;
    use envoy_types::pb::google::protobuf::value::Kind;
    use std::collections::HashMap;

    fn store() -> KeyStore {
        let s = KeyStore::new();
        s.apply_billing_update(&[
            KeyEntry::ok("app-1", "sk-good"),
            KeyEntry::blocked("app-2", "sk-blocked", "balance"),
        ]);
        s
    }

    fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn decide_with(config: &CheckConfig, pairs: &[(&str, &str)]) -> String {
        let s = store();
        let h = headers(pairs);
        let key = find_key(config, |n| h.get(n).map(String::as_str));
        format!("{:?}", decide(key, &s.view(), None))
    }

    #[test]
    fn every_outcome_with_both_header_names() {
        let c = CheckConfig::default();
        for name in ["api-key", "apikey"] {
            assert!(decide_with(&c, &[(name, "sk-good")]).starts_with("Allow { app_id: \"app-1\""));
            assert_eq!(decide_with(&c, &[(name, "sk-nope")]), "InvalidKey");
            assert_eq!(
                decide_with(&c, &[(name, "sk-blocked")]),
                "Blocked { reason: \"balance\" }"
            );
        }
        assert_eq!(decide_with(&c, &[]), "MissingKey");
        assert_eq!(decide_with(&c, &[("api-key", "  ")]), "MissingKey");
        assert!(decide_with(&c, &[("api-key", " \tsk-good ")]).starts_with("Allow"));
        // Unicode whitespace is part of the value, not padding.
        assert_eq!(
            decide_with(&c, &[("api-key", "\u{a0}sk-good")]),
            "InvalidKey"
        );
    }

    #[test]
    fn first_configured_header_wins_when_both_are_present() {
        let c = CheckConfig::default();
        assert_eq!(
            decide_with(&c, &[("api-key", "sk-nope"), ("apikey", "sk-good")]),
            "InvalidKey"
        );
    }

    #[test]
    fn bearer_only_when_enabled() {
        let mut c = CheckConfig::default();
        let auth = [("authorization", "Bearer sk-good")];
        assert_eq!(decide_with(&c, &auth), "MissingKey");
        c.accept_bearer = true;
        assert!(decide_with(&c, &auth).starts_with("Allow"));
        assert_eq!(
            decide_with(&c, &[("authorization", "Basic sk-good")]),
            "MissingKey"
        );
    }

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
