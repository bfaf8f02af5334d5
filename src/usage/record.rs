//! The usage record, serialized exactly as the billing system consumes it on
//! `billing/report`, plus an optional record id field for de-duplication.

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::Usage;

/// One record for `billing/report`.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRecord {
    pub app_id: String,
    pub api_key: String,
    pub module: String,
    pub model: String,
    pub usage: u64,
    /// Epoch milliseconds of when the billed work completed.
    pub timestamp: i64,
    pub metadata: Map<String, Value>,
    /// Stable across re-publishing, so the consumer can drop duplicates.
    pub record_id: String,
}

impl UsageRecord {
    pub fn new(
        app_id: &str,
        api_key: &str,
        usage: Usage,
        timestamp: i64,
        record_id: String,
    ) -> Self {
        UsageRecord {
            app_id: app_id.to_string(),
            api_key: api_key.to_string(),
            module: usage.module,
            model: usage.model,
            usage: usage.usage,
            timestamp,
            metadata: usage.metadata,
            record_id,
        }
    }

    /// The `billing/report` payload: the SDK's fields in the SDK's order, `metadata`
    /// only when non-empty, then the record id under `id_field` unless it is empty.
    pub fn to_payload(&self, id_field: &str) -> Vec<u8> {
        let payload = Payload {
            record: self,
            id_field,
        };
        // Serializing strings, integers and a JSON map into a Vec cannot fail.
        serde_json::to_vec(&payload).unwrap_or_default()
    }
}

struct Payload<'a> {
    record: &'a UsageRecord,
    id_field: &'a str,
}

impl Serialize for Payload<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.record;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("app_id", &r.app_id)?;
        m.serialize_entry("api_key", &r.api_key)?;
        m.serialize_entry("module", &r.module)?;
        m.serialize_entry("model", &r.model)?;
        m.serialize_entry("usage", &r.usage)?;
        m.serialize_entry("timestamp", &r.timestamp)?;
        if !r.metadata.is_empty() {
            m.serialize_entry("metadata", &r.metadata)?;
        }
        if !self.id_field.is_empty() {
            m.serialize_entry(self.id_field, &r.record_id)?;
        }
        m.end()
    }
}

/// A record id: 32 hex digits of SHA-256 over length-prefixed parts, so the same
/// inputs always give the same id and different splits never collide.
pub fn record_id(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    hex::encode(&h.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(metadata: Map<String, Value>) -> UsageRecord {
        UsageRecord {
            app_id: "app-1".into(),
            api_key: "sk-test-0001".into(),
            module: "llm".into(),
            model: "gpt-4".into(),
            usage: 150,
            timestamp: 1795648616249,
            metadata,
            record_id: "abc".into(),
        }
    }

    #[test]
    fn payload_matches_the_sdk_format() {
        let md: Map<String, Value> = serde_json::from_str(
            r#"{"prompt_tokens": 100, "completion_tokens": 50, "note": "h\u00e9llo"}"#,
        )
        .unwrap();
        let got: Value = serde_json::from_slice(&record(md).to_payload("")).unwrap();
        let want: Value = serde_json::from_str(
            r#"{"app_id": "app-1", "api_key": "sk-test-0001", "module": "llm", "model": "gpt-4", "usage": 150, "timestamp": 1795648616249, "metadata": {"prompt_tokens": 100, "completion_tokens": 50, "note": "h\u00e9llo"}}"#,
        )
        .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn empty_metadata_is_left_out_and_the_id_field_is_configurable() {
        let text = String::from_utf8(record(Map::new()).to_payload("record_id")).unwrap();
        assert_eq!(
            text,
            r#"{"app_id":"app-1","api_key":"sk-test-0001","module":"llm","model":"gpt-4","usage":150,"timestamp":1795648616249,"record_id":"abc"}"#
        );
        let v: Value = serde_json::from_slice(&record(Map::new()).to_payload("dedup_id")).unwrap();
        assert_eq!(v["dedup_id"], "abc");
    }

    #[test]
    fn record_ids_are_stable_and_unambiguous() {
        assert_eq!(record_id(&[b"a", b"b"]), record_id(&[b"a", b"b"]));
        assert_ne!(record_id(&[b"ab", b""]), record_id(&[b"a", b"b"]));
        assert_eq!(record_id(&[b"x"]).len(), 32);
    }
}
