//! Envoy's access-log stream (`envoy.service.accesslog.v3.AccessLogService`): every
//! HTTP entry that a backend declared usage for becomes a usage record.
//!
//! The stream has no acknowledgements and Envoy drops what it cannot send, so entries
//! are turned into records in memory and written to the outbox right away; nothing
//! slow (MQTT) happens on this path. [`entry_outcome`] is the whole decision for one
//! entry, a plain function over the entry and the key view.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::RequestMethod;
use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogService;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::authz::{METADATA_APP_ID, METADATA_KEY_FINGERPRINT, find_key};
use crate::config::{CheckConfig, UsageConfig};
use crate::keys::sync::now_ms;
use crate::keys::{KeyStore, KeyView};
use crate::outbox::Durability;
use crate::usage::contract::{Declared, Field, FieldNames, Limits, usages};
use crate::usage::record::record_id;
use crate::usage::recorder::Recorder;
use crate::usage::routes::{RequestFacts, matching};
use crate::usage::{Rejection, UsageRecord};

/// Where Envoy's ext_authz filter puts the Check's dynamic metadata.
pub const EXT_AUTHZ_NAMESPACE: &str = "envoy.filters.http.ext_authz";

/// Why an HTTP entry bills nothing. `as_str` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotBilled {
    /// ext_authz denied the request (or failed closed).
    Denied,
    /// No key in the request and no Check metadata.
    NoKey,
    /// The key is not (or no longer) in the key store.
    UnknownKey,
    /// The backend declared no usage and no route default matched.
    NoUsage,
}

impl NotBilled {
    pub const ALL: [NotBilled; 4] = [
        NotBilled::Denied,
        NotBilled::NoKey,
        NotBilled::UnknownKey,
        NotBilled::NoUsage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NotBilled::Denied => "denied",
            NotBilled::NoKey => "no_key",
            NotBilled::UnknownKey => "unknown_key",
            NotBilled::NoUsage => "no_usage",
        }
    }
}

/// What one access-log entry amounts to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Bill(Vec<UsageRecord>),
    NotBilled(NotBilled),
    /// The backend declared usage, but not validly. `app_id` is for the log line.
    Rejected {
        reason: Rejection,
        app_id: String,
    },
}

/// Configuration an entry is judged by.
pub struct Rules<'a> {
    pub check: &'a CheckConfig,
    pub usage: &'a UsageConfig,
}

/// The decision for one HTTP entry: who pays (from the Check's metadata, else the
/// logged key header and the key store), what the backend declared (trailers, then
/// headers, then `header_to_metadata` metadata) or what a route default says.
pub fn entry_outcome(entry: &HttpAccessLogEntry, keys: &KeyView, rules: &Rules<'_>) -> Outcome {
    let common = entry.common_properties.as_ref();
    let request = entry.request.as_ref();
    let response = entry.response.as_ref();
    if response.is_some_and(|r| r.response_code_details.starts_with("ext_authz")) {
        return Outcome::NotBilled(NotBilled::Denied);
    }
    let filter_metadata = common
        .and_then(|c| c.metadata.as_ref())
        .map(|m| &m.filter_metadata);
    let authz = filter_metadata.and_then(|m| m.get(EXT_AUTHZ_NAMESPACE));

    // Who pays.
    let from_check = authz
        .and_then(|s| string_field(s, METADATA_KEY_FINGERPRINT))
        .and_then(|fp| keys.get_by_fingerprint(&fp));
    let payer = match from_check {
        Some(key) => key,
        None => {
            let empty = HashMap::new();
            let headers = request.map_or(&empty, |r| &r.request_headers);
            let Some(api_key) = find_key(rules.check, |name| headers.get(name).map(String::as_str))
            else {
                return Outcome::NotBilled(NotBilled::NoKey);
            };
            match keys.get(api_key) {
                None => return Outcome::NotBilled(NotBilled::UnknownKey),
                // Without a Check on this route, a blocked key is not billed either.
                Some(k) if k.blocked && authz.is_none() => {
                    return Outcome::NotBilled(NotBilled::Denied);
                }
                Some(k) => k,
            }
        }
    };
    // The Check's app id is what the request was allowed as.
    let app_id = authz
        .and_then(|s| string_field(s, METADATA_APP_ID))
        .unwrap_or_else(|| payer.app_id.to_string());

    // What the backend declared.
    let names = FieldNames::from_config(rules.usage);
    let empty = HashMap::new();
    let trailers = response.map_or(&empty, |r| &r.response_trailers);
    let headers = response.map_or(&empty, |r| &r.response_headers);
    let metadata = filter_metadata.and_then(|m| m.get(&rules.usage.metadata_namespace));
    let from_headers = Declared::merge(&[trailers, headers], &names, |h, name, _| {
        h.get(name).cloned()
    });
    let from_metadata = metadata
        .map(|m| Declared::merge(&[m], &names, |s, _, field| metadata_field(s, field)))
        .unwrap_or_default();
    let declared = Declared {
        module: from_headers.module.or(from_metadata.module),
        model: from_headers.model.or(from_metadata.model),
        usage: from_headers.usage.or(from_metadata.usage),
        metadata: from_headers.metadata.or(from_metadata.metadata),
        records: from_headers.records.or(from_metadata.records),
    };

    let status = response
        .and_then(|r| r.response_code)
        .map_or(0, |c| c.value);
    let facts = RequestFacts {
        host: request.map_or("", |r| r.authority.as_str()),
        path: request.map_or("", |r| r.path.as_str()),
        method: request
            .and_then(|r| RequestMethod::try_from(r.request_method).ok())
            .map_or("", |m| m.as_str_name()),
        status,
    };
    let default = matching(&rules.usage.routes, facts);
    let usages = match usages(&declared, default, Limits::from_config(rules.usage)) {
        Ok(u) if u.is_empty() => return Outcome::NotBilled(NotBilled::NoUsage),
        Ok(u) => u,
        Err(reason) => return Outcome::Rejected { reason, app_id },
    };

    let completed_ms = completion_ms(entry);
    let request_id = request.map_or("", |r| r.request_id.as_str());
    let start = common
        .and_then(|c| c.start_time.as_ref())
        .map(|t| format!("{}.{:09}", t.seconds, t.nanos))
        .unwrap_or_default();
    let records = usages
        .into_iter()
        .enumerate()
        .map(|(i, usage)| {
            // Envoy's request id, made unguessable for clients that send their own
            // x-request-id: the same entry always yields the same id.
            let id = record_id(&[
                request_id.as_bytes(),
                start.as_bytes(),
                facts.path.as_bytes(),
                i.to_string().as_bytes(),
            ]);
            UsageRecord::new(&app_id, payer.api_key, usage, completed_ms, id)
        })
        .collect();
    Outcome::Bill(records)
}

