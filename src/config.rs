//! Configuration: one TOML file, environment overrides for secrets and deploy-time
//! values, typed fields, unknown keys rejected, and every error naming its key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Exit code for a bad configuration or command line (sysexits.h `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

/// A configuration error, always naming the offending key (or env var, or file).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub listen: ListenConfig,
    /// The billing system's broker. Required outside dev mode: without it nothing is
    /// metered and no key list arrives.
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub topics: Topics,
    #[serde(default)]
    pub keys: KeysConfig,
    #[serde(default)]
    pub check: CheckConfig,
    #[serde(default)]
    pub usage: UsageConfig,
    #[serde(default)]
    pub outbox: OutboxSettings,
    #[serde(default)]
    pub log: LogConfig,
    /// Local enforcement: the key list pushed into Envoy's `api_key_auth` over ECDS.
    #[serde(default)]
    pub xds: XdsConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// gRPC: ext_authz Check and grpc.health.v1.
    #[serde(default = "default_grpc_addr")]
    pub grpc: SocketAddr,
    /// Admin HTTP: /healthz, /readyz, /metrics.
    #[serde(default = "default_admin_addr")]
    pub admin: SocketAddr,
    /// TLS (and optionally mTLS) on the gRPC listener; plain when absent.
    #[serde(default)]
    pub grpc_tls: Option<GrpcTlsConfig>,
    /// Plaintext gRPC on an address other than loopback: whoever reaches it can bill
    /// any key, so it must be chosen explicitly (and is logged). Loopback (an Envoy or
    /// sidecar in the same pod) needs nothing.
    #[serde(default)]
    pub allow_plaintext: bool,
    /// Larger gRPC messages are refused (RESOURCE_EXHAUSTED) before they are decoded.
    /// Envoy's first access-log message carries its node description (~64 KiB).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Open gRPC connections at most; more are refused (reset at once, logged). Envoy
    /// opens about one per worker thread: 4096 serve some 2000 two-thread sidecars.
    #[serde(default = "default_grpc_max_connections")]
    pub grpc_max_connections: usize,
    /// An HTTP/2 PING goes to a gRPC connection quiet for this long...
    #[serde(default = "default_grpc_keepalive_interval_secs")]
    pub grpc_keepalive_interval_secs: u64,
    /// ...and it is closed if the PING is not answered within this time: a dead
    /// Envoy's connection is noticed within the sum.
    #[serde(default = "default_grpc_keepalive_timeout_secs")]
    pub grpc_keepalive_timeout_secs: u64,
    /// Open admin connections at most. Past it, a new connection displaces the oldest
    /// one still waiting for its request (a slowloris), or is refused.
    #[serde(default = "default_admin_max_connections")]
    pub admin_max_connections: usize,
    /// An admin connection that has not sent a whole request head within this time
    /// (from its start, or from the end of the previous response) is closed.
    #[serde(default = "default_admin_header_read_timeout_ms")]
    pub admin_header_read_timeout_ms: u64,
}

fn default_max_message_bytes() -> usize {
    4 << 20
}
fn default_grpc_max_connections() -> usize {
    4096
}
fn default_grpc_keepalive_interval_secs() -> u64 {
    30
}
fn default_grpc_keepalive_timeout_secs() -> u64 {
    10
}
/// Probes, scrapes and port-forwards need a handful at a time.
fn default_admin_max_connections() -> usize {
    64
}
/// A probe or scrape sends its request head in one packet.
fn default_admin_header_read_timeout_ms() -> u64 {
    5000
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            grpc: default_grpc_addr(),
            admin: default_admin_addr(),
            grpc_tls: None,
            allow_plaintext: false,
            max_message_bytes: default_max_message_bytes(),
            grpc_max_connections: default_grpc_max_connections(),
            grpc_keepalive_interval_secs: default_grpc_keepalive_interval_secs(),
            grpc_keepalive_timeout_secs: default_grpc_keepalive_timeout_secs(),
            admin_max_connections: default_admin_max_connections(),
            admin_header_read_timeout_ms: default_admin_header_read_timeout_ms(),
        }
    }
}

/// TLS on keymeter's own gRPC listener (Envoy is the client).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcTlsConfig {
    /// PEM certificate chain presented to Envoy.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate signed by it (mTLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Which client certificates may call which service (needs `client_ca_file`).
    #[serde(default)]
    pub allow: PeerAllowList,
}

/// Client identities allowed per service, each matched against the certificate's URI
/// subject alternative names (SPIFFE IDs such as
/// `spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway`) and DNS ones. An
/// empty list allows every certificate the client CA signed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAllowList {
    /// Envoy: ext_authz Check and the access-log stream (they move money).
    #[serde(default)]
    pub envoy: Vec<String>,
    /// Jobs: the Report API.
    #[serde(default)]
    pub report: Vec<String>,
}

impl PeerAllowList {
    pub fn is_empty(&self) -> bool {
        self.envoy.is_empty() && self.report.is_empty()
    }
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Loopback: an Envoy (or sidecar) in the same pod reaches it; anything wider is an
/// explicit choice (mTLS, or `listen.allow_plaintext`).
fn default_grpc_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9191))
}

fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 9192))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub host: String,
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    #[serde(default)]
    pub username: String,
    /// Prefer `KEYMETER_MQTT_PASSWORD`; never printed.
    #[serde(default, skip_serializing)]
    pub password: Secret,
    /// Empty means `keymeter-<hostname>`: unique per replica, stable across restarts.
    #[serde(default)]
    pub client_id: String,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// Reconnect backoff doubles from 100 ms up to this cap.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_secs: u64,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_secs: u64,
    /// Ask for the key list again when no `keys_update` answered the last request
    /// within this time (the billing system may have been down when we connected).
    #[serde(default = "default_keys_request_retry")]
    pub keys_request_retry_secs: u64,
    /// `"3.1.1"`, what the billing SDK speaks, or `"5"`, whose PUBACK says whether the
    /// broker accepted a publish: a record the broker refuses (e.g. its ACL denies
    /// `billing/report`) then stays in the outbox instead of being deleted unread.
    #[serde(default)]
    pub protocol: MqttProtocol,
    #[serde(default)]
    pub tls: TlsConfig,
}

/// The MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MqttProtocol {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

fn default_mqtt_port() -> u16 {
    8883
}
fn default_keep_alive() -> u64 {
    30
}
fn default_reconnect_max() -> u64 {
    30
}
fn default_heartbeat() -> u64 {
    10
}
fn default_keys_request_retry() -> u64 {
    30
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// TLS to the broker; on by default like the billing SDK.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// PEM CA bundle; empty means the system's trust roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// Accept any broker certificate. Dangerous; logged as a warning at start-up.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: true,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            insecure_skip_verify: false,
        }
    }
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    #[serde(default = "default_report_topic")]
    pub report: String,
    #[serde(default = "default_keys_request_topic")]
    pub keys_request: String,
    #[serde(default = "default_keys_update_topic")]
    pub keys_update: String,
    #[serde(default = "default_heartbeat_topic")]
    pub heartbeat: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            report: default_report_topic(),
            keys_request: default_keys_request_topic(),
            keys_update: default_keys_update_topic(),
            heartbeat: default_heartbeat_topic(),
        }
    }
}

fn default_report_topic() -> String {
    "billing/report".into()
}
fn default_keys_request_topic() -> String {
    "billing/keys/request".into()
}
fn default_keys_update_topic() -> String {
    "billing/keys/update".into()
}
fn default_heartbeat_topic() -> String {
    "billing/heartbeat".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysConfig {
    /// Local keys file (`{"keys": [...]}`), reloaded on change and on SIGHUP.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// How often the keys file is checked for changes.
    #[serde(default = "default_file_poll_ms")]
    pub file_poll_interval_ms: u64,
    /// Where the last key list from the billing system is kept for fail-static restarts.
    #[serde(default)]
    pub snapshot: Option<PathBuf>,
    /// Larger `billing/keys/update` payloads are rejected whole.
    #[serde(default = "default_max_update_bytes")]
    pub max_update_bytes: usize,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            file: None,
            file_poll_interval_ms: default_file_poll_ms(),
            snapshot: None,
            max_update_bytes: default_max_update_bytes(),
        }
    }
}

fn default_file_poll_ms() -> u64 {
    1000
}
fn default_max_update_bytes() -> usize {
    64 * 1024 * 1024
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    /// Request headers searched for the key, in order; the first present wins.
    #[serde(default = "default_key_headers")]
    pub key_headers: Vec<String>,
    /// Also accept `authorization: Bearer <key>` (after `key_headers`).
    #[serde(default)]
    pub accept_bearer: bool,
    /// Header set on allowed requests with the key's app id (overwrites a client's own).
    #[serde(default = "default_app_id_header")]
    pub app_id_header: String,
    /// Remove the key headers before the request reaches the backend.
    #[serde(default)]
    pub strip_key_header: bool,
    /// Realm in `www-authenticate` on 401 answers.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Brute-force guard per client address; off when absent.
    #[serde(default)]
    pub invalid_key_limit: Option<InvalidKeyLimit>,
}

/// Too many invalid keys from one address within `window_secs` and it gets 429 with
/// `retry-after` until the window ends; valid keys from it are never affected.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvalidKeyLimit {
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_window_secs")]
    pub window_secs: u64,
    /// Addresses tracked at once, bounding memory; beyond it new ones are not limited.
    #[serde(default = "default_max_clients")]
    pub max_clients: usize,
    /// Request header holding the client's address, when the Check's peer address is
    /// a proxy's. Envoy configured as an edge (`use_remote_address`, as
    /// `deploy/envoy/envoy.yaml`) sets `x-envoy-external-address` to the address that
    /// `xff_num_trusted_hops` leaves trusted and drops a client's own value; empty
    /// means the Check's source address. Only for an Envoy that overwrites it: an
    /// address a client can write is one it can change to escape the guard.
    #[serde(default = "default_client_address_header")]
    pub client_address_header: String,
}

