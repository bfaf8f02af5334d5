//! Envoy's access-log messages on the wire, decoded so that bad content costs at most
//! the entry it sits in.
//!
//! prost refuses a whole `StreamAccessLogsMessage` when one `string` in it is not
//! UTF-8, and Envoy's `header_to_metadata` copies a backend's header bytes into the
//! entry as they came: one Latin-1 `x-billing-model` would cost every entry of the
//! batch. Here the message is walked field by field ([`decode_message`]), each entry
//! is decoded on its own ([`decode_entry`]), only the fields metering reads are looked
//! at, and strings are read lossily: bytes that are not UTF-8 become U+FFFD, which the
//! header contract treats as "was not UTF-8". For an entry that is valid protobuf with
//! valid UTF-8, the result is exactly what prost would have decoded.
//!
//! Field semantics follow protobuf: a singular scalar seen twice keeps the last value,
//! a singular message seen twice is merged, a map key seen twice keeps the last entry.
//! A field metering reads that arrives with the wrong wire type makes its entry
//! [`Malformed`], as it would for prost; fields metering does not read are skipped.

use std::borrow::Cow;

use serde_json::Value as Json;

use crate::protowire::{Malformed, Reader, WireValue, each_field};

/// Field numbers (envoy/service/accesslog/v3, envoy/data/accesslog/v3,
/// envoy/config/core/v3, google/protobuf).
mod tag {
    pub const MESSAGE_IDENTIFIER: u32 = 1;
    pub const MESSAGE_HTTP_LOGS: u32 = 2;
    pub const MESSAGE_TCP_LOGS: u32 = 3;
    pub const IDENTIFIER_NODE: u32 = 1;
    pub const IDENTIFIER_LOG_NAME: u32 = 2;
    pub const NODE_ID: u32 = 1;
    pub const ENTRIES_LOG_ENTRY: u32 = 1;

    pub const ENTRY_COMMON: u32 = 1;
    pub const ENTRY_REQUEST: u32 = 3;
    pub const ENTRY_RESPONSE: u32 = 4;

    pub const COMMON_START_TIME: u32 = 5;
    pub const COMMON_TIME_TO_LAST_RX_BYTE: u32 = 6;
    pub const COMMON_TIME_TO_LAST_UPSTREAM_RX_BYTE: u32 = 10;
    pub const COMMON_TIME_TO_LAST_DOWNSTREAM_TX_BYTE: u32 = 12;
    pub const COMMON_METADATA: u32 = 17;
    pub const METADATA_FILTER_METADATA: u32 = 1;

    pub const REQUEST_METHOD: u32 = 1;
    pub const REQUEST_AUTHORITY: u32 = 3;
    pub const REQUEST_PATH: u32 = 5;
    pub const REQUEST_ID: u32 = 9;
    pub const REQUEST_HEADERS: u32 = 13;

    pub const RESPONSE_CODE: u32 = 1;
    pub const RESPONSE_HEADERS: u32 = 4;
    pub const RESPONSE_TRAILERS: u32 = 5;
    pub const RESPONSE_CODE_DETAILS: u32 = 6;

    pub const MAP_KEY: u32 = 1;
    pub const MAP_VALUE: u32 = 2;
    pub const TIME_SECONDS: u32 = 1;
    pub const TIME_NANOS: u32 = 2;
    pub const WRAPPER_VALUE: u32 = 1;
    pub const STRUCT_FIELDS: u32 = 1;
    pub const LIST_VALUES: u32 = 1;
    pub const VALUE_NULL: u32 = 1;
    pub const VALUE_NUMBER: u32 = 2;
    pub const VALUE_STRING: u32 = 3;
    pub const VALUE_BOOL: u32 = 4;
    pub const VALUE_STRUCT: u32 = 5;
    pub const VALUE_LIST: u32 = 6;
}

/// Nesting of `Struct`/`ListValue` inside one metadata value; prost stops at 100 levels
/// for the whole message, of which the entry itself takes five.
const MAX_VALUE_DEPTH: usize = 64;

