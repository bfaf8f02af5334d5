//! The header contract for backends: how a response declares what it costs.
//!
//! A backend sets `x-billing-module`, `x-billing-model`, `x-billing-usage` and
//! optionally `x-billing-metadata` (a JSON object) in its response headers, or in its
//! trailers when usage is known only at the end of a stream. Several records go in one
//! `x-billing-records` JSON array. The same fields may arrive as Envoy dynamic
//! metadata (`header_to_metadata` moves a header there and hides it from the client).
//!
//! Per field, the first source that has it wins: trailers, then headers, then metadata.
//! `records`, when present, is the whole declaration and the single fields are ignored.

use std::collections::HashMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::config::{RouteRule, UsageConfig};

/// Longest module or model name.
const MAX_NAME_BYTES: usize = 128;
/// Largest usage accepted: many consumers store it as a signed 64-bit integer.
const MAX_USAGE: u64 = i64::MAX as u64;

/// One thing to bill, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    pub module: String,
    pub model: String,
    pub usage: u64,
    /// Empty means "no metadata": the field is then left out of the record.
    pub metadata: Map<String, Value>,
    /// The backend sent metadata that could not be used: the usage is billed without
    /// it (losing the charge would be worse than losing its details).
    pub metadata_dropped: Option<MetadataProblem>,
}

pub use crate::metrics::label::MetadataProblem;

/// Where metadata must be right (the Report API answers the caller at once), a
/// problem with it rejects the record.
impl From<MetadataProblem> for Rejection {
    fn from(p: MetadataProblem) -> Rejection {
        match p {
            MetadataProblem::NotUtf8 => Rejection::NotUtf8,
            MetadataProblem::InvalidJson => Rejection::MetadataInvalidJson,
            MetadataProblem::NotObject => Rejection::MetadataNotObject,
            MetadataProblem::TooLarge => Rejection::MetadataTooLarge,
        }
    }
}

pub use crate::metrics::label::Rejection;

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The raw usage fields of one response, merged from its sources.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Declared {
    pub module: Option<String>,
    pub model: Option<String>,
    pub usage: Option<String>,
    pub metadata: Option<String>,
    pub records: Option<String>,
}

impl Declared {
    /// Did the backend say anything at all?
    pub fn is_empty(&self) -> bool {
        self.module.is_none()
            && self.model.is_none()
            && self.usage.is_none()
            && self.metadata.is_none()
            && self.records.is_none()
    }

    /// Merges sources in priority order: the first that has a field wins.
    /// `get(source, field)` looks `field` up in `source`.
    pub fn merge<'a, S>(
        sources: &[S],
        names: &'a FieldNames<'a>,
        get: impl Fn(&S, &'a str, Field) -> Option<String>,
    ) -> Declared {
        let pick = |field: Field| {
            let name = names.name(field);
            sources.iter().find_map(|s| get(s, name, field))
        };
        Declared {
            module: pick(Field::Module),
            model: pick(Field::Model),
            usage: pick(Field::Usage),
            metadata: pick(Field::Metadata),
            records: pick(Field::Records),
        }
    }

    /// Looks the fields up in one header map (lowercase names, as Envoy logs them).
    pub fn from_headers(headers: &HashMap<String, String>, names: &FieldNames<'_>) -> Declared {
        Declared::merge(&[headers], names, |h, name, _| h.get(name).cloned())
    }
}

/// One field of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Module,
    Model,
    Usage,
    Metadata,
    Records,
}

impl Field {
    /// Key of the field in the dynamic-metadata namespace.
    pub fn metadata_key(self) -> &'static str {
        match self {
            Field::Module => "module",
            Field::Model => "model",
            Field::Usage => "usage",
            Field::Metadata => "metadata",
            Field::Records => "records",
        }
    }
}

/// Header names of the contract, from the configuration.
pub struct FieldNames<'a> {
    pub module: &'a str,
    pub model: &'a str,
    pub usage: &'a str,
    pub metadata: &'a str,
    pub records: &'a str,
}

