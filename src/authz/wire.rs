//! The Check's protobuf on the wire, without materializing it.
//!
//! A `CheckRequest` carries every request header, the peers, route metadata and more;
//! decoding it into prost structs allocates a `String` pair per header and a map, for a
//! decision that needs one or two header values. [`scan`] walks the bytes instead and
//! borrows the few fields the Check reads. Answers are written directly as protobuf
//! (allow) or encoded once and reused (the common denials).

use std::net::IpAddr;

pub use crate::protowire::Malformed;
use crate::protowire::each_len_field;

/// Field numbers used (envoy/service/auth/v3 and envoy/config/core/v3).
mod tag {
    pub const CHECK_REQUEST_ATTRIBUTES: u32 = 1;
    pub const ATTRIBUTES_SOURCE: u32 = 1;
    pub const ATTRIBUTES_REQUEST: u32 = 4;
    pub const PEER_ADDRESS: u32 = 1;
    pub const ADDRESS_SOCKET_ADDRESS: u32 = 1;
    pub const SOCKET_ADDRESS_ADDRESS: u32 = 2;
    pub const REQUEST_HTTP: u32 = 2;
    pub const HTTP_HEADERS: u32 = 3;
    pub const HTTP_HEADER_MAP: u32 = 13;
    pub const HEADER_MAP_HEADERS: u32 = 1;
    pub const HEADER_VALUE_KEY: u32 = 1;
    pub const HEADER_VALUE_VALUE: u32 = 2;
    pub const HEADER_VALUE_RAW_VALUE: u32 = 3;
    pub const MAP_KEY: u32 = 1;
    pub const MAP_VALUE: u32 = 2;

    pub const RESPONSE_STATUS: u32 = 1;
    pub const RESPONSE_OK: u32 = 3;
    pub const RESPONSE_DYNAMIC_METADATA: u32 = 4;
    pub const OK_HEADERS: u32 = 2;
    pub const OK_HEADERS_TO_REMOVE: u32 = 5;
    pub const OPTION_HEADER: u32 = 1;
    pub const OPTION_APPEND_ACTION: u32 = 3;
    pub const STRUCT_FIELDS: u32 = 1;
    pub const VALUE_STRING: u32 = 3;
}

/// Wire types the answers are written with.
const VARINT: u8 = 0;
const LEN: u8 = 2;

/// Headers are looked up among a handful of names; a small inline list avoids a map.
/// Names and values stay bytes until looked up: only the few headers the decision reads
/// must be UTF-8, so a stray Latin-1 `user-agent` costs nothing.
pub struct CheckView<'a> {
    /// Both of Envoy's encodings: the `headers` map and, with `encode_raw_headers`,
    /// `header_map` (one entry per occurrence of a repeated header).
    headers: Vec<(&'a [u8], &'a [u8])>,
    source: Option<&'a [u8]>,
}

impl<'a> CheckView<'a> {
    /// A request header by lowercase name, as Envoy sends them. A header that is sent
    /// more than once, or whose value is not UTF-8, reads as [`UNREADABLE`]: it can
    /// never be a valid key, and it is never taken for an absent one.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        let mut found = self
            .headers
            .iter()
            .filter(|(k, _)| *k == name.as_bytes())
            .map(|(_, v)| *v);
        let value = found.next()?;
        if found.next().is_some() {
            return Some(UNREADABLE);
        }
        Some(std::str::from_utf8(value).unwrap_or(UNREADABLE))
    }

    /// The downstream client's address as Envoy saw it.
    pub fn source_ip(&self) -> Option<IpAddr> {
        std::str::from_utf8(self.source?).ok()?.parse().ok()
    }
}

/// What a key header that cannot be read as one value stands for. Keys with control
/// characters are never stored (`keys::update`), so this matches no key.
pub const UNREADABLE: &str = "\u{0}";

