//! The access-log decoder against prost, on generated messages whose string fields may
//! hold any bytes at all.
//!
//! Messages are written with wire-compatible mirror types whose strings are `bytes`,
//! so a field can carry what a Latin-1 backend header carries through Envoy's
//! `header_to_metadata`. For every entry of every message keymeter's decoder must not
//! panic, must not fail, and must judge the entry exactly as prost's decoding of the
//! same entry would be judged, with bytes that are not UTF-8 read as U+FFFD; for an
//! entry that is valid UTF-8 throughout that is exactly what prost decodes.

use std::borrow::Cow;

use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use keymeter::accesslog::wire::{
    Fields, Headers, LogEntry, MetaValue, Time, decode_entry, decode_message,
};
use keymeter::accesslog::{EXT_AUTHZ_NAMESPACE, Outcome, Rules, entry_outcome};
use keymeter::config::{CheckConfig, RouteRule, StatusClass, UsageConfig};
use keymeter::keys::{KeyEntry, KeyStore, fingerprint};
use proptest::prelude::*;
use prost::Message;

// ---- wire-compatible mirrors of the access-log messages, strings as bytes ----------

#[derive(Clone, PartialEq, Message)]
struct MMessage {
    #[prost(message, optional, tag = "1")]
    identifier: Option<MIdentifier>,
    #[prost(message, optional, tag = "2")]
    http_logs: Option<MEntries>,
}