impl<'a> FieldNames<'a> {
    pub fn from_config(config: &'a UsageConfig) -> FieldNames<'a> {
        let h = &config.headers;
        FieldNames {
            module: &h.module,
            model: &h.model,
            usage: &h.usage,
            metadata: &h.metadata,
            records: &h.records,
        }
    }

    pub fn name(&self, field: Field) -> &'a str {
        match field {
            Field::Module => self.module,
            Field::Model => self.model,
            Field::Usage => self.usage,
            Field::Metadata => self.metadata,
            Field::Records => self.records,
        }
    }
}

/// Limits that bound what a backend can make keymeter store.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_metadata_bytes: usize,
    pub max_records: usize,
}

impl Limits {
    pub fn from_config(config: &UsageConfig) -> Limits {
        Limits {
            max_metadata_bytes: config.max_metadata_bytes,
            max_records: config.max_records_per_response,
        }
    }
}

/// Turns a declaration into validated usages, one verdict per record: a single-field
/// declaration is one record, `records` one per item. `default` is the matching route
/// rule, if any: it fills fields the backend left out (backend values always win).
/// An empty list means there is nothing to bill.
///
/// Verdicts are per field: a bad module, model or usage rejects its record; bad
/// metadata is dropped and the usage still bills ([`Usage::metadata_dropped`]).
pub fn usages(
    declared: &Declared,
    default: Option<&RouteRule>,
    limits: Limits,
) -> Vec<Result<Usage, Rejection>> {
    if let Some(records) = &declared.records {
        return parse_records(records, limits);
    }
    if declared.is_empty() {
        return default
            .map(|rule| {
                Ok(Usage {
                    module: rule.module.clone(),
                    model: rule.model.clone(),
                    usage: rule.usage,
                    metadata: Map::new(),
                    metadata_dropped: None,
                })
            })
            .into_iter()
            .collect();
    }
    vec![single(declared, default, limits)]
}

fn single(
    declared: &Declared,
    default: Option<&RouteRule>,
    limits: Limits,
) -> Result<Usage, Rejection> {
    let module = match (&declared.module, default) {
        (Some(m), _) => name(m, Rejection::ModuleMissing, Rejection::ModuleInvalid)?,
        (None, Some(rule)) => rule.module.clone(),
        (None, None) => return Err(Rejection::ModuleMissing),
    };
    let model = match (&declared.model, default) {
        (Some(m), _) => name(m, Rejection::ModelMissing, Rejection::ModelInvalid)?,
        (None, Some(rule)) => rule.model.clone(),
        (None, None) => return Err(Rejection::ModelMissing),
    };
    let usage = match (&declared.usage, default) {
        (Some(u), _) => parse_usage_text(u)?,
        (None, Some(rule)) => rule.usage,
        (None, None) => return Err(Rejection::UsageMissing),
    };
    let (metadata, metadata_dropped) = match &declared.metadata {
        Some(m) => or_dropped(parse_metadata_text(m, limits)),
        None => (Map::new(), None),
    };
    Ok(Usage {
        module,
        model,
        usage,
        metadata,
        metadata_dropped,
    })
}

/// Metadata, or none and why.
fn or_dropped(
    parsed: Result<Map<String, Value>, MetadataProblem>,
) -> (Map<String, Value>, Option<MetadataProblem>) {
    match parsed {
        Ok(m) => (m, None),
        Err(p) => (Map::new(), Some(p)),
    }
}

/// Envoy replaces bytes that are not UTF-8 in logged header values with this
/// character, so a name containing it was not valid UTF-8 at the backend.
const ENVOY_INVALID_UTF8_MARK: char = '!';
/// What keymeter's own decoding turns bytes that are not UTF-8 into (values that
/// reach it through dynamic metadata keep the backend's raw bytes).
const NOT_UTF8_MARK: char = char::REPLACEMENT_CHARACTER;

