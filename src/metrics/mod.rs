//! Prometheus metrics. Every handle the hot paths touch is resolved once here, so a
//! Check increments an atomic and never looks up a label set.
//!
//! No label ever carries a key, a fingerprint or a password: labels are outcomes and
//! reasons from fixed sets, plus module names (backend-chosen, not secret) capped at
//! [`MAX_MODULE_LABELS`] distinct values per process.
//!
//! Every label value from a fixed set is created at start-up with the value 0, so a
//! series exists before its first event: `increase()` and `rate()` then see the first
//! `outbox_full` too, and dashboards show 0 instead of "no data".

pub(crate) mod label;
pub mod process;
pub(crate) use label::label_enum;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;
/// Labels whose value is not from a fixed set (module names).
type OwnedLabels = Vec<(&'static str, String)>;

/// Distinct `module` label values per process; later names are counted as
/// [`OTHER_MODULE`]. Module names come from backends and the Report API, so without a
/// cap a buggy or hostile caller could create a series per request.
pub const MAX_MODULE_LABELS: usize = 64;
/// The `module` label of records whose module arrived after the cap was reached.
pub const OTHER_MODULE: &str = "_other";

use label::{
    Guarded, Ignored, ListRejection, Listener, Lost, MetadataProblem, NotBilled, Published,
    Refusal, Rejection, SkipReason, Skipped, Source,
};

/// Check outcomes, one counter each.
pub struct CheckOutcomes {
    pub allowed: Counter,
    pub missing_key: Counter,
    pub invalid_key: Counter,
    pub blocked_key: Counter,
    /// Invalid keys answered 429 by the brute-force guard.
    pub rate_limited: Counter,
    /// Bytes that are not a CheckRequest, denied with 400.
    pub malformed: Counter,
}

/// Local enforcement (`src/xds`): the key list pushed into Envoy over ECDS. Counts,
/// sizes and durations only: the pushed config holds raw keys.
pub struct XdsMetrics {
    /// Envoy ECDS streams open now.
    pub connected: Gauge,
    /// Versions sent to an Envoy (one per Envoy per version).
    pub pushes: Counter,
    pub acks: Counter,
    /// Versions an Envoy rejected; it keeps enforcing the one it runs.
    pub nacks: Counter,
    /// From sending a version to its ACK: transfer and Envoy applying it.
    pub push_duration: Histogram,
    /// Encoding a version from the key store.
    pub build_duration: Histogram,
    /// Allowed keys in the newest version.
    pub keys: Gauge,
    /// Bytes of the newest version's resource.
    pub version_bytes: Gauge,
    /// Key lists not pushed because they exceed `xds.max_keys`.
    pub refused: Counter,
}

impl XdsMetrics {
    fn register(registry: &mut Registry) -> XdsMetrics {
        let m = XdsMetrics {
            connected: Gauge::default(),
            pushes: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            // 1 ms .. ~16 s: a million keys take seconds.
            push_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
            build_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 18),
            ),
            keys: Gauge::default(),
            version_bytes: Gauge::default(),
            refused: Counter::default(),
        };
        registry.register(
            "xds_envoys_connected",
            "Envoy ECDS streams open (local enforcement)",
            m.connected.clone(),
        );
        registry.register(
            "xds_pushes",
            "api_key_auth versions sent to Envoys (one per Envoy per version)",
            m.pushes.clone(),
        );
        registry.register(
            "xds_acks",
            "api_key_auth versions Envoys accepted",
            m.acks.clone(),
        );
        registry.register(
            "xds_nacks",
            "api_key_auth versions an Envoy rejected (it keeps enforcing the version it runs); the log has Envoy's error and node id",
            m.nacks.clone(),
        );
        registry.register(
            "xds_push_duration_seconds",
            "From sending an api_key_auth version to an Envoy to its ACK",
            m.push_duration.clone(),
        );
        registry.register(
            "xds_build_duration_seconds",
            "Encoding an api_key_auth version from the key store",
            m.build_duration.clone(),
        );
        registry.register(
            "xds_keys",
            "Allowed keys in the newest api_key_auth version",
            m.keys.clone(),
        );
        registry.register(
            "xds_version_bytes",
            "Size of the newest api_key_auth version",
            m.version_bytes.clone(),
        );
        registry.register(
            "xds_versions_refused",
            "Key lists not pushed because they hold more than xds.max_keys allowed keys",
            m.refused.clone(),
        );
        m
    }
}