/// One `StreamAccessLogsMessage`, walked but with its entries not yet decoded.
#[derive(Debug, Default)]
pub struct Message<'a> {
    /// `identifier.node.id`, sent with the first message of a stream.
    pub node_id: Option<Cow<'a, str>>,
    pub log_name: Option<Cow<'a, str>>,
    /// The encoded `HTTPAccessLogEntry`s, for [`decode_entry`].
    pub http_entries: Vec<&'a [u8]>,
    /// HTTP entries that were not even length-delimited (wrong wire type).
    pub http_entries_malformed: usize,
    pub tcp_entries: usize,
}

/// Walks a message. A break in the encoding ends the walk where it is; a break inside
/// the identifier or an entry list costs only the rest of that part. Everything read
/// before is returned with the first break: entries are self-contained, so those
/// before it are whole.
pub fn decode_message(buf: &[u8]) -> (Message<'_>, Option<Malformed>) {
    let mut message = Message::default();
    let mut first_break = None;
    let mut note = |m: Malformed| {
        first_break.get_or_insert(m);
    };
    let mut r = Reader::new(buf);
    loop {
        let at = r.offset();
        let (number, value) = match r.field() {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(m) => {
                note(m);
                break;
            }
        };
        let result = match (number, value) {
            (tag::MESSAGE_IDENTIFIER, WireValue::Len(b)) => {
                identifier(b, &mut message).map_err(|m| within(buf, b, m))
            }
            (tag::MESSAGE_HTTP_LOGS, WireValue::Len(b)) => each_field(b, |n, v| {
                match (n, v) {
                    (tag::ENTRIES_LOG_ENTRY, WireValue::Len(entry)) => {
                        message.http_entries.push(entry)
                    }
                    (tag::ENTRIES_LOG_ENTRY, _) => message.http_entries_malformed += 1,
                    _ => {}
                }
                Ok(())
            })
            .map_err(|m| within(buf, b, m)),
            (tag::MESSAGE_TCP_LOGS, WireValue::Len(b)) => each_field(b, |n, _| {
                if n == tag::ENTRIES_LOG_ENTRY {
                    message.tcp_entries += 1;
                }
                Ok(())
            })
            .map_err(|m| within(buf, b, m)),
            (tag::MESSAGE_IDENTIFIER..=tag::MESSAGE_TCP_LOGS, _) => Err(Malformed { offset: at }),
            _ => Ok(()),
        };
        if let Err(m) = result {
            note(m);
        }
    }
    (message, first_break)
}

fn identifier<'a>(buf: &'a [u8], message: &mut Message<'a>) -> Result<(), Malformed> {
    each_field(buf, |number, value| {
        match (number, value) {
            (tag::IDENTIFIER_NODE, WireValue::Len(node)) => each_field(node, |n, v| {
                if let (tag::NODE_ID, WireValue::Len(id)) = (n, v) {
                    message.node_id = Some(String::from_utf8_lossy(id));
                }
                Ok(())
            })?,
            (tag::IDENTIFIER_LOG_NAME, WireValue::Len(name)) => {
                message.log_name = Some(String::from_utf8_lossy(name));
            }
            _ => {}
        }
        Ok(())
    })
}

/// A break found inside `inner` (a slice of `outer`), as an offset into `outer`.
fn within(outer: &[u8], inner: &[u8], m: Malformed) -> Malformed {
    let base = (inner.as_ptr() as usize).saturating_sub(outer.as_ptr() as usize);
    Malformed {
        offset: base + m.offset,
    }
}

/// A `google.protobuf.Timestamp` or `Duration`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Time {
    pub seconds: i64,
    pub nanos: i32,
}

impl Time {
    pub fn as_millis(self) -> i64 {
        self.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(self.nanos) / 1_000_000)
    }
}

/// A header map as Envoy logs it (lowercase names).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Headers<'a>(pub Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'a> Headers<'a> {
    /// The value of `name`; of a name sent twice in the map, the last.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }
}

/// A `google.protobuf.Value` from dynamic metadata. `Struct` and `ListValue` come as
/// JSON, their strings read lossily.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue<'a> {
    Null,
    Number(f64),
    Text(Cow<'a, str>),
    Bool(bool),
    Json(Json),
}

/// One metadata namespace (a `google.protobuf.Struct`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Fields<'a>(pub Vec<(Cow<'a, str>, MetaValue<'a>)>);

impl<'a> Fields<'a> {
    /// The value of `key` (null for a value with no kind set).
    pub fn get(&self, key: &str) -> Option<&MetaValue<'a>> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A string field.
    pub fn text(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            MetaValue::Text(t) => Some(t),
            _ => None,
        }
    }
}