/// When the request completed: start time plus the time to the last byte sent
/// downstream (or the latest other duration Envoy logged), in epoch milliseconds.
fn completion_ms(entry: &HttpAccessLogEntry) -> i64 {
    let Some(common) = entry.common_properties.as_ref() else {
        return now_ms();
    };
    let Some(start) = common.start_time.as_ref() else {
        return now_ms();
    };
    let elapsed = [
        &common.time_to_last_downstream_tx_byte,
        &common.time_to_last_upstream_rx_byte,
        &common.time_to_last_rx_byte,
    ]
    .into_iter()
    .find_map(|d| d.as_ref())
    .map_or(0, |d| d.seconds * 1000 + i64::from(d.nanos) / 1_000_000);
    start.seconds * 1000 + i64::from(start.nanos) / 1_000_000 + elapsed
}

fn string_field(s: &Struct, key: &str) -> Option<String> {
    match s.fields.get(key)?.kind.as_ref()? {
        Kind::StringValue(v) => Some(v.clone()),
        _ => None,
    }
}

/// A usage field from dynamic metadata: `header_to_metadata` gives strings by default
/// and numbers or structs when a type is configured.
fn metadata_field(s: &Struct, field: Field) -> Option<String> {
    let value = s.fields.get(field.metadata_key())?;
    match value.kind.as_ref()? {
        Kind::StringValue(v) => Some(v.clone()),
        Kind::NumberValue(n) if n.fract() == 0.0 && n.abs() < 9.0e15 => {
            Some(format!("{}", *n as i64))
        }
        Kind::NumberValue(n) => Some(n.to_string()),
        Kind::BoolValue(b) => Some(b.to_string()),
        Kind::NullValue(_) => None,
        _ => Some(to_json(value).to_string()),
    }
}

fn to_json(v: &Value) -> serde_json::Value {
    match v.kind.as_ref() {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect(),
        ),
        Some(Kind::ListValue(l)) => {
            serde_json::Value::Array(l.values.iter().map(to_json).collect())
        }
    }
}

/// The gRPC service.
pub struct AccessLogServer {
    keys: Arc<KeyStore>,
    recorder: Arc<Recorder>,
    check: CheckConfig,
    usage: UsageConfig,
    shutdown: CancellationToken,
}

impl AccessLogServer {
    pub fn new(
        keys: Arc<KeyStore>,
        recorder: Arc<Recorder>,
        check: CheckConfig,
        usage: UsageConfig,
        shutdown: CancellationToken,
    ) -> Self {
        AccessLogServer {
            keys,
            recorder,
            check,
            usage,
            shutdown,
        }
    }