fn default_client_address_header() -> String {
    "x-envoy-external-address".into()
}

impl Default for InvalidKeyLimit {
    fn default() -> Self {
        InvalidKeyLimit {
            max_attempts: default_max_attempts(),
            window_secs: default_window_secs(),
            max_clients: default_max_clients(),
            client_address_header: default_client_address_header(),
        }
    }
}

fn default_max_attempts() -> u32 {
    20
}
fn default_window_secs() -> u64 {
    60
}
fn default_max_clients() -> usize {
    100_000
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            key_headers: default_key_headers(),
            accept_bearer: false,
            app_id_header: default_app_id_header(),
            strip_key_header: false,
            realm: default_realm(),
            invalid_key_limit: None,
        }
    }
}

fn default_key_headers() -> Vec<String> {
    vec!["api-key".into(), "apikey".into()]
}
fn default_app_id_header() -> String {
    "x-billing-app-id".into()
}
fn default_realm() -> String {
    "keymeter".into()
}

/// The header contract for backends and how usage records are built.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    #[serde(default)]
    pub headers: UsageHeaders,
    /// Dynamic-metadata namespace where Envoy's `header_to_metadata` puts usage fields
    /// (keys `module`, `model`, `usage`, `metadata`, `records`).
    #[serde(default = "default_metadata_namespace")]
    pub metadata_namespace: String,
    /// Larger `metadata` objects are dropped (the usage still bills); the Report API
    /// rejects them.
    #[serde(default = "default_max_metadata_bytes")]
    pub max_metadata_bytes: usize,
    /// At most this many records per response (`records` header).
    #[serde(default = "default_max_records")]
    pub max_records_per_response: usize,
    /// Name of the extra top-level field carrying the record id in `billing/report`;
    /// empty leaves it out (the payload is then exactly the SDK's).
    #[serde(default = "default_record_id_field")]
    pub record_id_field: String,
    /// Defaults for responses whose backend sets no usage headers; first match wins.
    #[serde(default)]
    pub routes: Vec<RouteRule>,
    /// The Report API refuses a `timestamp_ms` older than this many seconds.
    #[serde(default = "default_report_max_age_secs")]
    pub report_max_age_secs: u64,
    /// How long the Report API remembers an `idempotency_key` (also across restarts):
    /// a retry within it gets the original record ids and records nothing new.
    #[serde(default = "default_report_idempotency_secs")]
    pub report_idempotency_secs: u64,
}

fn default_report_idempotency_secs() -> u64 {
    24 * 3600
}

fn default_report_max_age_secs() -> u64 {
    7 * 24 * 3600
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            headers: UsageHeaders::default(),
            metadata_namespace: default_metadata_namespace(),
            max_metadata_bytes: default_max_metadata_bytes(),
            max_records_per_response: default_max_records(),
            record_id_field: default_record_id_field(),
            routes: Vec::new(),
            report_max_age_secs: default_report_max_age_secs(),
            report_idempotency_secs: default_report_idempotency_secs(),
        }
    }
}

fn default_metadata_namespace() -> String {
    "keymeter".into()
}
fn default_max_metadata_bytes() -> usize {
    8 * 1024
}
fn default_max_records() -> usize {
    16
}
fn default_record_id_field() -> String {
    "record_id".into()
}

/// Response header (and trailer) names of the backend contract.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageHeaders {
    #[serde(default = "default_module_header")]
    pub module: String,
    #[serde(default = "default_model_header")]
    pub model: String,
    #[serde(default = "default_usage_header")]
    pub usage: String,
    #[serde(default = "default_metadata_header")]
    pub metadata: String,
    /// A JSON array of `{module, model, usage, metadata}` for several records.
    #[serde(default = "default_records_header")]
    pub records: String,
}

impl Default for UsageHeaders {
    fn default() -> Self {
        UsageHeaders {
            module: default_module_header(),
            model: default_model_header(),
            usage: default_usage_header(),
            metadata: default_metadata_header(),
            records: default_records_header(),
        }
    }
}

fn default_module_header() -> String {
    "x-billing-module".into()
}
fn default_model_header() -> String {
    "x-billing-model".into()
}
fn default_usage_header() -> String {
    "x-billing-usage".into()
}
fn default_metadata_header() -> String {
    "x-billing-metadata".into()
}
fn default_records_header() -> String {
    "x-billing-records".into()
}

/// Which response statuses a route default bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StatusClass {
    #[serde(rename = "1xx")]
    Informational,
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
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// Exact `:authority` (host, port stripped); absent matches any.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// e.g. `GET`; absent matches any.
    #[serde(default)]
    pub method: Option<String>,
    /// Response statuses that bill; `2xx` by default, so failures do not.
    #[serde(default = "default_status_class")]
    pub status: StatusClass,
    pub module: String,
    pub model: String,
    pub usage: u64,
}

