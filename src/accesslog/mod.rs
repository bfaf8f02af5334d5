//! Envoy's access-log stream (`envoy.service.accesslog.v3.AccessLogService`): every
//! HTTP entry that a backend declared usage for becomes a usage record.
//!
//! The stream has no acknowledgements and Envoy drops what it cannot send, so entries
//! are turned into records in memory and written to the outbox right away; nothing
//! slow (MQTT) happens on this path. Messages are decoded by `wire.rs` so that bad
//! content costs at most its own entry, and [`entry_outcome`] is the whole decision
//! for one entry, a plain function over the entry and the key view. `service.rs` is
//! the gRPC side.

mod service;
pub mod wire;

pub use service::AccessLogServer;

use envoy_types::pb::envoy::config::core::v3::RequestMethod;

use crate::authz::{
    Decision, METADATA_APP_ID, METADATA_KEY_FINGERPRINT, UNREADABLE_KEY, decide, find_key,
};
use crate::clock::now_ms;
use crate::config::{CheckConfig, UsageConfig};
use crate::keys::{KeyView, fingerprint};
use crate::usage::contract::{Declared, Field, FieldNames, Limits, MetadataProblem, usages};
use crate::usage::record::record_id;
use crate::usage::routes::{RequestFacts, matching};
use crate::usage::{Rejection, UsageRecord};
use wire::{Fields, LogEntry, MetaValue};

/// Where Envoy's ext_authz filter puts the Check's dynamic metadata.
pub const EXT_AUTHZ_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// `response_code_details` of Envoy's `api_key_auth` denials (local mode; measured
/// with Envoy 1.40): no key, a key not in the pushed list, no list yet, and a route's
/// client allow-list.
const API_KEY_AUTH_DENIALS: [&str; 5] = [
    "missing_api_key",
    "unknown_api_key",
    "missing_credentials",
    "missing_key_sources",
    "client_not_allowed",
];

pub use crate::metrics::label::NotBilled;

pub use crate::metrics::label::Skipped;

/// What one access-log entry amounts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    NotBilled(NotBilled),
    /// The backend (or a route default) declared usage: a verdict per record.
    Declared(Declaration),
}

/// The verdicts on one response's declared records.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Declaration {
    /// Who the records bill, also for the log lines of rejections.
    pub app_id: String,
    pub records: Vec<UsageRecord>,
    /// Records not billed, by reason (the others still bill).
    pub rejected: Vec<Rejection>,
    /// Records billed without the metadata the backend sent, by reason.
    pub metadata_dropped: Vec<MetadataProblem>,
}

/// Configuration an entry is judged by.
pub struct Rules<'a> {
    pub check: &'a CheckConfig,
    pub usage: &'a UsageConfig,
}

impl Rules<'_> {
    /// The dynamic-metadata namespaces an entry is judged by, for `wire::decode_entry`.
    pub fn namespaces(&self) -> [&str; 2] {
        [EXT_AUTHZ_NAMESPACE, &self.usage.metadata_namespace]
    }
}

