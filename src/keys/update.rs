//! `billing/keys/update` as the billing system really sends it, read entry by entry.
//!
//! The billing server was built and tested against the SDK, which validates nothing
//! (README, "What a `billing/keys/update` may hold"): its messages are only as clean as
//! that code requires. So a message is read the way the SDK reads it, with
//! `dict.get`: every field of an entry may be missing, `null` or of another JSON type,
//! unknown fields are ignored, `timestamp` orders nothing and may be anything. Each
//! entry is then judged on its own: a usable one applies, an unusable one is skipped
//! with a [`SkipReason`], and neither costs the other entries of the message.
//!
//! keymeter is stricter than the SDK only where the SDK's looseness is a bug, each
//! case named by a [`SkipReason`]: an `ok` entry needs an app id it can put into the
//! `x-billing-app-id` header, and a key must be one a request can carry in a header
//! value. A `blocked` entry with a usable key always applies, whatever its other
//! fields say. The keys file and the snapshot apply the same per-entry rules, but
//! reject the whole file on the first entry that breaks them (see `sync.rs`).

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{KeyEntryRef, KeyStatus};

/// Longest accepted API key or app id, and longest kept block reason: far above real
/// keys, small enough to bound memory.
pub const MAX_FIELD_BYTES: usize = 1024;

pub use crate::metrics::label::SkipReason;

impl SkipReason {
    /// What is wrong, for an operator reading a log line (never quotes the entry).
    pub fn describe(self) -> &'static str {
        match self {
            SkipReason::NotAnObject => "not a JSON object",
            SkipReason::NoApiKey => "api_key missing, null, empty or not a string",
            SkipReason::ApiKeyTooLong => "api_key longer than 1024 bytes",
            SkipReason::ApiKeyNotHeaderSafe => {
                "api_key has a control character or a leading or trailing space"
            }
            SkipReason::NoAppId => "ok entry whose app_id is missing, null, empty or not a string",
            SkipReason::AppIdTooLong => "app_id longer than 1024 bytes",
            SkipReason::AppIdNotHeaderSafe => "app_id has a control character",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a request can ever present `api_key`, as `authz::find_key` reads it: a
/// header value is trimmed of spaces and tabs at both ends (by Envoy and by keymeter)
/// and cannot hold control characters, so a key with those never matches. Inner
/// spaces are legal in a header value and arrive unchanged: such a key is usable.
pub fn check_api_key(api_key: &str) -> Result<(), SkipReason> {
    if api_key.is_empty() {
        return Err(SkipReason::NoApiKey);
    }
    if api_key.len() > MAX_FIELD_BYTES {
        return Err(SkipReason::ApiKeyTooLong);
    }
    // Tab is a control character, so it is covered by the first test.
    if api_key.chars().any(char::is_control) || api_key.starts_with(' ') || api_key.ends_with(' ') {
        return Err(SkipReason::ApiKeyNotHeaderSafe);
    }
    Ok(())
}

/// Whether `app_id` can be stated for an allowed key: keymeter sends it to the backend
/// as a header value, so it must be non-empty and free of control characters.
pub fn check_app_id(app_id: &str) -> Result<(), SkipReason> {
    if app_id.is_empty() {
        return Err(SkipReason::NoAppId);
    }
    if app_id.len() > MAX_FIELD_BYTES {
        return Err(SkipReason::AppIdTooLong);
    }
    if app_id.chars().any(char::is_control) {
        return Err(SkipReason::AppIdNotHeaderSafe);
    }
    Ok(())
}

/// `reason`, cut to at most [`MAX_FIELD_BYTES`] at a character boundary: a block must
/// apply whatever its reason says, so a long reason is shortened, not refused.
fn bounded(reason: Cow<'_, str>) -> Cow<'_, str> {
    if reason.len() <= MAX_FIELD_BYTES {
        return reason;
    }
    let mut end = MAX_FIELD_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    match reason {
        Cow::Borrowed(r) => Cow::Borrowed(&r[..end]),
        Cow::Owned(mut r) => {
            r.truncate(end);
            Cow::Owned(r)
        }
    }
}

/// One entry that was skipped: its position in `updates` and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Skipped {
    pub index: usize,
    pub reason: SkipReason,
}

/// A `billing/keys/update` message, judged entry by entry. The strings of `entries`
/// borrow from the payload where they hold no JSON escapes.
#[derive(Debug, Default)]
pub struct ParsedUpdate<'a> {
    /// The usable entries, in message order: status `ok` or `blocked` only. A `blocked`
    /// entry without a usable app id has an empty `app_id` (the store then keeps the
    /// app id it knew for the key).
    pub entries: Vec<KeyEntryRef<'a>>,
    /// Entries whose status is neither `ok` nor `blocked`: they change nothing (as in
    /// the SDK).
    pub ignored: usize,
    /// Entries keymeter could not use, in message order.
    pub skipped: Vec<Skipped>,
}

impl ParsedUpdate<'_> {
    /// Number of entries in the message's `updates`.
    pub fn total(&self) -> usize {
        self.entries.len() + self.ignored + self.skipped.len()
    }
}