#[cfg(test)]
impl RouteRule {
    /// For tests: a successful `/v1/search` request bills 1 unit of `search`/`default`.
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

fn default_path_prefix() -> String {
    "/".into()
}
fn default_status_class() -> StatusClass {
    StatusClass::Success
}

/// Fsync policy of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// fsync every group-committed batch: nothing written is lost to a power cut.
    Batch,
    /// fsync every `fsync_interval_ms`: a power cut may lose that much; a crash of
    /// keymeter alone loses nothing (the data is in the kernel).
    Interval,
}

/// The durable outbox between the access log and the broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxSettings {
    #[serde(default = "default_outbox_dir")]
    pub dir: PathBuf,
    /// Disk budget for unpublished records; when full, new records are rejected
    /// (counted and logged) while Checks keep working.
    #[serde(default = "default_outbox_max_bytes")]
    pub max_bytes: u64,
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    #[serde(default = "default_fsync_mode")]
    pub fsync: FsyncMode,
    #[serde(default = "default_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
    /// Records published but not yet acknowledged by the broker, at most.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        OutboxSettings {
            dir: default_outbox_dir(),
            max_bytes: default_outbox_max_bytes(),
            segment_bytes: default_segment_bytes(),
            fsync: default_fsync_mode(),
            fsync_interval_ms: default_fsync_interval_ms(),
            max_inflight: default_max_inflight(),
        }
    }
}

fn default_outbox_dir() -> PathBuf {
    PathBuf::from("/var/lib/keymeter/outbox")
}
fn default_outbox_max_bytes() -> u64 {
    1 << 30
}
fn default_segment_bytes() -> u64 {
    16 << 20
}
fn default_fsync_mode() -> FsyncMode {
    FsyncMode::Interval
}
fn default_fsync_interval_ms() -> u64 {
    50
}
fn default_max_inflight() -> u16 {
    100
}

/// Local enforcement (`deploy/envoy/envoy-local.yaml`): keymeter serves Envoy's
/// Extension Config Discovery Service with an `api_key_auth` filter config holding
/// every allowed key, and Envoy checks keys itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XdsConfig {
    /// Serve ECDS on the gRPC listener (the ext_authz Check is served either way).
    #[serde(default)]
    pub enabled: bool,
    /// The resource name, as in the Envoy filter's `config_discovery`.
    #[serde(default = "default_xds_resource_name")]
    pub resource_name: String,
    /// At most one new version per this many milliseconds: changes in between are
    /// coalesced into the next version.
    #[serde(default = "default_xds_push_interval_ms")]
    pub push_interval_ms: u64,
    /// A key list with more allowed keys than this is not pushed (an error is logged
    /// and counted); Envoy keeps enforcing the last version.
    #[serde(default = "default_xds_max_keys")]
    pub max_keys: usize,
}

impl Default for XdsConfig {
    fn default() -> Self {
        XdsConfig {
            enabled: false,
            resource_name: default_xds_resource_name(),
            push_interval_ms: default_xds_push_interval_ms(),
            max_keys: default_xds_max_keys(),
        }
    }
}

fn default_xds_resource_name() -> String {
    "keymeter.api_key_auth".into()
}
fn default_xds_push_interval_ms() -> u64 {
    100
}
/// Measured with Envoy 1.40 (bench/README.md, "Local mode at scale").
pub const XDS_MAX_KEYS_LIMIT: usize = 1_000_000;
fn default_xds_max_keys() -> usize {
    XDS_MAX_KEYS_LIMIT
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_log_format")]
    pub format: LogFormat,
    /// A tracing filter (`info`, `keymeter=debug,info`); `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: default_log_format(),
            level: default_log_level(),
        }
    }
}

fn default_log_format() -> LogFormat {
    LogFormat::Text
}
fn default_log_level() -> String {
    "info".into()
}

/// A secret string: deserializes like a `String`, prints as `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<empty>"
        } else {
            "<redacted>"
        })
    }
}

/// What an environment override holds, so `KEYMETER_MQTT_PORT=abc` is an error naming
/// the variable instead of a type error deep in serde.
#[derive(Clone, Copy)]
enum EnvKind {
    Str,
    Int,
    Bool,
}