/// A module or model name: non-empty, short, printable, UTF-8 at the source.
pub fn name(value: &str, missing: Rejection, invalid: Rejection) -> Result<String, Rejection> {
    let v = value.trim();
    if v.is_empty() {
        return Err(missing);
    }
    if v.contains(ENVOY_INVALID_UTF8_MARK) || v.contains(NOT_UTF8_MARK) {
        return Err(Rejection::NotUtf8);
    }
    if v.len() > MAX_NAME_BYTES || v.chars().any(char::is_control) {
        return Err(invalid);
    }
    Ok(v.to_string())
}

/// A usage count from text: ASCII digits only.
pub fn parse_usage_text(value: &str) -> Result<u64, Rejection> {
    let v = value.trim();
    if v.is_empty() {
        return Err(Rejection::UsageMissing);
    }
    if v.contains(NOT_UTF8_MARK) {
        return Err(Rejection::NotUtf8);
    }
    let digits = match v.strip_prefix('-') {
        Some(rest) if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) => {
            // "-0" is zero, anything else below zero is negative usage.
            return if rest.bytes().all(|b| b == b'0') {
                Ok(0)
            } else {
                Err(Rejection::UsageNegative)
            };
        }
        Some(_) => return Err(Rejection::UsageNotANumber),
        None => v.strip_prefix('+').unwrap_or(v),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::UsageNotANumber);
    }
    match digits.parse::<u64>() {
        Ok(n) if n <= MAX_USAGE => Ok(n),
        _ => Err(Rejection::UsageOverflow),
    }
}

/// A usage count from JSON: a non-negative integer, or a string of digits.
pub fn parse_usage_json(value: &Value) -> Result<u64, Rejection> {
    match value {
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                if u <= MAX_USAGE {
                    Ok(u)
                } else {
                    Err(Rejection::UsageOverflow)
                }
            } else if n.as_i64().is_some() {
                Err(Rejection::UsageNegative)
            } else {
                match n.as_f64() {
                    Some(f) if f < 0.0 => Err(Rejection::UsageNegative),
                    Some(f) if f.fract() == 0.0 && f > MAX_USAGE as f64 => {
                        Err(Rejection::UsageOverflow)
                    }
                    _ => Err(Rejection::UsageNotANumber),
                }
            }
        }
        Value::String(s) => parse_usage_text(s),
        Value::Null => Err(Rejection::UsageMissing),
        _ => Err(Rejection::UsageNotANumber),
    }
}

/// A metadata object from its JSON text. Text holding U+FFFD (what bytes that were
/// not UTF-8 become) is refused whole: it was damaged before keymeter saw it.
pub fn parse_metadata_text(
    text: &str,
    limits: Limits,
) -> Result<Map<String, Value>, MetadataProblem> {
    if text.len() > limits.max_metadata_bytes {
        return Err(MetadataProblem::TooLarge);
    }
    if text.contains(NOT_UTF8_MARK) {
        return Err(MetadataProblem::NotUtf8);
    }
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(trimmed) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(MetadataProblem::NotObject),
        Err(_) => Err(MetadataProblem::InvalidJson),
    }
}

/// The `metadata` of one `records` item. `raw_not_utf8`: the item's text held U+FFFD,
/// so a U+FFFD in its metadata marks damaged bytes rather than an escape.
fn parse_metadata_json(
    value: &Value,
    raw_not_utf8: bool,
    limits: Limits,
) -> Result<Map<String, Value>, MetadataProblem> {
    match value {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => {
            let text = serde_json::to_string(m).unwrap_or_default();
            if text.len() > limits.max_metadata_bytes {
                Err(MetadataProblem::TooLarge)
            } else if raw_not_utf8 && text.contains(NOT_UTF8_MARK) {
                Err(MetadataProblem::NotUtf8)
            } else {
                Ok(m.clone())
            }
        }
        // A JSON string holding an object, as header_to_metadata would pass it along.
        Value::String(s) => parse_metadata_text(s, limits),
        _ => Err(MetadataProblem::NotObject),
    }
}