/// Reads the parts of a `CheckRequest` the decision needs. Only a broken encoding is
/// [`Malformed`]; anything that decodes is a request, however odd.
pub fn scan(buf: &[u8]) -> Result<CheckView<'_>, Malformed> {
    let mut view = CheckView {
        headers: Vec::with_capacity(16),
        source: None,
    };
    each_len_field(buf, |n, attributes| {
        if n != tag::CHECK_REQUEST_ATTRIBUTES {
            return Ok(());
        }
        each_len_field(attributes, |n, b| match n {
            tag::ATTRIBUTES_SOURCE => each_len_field(b, |n, address| {
                if n != tag::PEER_ADDRESS {
                    return Ok(());
                }
                each_len_field(address, |n, socket| {
                    if n != tag::ADDRESS_SOCKET_ADDRESS {
                        return Ok(());
                    }
                    each_len_field(socket, |n, ip| {
                        if n == tag::SOCKET_ADDRESS_ADDRESS {
                            view.source = Some(ip);
                        }
                        Ok(())
                    })
                })
            }),
            tag::ATTRIBUTES_REQUEST => each_len_field(b, |n, http| {
                if n != tag::REQUEST_HTTP {
                    return Ok(());
                }
                each_len_field(http, |n, b| match n {
                    tag::HTTP_HEADERS => {
                        let (mut key, mut value): (&[u8], &[u8]) = (b"", b"");
                        each_len_field(b, |n, s| {
                            match n {
                                tag::MAP_KEY => key = s,
                                tag::MAP_VALUE => value = s,
                                _ => {}
                            }
                            Ok(())
                        })?;
                        view.headers.push((key, value));
                        Ok(())
                    }
                    tag::HTTP_HEADER_MAP => each_len_field(b, |n, header| {
                        if n != tag::HEADER_MAP_HEADERS {
                            return Ok(());
                        }
                        let (mut key, mut value): (&[u8], &[u8]) = (b"", b"");
                        each_len_field(header, |n, s| {
                            match n {
                                tag::HEADER_VALUE_KEY => key = s,
                                tag::HEADER_VALUE_VALUE | tag::HEADER_VALUE_RAW_VALUE => value = s,
                                _ => {}
                            }
                            Ok(())
                        })?;
                        view.headers.push((key, value));
                        Ok(())
                    }),
                    _ => Ok(()),
                })
            }),
            _ => Ok(()),
        })
    })?;
    Ok(view)
}

/// A protobuf writer for the small, fixed shape of an allow answer.
struct Writer(Vec<u8>);

impl Writer {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, number: u32, wire: u8) {
        self.varint(u64::from(number) << 3 | u64::from(wire));
    }

    fn bytes(&mut self, number: u32, b: &[u8]) {
        self.key(number, LEN);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    /// A nested message, written by `f` into a scratch buffer first for its length.
    fn message(&mut self, number: u32, f: impl FnOnce(&mut Writer)) {
        let mut inner = Writer(Vec::with_capacity(64));
        f(&mut inner);
        self.bytes(number, &inner.0);
    }
}