/// Environment overrides: secrets and values that differ per deployment.
const ENV_OVERRIDES: &[(&str, &[&str], EnvKind)] = &[
    ("KEYMETER_MQTT_HOST", &["mqtt", "host"], EnvKind::Str),
    ("KEYMETER_MQTT_PORT", &["mqtt", "port"], EnvKind::Int),
    (
        "KEYMETER_MQTT_USERNAME",
        &["mqtt", "username"],
        EnvKind::Str,
    ),
    (
        "KEYMETER_MQTT_PASSWORD",
        &["mqtt", "password"],
        EnvKind::Str,
    ),
    (
        "KEYMETER_MQTT_CLIENT_ID",
        &["mqtt", "client_id"],
        EnvKind::Str,
    ),
    (
        "KEYMETER_MQTT_TLS_ENABLED",
        &["mqtt", "tls", "enabled"],
        EnvKind::Bool,
    ),
    (
        "KEYMETER_MQTT_TLS_CA_FILE",
        &["mqtt", "tls", "ca_file"],
        EnvKind::Str,
    ),
    ("KEYMETER_GRPC_LISTEN", &["listen", "grpc"], EnvKind::Str),
    ("KEYMETER_ADMIN_LISTEN", &["listen", "admin"], EnvKind::Str),
    ("KEYMETER_KEYS_FILE", &["keys", "file"], EnvKind::Str),
    (
        "KEYMETER_KEYS_SNAPSHOT",
        &["keys", "snapshot"],
        EnvKind::Str,
    ),
    ("KEYMETER_OUTBOX_DIR", &["outbox", "dir"], EnvKind::Str),
    ("KEYMETER_LOG_FORMAT", &["log", "format"], EnvKind::Str),
    ("KEYMETER_LOG_LEVEL", &["log", "level"], EnvKind::Str),
];

/// Names of the environment overrides, for `--help` and the README.
pub fn env_override_names() -> impl Iterator<Item = &'static str> {
    ENV_OVERRIDES.iter().map(|(var, _, _)| *var)
}

