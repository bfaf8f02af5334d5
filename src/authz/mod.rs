//! ext_authz `Check`: is this request's API key valid right now?
//!
//! [`decide`] is the whole decision, shared by the Check, the Report API and the access
//! log: a plain function over the in-memory key view and the brute-force guard, no
//! gRPC types, no I/O. `service.rs` turns it into Envoy's answers (`answers.rs`) on
//! the wire (`wire.rs`). Every denial is an `Ok(CheckResponse)` with a deny status: an
//! `Err(Status)` is an *error* to Envoy, which then applies `failure_mode_allow` and
//! may let the request through.

mod answers;
pub mod guard;
mod service;
pub mod wire;

pub use service::{AuthzService, CheckServer};
/// What a key header that cannot be read as one value (sent twice, not UTF-8) stands
/// for, wherever keys are read: it matches no key.
pub use wire::UNREADABLE as UNREADABLE_KEY;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::config::CheckConfig;
use crate::keys::KeyView;

/// Dynamic-metadata field names the access log reads back (under the
/// `envoy.filters.http.ext_authz` namespace).
pub const METADATA_APP_ID: &str = "app_id";
pub const METADATA_KEY_FINGERPRINT: &str = "key_fp";

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyEntry, KeyStore};
    use std::collections::HashMap;

    /// One valid and one blocked key (also for the service's tests).
    pub(super) fn store() -> KeyStore {
        let s = KeyStore::new();
        s.apply_billing_update(&[
            KeyEntry::ok("app-1", "sk-good"),
            KeyEntry::blocked("app-2", "sk-blocked", "balance"),
        ]);
        s
    }

    pub(super) fn headers(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The decision for a request with these headers (no guard), owned for comparing.
    fn decide_with(config: &CheckConfig, pairs: &[(&str, &str)]) -> Decision<'static> {
        let s = store();
        let h = headers(pairs);
        let key = find_key(config, |n| h.get(n).map(String::as_str));
        match decide(key, &s.view(), None) {
            Decision::Allow {
                app_id,
                fingerprint,
            } => Decision::Allow {
                app_id: app_id.to_string().leak(),
                fingerprint,
            },
            Decision::Blocked { reason } => Decision::Blocked {
                reason: reason.to_string().leak(),
            },
            Decision::MissingKey => Decision::MissingKey,
            Decision::InvalidKey => Decision::InvalidKey,
            Decision::RateLimited { retry_after } => Decision::RateLimited { retry_after },
        }
    }

    fn allowed() -> Decision<'static> {
        Decision::Allow {
            app_id: "app-1",
            fingerprint: store().view().get("sk-good").unwrap().fingerprint,
        }
    }

    #[test]
    fn every_outcome_with_both_header_names() {
        let c = CheckConfig::default();
        for name in ["api-key", "apikey"] {
            assert_eq!(decide_with(&c, &[(name, "sk-good")]), allowed());
            assert_eq!(decide_with(&c, &[(name, "sk-nope")]), Decision::InvalidKey);
            assert_eq!(
                decide_with(&c, &[(name, "sk-blocked")]),
                Decision::Blocked { reason: "balance" }
            );
        }
        assert_eq!(decide_with(&c, &[]), Decision::MissingKey);
        assert_eq!(decide_with(&c, &[("api-key", "  ")]), Decision::MissingKey);
        assert_eq!(decide_with(&c, &[("api-key", " \tsk-good ")]), allowed());
        // Unicode whitespace is part of the value, not padding.
        assert_eq!(
            decide_with(&c, &[("api-key", "\u{a0}sk-good")]),
            Decision::InvalidKey
        );
    }

    #[test]
    fn first_configured_header_wins_when_both_are_present() {
        let c = CheckConfig::default();
        assert_eq!(
            decide_with(&c, &[("api-key", "sk-nope"), ("apikey", "sk-good")]),
            Decision::InvalidKey
        );
    }

    #[test]
    fn bearer_only_when_enabled() {
        let mut c = CheckConfig::default();
        let auth = [("authorization", "Bearer sk-good")];
        assert_eq!(decide_with(&c, &auth), Decision::MissingKey);
        c.accept_bearer = true;
        assert_eq!(decide_with(&c, &auth), allowed());
        assert_eq!(
            decide_with(&c, &[("authorization", "Basic sk-good")]),
            Decision::MissingKey
        );
    }

    #[test]
    fn the_guard_turns_an_invalid_key_into_rate_limited_and_never_a_valid_one() {
        let s = store();
        let guard = guard::InvalidKeyGuard::new(&crate::config::InvalidKeyLimit {
            max_attempts: 1,
            window_secs: 60,
            ..Default::default()
        });
        let now = Instant::now();
        let asker = Some(Asker {
            guard: &guard,
            client: "203.0.113.9".parse().unwrap(),
            now,
        });
        let view = s.view();
        assert_eq!(decide(Some("sk-nope"), &view, asker), Decision::InvalidKey);
        assert_eq!(
            decide(Some("sk-nope"), &view, asker),
            Decision::RateLimited {
                retry_after: Duration::from_secs(60)
            }
        );
        assert!(matches!(
            decide(Some("sk-good"), &view, asker),
            Decision::Allow {
                app_id: "app-1",
                ..
            }
        ));
    }
}