/// The decision for one HTTP entry: who pays (from the Check's metadata, else the
/// logged key header and the key store), what the backend declared (trailers, then
/// headers, then `header_to_metadata` metadata) or what a route default says.
pub fn entry_outcome(entry: &LogEntry<'_>, keys: &KeyView, rules: &Rules<'_>) -> Outcome {
    let details = &entry.response_code_details[..];
    if details.starts_with("ext_authz") || API_KEY_AUTH_DENIALS.contains(&details) {
        return Outcome::NotBilled(NotBilled::Denied);
    }
    let authz = entry.metadata(EXT_AUTHZ_NAMESPACE);

    // Who pays: only what Envoy's Check allowed. The Check hands the key's
    // fingerprint and app id to the log; the app must be the key's own, so a forged
    // entry cannot bill a key to another app.
    let check_app = authz.and_then(|s| s.text(METADATA_APP_ID));
    let logged_key = || {
        let headers = &entry.request_headers;
        find_key(rules.check, |name| {
            headers.get(name).map(|v| {
                if v.contains('\u{fffd}') {
                    UNREADABLE_KEY
                } else {
                    v
                }
            })
        })
    };
    let (api_key, app_id) = match authz.and_then(|s| s.text(METADATA_KEY_FINGERPRINT)) {
        Some(fp) => match keys.get_by_fingerprint(fp) {
            Some(key) if check_app.is_some_and(|app| app != key.app_id) => {
                return Outcome::NotBilled(NotBilled::AppMismatch);
            }
            Some(key) => (key.api_key, key.app_id),
            // Unknown here, but replicas can lag each other: the replica that answered
            // the Check knew it. Billed only if the logged key is the one it checked.
            None => match (logged_key(), check_app) {
                (Some(key), Some(app)) if fingerprint(key) == fp => (key, app),
                _ => return Outcome::NotBilled(NotBilled::UnknownKey),
            },
        },
        // No Check on this route (or its metadata did not reach the log): the logged
        // key decides, as a Check would have.
        None => {
            let Some(api_key) = logged_key() else {
                return Outcome::NotBilled(NotBilled::NoKey);
            };
            match decide(Some(api_key), keys, None) {
                Decision::Allow { app_id, .. } if check_app.is_some_and(|app| app != app_id) => {
                    return Outcome::NotBilled(NotBilled::AppMismatch);
                }
                Decision::Allow { app_id, .. } => (api_key, app_id),
                Decision::Blocked { .. } => return Outcome::NotBilled(NotBilled::Denied),
                Decision::MissingKey | Decision::InvalidKey | Decision::RateLimited { .. } => {
                    return Outcome::NotBilled(NotBilled::UnknownKey);
                }
            }
        }
    };
    let app_id = app_id.to_string();

    // What the backend declared.
    let names = FieldNames::from_config(rules.usage);
    let from_headers = Declared::merge(
        &[&entry.response_trailers, &entry.response_headers],
        &names,
        |h, name, _| h.get(name).map(str::to_string),
    );
    let from_metadata = entry
        .metadata(&rules.usage.metadata_namespace)
        .map(|m| Declared::merge(&[m], &names, |s, _, field| metadata_field(s, field)))
        .unwrap_or_default();
    let declared = Declared {
        module: from_headers.module.or(from_metadata.module),
        model: from_headers.model.or(from_metadata.model),
        usage: from_headers.usage.or(from_metadata.usage),
        metadata: from_headers.metadata.or(from_metadata.metadata),
        records: from_headers.records.or(from_metadata.records),
    };

    let method = RequestMethod::try_from(entry.request_method).map_or("", |m| m.as_str_name());
    let facts = RequestFacts {
        host: &entry.authority,
        path: &entry.path,
        method,
        status: entry.response_code.unwrap_or(0),
    };
    let default = matching(&rules.usage.routes, facts);
    let verdicts = usages(&declared, default, Limits::from_config(rules.usage));
    if verdicts.is_empty() {
        return Outcome::NotBilled(NotBilled::NoUsage);
    }

    let completed_ms = completion_ms(entry);
    let start = entry
        .start_time
        .map(|t| format!("{}.{:09}", t.seconds, t.nanos))
        .unwrap_or_default();
    let mut declaration = Declaration {
        app_id,
        ..Declaration::default()
    };
    for (i, verdict) in verdicts.into_iter().enumerate() {
        let usage = match verdict {
            Ok(usage) => usage,
            Err(reason) => {
                declaration.rejected.push(reason);
                continue;
            }
        };
        declaration.metadata_dropped.extend(usage.metadata_dropped);
        // Envoy's request id, made unguessable for clients that send their own
        // x-request-id: the same entry always yields the same id, and each item of a
        // declaration keeps its position's id whatever the verdict on the others.
        let id = record_id(&[
            entry.request_id.as_bytes(),
            start.as_bytes(),
            entry.path.as_bytes(),
            i.to_string().as_bytes(),
        ]);
        declaration.records.push(UsageRecord::new(
            &declaration.app_id,
            api_key,
            usage,
            completed_ms,
            id,
        ));
    }
    Outcome::Declared(declaration)
}