impl Config {
    /// Reads `path`, applies environment overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path, |var| std::env::var(var).ok())
    }

    /// Parses TOML text with overrides from `env`; `path` only names the source in errors.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: match e.span() {
                Some(span) => {
                    let (line, column) = line_and_column(text, span.start);
                    format!("line {line}, column {column}: {}", e.message())
                }
                None => e.message().to_string(),
            },
        })?;
        for (var, key_path, kind) in ENV_OVERRIDES {
            if let Some(raw) = env(var) {
                let v = env_value(var, &raw, *kind)?;
                set_path(&mut value, key_path, v);
            }
        }
        if !value.contains_key("mqtt") {
            return Err(ConfigError::invalid(
                "mqtt",
                "missing: keymeter needs the billing system's MQTT broker ([mqtt] host = ...) \
                 to receive keys and deliver usage. To try keymeter locally without a broker, \
                 run `keymeter dev`",
            ));
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
                let key = e.path().to_string();
                ConfigError::Invalid {
                    key,
                    message: e.into_inner().message().to_string(),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Semantic checks serde cannot express; each names its key. What needs the
    /// machine (files, directories) is `preflight::check`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(t) = &self.listen.grpc_tls {
            for (key, file) in [
                ("listen.grpc_tls.cert_file", Some(&t.cert_file)),
                ("listen.grpc_tls.key_file", Some(&t.key_file)),
                ("listen.grpc_tls.client_ca_file", t.client_ca_file.as_ref()),
            ] {
                if let Some(f) = file
                    && !f.is_file()
                {
                    return Err(ConfigError::invalid(
                        key,
                        format!("{} is not a readable file", f.display()),
                    ));
                }
            }
            if t.client_ca_file.is_none() && !t.allow.is_empty() {
                return Err(ConfigError::invalid(
                    "listen.grpc_tls.allow",
                    "needs listen.grpc_tls.client_ca_file: without client certificates there are no identities to allow",
                ));
            }
        } else if !self.listen.grpc.ip().is_loopback() && !self.listen.allow_plaintext {
            return Err(ConfigError::invalid(
                "listen.grpc",
                format!(
                    "{} is not loopback and [listen.grpc_tls] is not set: whoever reaches a plaintext gRPC port can bill any key. \
                     Configure mTLS (listen.grpc_tls with client_ca_file), listen on loopback (Envoy or a sidecar in the same pod), \
                     or set listen.allow_plaintext = true where the network is otherwise closed (NetworkPolicy)",
                    self.listen.grpc
                ),
            ));
        }
        if self.listen.max_message_bytes < 256 << 10 {
            return Err(ConfigError::invalid(
                "listen.max_message_bytes",
                "must be at least 262144 (Envoy's access-log identifier alone is ~64 KiB)",
            ));
        }
        let l = &self.listen;
        for (key, value) in [
            ("listen.grpc_max_connections", l.grpc_max_connections),
            ("listen.admin_max_connections", l.admin_max_connections),
        ] {
            if !(1..=1_000_000).contains(&value) {
                return Err(ConfigError::invalid(key, "must be 1-1000000"));
            }
        }
        for (key, value, max) in [
            (
                "listen.grpc_keepalive_interval_secs",
                l.grpc_keepalive_interval_secs,
                3600,
            ),
            (
                "listen.grpc_keepalive_timeout_secs",
                l.grpc_keepalive_timeout_secs,
                600,
            ),
        ] {
            if !(1..=max).contains(&value) {
                return Err(ConfigError::invalid(key, format!("must be 1-{max}")));
            }
        }
        if !(100..=600_000).contains(&l.admin_header_read_timeout_ms) {
            return Err(ConfigError::invalid(
                "listen.admin_header_read_timeout_ms",
                "must be 100-600000",
            ));
        }
        let m = &self.mqtt;
        if m.host.trim().is_empty() {
            return Err(ConfigError::invalid("mqtt.host", "must not be empty"));
        }
        if m.port == 0 {
            return Err(ConfigError::invalid("mqtt.port", "must be 1-65535"));
        }
        if m.keep_alive_secs < 5 || m.keep_alive_secs > 65535 {
            return Err(ConfigError::invalid(
                "mqtt.keep_alive_secs",
                "must be 5-65535 seconds",
            ));
        }
        if m.reconnect_max_secs == 0 {
            return Err(ConfigError::invalid(
                "mqtt.reconnect_max_secs",
                "must be at least 1",
            ));
        }
        if m.heartbeat_interval_secs == 0 {
            return Err(ConfigError::invalid(
                "mqtt.heartbeat_interval_secs",
                "must be at least 1",
            ));
        }
        if m.keys_request_retry_secs == 0 {
            return Err(ConfigError::invalid(
                "mqtt.keys_request_retry_secs",
                "must be at least 1",
            ));
        }
        if m.client_id.len() > 128 {
            return Err(ConfigError::invalid(
                "mqtt.client_id",
                "longer than 128 bytes",
            ));
        }
        let tls = &m.tls;
        if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
            return Err(ConfigError::invalid(
                "mqtt.tls.client_cert_file",
                "client_cert_file and client_key_file must be set together",
            ));
        }
        for (key, file) in [
            ("mqtt.tls.ca_file", &tls.ca_file),
            ("mqtt.tls.client_cert_file", &tls.client_cert_file),
            ("mqtt.tls.client_key_file", &tls.client_key_file),
        ] {
            if let Some(f) = file
                && tls.enabled
                && !f.is_file()
            {
                return Err(ConfigError::invalid(
                    key,
                    format!("{} is not a readable file", f.display()),
                ));
            }
        }
        for (key, topic) in [
            ("topics.report", &self.topics.report),
            ("topics.keys_request", &self.topics.keys_request),
            ("topics.keys_update", &self.topics.keys_update),
            ("topics.heartbeat", &self.topics.heartbeat),
        ] {
            if topic.is_empty() || topic.contains(['+', '#', '\0']) {
                return Err(ConfigError::invalid(
                    key,
                    "must be a non-empty topic name without wildcards",
                ));
            }
        }
        if self.keys.file_poll_interval_ms < 10 {
            return Err(ConfigError::invalid(
                "keys.file_poll_interval_ms",
                "must be at least 10",
            ));
        }
        if self.keys.max_update_bytes < 1024 {
            return Err(ConfigError::invalid(
                "keys.max_update_bytes",
                "must be at least 1024",
            ));
        }
        let u = &self.usage;
        for (key, name) in [
            ("usage.headers.module", &u.headers.module),
            ("usage.headers.model", &u.headers.model),
            ("usage.headers.usage", &u.headers.usage),
            ("usage.headers.metadata", &u.headers.metadata),
            ("usage.headers.records", &u.headers.records),
        ] {
            check_header_name(key, name)?;
        }
        if u.metadata_namespace.is_empty() {
            return Err(ConfigError::invalid(
                "usage.metadata_namespace",
                "must not be empty",
            ));
        }
        if u.max_metadata_bytes == 0 || u.max_metadata_bytes > 1 << 20 {
            return Err(ConfigError::invalid(
                "usage.max_metadata_bytes",
                "must be 1 to 1048576",
            ));
        }
        if u.max_records_per_response == 0 || u.max_records_per_response > 1000 {
            return Err(ConfigError::invalid(
                "usage.max_records_per_response",
                "must be 1 to 1000",
            ));
        }
        if !(60..=366 * 24 * 3600).contains(&u.report_idempotency_secs) {
            return Err(ConfigError::invalid(
                "usage.report_idempotency_secs",
                "must be 60 to 31622400 (366 days)",
            ));
        }
        if !(60..=366 * 24 * 3600).contains(&u.report_max_age_secs) {
            return Err(ConfigError::invalid(
                "usage.report_max_age_secs",
                "must be 60 to 31622400 (366 days)",
            ));
        }
        const RESERVED: [&str; 7] = [
            "app_id",
            "api_key",
            "module",
            "model",
            "usage",
            "timestamp",
            "metadata",
        ];
        if RESERVED.contains(&u.record_id_field.as_str()) {
            return Err(ConfigError::invalid(
                "usage.record_id_field",
                "must not be one of the billing payload's own fields",
            ));
        }
        for (i, r) in u.routes.iter().enumerate() {
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
        let o = &self.outbox;
        if o.max_bytes < 1 << 20 {
            return Err(ConfigError::invalid(
                "outbox.max_bytes",
                "must be at least 1 MiB",
            ));
        }
        if o.segment_bytes < 64 * 1024 || o.segment_bytes > o.max_bytes {
            return Err(ConfigError::invalid(
                "outbox.segment_bytes",
                "must be at least 64 KiB and at most outbox.max_bytes",
            ));
        }
        if o.fsync == FsyncMode::Interval && o.fsync_interval_ms == 0 {
            return Err(ConfigError::invalid(
                "outbox.fsync_interval_ms",
                "must be at least 1 (or use fsync = \"batch\")",
            ));
        }
        if o.max_inflight == 0 {
            return Err(ConfigError::invalid(
                "outbox.max_inflight",
                "must be at least 1",
            ));
        }
        if self.check.key_headers.is_empty() && !self.check.accept_bearer {
            return Err(ConfigError::invalid(
                "check.key_headers",
                "empty and accept_bearer is false: no request could carry a key",
            ));
        }
        if let Some(l) = &self.check.invalid_key_limit {
            if l.max_attempts == 0 {
                return Err(ConfigError::invalid(
                    "check.invalid_key_limit.max_attempts",
                    "must be at least 1",
                ));
            }
            if l.window_secs == 0 || l.window_secs > 86_400 {
                return Err(ConfigError::invalid(
                    "check.invalid_key_limit.window_secs",
                    "must be 1 to 86400",
                ));
            }
            if l.max_clients == 0 {
                return Err(ConfigError::invalid(
                    "check.invalid_key_limit.max_clients",
                    "must be at least 1",
                ));
            }
        }
        for h in &self.check.key_headers {
            check_header_name("check.key_headers", h)?;
        }
        check_header_name("check.app_id_header", &self.check.app_id_header)?;
        let x = &self.xds;
        if x.resource_name.is_empty()
            || x.resource_name.len() > 256
            || !x.resource_name.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ConfigError::invalid(
                "xds.resource_name",
                "must be 1 to 256 printable ASCII characters without spaces",
            ));
        }
        if !(10..=60_000).contains(&x.push_interval_ms) {
            return Err(ConfigError::invalid(
                "xds.push_interval_ms",
                "must be 10 to 60000",
            ));
        }
        if x.enabled && self.check.strip_key_header {
            return Err(ConfigError::invalid(
                "check.strip_key_header",
                "cannot be true with xds.enabled: Envoy's api_key_auth would remove the key before \
                 the access log is written, and a request whose key is not logged cannot be billed",
            ));
        }
        if x.max_keys == 0 || x.max_keys > XDS_MAX_KEYS_LIMIT {
            return Err(ConfigError::invalid(
                "xds.max_keys",
                format!(
                    "must be 1 to {XDS_MAX_KEYS_LIMIT} (the largest list measured to work with Envoy 1.40)"
                ),
            ));
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(ConfigError::invalid(
                "log.level",
                format!("`{}` is not a valid tracing filter", self.log.level),
            ));
        }
        Ok(())
    }

    /// The MQTT client id: configured, or `keymeter-<hostname>`.
    pub fn client_id(&self) -> String {
        if !self.mqtt.client_id.is_empty() {
            return self.mqtt.client_id.clone();
        }
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .take(100)
            .collect();
        format!("keymeter-{host}")
    }

    /// A configuration for a broker on loopback without TLS: dev mode and tests.
    pub fn for_local_broker(host: &str, port: u16) -> Config {
        Config {
            listen: ListenConfig {
                grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
                admin: SocketAddr::from(([127, 0, 0, 1], 0)),
                grpc_tls: None,
                allow_plaintext: false,
                ..ListenConfig::default()
            },
            mqtt: MqttConfig {
                host: host.into(),
                port,
                username: String::new(),
                password: Secret::default(),
                client_id: String::new(),
                keep_alive_secs: default_keep_alive(),
                reconnect_max_secs: 2,
                heartbeat_interval_secs: default_heartbeat(),
                keys_request_retry_secs: default_keys_request_retry(),
                protocol: MqttProtocol::default(),
                tls: TlsConfig {
                    enabled: false,
                    ..TlsConfig::default()
                },
            },
            topics: Topics::default(),
            keys: KeysConfig::default(),
            check: CheckConfig::default(),
            usage: UsageConfig::default(),
            outbox: OutboxSettings {
                dir: scratch_outbox_dir(),
                ..OutboxSettings::default()
            },
            log: LogConfig::default(),
            xds: XdsConfig::default(),
        }
    }
}