    /// Turns one batch of entries into records and writes them to the outbox.
    async fn handle_http(&self, entries: &[HttpAccessLogEntry]) {
        let metrics = self.recorder.metrics();
        metrics.http_entries.inc_by(entries.len() as u64);
        let rules = Rules {
            check: &self.check,
            usage: &self.usage,
        };
        let mut records = Vec::new();
        {
            let view = self.keys.view();
            for entry in entries {
                match entry_outcome(entry, &view, &rules) {
                    Outcome::Bill(r) => records.extend(r),
                    Outcome::NotBilled(why) => metrics.entry_not_billed(why.as_str()),
                    Outcome::Rejected { reason, app_id } => {
                        let path = entry.request.as_ref().map_or("", |r| r.path.as_str());
                        self.recorder.reject(reason, "access_log", &app_id, path);
                    }
                }
            }
        }
        // Written (not yet fsynced) is enough here: it survives a keymeter crash, and
        // Envoy would not resend the entry anyway.
        let _ = self.recorder.record(&records, Durability::Written).await;
    }
}

impl AccessLogServer {
    /// At shutdown: takes what Envoy already sent (buffered in the connection) before
    /// the stream is dropped, so those entries still become records.
    async fn drain(&self, stream: &mut Streaming<StreamAccessLogsMessage>, node: &str) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_DRAIN;
        while let Ok(Ok(Some(message))) = tokio::time::timeout_at(deadline, stream.message()).await
        {
            if let Some(LogEntries::HttpLogs(http)) = message.log_entries {
                self.handle_http(&http.log_entry).await;
            }
        }
        tracing::debug!(node = %node, "access-log stream drained for shutdown");
    }
}

/// How long a stream is read after shutdown starts, for entries already in flight.
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_millis(300);

/// Decrements the stream gauge however the stream ends.
struct StreamGauge<'a>(&'a crate::admin::metrics::Metrics);

impl Drop for StreamGauge<'_> {
    fn drop(&mut self) {
        self.0.access_log_streams.dec();
    }
}

#[tonic::async_trait]
impl AccessLogService for AccessLogServer {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let peer = request.remote_addr();
        let mut stream = request.into_inner();
        let metrics = self.recorder.metrics();
        metrics.access_log_streams.inc();
        let _gauge = StreamGauge(metrics);
        let mut node = String::new();
        loop {
            let message = tokio::select! {
                _ = self.shutdown.cancelled() => {
                    self.drain(&mut stream, &node).await;
                    break;
                }
                m = stream.message() => m,
            };
            let message = match message {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(status) => {
                    // A message that does not decode (or is too large) ends the stream
                    // with the decoder's error, so the sender sees it too.
                    tracing::warn!(node = %node, error = %status, "access-log stream failed");
                    return Err(status);
                }
            };
            // The identifier comes with the first message only.
            if let Some(id) = message.identifier {
                node = id.node.map(|n| n.id).unwrap_or_default();
                tracing::info!(node = %node, log_name = %id.log_name, peer = ?peer, "access-log stream connected");
            }
            match message.log_entries {
                Some(LogEntries::HttpLogs(http)) => self.handle_http(&http.log_entry).await,
                Some(LogEntries::TcpLogs(tcp)) => {
                    metrics.tcp_entries.inc_by(tcp.log_entry.len() as u64);
                }
                None => {}
            }
        }
        tracing::info!(node = %node, "access-log stream closed");
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteRule;
    use crate::keys::{KeyEntry, fingerprint};
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::envoy::data::accesslog::v3::{
        AccessLogCommon, HttpRequestProperties, HttpResponseProperties,
    };

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
        entry_outcome(
            &entry(e),
            &store().view(),
            &Rules {
                check: &check,
                usage: &usage,
            },
        )
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
        let Outcome::Bill(r) = o else { panic!("{o:?}") };
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
        assert!(
            matches!(&o, Outcome::Bill(r) if r[0].app_id == "app-1"),
            "{o:?}"
        );
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
        assert!(matches!(&o, Outcome::Bill(r) if r[0].usage == 7), "{o:?}");
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
        let Outcome::Bill(r) = o else { panic!("{o:?}") };
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
        let (Outcome::Bill(a), Outcome::Bill(b)) = (outcome(e(), vec![]), outcome(e(), vec![]))
        else {
            panic!()
        };
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
        assert!(
            matches!(&o, Outcome::Bill(r) if r[0].module == "search"),
            "{o:?}"
        );
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
            Outcome::Rejected {
                reason: Rejection::UsageNegative,
                app_id: "app-1".into()
            }
        );
    }
}