/// What metering reads of one `HTTPAccessLogEntry`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LogEntry<'a> {
    pub start_time: Option<Time>,
    pub time_to_last_rx_byte: Option<Time>,
    pub time_to_last_upstream_rx_byte: Option<Time>,
    pub time_to_last_downstream_tx_byte: Option<Time>,
    /// The namespaces asked for in [`decode_entry`], decoded; others are skipped.
    pub metadata: Vec<(Cow<'a, str>, Fields<'a>)>,
    pub request_method: i32,
    pub authority: Cow<'a, str>,
    pub path: Cow<'a, str>,
    pub request_id: Cow<'a, str>,
    pub request_headers: Headers<'a>,
    pub response_code: Option<u32>,
    pub response_code_details: Cow<'a, str>,
    pub response_headers: Headers<'a>,
    pub response_trailers: Headers<'a>,
}

impl<'a> LogEntry<'a> {
    /// A dynamic-metadata namespace, if it was asked for and is present.
    pub fn metadata(&self, namespace: &str) -> Option<&Fields<'a>> {
        self.metadata
            .iter()
            .find(|(ns, _)| ns == namespace)
            .map(|(_, f)| f)
    }
}

fn text(b: &[u8]) -> Cow<'_, str> {
    String::from_utf8_lossy(b)
}

/// The bytes of a field that must be length-delimited.
fn len(value: WireValue<'_>, at: usize) -> Result<&[u8], Malformed> {
    value.bytes().ok_or(Malformed { offset: at })
}

fn varint(value: WireValue<'_>, at: usize) -> Result<u64, Malformed> {
    value.varint().ok_or(Malformed { offset: at })
}

/// Decodes one entry, with the metadata `namespaces` metering reads.
pub fn decode_entry<'a>(buf: &'a [u8], namespaces: &[&str]) -> Result<LogEntry<'a>, Malformed> {
    let mut e = LogEntry::default();
    each_field(buf, |number, value| {
        let at = 0;
        match number {
            tag::ENTRY_COMMON => common(len(value, at)?, namespaces, &mut e),
            tag::ENTRY_REQUEST => request(len(value, at)?, &mut e),
            tag::ENTRY_RESPONSE => response(len(value, at)?, &mut e),
            _ => Ok(()),
        }
        .map_err(|m| match value {
            WireValue::Len(b) => within(buf, b, m),
            _ => m,
        })
    })?;
    Ok(e)
}

fn common<'a>(buf: &'a [u8], namespaces: &[&str], e: &mut LogEntry<'a>) -> Result<(), Malformed> {
    each_field(buf, |number, value| {
        let slot = match number {
            tag::COMMON_START_TIME => &mut e.start_time,
            tag::COMMON_TIME_TO_LAST_RX_BYTE => &mut e.time_to_last_rx_byte,
            tag::COMMON_TIME_TO_LAST_UPSTREAM_RX_BYTE => &mut e.time_to_last_upstream_rx_byte,
            tag::COMMON_TIME_TO_LAST_DOWNSTREAM_TX_BYTE => &mut e.time_to_last_downstream_tx_byte,
            tag::COMMON_METADATA => {
                return each_field(len(value, 0)?, |n, v| {
                    if n == tag::METADATA_FILTER_METADATA {
                        namespace(len(v, 0)?, namespaces, &mut e.metadata)?;
                    }
                    Ok(())
                });
            }
            _ => return Ok(()),
        };
        time(len(value, 0)?, slot.get_or_insert_default())
    })
}

fn time(buf: &[u8], t: &mut Time) -> Result<(), Malformed> {
    each_field(buf, |number, value| {
        match number {
            tag::TIME_SECONDS => t.seconds = varint(value, 0)? as i64,
            tag::TIME_NANOS => t.nanos = varint(value, 0)? as i32,
            _ => {}
        }
        Ok(())
    })
}

