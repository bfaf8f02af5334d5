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
}

/// Why a declaration was rejected. `as_str` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    UsageMissing,
    UsageNotANumber,
    UsageNegative,
    UsageOverflow,
    ModuleMissing,
    ModuleInvalid,
    ModelMissing,
    ModelInvalid,
    MetadataInvalidJson,
    MetadataNotObject,
    MetadataTooLarge,
    RecordsInvalid,
    TooManyRecords,
    NotUtf8,
}

impl Rejection {
    pub const ALL: [Rejection; 14] = [
        Rejection::UsageMissing,
        Rejection::UsageNotANumber,
        Rejection::UsageNegative,
        Rejection::UsageOverflow,
        Rejection::ModuleMissing,
        Rejection::ModuleInvalid,
        Rejection::ModelMissing,
        Rejection::ModelInvalid,
        Rejection::MetadataInvalidJson,
        Rejection::MetadataNotObject,
        Rejection::MetadataTooLarge,
        Rejection::RecordsInvalid,
        Rejection::TooManyRecords,
        Rejection::NotUtf8,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::UsageMissing => "usage_missing",
            Rejection::UsageNotANumber => "usage_not_a_number",
            Rejection::UsageNegative => "usage_negative",
            Rejection::UsageOverflow => "usage_overflow",
            Rejection::ModuleMissing => "module_missing",
            Rejection::ModuleInvalid => "module_invalid",
            Rejection::ModelMissing => "model_missing",
            Rejection::ModelInvalid => "model_invalid",
            Rejection::MetadataInvalidJson => "metadata_invalid_json",
            Rejection::MetadataNotObject => "metadata_not_object",
            Rejection::MetadataTooLarge => "metadata_too_large",
            Rejection::RecordsInvalid => "records_invalid",
            Rejection::TooManyRecords => "too_many_records",
            Rejection::NotUtf8 => "not_utf8",
        }
    }
}

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

/// Turns a declaration into validated usages. `default` is the matching route rule,
/// if any: it fills fields the backend left out (backend values always win).
/// `Ok(vec![])` means there is nothing to bill.
pub fn usages(
    declared: &Declared,
    default: Option<&RouteRule>,
    limits: Limits,
) -> Result<Vec<Usage>, Rejection> {
    if let Some(records) = &declared.records {
        return parse_records(records, limits);
    }
    if declared.is_empty() {
        return Ok(match default {
            Some(rule) => vec![Usage {
                module: rule.module.clone(),
                model: rule.model.clone(),
                usage: rule.usage,
                metadata: Map::new(),
            }],
            None => Vec::new(),
        });
    }
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
    let metadata = match &declared.metadata {
        Some(m) => parse_metadata_text(m, limits)?,
        None => Map::new(),
    };
    Ok(vec![Usage {
        module,
        model,
        usage,
        metadata,
    }])
}

/// Envoy replaces bytes that are not UTF-8 in logged header values with this
/// character, so a name containing it was not valid UTF-8 at the backend.
const ENVOY_INVALID_UTF8_MARK: char = '!';

/// A module or model name: non-empty, short, printable, UTF-8 at the source.
pub fn name(value: &str, missing: Rejection, invalid: Rejection) -> Result<String, Rejection> {
    let v = value.trim();
    if v.is_empty() {
        return Err(missing);
    }
    if v.contains(ENVOY_INVALID_UTF8_MARK) || v.contains(char::REPLACEMENT_CHARACTER) {
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

/// A metadata object from its JSON text.
pub fn parse_metadata_text(text: &str, limits: Limits) -> Result<Map<String, Value>, Rejection> {
    if text.len() > limits.max_metadata_bytes {
        return Err(Rejection::MetadataTooLarge);
    }
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(Map::new());
    }
    match serde_json::from_str::<Value>(trimmed) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Rejection::MetadataNotObject),
        Err(_) => Err(Rejection::MetadataInvalidJson),
    }
}

fn parse_metadata_json(value: &Value, limits: Limits) -> Result<Map<String, Value>, Rejection> {
    match value {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => {
            let size = serde_json::to_string(m)
                .map(|s| s.len())
                .unwrap_or(usize::MAX);
            if size > limits.max_metadata_bytes {
                Err(Rejection::MetadataTooLarge)
            } else {
                Ok(m.clone())
            }
        }
        // A JSON string holding an object, as header_to_metadata would pass it along.
        Value::String(s) => parse_metadata_text(s, limits),
        _ => Err(Rejection::MetadataNotObject),
    }
}