/// The encoded `CheckResponse` allowing a request: status OK, the app id header
/// (overwriting a client's own), the key headers to remove, and the dynamic metadata.
pub fn encode_allow(
    app_id_header: &str,
    headers_to_remove: &[String],
    metadata: [(&str, &str); 2],
    app_id: &str,
    overwrite_action: i32,
) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(128 + app_id.len()));
    // google.rpc.Status with code 0: an empty message.
    w.bytes(tag::RESPONSE_STATUS, &[]);
    w.message(tag::RESPONSE_OK, |ok| {
        ok.message(tag::OK_HEADERS, |option| {
            option.message(tag::OPTION_HEADER, |h| {
                h.bytes(tag::HEADER_VALUE_KEY, app_id_header.as_bytes());
                h.bytes(tag::HEADER_VALUE_VALUE, app_id.as_bytes());
            });
            option.key(tag::OPTION_APPEND_ACTION, VARINT);
            option.varint(overwrite_action as u64);
        });
        for name in headers_to_remove {
            ok.bytes(tag::OK_HEADERS_TO_REMOVE, name.as_bytes());
        }
    });
    w.message(tag::RESPONSE_DYNAMIC_METADATA, |s| {
        for (key, value) in metadata {
            s.message(tag::STRUCT_FIELDS, |entry| {
                entry.bytes(tag::MAP_KEY, key.as_bytes());
                entry.message(tag::MAP_VALUE, |v| {
                    v.bytes(tag::VALUE_STRING, value.as_bytes())
                });
            });
        }
    });
    w.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{
        Address, HeaderMap, HeaderValue, SocketAddress, address::Address as Kind,
    };
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Peer, Request,
    };
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    use prost::Message;

    fn request(headers: &[(&str, &str)], source: Option<&str>) -> Vec<u8> {
        CheckRequest {
            attributes: Some(AttributeContext {
                source: source.map(|ip| Peer {
                    address: Some(Address {
                        address: Some(Kind::SocketAddress(SocketAddress {
                            address: ip.into(),
                            port_specifier: None,
                            ..Default::default()
                        })),
                    }),
                    service: "svc".into(),
                    ..Default::default()
                }),
                request: Some(Request {
                    http: Some(HttpRequest {
                        id: "123".into(),
                        method: "POST".into(),
                        path: "/v1/chat".into(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        body: "ignored".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: [("k".to_string(), "v".to_string())].into(),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn scan_finds_headers_and_source() {
        let bytes = request(
            &[
                (":path", "/v1/chat"),
                ("api-key", "sk-1"),
                ("user-agent", "curl"),
            ],
            Some("203.0.113.5"),
        );
        let v = scan(&bytes).unwrap();
        assert_eq!(v.header("api-key"), Some("sk-1"));
        assert_eq!(v.header("user-agent"), Some("curl"));
        assert_eq!(v.header("apikey"), None);
        assert_eq!(v.source_ip(), Some("203.0.113.5".parse().unwrap()));
        let empty = scan(&[]).unwrap();
        assert_eq!(empty.header("api-key"), None);
        assert_eq!(empty.source_ip(), None);
    }

    #[test]
    fn scan_reads_the_raw_header_map() {
        let bytes = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(Request {
                    http: Some(HttpRequest {
                        header_map: Some(HeaderMap {
                            headers: vec![HeaderValue {
                                key: "api-key".into(),
                                raw_value: b"sk-raw".to_vec(),
                                ..Default::default()
                            }],
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
        .encode_to_vec();
        assert_eq!(scan(&bytes).unwrap().header("api-key"), Some("sk-raw"));
    }

    #[test]
    fn broken_encodings_are_malformed_not_panics() {
        let good = request(&[("api-key", "sk-1")], Some("10.0.0.1"));
        for cut in 1..good.len() {
            // Every prefix either scans or is Malformed; none panics.
            let _ = scan(&good[..cut]);
        }
        assert!(scan(&[0x0a, 0xff]).is_err());
        assert!(scan(&[0x0f]).is_err(), "wire type 7");
        assert!(scan(&[0x00]).is_err(), "field 0");
    }

    #[test]
    fn encoded_allow_decodes_as_the_check_response_envoy_expects() {
        use envoy_types::ext_authz::v3::pb::{CheckResponse, HttpResponse};
        use envoy_types::pb::google::protobuf::value::Kind;
        let bytes = encode_allow(
            "x-billing-app-id",
            &["api-key".to_string(), "apikey".to_string()],
            [("app_id", "app-1"), ("key_fp", "fp-0123")],
            "app-1",
            2,
        );
        let r = CheckResponse::decode(bytes.as_slice()).unwrap();
        assert_eq!(r.status.unwrap().code, 0);
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!()
        };
        let h = ok.headers[0].header.as_ref().unwrap();
        assert_eq!(
            (h.key.as_str(), h.value.as_str()),
            ("x-billing-app-id", "app-1")
        );
        assert_eq!(ok.headers[0].append_action, 2);
        assert_eq!(ok.headers_to_remove, ["api-key", "apikey"]);
        let md = r.dynamic_metadata.unwrap().fields;
        assert_eq!(md["key_fp"].kind, Some(Kind::StringValue("fp-0123".into())));
        assert_eq!(md["app_id"].kind, Some(Kind::StringValue("app-1".into())));
    }
}