/// One `filter_metadata` map entry: decoded if its namespace is wanted.
fn namespace<'a>(
    entry: &'a [u8],
    wanted: &[&str],
    out: &mut Vec<(Cow<'a, str>, Fields<'a>)>,
) -> Result<(), Malformed> {
    let mut key: &[u8] = b"";
    let mut structs: Vec<&[u8]> = Vec::new();
    each_field(entry, |number, value| {
        match number {
            tag::MAP_KEY => key = len(value, 0)?,
            // A message field seen twice is merged: keep every part.
            tag::MAP_VALUE => structs.push(len(value, 0)?),
            _ => {}
        }
        Ok(())
    })?;
    let key = text(key);
    if !wanted.contains(&key.as_ref()) {
        return Ok(());
    }
    let mut fields = Fields::default();
    for part in structs {
        struct_fields(part, 0, &mut fields.0)?;
    }
    // A map key seen twice: the last entry replaces the earlier one.
    out.retain(|(ns, _)| *ns != key);
    out.push((key, fields));
    Ok(())
}

/// The `fields` of a `google.protobuf.Struct`, appended to `out` (lookups take the
/// last of a key, as a map would keep it).
fn struct_fields<'a>(
    buf: &'a [u8],
    depth: usize,
    out: &mut Vec<(Cow<'a, str>, MetaValue<'a>)>,
) -> Result<(), Malformed> {
    each_field(buf, |number, value| {
        if number != tag::STRUCT_FIELDS {
            return Ok(());
        }
        let mut key: &[u8] = b"";
        let mut parsed = MetaValue::Null;
        each_field(len(value, 0)?, |n, v| {
            match n {
                tag::MAP_KEY => key = len(v, 0)?,
                tag::MAP_VALUE => parsed = meta_value(len(v, 0)?, depth)?,
                _ => {}
            }
            Ok(())
        })?;
        let key = text(key);
        out.retain(|(k, _)| *k != key);
        out.push((key, parsed));
        Ok(())
    })
}

/// A `google.protobuf.Value`; null when no kind is set. Of several kinds the last one
/// counts.
fn meta_value(buf: &[u8], depth: usize) -> Result<MetaValue<'_>, Malformed> {
    if depth > MAX_VALUE_DEPTH {
        return Err(Malformed { offset: 0 });
    }
    let mut kind = MetaValue::Null;
    each_field(buf, |number, value| {
        kind = match number {
            tag::VALUE_NULL => {
                varint(value, 0)?;
                MetaValue::Null
            }
            tag::VALUE_NUMBER => match value {
                WireValue::Fixed64(bits) => MetaValue::Number(f64::from_bits(bits)),
                _ => return Err(Malformed { offset: 0 }),
            },
            tag::VALUE_STRING => MetaValue::Text(text(len(value, 0)?)),
            tag::VALUE_BOOL => MetaValue::Bool(varint(value, 0)? != 0),
            tag::VALUE_STRUCT => {
                let mut fields = Vec::new();
                struct_fields(len(value, 0)?, depth + 1, &mut fields)?;
                MetaValue::Json(Json::Object(
                    fields
                        .into_iter()
                        .map(|(k, v)| (k.into_owned(), v.into_json()))
                        .collect(),
                ))
            }
            tag::VALUE_LIST => {
                let mut items = Vec::new();
                each_field(len(value, 0)?, |n, v| {
                    if n == tag::LIST_VALUES {
                        items.push(meta_value(len(v, 0)?, depth + 1)?.into_json());
                    }
                    Ok(())
                })?;
                MetaValue::Json(Json::Array(items))
            }
            _ => return Ok(()),
        };
        Ok(())
    })?;
    Ok(kind)
}

impl MetaValue<'_> {
    /// As JSON; a number JSON cannot hold (NaN, infinite) becomes null.
    pub fn into_json(self) -> Json {
        match self {
            MetaValue::Null => Json::Null,
            MetaValue::Number(n) => {
                serde_json::Number::from_f64(n).map_or(Json::Null, Json::Number)
            }
            MetaValue::Text(t) => Json::String(t.into_owned()),
            MetaValue::Bool(b) => Json::Bool(b),
            MetaValue::Json(j) => j,
        }
    }
}

fn request<'a>(buf: &'a [u8], e: &mut LogEntry<'a>) -> Result<(), Malformed> {
    each_field(buf, |number, value| {
        match number {
            tag::REQUEST_METHOD => e.request_method = varint(value, 0)? as i32,
            tag::REQUEST_AUTHORITY => e.authority = text(len(value, 0)?),
            tag::REQUEST_PATH => e.path = text(len(value, 0)?),
            tag::REQUEST_ID => e.request_id = text(len(value, 0)?),
            tag::REQUEST_HEADERS => header(len(value, 0)?, &mut e.request_headers)?,
            _ => {}
        }
        Ok(())
    })
}