/// The `records` array: `[{"module", "model", "usage", "metadata"?}, ...]`, one
/// verdict per item. Only an array that cannot be read at all is one rejection.
fn parse_records(text: &str, limits: Limits) -> Vec<Result<Usage, Rejection>> {
    // Bound the work before parsing: each record is small.
    let max_text = limits.max_records * (limits.max_metadata_bytes + 2 * MAX_NAME_BYTES + 128);
    if text.len() > max_text {
        return vec![Err(Rejection::TooManyRecords)];
    }
    let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(text.trim()) else {
        return vec![Err(Rejection::RecordsInvalid)];
    };
    if items.len() > limits.max_records {
        return vec![Err(Rejection::TooManyRecords)];
    }
    items.iter().map(|raw| record_item(raw, limits)).collect()
}

fn record_item(raw: &RawValue, limits: Limits) -> Result<Usage, Rejection> {
    let Ok(Value::Object(o)) = serde_json::from_str::<Value>(raw.get()) else {
        return Err(Rejection::RecordsInvalid);
    };
    let text_field = |k: &str, missing, invalid| match o.get(k) {
        None | Some(Value::Null) => Err(missing),
        Some(Value::String(s)) => name(s, missing, invalid),
        Some(_) => Err(invalid),
    };
    let not_utf8 = raw.get().contains(NOT_UTF8_MARK);
    let metadata = o.get("metadata").unwrap_or(&Value::Null);
    let (metadata, metadata_dropped) = or_dropped(parse_metadata_json(metadata, not_utf8, limits));
    Ok(Usage {
        module: text_field("module", Rejection::ModuleMissing, Rejection::ModuleInvalid)?,
        model: text_field("model", Rejection::ModelMissing, Rejection::ModelInvalid)?,
        usage: parse_usage_json(o.get("usage").unwrap_or(&Value::Null))?,
        metadata,
        metadata_dropped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_metadata_bytes: 8192,
        max_records: 16,
    };

    fn declared(pairs: &[(&str, &str)]) -> Declared {
        let h: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let config = UsageConfig::default();
        Declared::from_headers(&h, &FieldNames::from_config(&config))
    }

    /// The verdict for a single-field declaration.
    fn one(d: &Declared, rule: Option<&RouteRule>) -> Result<Usage, Rejection> {
        let mut v = usages(d, rule, LIMITS);
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    fn rule() -> RouteRule {
        RouteRule::search_example()
    }

    #[test]
    fn headers_make_one_usage() {
        let d = declared(&[
            ("x-billing-module", "llm"),
            ("x-billing-model", "gpt-4"),
            ("x-billing-usage", "150"),
            (
                "x-billing-metadata",
                r#"{"prompt_tokens": 100, "completion_tokens": 50, "note": "héllo"}"#,
            ),
        ]);
        let u = one(&d, None).unwrap();
        assert_eq!(
            (u.module.as_str(), u.model.as_str(), u.usage),
            ("llm", "gpt-4", 150)
        );
        assert_eq!(u.metadata["prompt_tokens"], 100);
        assert_eq!(u.metadata["note"], "héllo");
        assert_eq!(u.metadata_dropped, None);
    }

    #[test]
    fn nothing_declared_and_no_rule_bills_nothing() {
        assert_eq!(usages(&declared(&[]), None, LIMITS), vec![]);
    }

    #[test]
    fn route_default_applies_and_backend_values_win() {
        let u = one(&declared(&[]), Some(&rule())).unwrap();
        assert_eq!((u.module.as_str(), u.usage), ("search", 1));
        let u = one(&declared(&[("x-billing-usage", "7")]), Some(&rule())).unwrap();
        assert_eq!(
            (u.module.as_str(), u.model.as_str(), u.usage),
            ("search", "default", 7)
        );
    }

    #[test]
    fn bad_values_are_rejected_with_their_reason() {
        let base = [("x-billing-module", "llm"), ("x-billing-model", "m")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v: Vec<(&str, &str)> = base.to_vec();
            v.extend_from_slice(extra);
            one(&declared(&v), None).unwrap_err()
        };
        assert_eq!(
            with(&[("x-billing-usage", "abc")]),
            Rejection::UsageNotANumber
        );
        assert_eq!(
            with(&[("x-billing-usage", "1.5")]),
            Rejection::UsageNotANumber
        );
        assert_eq!(with(&[("x-billing-usage", "-3")]), Rejection::UsageNegative);
        assert_eq!(
            with(&[("x-billing-usage", "99999999999999999999")]),
            Rejection::UsageOverflow
        );
        assert_eq!(
            with(&[("x-billing-usage", "9223372036854775808")]),
            Rejection::UsageOverflow
        );
        assert_eq!(with(&[("x-billing-usage", "")]), Rejection::UsageMissing);
        assert_eq!(
            with(&[("x-billing-usage", "1\u{fffd}")]),
            Rejection::NotUtf8
        );
        let d = declared(&[
            ("x-billing-module", " "),
            ("x-billing-model", "m"),
            ("x-billing-usage", "1"),
        ]);
        assert_eq!(one(&d, None).unwrap_err(), Rejection::ModuleMissing);
        let d = declared(&[("x-billing-module", "llm"), ("x-billing-usage", "1")]);
        assert_eq!(one(&d, None).unwrap_err(), Rejection::ModelMissing);
        let d = declared(&[
            ("x-billing-module", "llm\u{7}"),
            ("x-billing-model", "m"),
            ("x-billing-usage", "1"),
        ]);
        assert_eq!(one(&d, None).unwrap_err(), Rejection::ModuleInvalid);
        for model in ["caf\u{fffd}", "caf!"] {
            let d = declared(&[
                ("x-billing-module", "llm"),
                ("x-billing-model", model),
                ("x-billing-usage", "1"),
            ]);
            assert_eq!(one(&d, None).unwrap_err(), Rejection::NotUtf8, "{model}");
        }
    }

    #[test]
    fn bad_metadata_is_dropped_and_the_usage_still_bills() {
        let big = format!("{{\"k\": \"{}\"}}", "x".repeat(9000));
        for (metadata, problem) in [
            ("[1]", MetadataProblem::NotObject),
            ("{oops", MetadataProblem::InvalidJson),
            (r#"{"note": "caf\ufffd"}"#, MetadataProblem::NotUtf8),
            (big.as_str(), MetadataProblem::TooLarge),
        ] {
            let metadata = metadata.replace("\\ufffd", "\u{fffd}");
            let d = declared(&[
                ("x-billing-module", "llm"),
                ("x-billing-model", "m"),
                ("x-billing-usage", "5"),
                ("x-billing-metadata", &metadata),
            ]);
            let u = one(&d, None).unwrap();
            assert_eq!(u.usage, 5);
            assert!(u.metadata.is_empty());
            assert_eq!(u.metadata_dropped, Some(problem), "{metadata:.20}");
        }
        // An escaped U+FFFD is what a backend writes on purpose: kept.
        let d = declared(&[
            ("x-billing-module", "llm"),
            ("x-billing-model", "m"),
            ("x-billing-usage", "5"),
            ("x-billing-metadata", r#"{"note": "\ufffd"}"#),
        ]);
        let u = one(&d, None).unwrap();
        assert_eq!(u.metadata["note"], "\u{fffd}");
        assert_eq!(u.metadata_dropped, None);
    }

    #[test]
    fn usage_text_edge_cases() {
        assert_eq!(parse_usage_text(" 42 "), Ok(42));
        assert_eq!(parse_usage_text("+5"), Ok(5));
        assert_eq!(parse_usage_text("-0"), Ok(0));
        assert_eq!(parse_usage_text("0x10"), Err(Rejection::UsageNotANumber));
        assert_eq!(parse_usage_text("1e3"), Err(Rejection::UsageNotANumber));
        assert_eq!(parse_usage_text("-"), Err(Rejection::UsageNotANumber));
        assert_eq!(parse_usage_text("9223372036854775807"), Ok(i64::MAX as u64));
    }

    #[test]
    fn records_array_makes_several_usages() {
        let d = declared(&[(
            "x-billing-records",
            r#"[{"module": "llm", "model": "gpt-4", "usage": 120, "metadata": {"prompt_tokens": 100}},
                {"module": "tts", "model": "eleven", "usage": "12"}]"#,
        )]);
        let u: Vec<Usage> = usages(&d, None, LIMITS)
            .into_iter()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[1].module, "tts");
        assert_eq!(u[1].usage, 12);
        assert!(u[1].metadata.is_empty());
        let bad = |text: &str| usages(&declared(&[("x-billing-records", text)]), None, LIMITS);
        assert_eq!(bad("{}"), vec![Err(Rejection::RecordsInvalid)]);
        assert_eq!(bad("[1]"), vec![Err(Rejection::RecordsInvalid)]);
        assert_eq!(
            bad(r#"[{"module": "a", "model": "b", "usage": -1}]"#),
            vec![Err(Rejection::UsageNegative)]
        );
        assert_eq!(
            bad(r#"[{"module": "a", "model": "b", "usage": 1.5}]"#),
            vec![Err(Rejection::UsageNotANumber)]
        );
        assert_eq!(
            bad(r#"[{"model": "b", "usage": 1}]"#),
            vec![Err(Rejection::ModuleMissing)]
        );
        let many = format!(
            "[{}]",
            vec![r#"{"module":"a","model":"b","usage":1}"#; 17].join(",")
        );
        assert_eq!(bad(&many), vec![Err(Rejection::TooManyRecords)]);
        assert_eq!(bad("[]"), vec![]);
    }

    #[test]
    fn each_records_item_has_its_own_verdict() {
        let d = declared(&[(
            "x-billing-records",
            "[{\"module\": \"llm\", \"model\": \"gpt-4\", \"usage\": 1},
              {\"module\": \"llm\", \"model\": \"caf\u{fffd}\", \"usage\": 2},
              {\"module\": \"tts\", \"model\": \"e\", \"usage\": 3, \"metadata\": {\"n\": \"\u{fffd}\"}},
              {\"module\": \"tts\", \"model\": \"e\", \"usage\": 4, \"metadata\": [1]}]",
        )]);
        let v = usages(&d, None, LIMITS);
        assert_eq!(v.len(), 4);
        assert_eq!(v[0].as_ref().unwrap().usage, 1);
        assert_eq!(v[1], Err(Rejection::NotUtf8));
        let third = v[2].as_ref().unwrap();
        assert_eq!(
            (third.usage, third.metadata_dropped),
            (3, Some(MetadataProblem::NotUtf8))
        );
        assert!(third.metadata.is_empty());
        let fourth = v[3].as_ref().unwrap();
        assert_eq!(
            (fourth.usage, fourth.metadata_dropped),
            (4, Some(MetadataProblem::NotObject))
        );
    }

    #[test]
    fn earlier_sources_win_per_field() {
        let trailers = HashMap::from([("x-billing-usage".to_string(), "99".to_string())]);
        let headers = HashMap::from([
            ("x-billing-usage".to_string(), "1".to_string()),
            ("x-billing-module".to_string(), "asr".to_string()),
            ("x-billing-model".to_string(), "whisper".to_string()),
        ]);
        let config = UsageConfig::default();
        let names = FieldNames::from_config(&config);
        let d = Declared::merge(&[&trailers, &headers], &names, |h, n, _| h.get(n).cloned());
        assert_eq!(d.usage.as_deref(), Some("99"));
        assert_eq!(d.module.as_deref(), Some("asr"));
    }
}