/// Reads a payload as a `billing/keys/update`. Errors only when it is not JSON, not a
/// JSON object, or its `updates` is neither an array nor `null` (nothing to apply
/// either way); the caller maps the serde error to a rejection reason.
pub fn parse(payload: &[u8]) -> Result<ParsedUpdate<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(payload);
    let parsed = de.deserialize_map(MessageVisitor)?;
    de.end()?;
    Ok(parsed)
}

struct MessageVisitor;

impl<'de> Visitor<'de> for MessageVisitor {
    type Value = ParsedUpdate<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a key update object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut parsed = ParsedUpdate::default();
        while let Some(name) = map.next_key::<FieldName>()? {
            match name {
                // A repeated `updates` replaces the earlier one, as in Python's json.
                FieldName::Updates => parsed = map.next_value::<Updates>()?.0,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(parsed)
    }
}

/// The names keymeter reads; everything else is ignored.
enum FieldName {
    Updates,
    AppId,
    ApiKey,
    Status,
    Reason,
    Other,
}

impl<'de> Deserialize<'de> for FieldName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = FieldName;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<FieldName, E> {
                Ok(match s {
                    "updates" => FieldName::Updates,
                    "app_id" => FieldName::AppId,
                    "api_key" => FieldName::ApiKey,
                    "status" => FieldName::Status,
                    "reason" => FieldName::Reason,
                    _ => FieldName::Other,
                })
            }
        }
        d.deserialize_identifier(Name)
    }
}

/// `updates`: an array of entries, judged as they are read so that no raw copy of a
/// large message is kept; `null` counts as no entries.
struct Updates<'a>(ParsedUpdate<'a>);

impl<'de> Deserialize<'de> for Updates<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct List;
        impl<'de> Visitor<'de> for List {
            type Value = Updates<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of key entries")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Updates(ParsedUpdate::default()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parsed = ParsedUpdate::default();
                let mut index = 0;
                while let Some(raw) = seq.next_element::<RawEntry>()? {
                    match raw.judge() {
                        Ok(Some(entry)) => parsed.entries.push(entry),
                        Ok(None) => parsed.ignored += 1,
                        Err(reason) => parsed.skipped.push(Skipped { index, reason }),
                    }
                    index += 1;
                }
                Ok(Updates(parsed))
            }
        }
        d.deserialize_any(List)
    }
}

/// Visitor methods that take each JSON value other than strings and objects (an
/// array is read to its end) as `$value`: what a field or an entry is when it is not
/// of the type keymeter reads.
macro_rules! other_values_are {
    ($de:lifetime, $value:expr) => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_seq<A: SeqAccess<$de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            IgnoredAny.visit_seq(seq).map(|_| $value)
        }
    };
}

/// A field as the SDK's `entry.get(name)` sees it: a string, or nothing usable
/// (missing, `null`, or any other JSON type).
#[derive(Default)]
struct Text<'a>(Option<Cow<'a, str>>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Any;
        impl<'de> Visitor<'de> for Any {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Borrowed(s))))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Owned(s.to_string()))))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
                Ok(Text(Some(Cow::Owned(s))))
            }
            other_values_are!('de, Text(None));
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                IgnoredAny.visit_map(map).map(|_| Text(None))
            }
        }
        d.deserialize_any(Any)
    }
}

/// One element of `updates` before it is judged.
enum RawEntry<'a> {
    Object {
        app_id: Text<'a>,
        api_key: Text<'a>,
        status: Text<'a>,
        reason: Text<'a>,
    },
    NotAnObject,
}

impl<'de> Deserialize<'de> for RawEntry<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> Visitor<'de> for Entry {
            type Value = RawEntry<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut app_id, mut api_key, mut status, mut reason) = Default::default();
                // A repeated field: the last one counts, as in Python's json.
                while let Some(name) = map.next_key::<FieldName>()? {
                    match name {
                        FieldName::AppId => app_id = map.next_value()?,
                        FieldName::ApiKey => api_key = map.next_value()?,
                        FieldName::Status => status = map.next_value()?,
                        FieldName::Reason => reason = map.next_value()?,
                        FieldName::Updates | FieldName::Other => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(RawEntry::Object {
                    app_id,
                    api_key,
                    status,
                    reason,
                })
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(RawEntry::NotAnObject)
            }
            other_values_are!('de, RawEntry::NotAnObject);
        }
        d.deserialize_any(Entry)
    }
}

