//! `[usage]`: the header contract for backends, route defaults and the Report API's
//! limits.

use serde::Deserialize;

use super::{ConfigError, check_header_name};

/// The header contract for backends and how usage records are built.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct UsageConfig {
    pub headers: UsageHeaders,
    /// Dynamic-metadata namespace where Envoy's `header_to_metadata` puts usage fields
    /// (keys `module`, `model`, `usage`, `metadata`, `records`).
    pub metadata_namespace: String,
    /// Larger `metadata` objects are dropped (the usage still bills); the Report API
    /// rejects them.
    pub max_metadata_bytes: usize,
    /// At most this many records per response (`records` header).
    pub max_records_per_response: usize,
    /// Name of the extra top-level field carrying the record id in `billing/report`;
    /// empty leaves it out (the payload is then exactly the SDK's).
    pub record_id_field: String,
    /// Defaults for responses whose backend sets no usage headers; first match wins.
    pub routes: Vec<RouteRule>,
    /// The Report API refuses a `timestamp_ms` older than this many seconds.
    pub report_max_age_secs: u64,
    /// How long the Report API remembers an `idempotency_key` (also across restarts):
    /// a retry within it gets the original record ids and records nothing new.
    pub report_idempotency_secs: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            headers: UsageHeaders::default(),
            metadata_namespace: "keymeter".into(),
            max_metadata_bytes: 8 * 1024,
            max_records_per_response: 16,
            record_id_field: "record_id".into(),
            routes: Vec::new(),
            report_max_age_secs: 7 * 24 * 3600,
            report_idempotency_secs: 24 * 3600,
        }
    }
}

/// Response header (and trailer) names of the backend contract.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct UsageHeaders {
    pub module: String,
    pub model: String,
    pub usage: String,
    pub metadata: String,
    /// A JSON array of `{module, model, usage, metadata}` for several records.
    pub records: String,
}

impl Default for UsageHeaders {
    fn default() -> Self {
        UsageHeaders {
            module: "x-billing-module".into(),
            model: "x-billing-model".into(),
            usage: "x-billing-usage".into(),
            metadata: "x-billing-metadata".into(),
            records: "x-billing-records".into(),
        }
    }
}

/// Which response statuses a route default bills.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub enum StatusClass {
    #[serde(rename = "1xx")]
    Informational,
    /// The default, so failures do not bill.
    #[default]
    #[serde(rename = "2xx")]
    Success,
    #[serde(rename = "3xx")]
    Redirection,
    #[serde(rename = "4xx")]
    ClientError,
    #[serde(rename = "5xx")]
    ServerError,
    #[serde(rename = "any")]
    Any,
}

impl StatusClass {
    pub fn matches(self, status: u32) -> bool {
        match self {
            StatusClass::Any => true,
            StatusClass::Informational => (100..200).contains(&status),
            StatusClass::Success => (200..300).contains(&status),
            StatusClass::Redirection => (300..400).contains(&status),
            StatusClass::ClientError => (400..500).contains(&status),
            StatusClass::ServerError => (500..600).contains(&status),
        }
    }
}

/// A route default: requests that match get this usage when the backend sets none.
/// `module`, `model` and `usage` are required.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// Exact `:authority` (host, port stripped); absent matches any.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "RouteRule::any_path")]
    pub path_prefix: String,
    /// e.g. `GET`; absent matches any.
    #[serde(default)]
    pub method: Option<String>,
    /// Response statuses that bill; `2xx` by default, so failures do not.
    #[serde(default)]
    pub status: StatusClass,
    pub module: String,
    pub model: String,
    pub usage: u64,
}

impl RouteRule {
    fn any_path() -> String {
        "/".into()
    }

    /// For tests: a successful `/v1/search` request bills 1 unit of `search`/`default`.
    #[cfg(test)]
    pub(crate) fn search_example() -> RouteRule {
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
}

/// Fields of the billing payload itself: the record id cannot take their names.
const PAYLOAD_FIELDS: [&str; 7] = [
    "app_id",
    "api_key",
    "module",
    "model",
    "usage",
    "timestamp",
    "metadata",
];

/// 366 days: the longest window the Report API can be asked to remember or accept.
const MAX_WINDOW_SECS: u64 = 366 * 24 * 3600;

impl UsageConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.headers;
        for (key, name) in [
            ("usage.headers.module", &h.module),
            ("usage.headers.model", &h.model),
            ("usage.headers.usage", &h.usage),
            ("usage.headers.metadata", &h.metadata),
            ("usage.headers.records", &h.records),
        ] {
            check_header_name(key, name)?;
        }
        if self.metadata_namespace.is_empty() {
            return Err(ConfigError::invalid(
                "usage.metadata_namespace",
                "must not be empty",
            ));
        }
        super::in_range(
            "usage.max_metadata_bytes",
            self.max_metadata_bytes,
            1..=1 << 20,
        )?;
        super::in_range(
            "usage.max_records_per_response",
            self.max_records_per_response,
            1..=1000,
        )?;
        super::in_range(
            "usage.report_idempotency_secs",
            self.report_idempotency_secs,
            60..=MAX_WINDOW_SECS,
        )?;
        super::in_range(
            "usage.report_max_age_secs",
            self.report_max_age_secs,
            60..=MAX_WINDOW_SECS,
        )?;
        if PAYLOAD_FIELDS.contains(&self.record_id_field.as_str()) {
            return Err(ConfigError::invalid(
                "usage.record_id_field",
                "must not be one of the billing payload's own fields",
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = |f: &str| format!("usage.routes[{i}].{f}");
            if !r.path_prefix.starts_with('/') {
                return Err(ConfigError::invalid(
                    &key("path_prefix"),
                    "must start with /",
                ));
            }
            if r.module.trim().is_empty() {
                return Err(ConfigError::invalid(&key("module"), "must not be empty"));
            }
            if r.model.trim().is_empty() {
                return Err(ConfigError::invalid(&key("model"), "must not be empty"));
            }
            if r.usage > i64::MAX as u64 {
                return Err(ConfigError::invalid(&key("usage"), "too large"));
            }
        }
        Ok(())
    }
}