#[derive(Clone, PartialEq, Message)]
struct MIdentifier {
    #[prost(message, optional, tag = "1")]
    node: Option<MNode>,
    #[prost(bytes = "vec", tag = "2")]
    log_name: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct MNode {
    #[prost(bytes = "vec", tag = "1")]
    id: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct MEntries {
    #[prost(message, repeated, tag = "1")]
    log_entry: Vec<MEntry>,
}

#[derive(Clone, PartialEq, Message)]
struct MEntry {
    #[prost(message, optional, tag = "1")]
    common: Option<MCommon>,
    #[prost(message, optional, tag = "3")]
    request: Option<MRequest>,
    #[prost(message, optional, tag = "4")]
    response: Option<MResponse>,
}

#[derive(Clone, PartialEq, Message)]
struct MCommon {
    #[prost(message, optional, tag = "5")]
    start_time: Option<MTime>,
    #[prost(message, optional, tag = "10")]
    time_to_last_upstream_rx_byte: Option<MTime>,
    #[prost(message, optional, tag = "12")]
    time_to_last_downstream_tx_byte: Option<MTime>,
    #[prost(bytes = "vec", tag = "15")]
    upstream_cluster: Vec<u8>,
    #[prost(message, optional, tag = "17")]
    metadata: Option<MMetadata>,
}

#[derive(Clone, PartialEq, Message)]
struct MTime {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

#[derive(Clone, PartialEq, Message)]
struct MMetadata {
    #[prost(message, repeated, tag = "1")]
    filter_metadata: Vec<MNamespace>,
}

#[derive(Clone, PartialEq, Message)]
struct MNamespace {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    value: Option<MStruct>,
}

#[derive(Clone, PartialEq, Message)]
struct MStruct {
    #[prost(message, repeated, tag = "1")]
    fields: Vec<MField>,
}

#[derive(Clone, PartialEq, Message)]
struct MField {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(message, optional, tag = "2")]
    value: Option<MValue>,
}

#[derive(Clone, PartialEq, Message)]
struct MValue {
    #[prost(oneof = "MKind", tags = "2, 3, 4, 5")]
    kind: Option<MKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum MKind {
    #[prost(double, tag = "2")]
    Number(f64),
    #[prost(bytes = "vec", tag = "3")]
    Text(Vec<u8>),
    #[prost(bool, tag = "4")]
    Bool(bool),
    #[prost(message, tag = "5")]
    Struct(MStruct),
}

#[derive(Clone, PartialEq, Message)]
struct MRequest {
    #[prost(int32, tag = "1")]
    method: i32,
    #[prost(bytes = "vec", tag = "3")]
    authority: Vec<u8>,
    #[prost(bytes = "vec", tag = "5")]
    path: Vec<u8>,
    #[prost(bytes = "vec", tag = "6")]
    user_agent: Vec<u8>,
    #[prost(bytes = "vec", tag = "9")]
    request_id: Vec<u8>,
    #[prost(message, repeated, tag = "13")]
    headers: Vec<MPair>,
}

#[derive(Clone, PartialEq, Message)]
struct MResponse {
    #[prost(message, optional, tag = "1")]
    code: Option<MCode>,
    #[prost(message, repeated, tag = "4")]
    headers: Vec<MPair>,
    #[prost(message, repeated, tag = "5")]
    trailers: Vec<MPair>,
    #[prost(bytes = "vec", tag = "6")]
    details: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct MCode {
    #[prost(uint32, tag = "1")]
    value: u32,
}

#[derive(Clone, PartialEq, Message)]
struct MPair {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

// ---- repairing: every bytes field as from_utf8_lossy would read it -----------------

fn lossy(b: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(b).into_owned().into_bytes()
}

fn repair_struct(s: &MStruct) -> MStruct {
    MStruct {
        fields: s
            .fields
            .iter()
            .map(|f| MField {
                key: lossy(&f.key),
                value: f.value.as_ref().map(|v| MValue {
                    kind: v.kind.as_ref().map(|k| match k {
                        MKind::Text(t) => MKind::Text(lossy(t)),
                        MKind::Struct(s) => MKind::Struct(repair_struct(s)),
                        other => other.clone(),
                    }),
                }),
            })
            .collect(),
    }
}

fn repair_pairs(pairs: &[MPair]) -> Vec<MPair> {
    pairs
        .iter()
        .map(|p| MPair {
            key: lossy(&p.key),
            value: lossy(&p.value),
        })
        .collect()
}

fn repair(e: &MEntry) -> MEntry {
    let mut e = e.clone();
    if let Some(c) = &mut e.common {
        c.upstream_cluster = lossy(&c.upstream_cluster);
        if let Some(m) = &mut c.metadata {
            for ns in &mut m.filter_metadata {
                ns.key = lossy(&ns.key);
                ns.value = ns.value.as_ref().map(repair_struct);
            }
        }
    }
    if let Some(r) = &mut e.request {
        r.authority = lossy(&r.authority);
        r.path = lossy(&r.path);
        r.user_agent = lossy(&r.user_agent);
        r.request_id = lossy(&r.request_id);
        r.headers = repair_pairs(&r.headers);
    }
    if let Some(r) = &mut e.response {
        r.headers = repair_pairs(&r.headers);
        r.trailers = repair_pairs(&r.trailers);
        r.details = lossy(&r.details);
    }
    e
}

// ---- the reference: prost's decoding, mapped field by field ------------------------

fn reference_value(v: &Value) -> MetaValue<'_> {
    match v.kind.as_ref() {
        None | Some(Kind::NullValue(_)) => MetaValue::Null,
        Some(Kind::NumberValue(n)) => MetaValue::Number(*n),
        Some(Kind::StringValue(s)) => MetaValue::Text(Cow::Borrowed(s)),
        Some(Kind::BoolValue(b)) => MetaValue::Bool(*b),
        Some(Kind::StructValue(_) | Kind::ListValue(_)) => MetaValue::Json(json(v)),
    }
}

fn json(v: &Value) -> serde_json::Value {
    match v.kind.as_ref() {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(Kind::StringValue(s)) => s.clone().into(),
        Some(Kind::BoolValue(b)) => (*b).into(),
        Some(Kind::StructValue(s)) => {
            serde_json::Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), json(v))).collect())
        }
        Some(Kind::ListValue(l)) => l.values.iter().map(json).collect(),
    }
}