/// The `records` array: `[{"module", "model", "usage", "metadata"?}, ...]`.
fn parse_records(text: &str, limits: Limits) -> Result<Vec<Usage>, Rejection> {
    // Bound the work before parsing: each record is small.
    let max_text = limits.max_records * (limits.max_metadata_bytes + 2 * MAX_NAME_BYTES + 128);
    if text.len() > max_text {
        return Err(Rejection::TooManyRecords);
    }
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(text.trim()) else {
        return Err(Rejection::RecordsInvalid);
    };
    if items.len() > limits.max_records {
        return Err(Rejection::TooManyRecords);
    }
    items
        .iter()
        .map(|item| {
            let Value::Object(o) = item else {
                return Err(Rejection::RecordsInvalid);
            };
            let text_field = |k: &str, missing, invalid| match o.get(k) {
                None | Some(Value::Null) => Err(missing),
                Some(Value::String(s)) => name(s, missing, invalid),
                Some(_) => Err(invalid),
            };
            Ok(Usage {
                module: text_field("module", Rejection::ModuleMissing, Rejection::ModuleInvalid)?,
                model: text_field("model", Rejection::ModelMissing, Rejection::ModelInvalid)?,
                usage: parse_usage_json(o.get("usage").unwrap_or(&Value::Null))?,
                metadata: parse_metadata_json(o.get("metadata").unwrap_or(&Value::Null), limits)?,
            })
        })
        .collect()
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
        let u = usages(&d, None, LIMITS).unwrap();
        assert_eq!(u.len(), 1);
        assert_eq!(
            (u[0].module.as_str(), u[0].model.as_str(), u[0].usage),
            ("llm", "gpt-4", 150)
        );
        assert_eq!(u[0].metadata["prompt_tokens"], 100);
        assert_eq!(u[0].metadata["note"], "héllo");
    }

    #[test]
    fn nothing_declared_and_no_rule_bills_nothing() {
        assert_eq!(usages(&declared(&[]), None, LIMITS), Ok(vec![]));
    }

    #[test]
    fn route_default_applies_and_backend_values_win() {
        let u = usages(&declared(&[]), Some(&rule()), LIMITS).unwrap();
        assert_eq!((u[0].module.as_str(), u[0].usage), ("search", 1));
        let u = usages(
            &declared(&[("x-billing-usage", "7")]),
            Some(&rule()),
            LIMITS,
        )
        .unwrap();
        assert_eq!(
            (u[0].module.as_str(), u[0].model.as_str(), u[0].usage),
            ("search", "default", 7)
        );
    }

    #[test]
    fn bad_values_are_rejected_with_their_reason() {
        let base = [("x-billing-module", "llm"), ("x-billing-model", "m")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v: Vec<(&str, &str)> = base.to_vec();
            v.extend_from_slice(extra);
            usages(&declared(&v), None, LIMITS).unwrap_err()
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
            with(&[("x-billing-usage", "1"), ("x-billing-metadata", "[1]")]),
            Rejection::MetadataNotObject
        );
        assert_eq!(
            with(&[("x-billing-usage", "1"), ("x-billing-metadata", "{oops")]),
            Rejection::MetadataInvalidJson
        );
        let big = format!("{{\"k\": \"{}\"}}", "x".repeat(9000));
        let d = declared(&[
            ("x-billing-module", "llm"),
            ("x-billing-model", "m"),
            ("x-billing-usage", "1"),
            ("x-billing-metadata", &big),
        ]);
        assert_eq!(
            usages(&d, None, LIMITS).unwrap_err(),
            Rejection::MetadataTooLarge
        );
        let d = declared(&[
            ("x-billing-module", " "),
            ("x-billing-model", "m"),
            ("x-billing-usage", "1"),
        ]);
        assert_eq!(
            usages(&d, None, LIMITS).unwrap_err(),
            Rejection::ModuleMissing
        );
        let d = declared(&[("x-billing-module", "llm"), ("x-billing-usage", "1")]);
        assert_eq!(
            usages(&d, None, LIMITS).unwrap_err(),
            Rejection::ModelMissing
        );
        let d = declared(&[
            ("x-billing-module", "llm\u{7}"),
            ("x-billing-model", "m"),
            ("x-billing-usage", "1"),
        ]);
        assert_eq!(
            usages(&d, None, LIMITS).unwrap_err(),
            Rejection::ModuleInvalid
        );
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
        let u = usages(&d, None, LIMITS).unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[1].module, "tts");
        assert_eq!(u[1].usage, 12);
        assert!(u[1].metadata.is_empty());
        let bad = |text: &str| usages(&declared(&[("x-billing-records", text)]), None, LIMITS);
        assert_eq!(bad("{}"), Err(Rejection::RecordsInvalid));
        assert_eq!(bad("[1]"), Err(Rejection::RecordsInvalid));
        assert_eq!(
            bad(r#"[{"module": "a", "model": "b", "usage": -1}]"#),
            Err(Rejection::UsageNegative)
        );
        assert_eq!(
            bad(r#"[{"module": "a", "model": "b", "usage": 1.5}]"#),
            Err(Rejection::UsageNotANumber)
        );
        assert_eq!(
            bad(r#"[{"model": "b", "usage": 1}]"#),
            Err(Rejection::ModuleMissing)
        );
        let many = format!(
            "[{}]",
            vec![r#"{"module":"a","model":"b","usage":1}"#; 17].join(",")
        );
        assert_eq!(bad(&many), Err(Rejection::TooManyRecords));
        assert_eq!(bad("[]"), Ok(vec![]));
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
