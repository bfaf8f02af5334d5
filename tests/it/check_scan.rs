//! The Check's in-place scanner against prost, on generated CheckRequests whose header
//! names and values may hold any bytes, in both of Envoy's encodings (the `headers`
//! map, and `header_map` as `encode_raw_headers` sends it), with repeated headers.
//!
//! The scanner must never panic; a key header sent once reads exactly as prost decodes
//! it; a key header sent twice or not UTF-8 reads as an unreadable (never valid) key;
//! and keymeter answers every input, malformed ones with a deny, never a gRPC error.

use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse};
use keymeter::authz::wire::{UNREADABLE, scan};
use keymeter::authz::{AuthzService, find_key};
use keymeter::config::CheckConfig;
use keymeter::keys::{KeyEntry, KeyStore};
use proptest::prelude::*;
use prost::Message;
use std::sync::Arc;

#[derive(Clone, PartialEq, Message)]
struct MCheckRequest {
    #[prost(message, optional, tag = "1")]
    attributes: Option<MAttributes>,
}

#[derive(Clone, PartialEq, Message)]
struct MAttributes {
    #[prost(message, optional, tag = "1")]
    source: Option<MPeer>,
    #[prost(message, optional, tag = "4")]
    request: Option<MRequest>,
    #[prost(bytes = "vec", tag = "6")]
    context_extensions_junk: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct MPeer {
    #[prost(message, optional, tag = "1")]
    address: Option<MAddress>,
}

#[derive(Clone, PartialEq, Message)]
struct MAddress {
    #[prost(message, optional, tag = "1")]
    socket_address: Option<MSocketAddress>,
}

#[derive(Clone, PartialEq, Message)]
struct MSocketAddress {
    #[prost(bytes = "vec", tag = "2")]
    address: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct MRequest {
    #[prost(message, optional, tag = "2")]
    http: Option<MHttp>,
}

#[derive(Clone, PartialEq, Message)]
struct MHttp {
    #[prost(bytes = "vec", tag = "4")]
    path: Vec<u8>,
    #[prost(message, repeated, tag = "3")]
    headers: Vec<MPair>,
    #[prost(message, optional, tag = "13")]
    header_map: Option<MHeaderMap>,
}

#[derive(Clone, PartialEq, Message)]
struct MPair {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
struct MHeaderMap {
    #[prost(message, repeated, tag = "1")]
    headers: Vec<MHeaderValue>,
}

#[derive(Clone, PartialEq, Message)]
struct MHeaderValue {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    raw_value: Vec<u8>,
}

const NAMES: &[&str] = &["api-key", "apikey", "authorization", "user-agent", ":path"];
const VALUES: &[&str] = &[
    "sk-good",
    "sk-blocked",
    " sk-good ",
    "Bearer sk-good",
    "",
    "x",
];

fn bytes_like(valid: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        5 => prop::sample::select(valid).prop_map(|s| s.as_bytes().to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..10),
        1 => prop::sample::select(valid).prop_map(|s| {
            let mut b = s.as_bytes().to_vec();
            b.push(0xe9);
            b
        }),
    ]
}

fn pair() -> impl Strategy<Value = MPair> {
    (bytes_like(NAMES), bytes_like(VALUES)).prop_map(|(key, value)| MPair { key, value })
}

fn request() -> impl Strategy<Value = MCheckRequest> {
    (
        prop::option::of(bytes_like(&["203.0.113.5", "::1", "not-an-ip"])),
        prop::collection::vec(pair(), 0..5),
        prop::option::of(prop::collection::vec(pair(), 0..4)),
    )
        .prop_map(|(source, headers, raw)| MCheckRequest {
            attributes: Some(MAttributes {
                source: source.map(|address| MPeer {
                    address: Some(MAddress {
                        socket_address: Some(MSocketAddress { address }),
                    }),
                }),
                request: Some(MRequest {
                    http: Some(MHttp {
                        path: b"/v1/chat".to_vec(),
                        headers,
                        header_map: raw.map(|pairs| MHeaderMap {
                            headers: pairs
                                .into_iter()
                                .map(|p| MHeaderValue {
                                    key: p.key,
                                    raw_value: p.value,
                                })
                                .collect(),
                        }),
                    }),
                }),
                context_extensions_junk: Vec::new(),
            }),
        })
}

/// What a header name reads as, from the generated occurrences themselves.
fn expected(m: &MCheckRequest, name: &str) -> Option<String> {
    let http = m.attributes.as_ref()?.request.as_ref()?.http.as_ref()?;
    let mut values: Vec<&[u8]> = http
        .headers
        .iter()
        .filter(|p| p.key == name.as_bytes())
        .map(|p| p.value.as_slice())
        .collect();
    if let Some(map) = &http.header_map {
        values.extend(
            map.headers
                .iter()
                .filter(|h| h.key == name.as_bytes())
                .map(|h| h.raw_value.as_slice()),
        );
    }
    match values.as_slice() {
        [] => None,
        [one] => Some(std::str::from_utf8(one).map_or(UNREADABLE.to_string(), str::to_string)),
        _ => Some(UNREADABLE.to_string()),
    }
}

fn authz() -> AuthzService {
    let keys = KeyStore::new();
    keys.apply_billing_update(&[
        KeyEntry::ok("app-1", "sk-good"),
        KeyEntry::blocked("app-2", "sk-blocked", "balance"),
    ]);
    AuthzService::new(
        Arc::new(keys),
        Arc::new(keymeter::metrics::Metrics::new()),
        CheckConfig {
            accept_bearer: true,
            ..CheckConfig::default()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn the_scanner_reads_what_prost_decodes_and_repeats_are_unreadable(m in request()) {
        let bytes = m.encode_to_vec();
        let view = scan(&bytes).expect("a valid encoding always scans");
        for name in NAMES {
            prop_assert_eq!(view.header(name).map(str::to_string), expected(&m, name), "{}", name);
        }
        // Where prost decodes it too, a header sent once reads the same.
        if let Ok(decoded) = CheckRequest::decode(bytes.as_slice()) {
            let http = decoded.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref()).unwrap();
            for name in NAMES {
                let map = http.headers.get(*name);
                let raw: Vec<_> = http.header_map.iter().flat_map(|h| &h.headers).filter(|h| h.key == *name).collect();
                let sent = m.attributes.as_ref().unwrap().request.as_ref().unwrap().http.as_ref().unwrap()
                    .headers.iter().filter(|p| p.key == name.as_bytes()).count();
                if sent == 1 && raw.is_empty() {
                    prop_assert_eq!(view.header(name), map.map(String::as_str));
                }
            }
            let source = decoded.attributes.as_ref().and_then(|a| a.source.as_ref())
                .and_then(|p| p.address.as_ref()).and_then(|a| match &a.address {
                    Some(envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(s)) => s.address.parse().ok(),
                    _ => None,
                });
            prop_assert_eq!(view.source_ip(), source);
        }
        // The key the decision sees is one a request can present, or none.
        let key = find_key(&CheckConfig { accept_bearer: true, ..CheckConfig::default() }, |n| view.header(n));
        if let Some(k) = key {
            prop_assert!(k == UNREADABLE || !k.is_empty());
        }
    }

    #[test]
    fn every_input_gets_an_answer_and_garbage_a_deny(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let service = authz();
        let answer = CheckResponse::decode(service.check_bytes(&bytes)).expect("a CheckResponse");
        let code = answer.status.map_or(0, |s| s.code);
        if scan(&bytes).is_err() {
            prop_assert_eq!(code, 3, "malformed: INVALID_ARGUMENT inside a deny");
            prop_assert_eq!(crate::support::keymeter::http_status(&CheckResponse::decode(service.check_bytes(&bytes)).unwrap()), 400);
        } else {
            // Random bytes never carry a valid key.
            prop_assert_ne!(code, 0);
        }
    }
}

#[test]
fn repeated_key_headers_are_invalid_in_both_encodings() {
    let service = authz();
    let check = |m: MCheckRequest| {
        crate::support::keymeter::http_status(
            &CheckResponse::decode(service.check_bytes(&m.encode_to_vec())).unwrap(),
        )
    };
    let http = |headers: Vec<(&str, &str)>, raw: Option<Vec<(&str, &[u8])>>| MCheckRequest {
        attributes: Some(MAttributes {
            source: None,
            request: Some(MRequest {
                http: Some(MHttp {
                    path: b"/".to_vec(),
                    headers: headers
                        .into_iter()
                        .map(|(k, v)| MPair {
                            key: k.into(),
                            value: v.into(),
                        })
                        .collect(),
                    header_map: raw.map(|r| MHeaderMap {
                        headers: r
                            .into_iter()
                            .map(|(k, v)| MHeaderValue {
                                key: k.into(),
                                raw_value: v.to_vec(),
                            })
                            .collect(),
                    }),
                }),
            }),
            context_extensions_junk: Vec::new(),
        }),
    };
    assert_eq!(check(http(vec![("api-key", "sk-good")], None)), 200);
    assert_eq!(
        check(http(vec![], Some(vec![("api-key", b"sk-good")]))),
        200
    );
    // encode_raw_headers: one entry per occurrence.
    let twice: Vec<(&str, &[u8])> = vec![("api-key", b"sk-good"), ("api-key", b"sk-good")];
    assert_eq!(check(http(vec![], Some(twice))), 401);
    // A map entry sent twice (no Envoy does that; a forger might).
    assert_eq!(
        check(http(
            vec![("api-key", "sk-good"), ("api-key", "sk-good")],
            None
        )),
        401
    );
    // Not UTF-8: a wrong key, not an absent one (apikey is not consulted).
    let latin1: Vec<(&str, &[u8])> = vec![("api-key", b"sk-g\xe9"), ("apikey", b"sk-good")];
    assert_eq!(check(http(vec![], Some(latin1))), 401);
    // Not UTF-8 elsewhere costs nothing.
    let agent: Vec<(&str, &[u8])> = vec![("user-agent", b"caf\xe9"), ("api-key", b"sk-good")];
    assert_eq!(check(http(vec![], Some(agent))), 200);
}