fn reference_fields(s: &Struct) -> Fields<'_> {
    Fields(
        s.fields
            .iter()
            .map(|(k, v)| (Cow::Borrowed(k.as_str()), reference_value(v)))
            .collect(),
    )
}

fn headers(map: &std::collections::HashMap<String, String>) -> Headers<'_> {
    Headers(
        map.iter()
            .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str())))
            .collect(),
    )
}

fn reference<'a>(e: &'a HttpAccessLogEntry, namespaces: &[&str]) -> LogEntry<'a> {
    let c = e.common_properties.as_ref();
    let req = e.request.as_ref();
    let resp = e.response.as_ref();
    let time = |seconds: i64, nanos: i32| Time { seconds, nanos };
    let s = |v: Option<&'a String>| Cow::Borrowed(v.map_or("", String::as_str));
    LogEntry {
        start_time: c
            .and_then(|c| c.start_time)
            .map(|x| time(x.seconds, x.nanos)),
        time_to_last_rx_byte: c
            .and_then(|c| c.time_to_last_rx_byte)
            .map(|x| time(x.seconds, x.nanos)),
        time_to_last_upstream_rx_byte: c
            .and_then(|c| c.time_to_last_upstream_rx_byte)
            .map(|x| time(x.seconds, x.nanos)),
        time_to_last_downstream_tx_byte: c
            .and_then(|c| c.time_to_last_downstream_tx_byte)
            .map(|x| time(x.seconds, x.nanos)),
        metadata: c
            .and_then(|c| c.metadata.as_ref())
            .map(|m| {
                m.filter_metadata
                    .iter()
                    .filter(|(k, _)| namespaces.contains(&k.as_str()))
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), reference_fields(v)))
                    .collect()
            })
            .unwrap_or_default(),
        request_method: req.map_or(0, |r| r.request_method),
        authority: s(req.map(|r| &r.authority)),
        path: s(req.map(|r| &r.path)),
        request_id: s(req.map(|r| &r.request_id)),
        request_headers: req.map(|r| headers(&r.request_headers)).unwrap_or_default(),
        response_code: resp.and_then(|r| r.response_code).map(|c| c.value),
        response_code_details: s(resp.map(|r| &r.response_code_details)),
        response_headers: resp
            .map(|r| headers(&r.response_headers))
            .unwrap_or_default(),
        response_trailers: resp
            .map(|r| headers(&r.response_trailers))
            .unwrap_or_default(),
    }
}

// ---- generators ---------------------------------------------------------------------

/// Text as backends and Envoy produce it, or bytes that are not UTF-8 at all.
fn text(valid: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::sample::select(valid).prop_map(|s| s.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..12),
        1 => (prop::sample::select(valid), prop::collection::vec(0x80u8..=0xff, 1..3))
            .prop_map(|(s, bad)| {
                let mut b = s.as_bytes().to_vec();
                b.extend(bad);
                b
            }),
    ]
}

const NAMES: &[&str] = &[
    "x-billing-module",
    "x-billing-model",
    "x-billing-usage",
    "x-billing-metadata",
    "x-billing-records",
    "api-key",
    "apikey",
    "user-agent",
];
const VALUES: &[&str] = &[
    "llm",
    "gpt-4",
    "tts",
    "caf\u{e9}",
    "42",
    "7",
    "-1",
    "",
    "sk-good",
    "sk-blocked",
    r#"{"n": 1}"#,
    r#"[{"module": "a", "model": "b", "usage": 3}]"#,
    "[1]",
];
const META_KEYS: &[&str] = &[
    "module", "model", "usage", "metadata", "records", "app_id", "key_fp", "other",
];

fn pairs() -> impl Strategy<Value = Vec<MPair>> {
    prop::collection::vec(
        (text(NAMES), text(VALUES)).prop_map(|(key, value)| MPair { key, value }),
        0..6,
    )
}