/// A fresh outbox directory under the system temp dir, for dev mode and tests.
fn scratch_outbox_dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("keymeter-outbox-{}-{n}", std::process::id()))
}

/// HTTP/2 header names as Envoy hands them over: lowercase token characters.
fn check_header_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("`{name}` is not a lowercase header name"),
        ))
    }
}

fn env_value(var: &'static str, raw: &str, kind: EnvKind) -> Result<toml::Value, ConfigError> {
    match kind {
        EnvKind::Str => Ok(toml::Value::String(raw.to_string())),
        EnvKind::Int => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| ConfigError::Env {
                var,
                message: format!("`{raw}` is not an integer"),
            }),
        EnvKind::Bool => match raw.trim() {
            "true" | "1" => Ok(toml::Value::Boolean(true)),
            "false" | "0" => Ok(toml::Value::Boolean(false)),
            _ => Err(ConfigError::Env {
                var,
                message: format!("`{raw}` is not true/false"),
            }),
        },
    }
}

fn set_path(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    let (last, parents) = path.split_last().expect("override paths are non-empty");
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            // A scalar where a table belongs: replace it so serde reports the real key.
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert(last.to_string(), value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"), |_| None)
    }

    const MINIMAL: &str = "[mqtt]\nhost = \"broker.example\"\n";

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.mqtt.port, 8883);
        assert!(c.mqtt.tls.enabled);
        assert!(!c.mqtt.tls.insecure_skip_verify);
        assert_eq!(c.check.key_headers, ["api-key", "apikey"]);
        assert!(!c.check.strip_key_header);
        assert_eq!(c.topics, Topics::default());
    }

    #[test]
    fn missing_mqtt_mentions_dev_mode() {
        let e = parse("").unwrap_err().to_string();
        assert!(e.contains("keymeter dev"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[mqtt]\nhost = \"b\"\nportt = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("portt"), "{e}");
    }

    #[test]
    fn wrong_type_is_named_with_its_path() {
        let e = parse("[mqtt]\nhost = \"b\"\n[mqtt.tls]\nenabled = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.tls.enabled"), "{e}");
    }

    #[test]
    fn env_overrides_apply_and_bad_values_name_the_variable() {
        let c = Config::parse(MINIMAL, Path::new("t"), |v| match v {
            "KEYMETER_MQTT_PASSWORD" => Some("s3cret".into()),
            "KEYMETER_MQTT_PORT" => Some("1883".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.mqtt.password.expose(), "s3cret");
        assert_eq!(c.mqtt.port, 1883);
        let c = Config::parse(MINIMAL, Path::new("t"), |v| {
            (v == "KEYMETER_OUTBOX_DIR").then(|| "/data/outbox".to_string())
        })
        .unwrap();
        assert_eq!(c.outbox.dir, Path::new("/data/outbox"));
        let e = Config::parse(MINIMAL, Path::new("t"), |v| {
            (v == "KEYMETER_MQTT_PORT").then(|| "abc".to_string())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("KEYMETER_MQTT_PORT"), "{e}");
    }

    #[test]
    fn password_is_never_serialized() {
        let c = Config::parse(MINIMAL, Path::new("t"), |v| {
            (v == "KEYMETER_MQTT_PASSWORD").then(|| "s3cret".to_string())
        })
        .unwrap();
        let dumped = toml::to_string(&c).unwrap();
        assert!(!dumped.contains("s3cret"), "{dumped}");
        let debugged = format!("{c:?}");
        assert!(!debugged.contains("s3cret"), "{debugged}");
    }

    #[test]
    fn mqtt_protocol_is_3_1_1_unless_5_is_asked_for() {
        assert_eq!(parse(MINIMAL).unwrap().mqtt.protocol, MqttProtocol::V311);
        let five = parse("[mqtt]\nhost = \"b\"\nprotocol = \"5\"\n").unwrap();
        assert_eq!(five.mqtt.protocol, MqttProtocol::V5);
        let three = parse("[mqtt]\nhost = \"b\"\nprotocol = \"3.1.1\"\n").unwrap();
        assert_eq!(three.mqtt.protocol, MqttProtocol::V311);
        for bad in ["\"4\"", "\"3.1\"", "5"] {
            let e = parse(&format!("[mqtt]\nhost = \"b\"\nprotocol = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("mqtt.protocol"), "{bad}: {e}");
        }
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let e = parse("[mqtt]\nhost = \"b\"\n[check]\napp_id_header = \"X Bad\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("check.app_id_header"), "{e}");
        let e = parse("[mqtt]\nhost = \"b\"\n[topics]\nreport = \"billing/#\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("topics.report"), "{e}");
    }

    #[test]
    fn xds_is_off_by_default_and_its_bad_values_are_named() {
        let c = parse(MINIMAL).unwrap();
        assert!(!c.xds.enabled);
        assert_eq!(c.xds.resource_name, "keymeter.api_key_auth");
        assert_eq!(c.xds.push_interval_ms, 100);
        let c = parse(&format!(
            "{MINIMAL}[xds]\nenabled = true\nmax_keys = 5000\n"
        ))
        .unwrap();
        assert!(c.xds.enabled);
        assert_eq!(c.xds.max_keys, 5000);
        for (bad, key) in [
            ("resource_name = \"\"", "xds.resource_name"),
            ("resource_name = \"a b\"", "xds.resource_name"),
            ("push_interval_ms = 1", "xds.push_interval_ms"),
            ("max_keys = 0", "xds.max_keys"),
            ("max_keys = 1000001", "xds.max_keys"),
            ("enable = true", "enable"),
            (
                "enabled = true\n[check]\nstrip_key_header = true",
                "check.strip_key_header",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}[xds]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/keymeter.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::parse(&text, &path, |_| None);
        // The example names a CA file that only exists in a deployment.
        match c {
            Ok(_) => {}
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "mqtt.tls.ca_file"),
            Err(e) => panic!("{e}"),
        }
    }
}
