//! ext_authz `Check`: is this request's API key valid right now?
//!
//! [`decide`] is the whole decision: a plain function over the in-memory key view, no
//! gRPC types, no I/O. [`AuthzService`] only converts. Every denial is an
//! `Ok(CheckResponse)` with a deny status: an `Err(Status)` is an *error* to Envoy,
//! which then applies `failure_mode_allow` and may let the request through.

pub mod guard;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::ext_authz::v3::pb::{
    Authorization, CheckRequest, CheckResponse, DeniedHttpResponse, HeaderAppendAction,
    HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;
use tonic::{Request, Response, Status};

use crate::admin::metrics::Metrics;
use crate::config::CheckConfig;
use crate::keys::{KeyStore, KeyView};

/// Dynamic-metadata field names the access log reads back (under the
/// `envoy.filters.http.ext_authz` namespace).
pub const METADATA_APP_ID: &str = "app_id";
pub const METADATA_KEY_FINGERPRINT: &str = "key_fp";

/// gRPC status codes carried inside a CheckResponse.
const GRPC_OK: i32 = 0;
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
const GRPC_UNAUTHENTICATED: i32 = 16;

/// The outcome of a Check, free of transport types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<'a> {
    Allow {
        app_id: &'a str,
        fingerprint: &'a str,
    },
    MissingKey,
    InvalidKey,
    Blocked {
        reason: &'a str,
    },
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

/// The downstream client's address as Envoy saw it (with `use_remote_address` and
/// `xff_num_trusted_hops`, the address from `x-forwarded-for` it trusts).
fn client_address(request: &CheckRequest) -> Option<IpAddr> {
    use envoy_types::pb::envoy::config::core::v3::address::Address;
    let address = request
        .attributes
        .as_ref()?
        .source
        .as_ref()?
        .address
        .as_ref()?;
    match address.address.as_ref()? {
        Address::SocketAddress(s) => s.address.parse().ok(),
        _ => None,
    }
}

/// HTTP's optional whitespace: spaces and tabs, nothing Unicode.
fn trim_ows(v: &str) -> &str {
    v.trim_matches([' ', '\t'])
}

/// The decision for a request whose key (if any) is `key`.
pub fn decide<'v>(key: Option<&str>, keys: &'v KeyView) -> Decision<'v> {
    let Some(key) = key else {
        return Decision::MissingKey;
    };
    match keys.get(key) {
        None => Decision::InvalidKey,
        Some(k) if k.blocked => Decision::Blocked { reason: &k.reason },
        Some(k) => Decision::Allow {
            app_id: &k.app_id,
            fingerprint: &k.fingerprint,
        },
    }
}

/// Precomputed parts of every answer, so a Check allocates only what varies.
struct Answers {
    app_id_header: String,
    missing_key_message: String,
    headers_to_remove: Vec<String>,
    www_authenticate: String,
}

pub struct AuthzService {
    keys: Arc<KeyStore>,
    metrics: Arc<Metrics>,
    config: CheckConfig,
    answers: Answers,
    guard: Option<guard::InvalidKeyGuard>,
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
        };
        let guard = config
            .invalid_key_limit
            .as_ref()
            .map(guard::InvalidKeyGuard::new);
        AuthzService {
            keys,
            metrics,
            config,
            answers,
            guard,
        }
    }

    /// Decides one request and builds Envoy's answer. Never fails: a malformed request
    /// is simply one without a key.
    pub fn check(&self, request: &CheckRequest) -> CheckResponse {
        let started = Instant::now();
        let http = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let key = http.and_then(|h| find_key(&self.config, |name| header(h, name)));
        let view = self.keys.view();
        let decision = decide(key, &view);
        let response = match decision {
            Decision::Allow {
                app_id,
                fingerprint,
            } => {
                self.metrics.checks.allowed.inc();
                self.allow(app_id, fingerprint)
            }
            Decision::MissingKey => {
                self.metrics.checks.missing_key.inc();
                self.deny(
                    401,
                    GRPC_UNAUTHENTICATED,
                    "missing_api_key",
                    &self.answers.missing_key_message,
                )
            }
            Decision::InvalidKey => match self.over_limit(request) {
                Some(wait) => {
                    self.metrics.checks.rate_limited.inc();
                    self.too_many(wait)
                }
                None => {
                    self.metrics.checks.invalid_key.inc();
                    self.deny(
                        401,
                        GRPC_UNAUTHENTICATED,
                        "invalid_api_key",
                        "the API key is not valid",
                    )
                }
            },
            Decision::Blocked { reason } => {
                self.metrics.checks.blocked_key.inc();
                let message = if reason.is_empty() {
                    "the API key is blocked".to_string()
                } else {
                    format!("the API key is blocked: {reason}")
                };
                self.deny(403, GRPC_PERMISSION_DENIED, "blocked_api_key", &message)
            }
        };
        self.metrics
            .check_duration
            .observe(started.elapsed().as_secs_f64());
        response
    }

    fn allow(&self, app_id: &str, fingerprint: &str) -> CheckResponse {
        let metadata = Struct {
            fields: HashMap::from([
                (METADATA_APP_ID.to_string(), string_value(app_id)),
                (
                    METADATA_KEY_FINGERPRINT.to_string(),
                    string_value(fingerprint),
                ),
            ]),
        };
        CheckResponse {
            status: Some(rpc::Status {
                code: GRPC_OK,
                ..Default::default()
            }),
            dynamic_metadata: Some(metadata),
            http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
                headers: vec![HeaderValueOption {
                    header: Some(HeaderValue {
                        key: self.answers.app_id_header.clone(),
                        value: app_id.to_string(),
                        ..Default::default()
                    }),
                    // A client must not be able to choose its own app id.
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    ..Default::default()
                }],
                headers_to_remove: self.answers.headers_to_remove.clone(),
                ..Default::default()
            })),
        }
    }

    /// Records an invalid key with the brute-force guard; `Some(wait)` when the client
    /// address is over its limit.
    fn over_limit(&self, request: &CheckRequest) -> Option<Duration> {
        let guard = self.guard.as_ref()?;
        let client = client_address(request)?;
        guard.on_invalid(client, Instant::now())
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
fn missing_key_message(config: &CheckConfig) -> String {
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

/// A header from Envoy's request attributes: the `headers` map, or `header_map` when
/// Envoy was configured with `encode_raw_headers`.
fn header<'h>(
    http: &'h envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest,
    name: &str,
) -> Option<&'h str> {
    if let Some(v) = http.headers.get(name) {
        return Some(v);
    }
    http.header_map.as_ref().and_then(|m| {
        m.headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| std::str::from_utf8(&h.raw_value).ok())
    })
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
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

#[tonic::async_trait]
impl Authorization for AuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(AuthzService::check(self, request.get_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyEntry;

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
        format!("{:?}", decide(key, &s.view()))
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
        assert_eq!(r.status.as_ref().unwrap().code, GRPC_OK);
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