fn meta_value() -> impl Strategy<Value = MValue> {
    let leaf = prop_oneof![
        4 => text(VALUES).prop_map(MKind::Text),
        1 => prop_oneof![Just(3.0), Just(1.5), Just(-2.0), any::<f64>()].prop_map(MKind::Number),
        1 => any::<bool>().prop_map(MKind::Bool),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop::collection::vec((text(META_KEYS), inner), 0..3).prop_map(|fields| {
            MKind::Struct(MStruct {
                fields: fields
                    .into_iter()
                    .map(|(key, kind)| MField {
                        key,
                        value: Some(MValue { kind: Some(kind) }),
                    })
                    .collect(),
            })
        })
    })
    .prop_map(|kind| MValue { kind: Some(kind) })
}

fn namespace() -> impl Strategy<Value = MNamespace> {
    let fp = fingerprint("sk-good");
    let fp: &'static str = Box::leak(fp.into_boxed_str());
    let authz_fields = prop::collection::vec(
        prop_oneof![
            text(&["app-1", "app-9"]).prop_map(|v| (b"app_id".to_vec(), v)),
            prop::sample::select(vec![fp, "fp-0000000000000000"])
                .prop_map(|v| (b"key_fp".to_vec(), v.as_bytes().to_vec())),
        ],
        0..3,
    );
    prop_oneof![
        (prop::collection::vec((text(META_KEYS), meta_value()), 0..5)).prop_map(|fields| {
            MNamespace {
                key: b"keymeter".to_vec(),
                value: Some(MStruct {
                    fields: fields
                        .into_iter()
                        .map(|(key, value)| MField {
                            key,
                            value: Some(value),
                        })
                        .collect(),
                }),
            }
        }),
        authz_fields.prop_map(|fields| MNamespace {
            key: EXT_AUTHZ_NAMESPACE.as_bytes().to_vec(),
            value: Some(MStruct {
                fields: fields
                    .into_iter()
                    .map(|(key, v)| MField {
                        key,
                        value: Some(MValue {
                            kind: Some(MKind::Text(v)),
                        }),
                    })
                    .collect(),
            }),
        }),
        (text(&["envoy.lb", "keymeter"]), meta_value()).prop_map(|(key, value)| MNamespace {
            key,
            value: Some(MStruct {
                fields: vec![MField {
                    key: b"x".to_vec(),
                    value: Some(value),
                }],
            }),
        }),
    ]
}

fn entry() -> impl Strategy<Value = MEntry> {
    let common = (
        1_795_000_000i64..1_796_000_000,
        0i32..1_000_000_000,
        prop::option::of(0i32..900_000_000),
        text(&["backend"]),
        prop::collection::vec(namespace(), 0..4),
    )
        .prop_map(|(seconds, nanos, elapsed, cluster, namespaces)| MCommon {
            start_time: Some(MTime { seconds, nanos }),
            time_to_last_upstream_rx_byte: None,
            time_to_last_downstream_tx_byte: elapsed.map(|nanos| MTime { seconds: 0, nanos }),
            upstream_cluster: cluster,
            metadata: Some(MMetadata {
                filter_metadata: namespaces,
            }),
        });
    let request = (
        0i32..10,
        text(&["api.example.com", "api.example.com:443"]),
        text(&["/v1/chat", "/v1/search?q=1", "/"]),
        text(&["curl/8"]),
        text(&["4f1c2d9e-0000-4000-8000-000000000001", "rid"]),
        pairs(),
    )
        .prop_map(
            |(method, authority, path, user_agent, request_id, headers)| MRequest {
                method,
                authority,
                path,
                user_agent,
                request_id,
                headers,
            },
        );
    let response = (
        prop::sample::select(vec![200u32, 403, 502]),
        pairs(),
        pairs(),
        text(&["via_upstream", "ext_authz_denied"]),
    )
        .prop_map(|(code, headers, trailers, details)| MResponse {
            code: Some(MCode { value: code }),
            headers,
            trailers,
            details,
        });
    (common, request, response).prop_map(|(common, request, response)| MEntry {
        common: Some(common),
        request: Some(request),
        response: Some(response),
    })
}