/// When the request completed: start time plus the time to the last byte sent
/// downstream (or the latest other duration Envoy logged), in epoch milliseconds.
fn completion_ms(entry: &LogEntry<'_>) -> i64 {
    let Some(start) = entry.start_time else {
        return now_ms();
    };
    let elapsed = [
        entry.time_to_last_downstream_tx_byte,
        entry.time_to_last_upstream_rx_byte,
        entry.time_to_last_rx_byte,
    ]
    .into_iter()
    .find_map(|d| d)
    .map_or(0, |d| d.as_millis());
    start.as_millis().saturating_add(elapsed)
}

/// A usage field from dynamic metadata: `header_to_metadata` gives strings by default
/// and numbers or structs when a type is configured.
fn metadata_field(s: &Fields<'_>, field: Field) -> Option<String> {
    match s.get(field.metadata_key())? {
        MetaValue::Text(v) => Some(v.to_string()),
        MetaValue::Number(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
            Some(format!("{}", *n as i64))
        }
        MetaValue::Number(n) => Some(n.to_string()),
        MetaValue::Bool(b) => Some(b.to_string()),
        MetaValue::Null => None,
        MetaValue::Json(j) => Some(j.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteRule;
    use crate::keys::{KeyEntry, KeyStore, fingerprint};
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
    };
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    use prost::Message;
    use std::collections::HashMap;

    fn store() -> KeyStore {
        let s = KeyStore::new();
        s.apply_billing_update(&[
            KeyEntry::ok("app-1", "sk-good"),
            KeyEntry::blocked("app-2", "sk-blocked", "balance"),
        ]);
        s
    }

    fn strings(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn st(pairs: &[(&str, &str)]) -> Struct {
        Struct {
            fields: pairs
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(v.to_string())),
                        },
                    )
                })
                .collect(),
        }
    }

    struct E {
        code: u32,
        details: &'static str,
        request_headers: Vec<(&'static str, &'static str)>,
        response_headers: Vec<(&'static str, &'static str)>,
        trailers: Vec<(&'static str, &'static str)>,
        metadata: Vec<(&'static str, Struct)>,
        path: &'static str,
    }

    impl Default for E {
        fn default() -> Self {
            E {
                code: 200,
                details: "via_upstream",
                request_headers: vec![],
                response_headers: vec![],
                trailers: vec![],
                metadata: vec![],
                path: "/v1/chat",
            }
        }
    }

    fn entry(e: E) -> HttpAccessLogEntry {
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                start_time: Some(envoy_types::pb::google::protobuf::Timestamp {
                    seconds: 1_795_648_616,
                    nanos: 200_000_000,
                }),
                time_to_last_downstream_tx_byte: Some(
                    envoy_types::pb::google::protobuf::Duration {
                        seconds: 0,
                        nanos: 49_000_000,
                    },
                ),
                metadata: Some(Metadata {
                    filter_metadata: e
                        .metadata
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            request: Some(HttpRequestProperties {
                request_method: RequestMethod::Post as i32,
                authority: "api.example.com".into(),
                path: e.path.into(),
                request_id: "4f1c2d9e-0000-4000-8000-000000000001".into(),
                request_headers: strings(&e.request_headers),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(envoy_types::pb::google::protobuf::UInt32Value {
                    value: e.code,
                }),
                response_code_details: e.details.into(),
                response_headers: strings(&e.response_headers),
                response_trailers: strings(&e.trailers),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn outcome(e: E, routes: Vec<RouteRule>) -> Outcome {
        let usage = UsageConfig {
            routes,
            ..UsageConfig::default()
        };
        let check = CheckConfig::default();
        let rules = Rules {
            check: &check,
            usage: &usage,
        };
        // Through the wire, as the service sees it.
        let bytes = entry(e).encode_to_vec();
        let decoded = wire::decode_entry(&bytes, &rules.namespaces()).unwrap();
        entry_outcome(&decoded, &store().view(), &rules)
    }

    /// The records of an entry that declared only valid usage.
    fn billed(o: Outcome) -> Vec<UsageRecord> {
        match o {
            Outcome::Declared(d) if d.rejected.is_empty() && d.metadata_dropped.is_empty() => {
                d.records
            }
            _ => panic!("{o:?}"),
        }
    }

    fn usage_headers(usage: &'static str) -> Vec<(&'static str, &'static str)> {
        vec![
            ("x-billing-module", "llm"),
            ("x-billing-model", "gpt-4"),
            ("x-billing-usage", usage),
        ]
    }

    fn check_metadata() -> (&'static str, Struct) {
        let fp = fingerprint("sk-good");
        (
            EXT_AUTHZ_NAMESPACE,
            st(&[("app_id", "app-1"), ("key_fp", fp.as_str())]),
        )
    }

    #[test]
    fn headers_bill_the_key_from_the_check_metadata() {
        let o = outcome(
            E {
                response_headers: usage_headers("42"),
                metadata: vec![check_metadata()],
                ..E::default()
            },
            vec![],
        );
        let r = billed(o);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].api_key, "sk-good");
        assert_eq!(r[0].app_id, "app-1");
        assert_eq!(r[0].usage, 42);
        assert_eq!(r[0].timestamp, 1_795_648_616_249);
        assert_eq!(r[0].record_id.len(), 32);
    }

    #[test]
    fn the_logged_key_header_is_the_fallback() {
        let o = outcome(
            E {
                request_headers: vec![("apikey", "sk-good")],
                response_headers: usage_headers("1"),
                ..E::default()
            },
            vec![],
        );
        assert_eq!(billed(o)[0].app_id, "app-1");
        let o = outcome(
            E {
                request_headers: vec![("api-key", "sk-unknown")],
                response_headers: usage_headers("1"),
                ..E::default()
            },
            vec![],
        );
        assert_eq!(o, Outcome::NotBilled(NotBilled::UnknownKey));
        let o = outcome(
            E {
                response_headers: usage_headers("1"),
                ..E::default()
            },
            vec![],
        );
        assert_eq!(o, Outcome::NotBilled(NotBilled::NoKey));
    }

    #[test]
    fn denied_requests_never_bill() {
        let o = outcome(
            E {
                code: 403,
                details: "ext_authz_denied",
                request_headers: vec![("api-key", "sk-blocked")],
                response_headers: usage_headers("1"),
                ..E::default()
            },
            vec![],
        );
        assert_eq!(o, Outcome::NotBilled(NotBilled::Denied));
    }

    #[test]
    fn api_key_auth_denials_never_bill_even_with_a_key_keymeter_allows() {
        // Local mode: Envoy's list can lag keymeter's by a push; a 401 it answered is
        // not billed, even when a route default would bill any status.
        for details in ["unknown_api_key", "missing_api_key", "missing_credentials"] {
            let o = outcome(
                E {
                    code: 401,
                    details,
                    request_headers: vec![("api-key", "sk-good")],
                    response_headers: usage_headers("1"),
                    ..E::default()
                },
                vec![],
            );
            assert_eq!(o, Outcome::NotBilled(NotBilled::Denied), "{details}");
        }
    }

    #[test]
    fn trailers_win_over_headers_and_metadata_is_read() {
        let mut trailers = usage_headers("7");
        trailers.truncate(3);
        let o = outcome(
            E {
                response_headers: usage_headers("1"),
                trailers: vec![("x-billing-usage", "7")],
                metadata: vec![check_metadata()],
                ..E::default()
            },
            vec![],
        );
        assert_eq!(billed(o)[0].usage, 7);
        let o = outcome(
            E {
                metadata: vec![
                    check_metadata(),
                    (
                        "keymeter",
                        st(&[
                            ("module", "tts"),
                            ("model", "eleven"),
                            ("usage", "12"),
                            ("metadata", r#"{"chars": 12}"#),
                        ]),
                    ),
                ],
                ..E::default()
            },
            vec![],
        );
        let r = billed(o);
        assert_eq!((r[0].module.as_str(), r[0].usage), ("tts", 12));
        assert_eq!(r[0].metadata["chars"], 12);
    }

    #[test]
    fn several_records_get_distinct_stable_ids() {
        let e = || E {
            response_headers: vec![(
                "x-billing-records",
                r#"[{"module":"llm","model":"m","usage":3},{"module":"tts","model":"t","usage":4}]"#,
            )],
            metadata: vec![check_metadata()],
            ..E::default()
        };
        let (a, b) = (billed(outcome(e(), vec![])), billed(outcome(e(), vec![])));
        assert_eq!(a.len(), 2);
        assert_ne!(a[0].record_id, a[1].record_id);
        assert_eq!(a[0].record_id, b[0].record_id, "same entry, same id");
    }

    #[test]
    fn route_defaults_and_rejections() {
        let rule = RouteRule::search_example();
        let o = outcome(
            E {
                path: "/v1/search?q=1",
                metadata: vec![check_metadata()],
                ..E::default()
            },
            vec![rule.clone()],
        );
        assert_eq!(billed(o)[0].module, "search");
        let o = outcome(
            E {
                code: 502,
                path: "/v1/search",
                metadata: vec![check_metadata()],
                ..E::default()
            },
            vec![rule],
        );
        assert_eq!(o, Outcome::NotBilled(NotBilled::NoUsage));
        let o = outcome(
            E {
                response_headers: usage_headers("-1"),
                metadata: vec![check_metadata()],
                ..E::default()
            },
            vec![],
        );
        assert_eq!(
            o,
            Outcome::Declared(Declaration {
                app_id: "app-1".into(),
                rejected: vec![Rejection::UsageNegative],
                ..Declaration::default()
            })
        );
    }

    #[test]
    fn only_what_the_check_allowed_bills() {
        // The Check's app id must be the key's own.
        let fp = fingerprint("sk-good");
        let forged = (
            EXT_AUTHZ_NAMESPACE,
            st(&[("app_id", "app-2"), ("key_fp", fp.as_str())]),
        );
        let o = outcome(
            E {
                response_headers: usage_headers("9"),
                metadata: vec![forged],
                ..E::default()
            },
            vec![],
        );
        assert_eq!(o, Outcome::NotBilled(NotBilled::AppMismatch));

        // A key this replica does not know yet (replicas lag): billed when the logged
        // key is the one the Check fingerprinted, with the Check's app.
        let fresh = fingerprint("sk-fresh");
        let meta = || {
            (
                EXT_AUTHZ_NAMESPACE,
                st(&[("app_id", "app-7"), ("key_fp", fresh.as_str())]),
            )
        };
        let o = outcome(
            E {
                request_headers: vec![("api-key", "sk-fresh")],
                response_headers: usage_headers("3"),
                metadata: vec![meta()],
                ..E::default()
            },
            vec![],
        );
        let r = billed(o);
        assert_eq!(
            (r[0].api_key.as_str(), r[0].app_id.as_str()),
            ("sk-fresh", "app-7")
        );
        // ...and not when the logged key is another one.
        let o = outcome(
            E {
                request_headers: vec![("api-key", "sk-good")],
                response_headers: usage_headers("3"),
                metadata: vec![meta()],
                ..E::default()
            },
            vec![],
        );
        assert_eq!(o, Outcome::NotBilled(NotBilled::UnknownKey));
    }
}
