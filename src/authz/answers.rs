//! Envoy's answers to a Check, as encoded `CheckResponse`s: the allow answer written
//! directly (`wire::encode_allow`), the common denials encoded once at start-up, the
//! rare ones when they happen. Every denial carries a JSON body, never the key.

use std::time::Duration;

use bytes::Bytes;
use envoy_types::ext_authz::v3::pb::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
    HttpResponse, HttpStatus,
};
use envoy_types::pb::google::rpc;
use prost::Message;

use super::{METADATA_APP_ID, METADATA_KEY_FINGERPRINT, missing_key_message, wire};
use crate::config::CheckConfig;
use crate::keys::Fingerprint;

/// gRPC status codes carried inside a CheckResponse.
pub(super) const GRPC_INVALID_ARGUMENT: i32 = 3;
pub(super) const GRPC_PERMISSION_DENIED: i32 = 7;
pub(super) const GRPC_RESOURCE_EXHAUSTED: i32 = 8;
pub(super) const GRPC_UNAUTHENTICATED: i32 = 16;

/// Every answer a Check can get, with what does not vary prepared once.
pub(super) struct Answers {
    app_id_header: String,
    headers_to_remove: Vec<String>,
    www_authenticate: String,
    missing_key: Bytes,
    invalid_key: Bytes,
    /// The answer to bytes that are not a CheckRequest.
    malformed: Bytes,
}

impl Answers {
    pub fn new(config: &CheckConfig) -> Answers {
        let www_authenticate = format!("ApiKey realm=\"{}\"", config.realm);
        let encoded = |http, grpc, error, message: &str| -> Bytes {
            deny(&www_authenticate, http, grpc, error, message)
                .encode_to_vec()
                .into()
        };
        Answers {
            app_id_header: config.app_id_header.clone(),
            headers_to_remove: if config.strip_key_header {
                let mut h = config.key_headers.clone();
                if config.accept_bearer {
                    h.push("authorization".into());
                }
                h
            } else {
                Vec::new()
            },
            missing_key: encoded(
                401,
                GRPC_UNAUTHENTICATED,
                "missing_api_key",
                &missing_key_message(config),
            ),
            invalid_key: encoded(
                401,
                GRPC_UNAUTHENTICATED,
                "invalid_api_key",
                "the API key is not valid",
            ),
            malformed: encoded(
                400,
                GRPC_INVALID_ARGUMENT,
                "malformed_check_request",
                "the authorization request could not be read",
            ),
            www_authenticate,
        }
    }

    /// Allowed: the app id header (overwriting a client's own), the key headers to
    /// remove, and the dynamic metadata the access log reads back.
    pub fn allow(&self, app_id: &str, fingerprint: u64) -> Bytes {
        let fingerprint = Fingerprint::new(fingerprint);
        wire::encode_allow(
            &self.app_id_header,
            &self.headers_to_remove,
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

    pub fn missing_key(&self) -> Bytes {
        self.missing_key.clone()
    }

    pub fn invalid_key(&self) -> Bytes {
        self.invalid_key.clone()
    }

    pub fn malformed(&self) -> Bytes {
        self.malformed.clone()
    }

    pub fn blocked(&self, reason: &str) -> Bytes {
        let message = if reason.is_empty() {
            "the API key is blocked".to_string()
        } else {
            format!("the API key is blocked: {reason}")
        };
        deny(
            &self.www_authenticate,
            403,
            GRPC_PERMISSION_DENIED,
            "blocked_api_key",
            &message,
        )
        .encode_to_vec()
        .into()
    }

    /// 429 with `retry-after`, in whole seconds rounded up.
    pub fn too_many(&self, wait: Duration) -> Bytes {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut r = deny(
            &self.www_authenticate,
            429,
            GRPC_RESOURCE_EXHAUSTED,
            "too_many_invalid_keys",
            &format!("too many invalid API keys from this address; retry after {secs} s"),
        );
        if let Some(HttpResponse::DeniedResponse(d)) = &mut r.http_response {
            d.headers
                .push(header_option("retry-after", &secs.to_string()));
        }
        r.encode_to_vec().into()
    }
}

/// A denial: the HTTP status Envoy answers with, a JSON body, and on 401 the
/// `www-authenticate` challenge.
fn deny(www_authenticate: &str, http: i32, grpc: i32, error: &str, message: &str) -> CheckResponse {
    let body = serde_json::json!({ "error": error, "message": message }).to_string();
    let mut headers = vec![header_option("content-type", "application/json")];
    if http == 401 {
        headers.push(header_option("www-authenticate", www_authenticate));
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