fn response<'a>(buf: &'a [u8], e: &mut LogEntry<'a>) -> Result<(), Malformed> {
    each_field(buf, |number, value| {
        match number {
            tag::RESPONSE_CODE => {
                let code = e.response_code.get_or_insert(0);
                each_field(len(value, 0)?, |n, v| {
                    if n == tag::WRAPPER_VALUE {
                        *code = varint(v, 0)? as u32;
                    }
                    Ok(())
                })?;
            }
            tag::RESPONSE_HEADERS => header(len(value, 0)?, &mut e.response_headers)?,
            tag::RESPONSE_TRAILERS => header(len(value, 0)?, &mut e.response_trailers)?,
            tag::RESPONSE_CODE_DETAILS => e.response_code_details = text(len(value, 0)?),
            _ => {}
        }
        Ok(())
    })
}

/// One `map<string, string>` entry.
fn header<'a>(entry: &'a [u8], headers: &mut Headers<'a>) -> Result<(), Malformed> {
    let (mut key, mut value): (&[u8], &[u8]) = (b"", b"");
    each_field(entry, |number, v| {
        match number {
            tag::MAP_KEY => key = len(v, 0)?,
            tag::MAP_VALUE => value = len(v, 0)?,
            _ => {}
        }
        Ok(())
    })?;
    headers.0.push((text(key), text(value)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::{Metadata, Node};
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
    };
    use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
    use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
        HttpAccessLogEntries, Identifier, LogEntries,
    };
    use envoy_types::pb::google::protobuf::{
        ListValue, Struct, Timestamp, UInt32Value, Value, value::Kind,
    };
    use prost::Message as _;

    fn string(s: &str) -> Value {
        Value {
            kind: Some(Kind::StringValue(s.into())),
        }
    }

    fn entry(path: &str, model: &str) -> HttpAccessLogEntry {
        let usage = Struct {
            fields: [
                ("model".to_string(), string(model)),
                (
                    "nested".to_string(),
                    Value {
                        kind: Some(Kind::ListValue(ListValue {
                            values: vec![
                                Value {
                                    kind: Some(Kind::NumberValue(1.5)),
                                },
                                Value {
                                    kind: Some(Kind::BoolValue(true)),
                                },
                            ],
                        })),
                    },
                ),
            ]
            .into(),
        };
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                start_time: Some(Timestamp {
                    seconds: 1_795_648_616,
                    nanos: 200_000_000,
                }),
                metadata: Some(Metadata {
                    filter_metadata: [
                        ("keymeter".to_string(), usage),
                        ("other".to_string(), Struct::default()),
                    ]
                    .into(),
                    ..Default::default()
                }),
                upstream_cluster: "backend".into(),
                ..Default::default()
            }),
            request: Some(HttpRequestProperties {
                request_method: 3,
                path: path.into(),
                request_id: "rid".into(),
                request_headers: [("api-key".to_string(), "sk-1".to_string())].into(),
                user_agent: "curl".into(),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(UInt32Value { value: 200 }),
                response_headers: [("x-billing-usage".to_string(), "3".to_string())].into(),
                response_code_details: "via_upstream".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn reads_what_prost_writes() {
        let bytes = entry("/v1/chat", "gpt-4").encode_to_vec();
        let e = decode_entry(&bytes, &["keymeter"]).unwrap();
        assert_eq!(e.path, "/v1/chat");
        assert_eq!(e.request_id, "rid");
        assert_eq!(e.request_method, 3);
        assert_eq!(e.request_headers.get("api-key"), Some("sk-1"));
        assert_eq!(e.response_code, Some(200));
        assert_eq!(e.response_code_details, "via_upstream");
        assert_eq!(e.response_headers.get("x-billing-usage"), Some("3"));
        assert_eq!(e.start_time.unwrap().as_millis(), 1_795_648_616_200);
        let usage = e.metadata("keymeter").unwrap();
        assert_eq!(usage.text("model"), Some("gpt-4"));
        assert_eq!(
            usage.get("nested"),
            Some(&MetaValue::Json(serde_json::json!([1.5, true])))
        );
        assert!(e.metadata("other").is_none(), "not asked for");
    }

    #[test]
    fn bytes_that_are_not_utf8_cost_only_their_own_field() {
        let mut bytes = entry("/v1/chat", "caf\u{e9}").encode_to_vec();
        // "café" in UTF-8 is 63 61 66 c3 a9: turn it into Latin-1's lone e9 plus a
        // byte, keeping the length.
        let at = bytes.windows(2).position(|w| w == [0xc3, 0xa9]).unwrap();
        bytes[at] = 0xe9;
        bytes[at + 1] = b'!';
        assert!(
            HttpAccessLogEntry::decode(bytes.as_slice()).is_err(),
            "prost refuses it"
        );
        let e = decode_entry(&bytes, &["keymeter"]).unwrap();
        assert_eq!(
            e.metadata("keymeter").unwrap().text("model"),
            Some("caf\u{fffd}!")
        );
        assert_eq!(e.path, "/v1/chat");
    }

    #[test]
    fn a_broken_message_keeps_the_entries_before_the_break() {
        let message = StreamAccessLogsMessage {
            identifier: Some(Identifier {
                node: Some(Node {
                    id: "envoy-1".into(),
                    ..Default::default()
                }),
                log_name: "keymeter".into(),
            }),
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
                log_entry: vec![entry("/a", "m"), entry("/b", "m")],
            })),
        };
        let bytes = message.encode_to_vec();
        let (m, result) = decode_message(&bytes);
        assert_eq!(result, None);
        assert_eq!(m.node_id.as_deref(), Some("envoy-1"));
        assert_eq!(m.log_name.as_deref(), Some("keymeter"));
        assert_eq!(m.http_entries.len(), 2);

        // The second entry claims more bytes than its list has: the first survives
        // and the break is located at the second entry's field.
        let a = entry("/a", "m").encode_to_vec();
        let b = entry("/b", "m").encode_to_vec();
        let mut list = vec![0x0a];
        prost::encoding::encode_varint(a.len() as u64, &mut list);
        list.extend(&a);
        let second_at = list.len();
        list.extend([0x0a, 0xff, 0x7f]);
        list.extend(&b);
        let mut bytes = vec![0x12];
        prost::encoding::encode_varint(list.len() as u64, &mut bytes);
        let header = bytes.len();
        bytes.extend(&list);
        let (m, result) = decode_message(&bytes);
        assert_eq!(m.http_entries.len(), 1);
        assert_eq!(
            result,
            Some(Malformed {
                offset: header + second_at
            })
        );
        let e = decode_entry(m.http_entries[0], &[]).unwrap();
        assert_eq!(e.path, "/a");
        // A message that breaks at its first byte yields nothing, and says where.
        assert_eq!(
            decode_message(&[0x12, 0x05]).1,
            Some(Malformed { offset: 0 })
        );
    }

    #[test]
    fn wrong_wire_types_in_read_fields_are_malformed_and_others_are_skipped() {
        // request { path = varint 1 }
        let bad_path = [0x1a, 0x02, 0x28, 0x01];
        assert!(decode_entry(&bad_path, &[]).is_err());
        // request { user_agent (6) = varint 1 }: not read, so not an error.
        let odd_agent = [0x1a, 0x02, 0x30, 0x01];
        assert_eq!(decode_entry(&odd_agent, &[]).unwrap(), LogEntry::default());
        // Every prefix of a real entry decodes or is malformed; none panics.
        let bytes = entry("/v1/chat", "gpt-4").encode_to_vec();
        for cut in 0..bytes.len() {
            let _ = decode_entry(&bytes[..cut], &["keymeter"]);
        }
    }

    #[test]
    fn deep_metadata_values_are_malformed_not_a_stack_overflow() {
        let mut v = string("x");
        for _ in 0..200 {
            v = Value {
                kind: Some(Kind::ListValue(ListValue { values: vec![v] })),
            };
        }
        let mut e = entry("/", "m");
        e.common_properties
            .as_mut()
            .unwrap()
            .metadata
            .as_mut()
            .unwrap()
            .filter_metadata
            .get_mut("keymeter")
            .unwrap()
            .fields
            .insert("deep".into(), v);
        let bytes = e.encode_to_vec();
        assert!(decode_entry(&bytes, &["keymeter"]).is_err());
        assert!(
            decode_entry(&bytes, &["other"]).is_ok(),
            "not read, not decoded"
        );
    }
}