/// A route default, so that entries without usage headers can bill too.
fn search_default() -> RouteRule {
    RouteRule {
        host: None,
        path_prefix: "/v1/search".into(),
        method: None,
        status: StatusClass::Success,
        module: "search".into(),
        model: "default".into(),
        usage: 1,
    }
}

fn store() -> KeyStore {
    let s = KeyStore::new();
    s.apply_billing_update(&[
        KeyEntry::ok("app-1", "sk-good"),
        KeyEntry::blocked("app-2", "sk-blocked", "balance"),
    ]);
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn every_entry_is_judged_as_prost_would_judge_it(
        entries in prop::collection::vec(entry(), 1..5),
        node in text(&["envoy-1"]),
    ) {
        let message = MMessage {
            identifier: Some(MIdentifier { node: Some(MNode { id: node }), log_name: b"keymeter".to_vec() }),
            http_logs: Some(MEntries { log_entry: entries.clone() }),
        };
        let bytes = message.encode_to_vec();
        let keys = store();
        let view = keys.view();
        let check = CheckConfig::default();
        let usage = UsageConfig { routes: vec![search_default()], ..UsageConfig::default() };
        let rules = Rules { check: &check, usage: &usage };
        let namespaces = rules.namespaces();

        let (decoded, broken) = decode_message(&bytes);
        prop_assert_eq!(broken, None);
        prop_assert_eq!(decoded.http_entries.len(), entries.len());
        for (raw, generated) in decoded.http_entries.iter().zip(&entries) {
            let mine = decode_entry(raw, &namespaces);
            prop_assert!(mine.is_ok(), "{:?}", mine.err());
            let mine = mine.unwrap();

            let own_bytes = generated.encode_to_vec();
            let valid = HttpAccessLogEntry::decode(own_bytes.as_slice()).is_ok();
            let repaired = repair(generated).encode_to_vec();
            let prost_entry = HttpAccessLogEntry::decode(repaired.as_slice())
                .expect("repaired entries are valid UTF-8");
            if valid {
                prop_assert_eq!(&repaired, &own_bytes, "repairing a valid entry changes nothing");
            }
            let theirs = reference(&prost_entry, &namespaces);
            for name in NAMES {
                prop_assert_eq!(mine.request_headers.get(name), theirs.request_headers.get(name));
                prop_assert_eq!(mine.response_headers.get(name), theirs.response_headers.get(name));
                prop_assert_eq!(mine.response_trailers.get(name), theirs.response_trailers.get(name));
            }
            for ns in namespaces {
                for key in META_KEYS {
                    prop_assert_eq!(
                        mine.metadata(ns).and_then(|f| f.get(key)),
                        theirs.metadata(ns).and_then(|f| f.get(key)),
                        "{}.{}", ns, key
                    );
                }
            }
            let (a, b) = (entry_outcome(&mine, &view, &rules), entry_outcome(&theirs, &view, &rules));
            prop_assert_eq!(&a, &b);
            // Bytes that were not UTF-8 never reach a record's module or model.
            if let Outcome::Declared(d) = &a {
                for r in &d.records {
                    let damaged = |s: &str| s.contains(char::REPLACEMENT_CHARACTER);
                    prop_assert!(!damaged(&r.model) && !damaged(&r.module));
                }
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_end_the_stream(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let (message, _) = decode_message(&bytes);
        for raw in message.http_entries {
            if let Ok(entry) = decode_entry(raw, &["keymeter", EXT_AUTHZ_NAMESPACE]) {
                let keys = store();
                let check = CheckConfig::default();
                let usage = UsageConfig::default();
                let _ = entry_outcome(&entry, &keys.view(), &Rules { check: &check, usage: &usage });
            }
        }
    }
}