pub struct Metrics {
    registry: Registry,
    pub xds: XdsMetrics,
    pub checks: CheckOutcomes,
    pub check_duration: Histogram,
    keys: Family<Labels, Gauge>,
    pub key_updates_applied: Counter,
    key_updates_rejected: Family<Labels, Counter>,
    key_updates_ignored: Family<Labels, Counter>,
    pub key_entries_ignored: Counter,
    key_entries_skipped: Family<Labels, Counter>,
    key_last_update: Gauge,
    key_source_last_update: Family<Labels, Gauge>,
    pub key_request_pending: Gauge,
    keys_file_reloads: Family<Labels, Counter>,
    pub snapshot_writes: Counter,
    pub snapshot_write_errors: Counter,
    pub mqtt_connected: Gauge,
    pub mqtt_connections: Counter,
    pub mqtt_connection_errors: Counter,
    pub heartbeats_sent: Counter,
    publish_refused: Family<Labels, Counter>,
    pub ready: Gauge,
    grpc_peers_refused: Family<Labels, Counter>,
    connections_refused: Family<Labels, Counter>,
    pub access_log_streams: Gauge,
    pub access_log_streams_opened: Counter,
    pub access_log_stream_errors: Counter,
    pub access_log_messages_malformed: Counter,
    access_log_entries_skipped: Family<Labels, Counter>,
    pub http_entries: Counter,
    pub tcp_entries: Counter,
    entries_not_billed: Family<Labels, Counter>,
    pub records_received: Counter,
    pub records_accepted: Counter,
    records_rejected: Family<Labels, Counter>,
    metadata_dropped: Family<Labels, Counter>,
    module_records: Family<OwnedLabels, Counter>,
    module_units: Family<OwnedLabels, Counter>,
    /// Module names that have their own label value (at most [`MAX_MODULE_LABELS`]).
    modules_seen: std::sync::RwLock<std::collections::HashSet<String>>,
    pub records_published: Counter,
    pub publish_latency: Histogram,
    pub outbox_pending_records: Gauge,
    pub outbox_inflight_records: Gauge,
    pub outbox_pending_bytes: Gauge,
    pub outbox_disk_bytes: Gauge,
    pub outbox_budget_bytes: Gauge,
    pub outbox_oldest_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub outbox_replayed: Counter,
    outbox_corrupt_bytes: Counter,
    outbox_fsync_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("keymeter");
        let checks_family = Family::<Labels, Counter>::default();
        registry.register(
            "check_requests",
            "ext_authz Check decisions by outcome",
            checks_family.clone(),
        );
        let outcome = |o: &'static str| checks_family.get_or_create(&vec![("outcome", o)]).clone();
        let checks = CheckOutcomes {
            allowed: outcome("allowed"),
            missing_key: outcome("missing_key"),
            invalid_key: outcome("invalid_key"),
            blocked_key: outcome("blocked_key"),
            rate_limited: outcome("rate_limited"),
            malformed: outcome("malformed"),
        };
        // 10 µs .. ~160 ms: a Check should sit in the first buckets.
        let check_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.00001, 2.0, 15),
        );
        registry.register(
            "check_duration_seconds",
            "Time keymeter spent deciding a Check, excluding the network",
            check_duration.clone(),
        );
        let keys = Family::<Labels, Gauge>::default();
        registry.register("keys", "Keys in the key store by status", keys.clone());
        let key_updates_applied = Counter::default();
        registry.register(
            "key_updates_applied",
            "Key list changes applied (billing updates, snapshot loads, file reloads)",
            key_updates_applied.clone(),
        );
        let key_updates_rejected = Family::<Labels, Counter>::default();
        registry.register(
            "key_updates_rejected",
            "Key list messages or files rejected whole, by reason",
            key_updates_rejected.clone(),
        );
        let key_updates_ignored = Family::<Labels, Counter>::default();
        registry.register(
            "key_updates_ignored",
            "billing/keys/update messages not applied although well-formed, by reason (retained: a retained message the broker delivered on subscribing)",
            key_updates_ignored.clone(),
        );
        let key_entries_ignored = Counter::default();
        registry.register(
            "key_entries_ignored",
            "Key entries ignored because their status is neither ok nor blocked: they change nothing, as in the SDK",
            key_entries_ignored.clone(),
        );
        let key_entries_skipped = Family::<Labels, Counter>::default();
        registry.register(
            "key_entries_skipped",
            "Entries of billing key updates that keymeter could not use, by reason; the other entries of their message applied",
            key_entries_skipped.clone(),
        );
        let key_last_update = Gauge::default();
        registry.register(
            "key_last_update_timestamp_seconds",
            "Unix time of the last key list change applied from any source",
            key_last_update.clone(),
        );
        let key_source_last_update = Family::<Labels, Gauge>::default();
        registry.register(
            "key_source_last_update_timestamp_seconds",
            "Unix time of the last key list change applied from each source (billing, snapshot, file)",
            key_source_last_update.clone(),
        );
        let key_request_pending = Gauge::default();
        registry.register(
            "key_list_request_pending",
            "1 while keymeter has asked the billing system for the key list and no key update has arrived since",
            key_request_pending.clone(),
        );
        let keys_file_reloads = Family::<Labels, Counter>::default();
        registry.register(
            "keys_file_reloads",
            "Reloads of the local keys file by result",
            keys_file_reloads.clone(),
        );
        let snapshot_writes = Counter::default();
        registry.register(
            "snapshot_writes",
            "Key snapshots written to disk",
            snapshot_writes.clone(),
        );
        let snapshot_write_errors = Counter::default();
        registry.register(
            "snapshot_write_errors",
            "Key snapshots that could not be written",
            snapshot_write_errors.clone(),
        );
        let mqtt_connected = Gauge::default();
        registry.register(
            "mqtt_connected",
            "1 while connected to the billing broker",
            mqtt_connected.clone(),
        );
        let mqtt_connections = Counter::default();
        registry.register(
            "mqtt_connections",
            "Successful connections to the billing broker (reconnects included)",
            mqtt_connections.clone(),
        );
        let mqtt_connection_errors = Counter::default();
        registry.register(
            "mqtt_connection_errors",
            "Failed or lost connections to the billing broker",
            mqtt_connection_errors.clone(),
        );
        let heartbeats_sent = Counter::default();
        registry.register(
            "heartbeats_sent",
            "Heartbeats published to the billing system",
            heartbeats_sent.clone(),
        );
        let publish_refused = Family::<Labels, Counter>::default();
        registry.register(
            "publish_refused",
            "Publishes the broker refused (MQTT 5 PUBACK reason code 0x80 or above), by message (report, keys_request) and reason; refused records stay in the outbox and are sent again",
            publish_refused.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 once a key list is loaded and Checks can be answered",
            ready.clone(),
        );
        let access_log_streams = Gauge::default();
        registry.register(
            "access_log_streams",
            "Envoy access-log streams connected now",
            access_log_streams.clone(),
        );
        let build_info = Family::<OwnedLabels, Gauge>::default();
        registry.register(
            "build_info",
            "Always 1; the labels say which keymeter runs (version, commit)",
            build_info.clone(),
        );
        build_info
            .get_or_create(&vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("commit", env!("KEYMETER_COMMIT").to_string()),
            ])
            .set(1);
        let grpc_peers_refused = Family::<Labels, Counter>::default();
        registry.register(
            "grpc_peers_refused",
            "gRPC calls refused because the client certificate is not allowed for the service (listen.grpc_tls.allow), by service",
            grpc_peers_refused.clone(),
        );
        let connections_refused = Family::<Labels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections reset at once because the listener had its listen.<listener>_max_connections open, by listener",
            connections_refused.clone(),
        );
        let access_log_streams_opened = Counter::default();
        registry.register(
            "access_log_streams_opened",
            "Envoy access-log streams opened (each Envoy worker keeps one; a rising rate means streams are being restarted)",
            access_log_streams_opened.clone(),
        );
        let access_log_stream_errors = Counter::default();
        registry.register(
            "access_log_stream_errors",
            "Access-log streams ended by a transport fault (reset, broken gRPC frame, message over listen.max_message_bytes); never by content",
            access_log_stream_errors.clone(),
        );
        let access_log_messages_malformed = Counter::default();
        registry.register(
            "access_log_messages_malformed",
            "Access-log messages whose protobuf encoding breaks part-way: the entries before the break are used, the stream stays open",
            access_log_messages_malformed.clone(),
        );
        let access_log_entries_skipped = Family::<Labels, Counter>::default();
        registry.register(
            "access_log_entries_skipped",
            "HTTP access-log entries skipped before they could be judged, by reason (malformed)",
            access_log_entries_skipped.clone(),
        );
        let access_log_entries = Family::<Labels, Counter>::default();
        registry.register(
            "access_log_entries",
            "Access-log entries received from Envoy by kind (http, tcp)",
            access_log_entries.clone(),
        );
        let http_entries = access_log_entries
            .get_or_create(&vec![("kind", "http")])
            .clone();
        let tcp_entries = access_log_entries
            .get_or_create(&vec![("kind", "tcp")])
            .clone();
        let entries_not_billed = Family::<Labels, Counter>::default();
        registry.register(
            "usage_entries_not_billed",
            "HTTP access-log entries that produce no record, by reason (denied, no_key, unknown_key, no_usage)",
            entries_not_billed.clone(),
        );
        let records_received = Counter::default();
        registry.register(
            "usage_records_received",
            "Usage records declared by backends or the Report API (accepted + rejected)",
            records_received.clone(),
        );
        let records_accepted = Counter::default();
        registry.register(
            "usage_records_accepted",
            "Usage records written to the outbox",
            records_accepted.clone(),
        );
        let records_rejected = Family::<Labels, Counter>::default();
        registry.register(
            "usage_records_rejected",
            "Usage records rejected, by reason",
            records_rejected.clone(),
        );
        let metadata_dropped = Family::<Labels, Counter>::default();
        registry.register(
            "usage_metadata_dropped",
            "Usage records billed without the metadata their backend sent, because it was not UTF-8, not JSON, not an object or too large",
            metadata_dropped.clone(),
        );
        let module_records = Family::<OwnedLabels, Counter>::default();
        registry.register(
            "usage_module_records",
            "Usage records written to the outbox, by module (at most 64 module names, then _other)",
            module_records.clone(),
        );
        let module_units = Family::<OwnedLabels, Counter>::default();
        registry.register(
            "usage_module_units",
            "Usage units of the records written to the outbox, by module (as module_records)",
            module_units.clone(),
        );
        let records_published = Counter::default();
        registry.register(
            "usage_records_published",
            "Usage records acknowledged by the broker (PUBACK) and removed from the outbox",
            records_published.clone(),
        );
        // 1 ms .. ~16 s.
        let publish_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
        );
        registry.register(
            "publish_latency_seconds",
            "Time from publishing a record to the broker's PUBACK",
            publish_latency.clone(),
        );
        let outbox_pending_records = Gauge::default();
        registry.register(
            "outbox_pending_records",
            "Records in the outbox not yet acknowledged by the broker",
            outbox_pending_records.clone(),
        );
        let outbox_inflight_records = Gauge::default();
        registry.register(
            "outbox_inflight_records",
            "Records published and waiting for the broker's PUBACK",
            outbox_inflight_records.clone(),
        );
        let outbox_pending_bytes = Gauge::default();
        registry.register(
            "outbox_pending_bytes",
            "Payload bytes of pending records",
            outbox_pending_bytes.clone(),
        );
        let outbox_disk_bytes = Gauge::default();
        registry.register(
            "outbox_disk_bytes",
            "Bytes of outbox segment files on disk",
            outbox_disk_bytes.clone(),
        );
        let outbox_budget_bytes = Gauge::default();
        registry.register(
            "outbox_budget_bytes",
            "The outbox disk budget (outbox.max_bytes)",
            outbox_budget_bytes.clone(),
        );
        let outbox_oldest_age_seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "outbox_oldest_unpublished_age_seconds",
            "Age of the oldest record not yet acknowledged by the broker (0 when none)",
            outbox_oldest_age_seconds.clone(),
        );
        let outbox_replayed = Counter::default();
        registry.register(
            "outbox_replayed_records",
            "Unacknowledged records found in the outbox at start-up and sent again",
            outbox_replayed.clone(),
        );
        let outbox_corrupt_bytes = Counter::default();
        registry.register(
            "outbox_corrupt_bytes",
            "Bytes of outbox segment files found torn or corrupt and skipped or truncated (on open and on read-back); each damage is also logged",
            outbox_corrupt_bytes.clone(),
        );
        let outbox_fsync_errors = Counter::default();
        registry.register(
            "outbox_fsync_errors",
            "Outbox fsyncs that failed; the files are retried, and Report API calls that needed them were refused",
            outbox_fsync_errors.clone(),
        );
        let xds = XdsMetrics::register(&mut registry);
        let metrics = Metrics {
            registry,
            xds,
            checks,
            check_duration,
            keys,
            key_updates_applied,
            key_updates_rejected,
            key_updates_ignored,
            key_entries_ignored,
            key_entries_skipped,
            key_last_update,
            key_source_last_update,
            key_request_pending,
            keys_file_reloads,
            snapshot_writes,
            snapshot_write_errors,
            mqtt_connected,
            mqtt_connections,
            mqtt_connection_errors,
            heartbeats_sent,
            publish_refused,
            ready,
            grpc_peers_refused,
            connections_refused,
            access_log_streams,
            access_log_streams_opened,
            access_log_stream_errors,
            access_log_messages_malformed,
            access_log_entries_skipped,
            http_entries,
            tcp_entries,
            entries_not_billed,
            records_received,
            records_accepted,
            records_rejected,
            metadata_dropped,
            module_records,
            module_units,
            modules_seen: Default::default(),
            records_published,
            publish_latency,
            outbox_pending_records,
            outbox_inflight_records,
            outbox_pending_bytes,
            outbox_disk_bytes,
            outbox_budget_bytes,
            outbox_oldest_age_seconds,
            outbox_replayed,
            outbox_corrupt_bytes,
            outbox_fsync_errors,
        };
        metrics.create_known_series();
        metrics
    }

    /// Creates every series whose label values come from a fixed set, at 0.
    fn create_known_series(&self) {
        self.set_key_counts(0, 0);
        for reason in ListRejection::ALL {
            let _ = self
                .key_updates_rejected
                .get_or_create(&vec![("reason", reason.as_str())]);
        }
        for reason in Ignored::ALL {
            let _ = self
                .key_updates_ignored
                .get_or_create(&vec![("reason", reason.as_str())]);
        }
        for reason in SkipReason::ALL {
            let _ = self
                .key_entries_skipped
                .get_or_create(&vec![("reason", reason.as_str())]);
        }
        for message in Published::ALL {
            for reason in Refusal::ALL {
                let _ = self.publish_refused.get_or_create(&vec![
                    ("message", message.as_str()),
                    ("reason", reason.as_str()),
                ]);
            }
        }
        for result in ["ok", "error"] {
            let _ = self
                .keys_file_reloads
                .get_or_create(&vec![("result", result)]);
        }
        for why in NotBilled::ALL {
            let _ = self
                .entries_not_billed
                .get_or_create(&vec![("reason", why.as_str())]);
        }
        for service in Guarded::ALL {
            let _ = self
                .grpc_peers_refused
                .get_or_create(&vec![("service", service.as_str())]);
        }
        for listener in Listener::ALL {
            let _ = self
                .connections_refused
                .get_or_create(&vec![("listener", listener.as_str())]);
        }
        for why in Skipped::ALL {
            let _ = self
                .access_log_entries_skipped
                .get_or_create(&vec![("reason", why.as_str())]);
        }
        for problem in MetadataProblem::ALL {
            let _ = self
                .metadata_dropped
                .get_or_create(&vec![("reason", problem.as_str())]);
        }
        let contract = Rejection::ALL.map(Rejection::as_str);
        for reason in contract.into_iter().chain(Lost::ALL.map(Lost::as_str)) {
            let _ = self
                .records_rejected
                .get_or_create(&vec![("reason", reason)]);
        }
    }

    pub fn set_key_counts(&self, total: usize, blocked: usize) {
        let ok = total.saturating_sub(blocked);
        self.keys
            .get_or_create(&vec![("status", "ok")])
            .set(ok as i64);
        self.keys
            .get_or_create(&vec![("status", "blocked")])
            .set(blocked as i64);
    }

    /// A key list change from `source` was applied now.
    pub fn key_list_applied(&self, source: Source, unix_secs: i64) {
        self.key_last_update.set(unix_secs);
        self.key_source_last_update
            .get_or_create(&vec![("source", source.as_str())])
            .set(unix_secs);
    }

    /// Records written to the outbox: counted per module, up to [`MAX_MODULE_LABELS`]
    /// distinct names, the rest as [`OTHER_MODULE`].
    pub fn records_accepted_for_module(&self, module: &str, records: u64, units: u64) {
        let label = self.module_label(module);
        let labels = vec![("module", label)];
        self.module_records.get_or_create(&labels).inc_by(records);
        self.module_units.get_or_create(&labels).inc_by(units);
    }

    fn module_label(&self, module: &str) -> String {
        let seen = self.modules_seen.read().unwrap_or_else(|e| e.into_inner());
        if seen.contains(module) {
            return module.to_owned();
        }
        drop(seen);
        let mut seen = self.modules_seen.write().unwrap_or_else(|e| e.into_inner());
        if seen.contains(module) || seen.len() < MAX_MODULE_LABELS {
            seen.insert(module.to_owned());
            module.to_owned()
        } else {
            OTHER_MODULE.to_owned()
        }
    }

    pub fn key_update_rejected(&self, reason: ListRejection) {
        self.key_updates_rejected
            .get_or_create(&vec![("reason", reason.as_str())])
            .inc();
    }

    /// A billing key update not applied for `reason`.
    pub fn key_update_ignored(&self, reason: Ignored) {
        self.key_updates_ignored
            .get_or_create(&vec![("reason", reason.as_str())])
            .inc();
    }

    /// `n` entries of one key update skipped for `reason`.
    pub fn key_entries_skipped(&self, reason: SkipReason, n: u64) {
        self.key_entries_skipped
            .get_or_create(&vec![("reason", reason.as_str())])
            .inc_by(n);
    }

    /// The broker refused a publish of `message` for `reason`.
    pub fn publish_refused(&self, message: Published, reason: Refusal) {
        self.publish_refused
            .get_or_create(&vec![
                ("message", message.as_str()),
                ("reason", reason.as_str()),
            ])
            .inc();
    }

    /// The keys file was read and applied (`ok`), or rejected.
    pub fn keys_file_reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.keys_file_reloads
            .get_or_create(&vec![("result", result)])
            .inc();
    }

    /// An HTTP access-log entry that bills nothing.
    pub fn entry_not_billed(&self, reason: NotBilled) {
        self.entries_not_billed
            .get_or_create(&vec![("reason", reason.as_str())])
            .inc();
    }

    /// `n` declared records rejected by the header contract.
    pub fn records_rejected(&self, reason: Rejection, n: u64) {
        self.records_rejected
            .get_or_create(&vec![("reason", reason.as_str())])
            .inc_by(n);
    }

    /// `n` correctly declared records the pipeline could not take: lost.
    pub fn records_lost(&self, reason: Lost, n: u64) {
        self.records_rejected
            .get_or_create(&vec![("reason", reason.as_str())])
            .inc_by(n);
    }

    /// A gRPC call to `service` refused for its client certificate.
    pub fn grpc_peer_refused(&self, service: Guarded) {
        self.grpc_peers_refused
            .get_or_create(&vec![("service", service.as_str())])
            .inc();
    }

    /// The counter of connections `listener` turns away for its connection cap.
    pub fn connections_refused(&self, listener: Listener) -> Counter {
        self.connections_refused
            .get_or_create(&vec![("listener", listener.as_str())])
            .clone()
    }

    /// `n` access-log entries skipped for `why`.
    pub fn access_log_entries_skipped(&self, why: Skipped, n: u64) {
        if n > 0 {
            self.access_log_entries_skipped
                .get_or_create(&vec![("reason", why.as_str())])
                .inc_by(n);
        }
    }

    /// A record billed without its metadata, for `problem`.
    pub fn metadata_dropped(&self, problem: MetadataProblem) {
        self.metadata_dropped
            .get_or_create(&vec![("reason", problem.as_str())])
            .inc();
    }

    /// Mirrors the outbox's own running totals (they only grow) into their counters.
    pub fn set_outbox_totals(&self, corrupt_bytes: u64, fsync_errors: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        // `fetch_max`: two scrapes racing cannot add a difference twice.
        self.outbox_corrupt_bytes
            .inner()
            .fetch_max(corrupt_bytes, Relaxed);
        self.outbox_fsync_errors
            .inner()
            .fetch_max(fsync_errors, Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_units_and_fixed_labels() {
        let m = Metrics::new();
        m.checks.allowed.inc();
        m.key_update_rejected(ListRejection::BadJson);
        m.set_key_counts(3, 1);
        let text = m.render();
        assert!(text.contains("keymeter_check_requests_total{outcome=\"allowed\"} 1"));
        assert!(text.contains("keymeter_key_updates_rejected_total{reason=\"bad_json\"} 1"));
        assert!(text.contains("keymeter_keys{status=\"ok\"} 2"));
        assert!(text.contains("keymeter_check_duration_seconds_bucket"));
    }

    #[test]
    fn series_from_fixed_label_sets_exist_at_zero_before_any_event() {
        let text = Metrics::new().render();
        for sample in [
            "keymeter_usage_records_rejected_total{reason=\"outbox_full\"} 0",
            "keymeter_usage_records_rejected_total{reason=\"outbox_error\"} 0",
            "keymeter_usage_records_rejected_total{reason=\"usage_not_a_number\"} 0",
            "keymeter_usage_records_rejected_total{reason=\"not_utf8\"} 0",
            "keymeter_key_updates_rejected_total{reason=\"bad_json\"} 0",
            "keymeter_key_updates_rejected_total{reason=\"file_unreadable\"} 0",
            "keymeter_key_entries_skipped_total{reason=\"no_app_id\"} 0",
            "keymeter_usage_entries_not_billed_total{reason=\"denied\"} 0",
            "keymeter_keys_file_reloads_total{result=\"error\"} 0",
            "keymeter_keys{status=\"blocked\"} 0",
            "keymeter_check_requests_total{outcome=\"blocked_key\"} 0",
            "keymeter_key_list_request_pending 0",
            "keymeter_outbox_corrupt_bytes_total 0",
            "keymeter_outbox_fsync_errors_total 0",
            "keymeter_key_updates_ignored_total{reason=\"retained\"} 0",
            "keymeter_publish_refused_total{message=\"report\",reason=\"not_authorized\"} 0",
            "keymeter_publish_refused_total{message=\"keys_request\",reason=\"quota_exceeded\"} 0",
        ] {
            assert!(text.contains(sample), "missing {sample} in\n{text}");
        }
    }

    #[test]
    fn outbox_totals_only_grow() {
        let m = Metrics::new();
        m.set_outbox_totals(1024, 3);
        m.set_outbox_totals(100, 1);
        let text = m.render();
        assert!(
            text.contains("keymeter_outbox_corrupt_bytes_total 1024"),
            "{text}"
        );
        assert!(
            text.contains("keymeter_outbox_fsync_errors_total 3"),
            "{text}"
        );
    }

    #[test]
    fn key_updates_are_timed_per_source() {
        let m = Metrics::new();
        m.key_list_applied(Source::Snapshot, 1_000);
        m.key_list_applied(Source::Billing, 2_000);
        let text = m.render();
        assert!(text.contains("keymeter_key_last_update_timestamp_seconds 2000"));
        assert!(text.contains(
            "keymeter_key_source_last_update_timestamp_seconds{source=\"snapshot\"} 1000"
        ));
        assert!(text.contains(
            "keymeter_key_source_last_update_timestamp_seconds{source=\"billing\"} 2000"
        ));
    }

    #[test]
    fn module_labels_are_capped() {
        let m = Metrics::new();
        m.records_accepted_for_module("llm", 1, 150);
        m.records_accepted_for_module("llm", 1, 50);
        for i in 0..MAX_MODULE_LABELS + 10 {
            m.records_accepted_for_module(&format!("m{i}"), 1, 1);
        }
        // A name seen before the cap keeps its own series afterwards.
        m.records_accepted_for_module("llm", 1, 1);
        let text = m.render();
        assert!(text.contains("keymeter_usage_module_records_total{module=\"llm\"} 3"));
        assert!(text.contains("keymeter_usage_module_units_total{module=\"llm\"} 201"));
        let series = text
            .lines()
            .filter(|l| l.starts_with("keymeter_usage_module_records_total{"))
            .count();
        assert_eq!(series, MAX_MODULE_LABELS + 1, "{text}");
        // 64 names: llm and m0..m62; m63.. go to _other.
        assert!(text.contains("keymeter_usage_module_records_total{module=\"_other\"} 11"));
        assert!(!text.contains("module=\"m63\""));
    }
}