impl<'a> RawEntry<'a> {
    /// The entry as the store takes it; `Ok(None)` when its status changes nothing.
    fn judge(self) -> Result<Option<KeyEntryRef<'a>>, SkipReason> {
        let RawEntry::Object {
            app_id,
            api_key,
            status,
            reason,
        } = self
        else {
            return Err(SkipReason::NotAnObject);
        };
        let status = match status.0.as_deref() {
            Some("ok") => KeyStatus::Ok,
            Some("blocked") => KeyStatus::Blocked,
            // As in the SDK: any other status, "OK" included, changes nothing.
            _ => return Ok(None),
        };
        let api_key = api_key.0.ok_or(SkipReason::NoApiKey)?;
        check_api_key(&api_key)?;
        let (app_id, reason) = if status == KeyStatus::Ok {
            let app_id = app_id.0.ok_or(SkipReason::NoAppId)?;
            check_app_id(&app_id)?;
            (app_id, Cow::Borrowed(""))
        } else {
            // A block applies whatever else it says: an unusable app id is dropped
            // (the store keeps the one it knew), an unusable reason is empty.
            let app_id = app_id.0.filter(|a| check_app_id(a).is_ok());
            (
                app_id.unwrap_or_default(),
                bounded(reason.0.unwrap_or_default()),
            )
        };
        Ok(Some(KeyEntryRef {
            app_id,
            api_key,
            status,
            reason,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::AsKeyEntry;

    /// (api_key, app_id, status, reason) of each usable entry.
    fn usable(p: &ParsedUpdate<'_>) -> Vec<(String, String, String, String)> {
        p.entries
            .iter()
            .map(|e| {
                let f = e.fields();
                (
                    f.api_key.into(),
                    f.app_id.into(),
                    f.status.as_str().into(),
                    f.reason.into(),
                )
            })
            .collect()
    }

    fn skipped(p: &ParsedUpdate<'_>) -> Vec<(usize, &'static str)> {
        p.skipped
            .iter()
            .map(|s| (s.index, s.reason.as_str()))
            .collect()
    }

    #[test]
    fn the_sdk_capture_parses_as_it_did() {
        let payload = br#"{"updates": [{"app_id": "app-1", "api_key": "sk-test-0001", "status": "ok", "reason": ""}, {"app_id": "app-2", "api_key": "sk-blocked", "status": "blocked", "reason": "balance"}], "timestamp": 1}"#;
        let p = parse(payload).unwrap();
        assert_eq!(
            usable(&p),
            [
                ("sk-test-0001", "app-1", "ok", ""),
                ("sk-blocked", "app-2", "blocked", "balance"),
            ]
            .map(|(a, b, c, d)| (a.into(), b.into(), c.into(), d.into()))
        );
        assert_eq!((p.ignored, p.skipped.len(), p.total()), (0, 0, 2));
        // Unescaped strings are not copied.
        assert!(matches!(p.entries[0].api_key, Cow::Borrowed(_)));
    }

    #[test]
    fn one_bad_entry_costs_only_itself() {
        let payload = br#"{"updates": [
            {"app_id": "a", "api_key": "k1", "status": "ok"},
            7,
            {"app_id": "a", "api_key": "", "status": "ok"},
            {"app_id": "a", "status": "ok"},
            {"app_id": "a", "api_key": 12, "status": "ok"},
            {"app_id": "a", "api_key": "k\n", "status": "ok"},
            {"app_id": "a", "api_key": " k", "status": "ok"},
            {"app_id": "a", "api_key": "k ", "status": "blocked"},
            {"app_id": null, "api_key": "k2", "status": "ok"},
            {"app_id": "", "api_key": "k2", "status": "ok"},
            {"app_id": ["a"], "api_key": "k2", "status": "ok"},
            {"app_id": "a\r\nx: y", "api_key": "k2", "status": "ok"},
            {"app_id": "a", "api_key": "k2", "status": "OK"},
            {"app_id": "a", "api_key": "k2"},
            {"app_id": "a", "api_key": "k2", "status": null},
            [1, {"deep": [2]}],
            "k3",
            null,
            {"app_id": "a", "api_key": "k3", "status": "ok"}
        ]}"#;
        let p = parse(payload).unwrap();
        assert_eq!(
            usable(&p),
            [("k1", "a", "ok", ""), ("k3", "a", "ok", "")].map(|(a, b, c, d)| (
                a.into(),
                b.into(),
                c.into(),
                d.into()
            ))
        );
        assert_eq!(
            skipped(&p),
            [
                (1, "not_an_object"),
                (2, "no_api_key"),
                (3, "no_api_key"),
                (4, "no_api_key"),
                (5, "api_key_not_header_safe"),
                (6, "api_key_not_header_safe"),
                (7, "api_key_not_header_safe"),
                (8, "no_app_id"),
                (9, "no_app_id"),
                (10, "no_app_id"),
                (11, "app_id_not_header_safe"),
                (15, "not_an_object"),
                (16, "not_an_object"),
                (17, "not_an_object"),
            ]
        );
        assert_eq!(p.ignored, 3);
        assert_eq!(p.total(), 19);
    }

    #[test]
    fn a_block_applies_whatever_its_other_fields_say() {
        let payload = br#"{"updates": [
            {"api_key": "k1", "status": "blocked"},
            {"app_id": null, "api_key": "k2", "status": "blocked", "reason": null},
            {"app_id": 5, "api_key": "k3", "status": "blocked", "reason": {"x": 1}},
            {"app_id": "a\u0000", "api_key": "k4", "status": "blocked", "reason": "r\nwith lines"},
            {"app_id": "app", "api_key": "k5", "status": "blocked", "reason": "balance", "extra": [1]}
        ]}"#;
        let p = parse(payload).unwrap();
        assert_eq!(
            usable(&p),
            [
                ("k1", "", "blocked", ""),
                ("k2", "", "blocked", ""),
                ("k3", "", "blocked", ""),
                ("k4", "", "blocked", "r\nwith lines"),
                ("k5", "app", "blocked", "balance"),
            ]
            .map(|(a, b, c, d)| (a.into(), b.into(), c.into(), d.into()))
        );
        let long = format!(
            r#"{{"updates": [{{"api_key": "k", "status": "blocked", "reason": "{}é"}}]}}"#,
            "r".repeat(MAX_FIELD_BYTES - 1)
        );
        let p = parse(long.as_bytes()).unwrap();
        assert_eq!(
            p.entries[0].reason.len(),
            MAX_FIELD_BYTES - 1,
            "cut before é"
        );
    }

    #[test]
    fn lenient_where_the_sdk_is() {
        for payload in [
            &br#"{"updates": [{"app_id": "a", "api_key": "k", "status": "ok"}]}"#[..],
            br#"{"updates": [{"app_id": "a", "api_key": "k", "status": "ok"}], "timestamp": 1.5}"#,
            br#"{"updates": [{"app_id": "a", "api_key": "k", "status": "ok"}], "timestamp": "now"}"#,
            br#"{"timestamp": null, "updates": [{"app_id": "a", "api_key": "k", "status": "ok", "reason": 3, "note": {}}], "v": [2]}"#,
            br#"{"updates": [], "updates": [{"app_id": "a", "api_key": "k", "status": "ok"}]}"#,
            br#"{"updates": [{"api_key": "other", "api_key": "k", "app_id": "a", "status": "ok"}]}"#,
            br#"{"upd\u0061tes": [{"app_id": "a", "api_key": "\u006b", "status": "ok"}]}"#,
        ] {
            let p = parse(payload).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                usable(&p),
                [("k".into(), "a".into(), "ok".into(), "".into())],
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        for empty in [&b"{}"[..], br#"{"updates": null}"#, br#"{"timestamp": 1}"#] {
            assert_eq!(parse(empty).unwrap().total(), 0);
        }
    }

    #[test]
    fn inner_spaces_are_a_usable_key() {
        let p =
            parse(br#"{"updates": [{"app_id": "a", "api_key": "sk two words", "status": "ok"}]}"#)
                .unwrap();
        assert_eq!(p.entries[0].api_key, "sk two words");
    }

    #[test]
    fn only_what_is_no_key_update_at_all_fails() {
        for payload in [
            &b"not json"[..],
            b"{\"updates\": [",
            b"[]",
            b"\"updates\"",
            br#"{"updates": 5}"#,
            br#"{"updates": "sk-good"}"#,
            br#"{"updates": {"api_key": "k"}}"#,
            br#"{"updates": []} trailing"#,
            b"\xff\xfe",
        ] {
            assert!(
                parse(payload).is_err(),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn header_rules_match_how_a_check_reads_the_key() {
        use crate::authz::find_key;
        use crate::config::CheckConfig;
        let config = CheckConfig::default();
        for key in [
            "sk-1",
            "sk two words",
            " sk",
            "sk ",
            "\tsk",
            "sk\t",
            "s\tk",
            "s\u{7f}k",
            "s\u{85}k",
            "ключ",
        ] {
            // A key is usable exactly when a header holding it yields it unchanged.
            let delivered = find_key(&config, |_| Some(key)) == Some(key);
            let usable = check_api_key(key).is_ok();
            if key.chars().any(char::is_control) {
                assert!(!usable, "{key:?}");
            } else {
                assert_eq!(usable, delivered, "{key:?}");
            }
        }
        assert_eq!(check_api_key(""), Err(SkipReason::NoApiKey));
        let long = "k".repeat(MAX_FIELD_BYTES + 1);
        assert_eq!(check_api_key(&long), Err(SkipReason::ApiKeyTooLong));
        assert!(check_api_key(&long[1..]).is_ok());
    }
}
