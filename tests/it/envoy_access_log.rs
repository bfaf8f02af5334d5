//! What Envoy 1.40 streams to an AccessLogService with the deployed config
//! (deploy/envoy/envoy.yaml), documented by assertion: if Envoy changes, this fails.
//!
//! Real keymeter answers ext_authz (keys from a billing stand-in on a real mosquitto);
//! the access log goes to a capture server in this file, so every
//! `StreamAccessLogsMessage` Envoy sends can be inspected as it arrived.
//!
//! Facts shown here (field paths are on `HttpAccessLogEntry`):
//! - usage headers moved by header_to_metadata: `common_properties.metadata
//!   .filter_metadata["keymeter"]`, keys module/model/usage/metadata/records, every
//!   value a protobuf string (also `usage`); values of 8192 bytes or more are dropped
//!   (and still removed from the response);
//! - without that filter: `response.response_headers` (lowercase names, only the
//!   listed ones; repeated headers joined with ",");
//! - usage in trailers: `response.response_trailers`; the client sees the trailers;
//! - keymeter's Check metadata: `filter_metadata["envoy.filters.http.ext_authz"]`
//!   (`app_id`, `key_fp` strings, plus Envoy's `ext_authz_duration` number, ms);
//!   a denied request has no metadata at all;
//! - request id: `request.request_id` (== `common_properties.stream_id`, == the
//!   `x-request-id` the backend saw; a client-sent `x-request-id` is kept as is);
//! - completion time: `common_properties.start_time` + `time_to_last_downstream_tx_byte`;
//! - one stream per Envoy worker thread; `identifier` (node, `log_name`) only in the
//!   first message of each stream; entries batched per flush (100 ms);
//! - with `grpc_stream_retry_policy`, entries flushed while the server is down are
//!   delivered once it is back (without it they are lost and Envoy counts them flushed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::backend::{ReceivedResponse, Reply};
use crate::support::envoy::{DeployConfigOptions, render_deploy_config_with};
use crate::support::keymeter::{Keymeter, billing};
use crate::support::{
    Backend, Envoy, EnvoyPorts, Mosquitto, RecordedRequest, http_client, wait_until,
};
use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use envoy_types::pb::envoy::data::accesslog::v3::http_access_log_entry::HttpVersion;
use envoy_types::pb::envoy::data::accesslog::v3::response_flags::unauthorized::Reason;
use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogType, HttpRequestProperties};
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::{
    AccessLogService, AccessLogServiceServer,
};
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries;
use envoy_types::pb::envoy::service::accesslog::v3::{
    StreamAccessLogsMessage, StreamAccessLogsResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use keymeter::Config;
use keymeter::dev::billing::BillingStandIn;
use keymeter::keys::KeyEntry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, Response, Status, Streaming};

const GOOD: &str = "sk-test-0001";
/// After an outage Envoy reconnects with a growing back-off (up to 10 s for its gRPC
/// client's connection); on a loaded CI machine the first entry after it can take
/// longer than that. A passing wait returns as soon as the entry is there.
const ENTRY_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// The capture server: a test-only AccessLogService that records everything.

/// One message as it arrived.
#[derive(Debug, Clone)]
struct Captured {
    /// 0, 1, ... in the order Envoy opened the streams.
    stream: usize,
    at: Instant,
    message: StreamAccessLogsMessage,
}

#[derive(Clone, Default)]
struct Capture {
    streams: Arc<Mutex<usize>>,
    messages: Arc<Mutex<Vec<Captured>>>,
}

#[tonic::async_trait]
impl AccessLogService for Capture {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let stream = {
            let mut streams = self.streams.lock().unwrap();
            *streams += 1;
            *streams - 1
        };
        let mut messages = request.into_inner();
        while let Some(message) = messages.message().await? {
            let at = Instant::now();
            self.messages.lock().unwrap().push(Captured {
                stream,
                at,
                message,
            });
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

impl Capture {
    fn messages(&self) -> Vec<Captured> {
        self.messages.lock().unwrap().clone()
    }

    /// Every HTTP entry received so far, with the message it came in.
    fn entries(&self) -> Vec<(Captured, HttpAccessLogEntry)> {
        self.messages()
            .into_iter()
            .flat_map(|c| {
                let entries = match &c.message.log_entries {
                    Some(LogEntries::HttpLogs(http)) => http.log_entry.clone(),
                    other => panic!("expected HTTP entries, got {other:?}"),
                };
                entries.into_iter().map(move |e| (c.clone(), e))
            })
            .collect()
    }

    /// Waits for the one entry whose request path is `path`.
    async fn entry_for(&self, path: &str) -> (Captured, HttpAccessLogEntry) {
        wait_until(
            &format!("an access-log entry for {path}"),
            ENTRY_TIMEOUT,
            || async { self.entries().iter().any(|(_, e)| request(e).path == path) },
        )
        .await;
        let mut found: Vec<_> = self
            .entries()
            .into_iter()
            .filter(|(_, e)| request(e).path == path)
            .collect();
        assert_eq!(found.len(), 1, "exactly one entry for {path}");
        found.pop().unwrap()
    }
}

/// The capture server on its own runtime, so that stopping it drops every
/// connection at once, as a crash does.
struct CaptureServer {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CaptureServer {
    /// Serves `capture` on 127.0.0.1:`port` (0: any free port).
    fn start(capture: &Capture, port: u16) -> CaptureServer {
        let service = AccessLogServiceServer::new(capture.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .expect("bind capture server");
                bound_tx
                    .send(listener.local_addr().unwrap().port())
                    .unwrap();
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming(incoming),
                );
                let _ = stopped.await;
            });
            // Dropping the runtime drops every connection task.
        });
        let port = bound_rx.recv().expect("capture server bound");
        CaptureServer {
            port,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Stops at once, dropping every connection.
    fn crash(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for CaptureServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

// ---------------------------------------------------------------------------
// The rig: mosquitto + billing stand-in + keymeter (ext_authz) + backend + Envoy.

struct Rig {
    capture: Capture,
    capture_server: Option<CaptureServer>,
    backend: Backend,
    envoy: Envoy,
    keymeter: Keymeter,
    _billing: BillingStandIn,
    _broker: Mosquitto,
}

impl Rig {
    async fn start(without_header_to_metadata: bool) -> Rig {
        let broker = Mosquitto::start().await;
        let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", GOOD)]).await;
        let keymeter =
            Keymeter::start_ready(Config::for_local_broker("127.0.0.1", broker.port())).await;
        let capture = Capture::default();
        let capture_server = CaptureServer::start(&capture, 0);
        let backend = Backend::start_replying(usage_backend).await;
        let ports = EnvoyPorts {
            keymeter_grpc: keymeter.grpc_port(),
            backend: backend.port(),
        };
        let yaml = render_deploy_config_with(
            ports,
            DeployConfigOptions {
                without_header_to_metadata,
                access_log_port: Some(capture_server.port),
            },
        );
        let envoy = Envoy::start_with_config(yaml).await;
        Rig {
            capture,
            capture_server: Some(capture_server),
            backend,
            envoy,
            keymeter,
            _billing: billing,
            _broker: broker,
        }
    }

    /// POST `path` through Envoy with `headers`; reads the whole answer.
    async fn post(&self, path: &str, headers: &[(&str, &str)]) -> ReceivedResponse {
        let mut request = http_client().post(self.envoy.url(path)).body("hello");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        ReceivedResponse::read(request.send().await.expect("request through Envoy")).await
    }

    /// The request as the backend saw it.
    fn backend_saw(&self, path: &str) -> RecordedRequest {
        self.backend
            .requests()
            .into_iter()
            .find(|r| r.path == path)
            .unwrap_or_else(|| panic!("{path} did not reach the backend"))
    }
}

const METADATA: &str = r#"{"prompt_tokens":30,"completion_tokens":12}"#;
const RECORDS: &str = r#"[{"module":"llm","model":"gpt-4","usage":42},{"module":"tts","model":"eleven","usage":12,"metadata":{"voice":"a"}}]"#;
const BILLING_HEADERS: [&str; 5] = [
    "x-billing-module",
    "x-billing-model",
    "x-billing-usage",
    "x-billing-metadata",
    "x-billing-records",
];

/// A backend declaring usage in the ways the header contract allows, chosen by path.
fn usage_backend(request: &RecordedRequest) -> Reply {
    let path = request.path.as_str();
    if let Some(len) = path.strip_prefix("/metadata-of-length-") {
        // An `x-billing-metadata` value of exactly `len` bytes.
        let pad = "x".repeat(len.parse::<usize>().unwrap() - r#"{"pad":""}"#.len());
        return Reply::ok()
            .header("x-billing-usage", "1")
            .header("x-billing-metadata", &format!(r#"{{"pad":"{pad}"}}"#));
    }
    match path {
        "/usage-in-headers" => Reply::ok()
            .header("content-type", "application/json")
            .header("x-billing-module", "llm")
            .header("x-billing-model", "gpt-4")
            .header("x-billing-usage", "42")
            .header("x-billing-metadata", METADATA)
            .chunk(r#"{"answer":"hi"}"#),
        "/records" => Reply::ok()
            .header("x-billing-records", RECORDS)
            .chunk("two records"),
        "/usage-twice" => Reply::ok()
            .header("x-billing-usage", "1")
            .header("x-billing-usage", "2"),
        "/usage-in-trailers" => Reply::ok()
            .header("content-type", "text/plain")
            .chunk("line 1\n")
            .chunk("line 2\n")
            .chunk("line 3\n")
            .chunk_delay(Duration::from_millis(30))
            .trailer("x-billing-module", "asr")
            .trailer("x-billing-model", "demo-asr")
            .trailer("x-billing-usage", "7")
            .trailer("x-billing-metadata", r#"{"seconds":7}"#),
        _ => Reply::ok().chunk("free"),
    }
}

fn request(entry: &HttpAccessLogEntry) -> &HttpRequestProperties {
    entry.request.as_ref().expect("entry.request")
}

fn response_code(entry: &HttpAccessLogEntry) -> u32 {
    let response = entry.response.as_ref().expect("entry.response");
    response
        .response_code
        .as_ref()
        .expect("response_code")
        .value
}

fn response_headers(entry: &HttpAccessLogEntry) -> HashMap<String, String> {
    entry.response.as_ref().unwrap().response_headers.clone()
}

fn response_trailers(entry: &HttpAccessLogEntry) -> HashMap<String, String> {
    entry.response.as_ref().unwrap().response_trailers.clone()
}

/// `filter_metadata[namespace]` as `key -> value`, each value rendered as
/// `s:<string>` or `n:<number>` so that assertions also check the protobuf type.
fn metadata(entry: &HttpAccessLogEntry, namespace: &str) -> Option<HashMap<String, String>> {
    let md = entry.common_properties.as_ref()?.metadata.as_ref()?;
    let fields = md.filter_metadata.get(namespace)?;
    let render = |kind: &Option<Kind>| match kind {
        Some(Kind::StringValue(s)) => format!("s:{s}"),
        Some(Kind::NumberValue(n)) => format!("n:{n}"),
        other => format!("{other:?}"),
    };
    Some(
        fields
            .fields
            .iter()
            .map(|(k, v)| (k.clone(), render(&v.kind)))
            .collect(),
    )
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn to_system_time(ts: &envoy_types::pb::google::protobuf::Timestamp) -> SystemTime {
    UNIX_EPOCH + Duration::new(ts.seconds as u64, ts.nanos as u32)
}

fn to_duration(d: &envoy_types::pb::google::protobuf::Duration) -> Duration {
    Duration::new(d.seconds as u64, d.nanos as u32)
}

/// One raw HTTP/1.1 request (for header spellings that `reqwest` normalizes); returns
/// the status code.
async fn raw_post(port: u16, path: &str, header_lines: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\n{header_lines}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"))
}

// ---------------------------------------------------------------------------

/// The deployed config: usage headers become metadata, trailers stay trailers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployed_config_moves_usage_headers_to_metadata_and_logs_trailers() {
    let rig = Rig::start(false).await;
    let key_fp = {
        let check = rig.keymeter.check(&[("api-key", GOOD)]).await;
        let fields = check
            .dynamic_metadata
            .expect("allowed Check has metadata")
            .fields;
        match &fields["key_fp"].kind {
            Some(Kind::StringValue(s)) => s.clone(),
            other => panic!("key_fp: {other:?}"),
        }
    };

    // (a) Usage in response headers: moved into metadata, hidden from the client.
    let sent_at = SystemTime::now();
    let a = rig.post("/usage-in-headers", &[("api-key", GOOD)]).await;
    let a_done = Instant::now();
    assert_eq!(a.status, 200);
    assert_eq!(a.text(), r#"{"answer":"hi"}"#);
    for name in BILLING_HEADERS {
        assert_eq!(a.header(name), None, "the client must not see {name}");
    }
    assert_eq!(a.header("content-type"), Some("application/json"));
    let (a_msg, a_entry) = rig.capture.entry_for("/usage-in-headers").await;
    println!(
        "entry for (a) arrived {:?} after the client had the response",
        a_msg.at.duration_since(a_done)
    );
    assert!(a_msg.at.duration_since(a_done) < Duration::from_secs(2));
    assert_eq!(
        metadata(&a_entry, "keymeter"),
        Some(map(&[
            ("module", "s:llm"),
            ("model", "s:gpt-4"),
            ("usage", "s:42"), // a string, not a number
            ("metadata", &format!("s:{METADATA}")),
        ]))
    );
    let authz = metadata(&a_entry, "envoy.filters.http.ext_authz").expect("Check metadata");
    assert_eq!(authz["app_id"], "s:app-1");
    assert_eq!(authz["key_fp"], format!("s:{key_fp}"));
    assert!(
        authz["ext_authz_duration"].starts_with("n:"),
        "Envoy adds the Check's duration in ms as a number: {authz:?}"
    );
    assert_eq!(authz.len(), 3, "{authz:?}");
    assert!(
        response_headers(&a_entry).is_empty(),
        "moved headers are gone from the log's response headers too"
    );
    assert!(response_trailers(&a_entry).is_empty());
    assert_eq!(
        request(&a_entry).request_headers,
        map(&[("api-key", GOOD)]),
        "only the listed request headers are logged"
    );
    assert_eq!(response_code(&a_entry), 200);
    let a_response = a_entry.response.as_ref().unwrap();
    assert_eq!(a_response.response_code_details, "via_upstream");
    assert_eq!(a_entry.protocol_version, HttpVersion::Http11 as i32);
    let a_common = a_entry.common_properties.as_ref().unwrap();
    assert_eq!(
        a_common.access_log_type,
        AccessLogType::DownstreamEnd as i32
    );
    assert_eq!(a_common.upstream_cluster, "backend");
    assert_eq!(request(&a_entry).request_body_bytes, 5);
    assert_eq!(a_response.response_body_bytes, 15);

    // (e) The request id: Envoy's x-request-id, as the backend saw it.
    let backend_id = rig
        .backend_saw("/usage-in-headers")
        .header("x-request-id")
        .expect("Envoy sets x-request-id")
        .to_owned();
    assert_eq!(request(&a_entry).request_id, backend_id);
    assert_eq!(a_common.stream_id, backend_id);
    assert_eq!(backend_id.len(), 36, "a UUID: {backend_id}");
    // ...also when the client sent its own: the shipped config is an edge
    // (use_remote_address, no internal addresses), so a client's x-request-id is
    // replaced, and cannot steer record ids.
    rig.post(
        "/request-id",
        &[("api-key", GOOD), ("x-request-id", "client-chosen")],
    )
    .await;
    let (_, chosen) = rig.capture.entry_for("/request-id").await;
    let id = &request(&chosen).request_id;
    assert_ne!(id, "client-chosen");
    assert_eq!(id.len(), 36, "Envoy's UUID: {id}");
    assert_eq!(&chosen.common_properties.as_ref().unwrap().stream_id, id);

    // (e) When the request completed: start_time + time_to_last_downstream_tx_byte.
    let start = to_system_time(a_common.start_time.as_ref().expect("start_time"));
    assert!(
        start >= sent_at - Duration::from_millis(50) && start <= SystemTime::now(),
        "start_time is wall-clock time when Envoy got the request"
    );

    // Several records in one response: one metadata string holding the JSON array.
    let r = rig.post("/records", &[("apikey", GOOD)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-billing-records"), None);
    let (_, r_entry) = rig.capture.entry_for("/records").await;
    assert_eq!(
        metadata(&r_entry, "keymeter"),
        Some(map(&[("records", &format!("s:{RECORDS}"))]))
    );
    assert_eq!(request(&r_entry).request_headers, map(&[("apikey", GOOD)]));

    // A repeated usage header: the values joined with "," go to metadata (not an
    // integer: a parser must reject it), the client sees none.
    let twice = rig.post("/usage-twice", &[("api-key", GOOD)]).await;
    assert_eq!(twice.header("x-billing-usage"), None);
    let (_, twice_entry) = rig.capture.entry_for("/usage-twice").await;
    assert_eq!(
        metadata(&twice_entry, "keymeter"),
        Some(map(&[("usage", "s:1,2")]))
    );

    // header_to_metadata ignores values of 8192 bytes or more, yet still removes
    // them: such usage is lost without a trace. 8191 bytes pass.
    for (len, kept) in [(8191, true), (8192, false)] {
        let path = format!("/metadata-of-length-{len}");
        let big = rig.post(&path, &[("api-key", GOOD)]).await;
        assert_eq!(big.status, 200);
        assert_eq!(big.header("x-billing-metadata"), None);
        let (_, entry) = rig.capture.entry_for(&path).await;
        let md = metadata(&entry, "keymeter").expect("usage moved");
        assert_eq!(md["usage"], "s:1");
        assert_eq!(md.get("metadata").map(|v| v.len() - 2), kept.then_some(len));
        assert!(response_headers(&entry).is_empty());
    }

    // (c) Usage in trailers of a streamed response: logged as trailers, not moved,
    // and the (HTTP/1.1) client receives them too.
    let c = rig.post("/usage-in-trailers", &[("api-key", GOOD)]).await;
    let c_done = SystemTime::now();
    assert_eq!(c.status, 200);
    assert_eq!(c.text(), "line 1\nline 2\nline 3\n");
    assert_eq!(c.header("transfer-encoding"), Some("chunked"));
    assert_eq!(c.trailer("x-billing-usage"), Some("7"));
    let (_, c_entry) = rig.capture.entry_for("/usage-in-trailers").await;
    assert_eq!(
        response_trailers(&c_entry),
        map(&[
            ("x-billing-module", "asr"),
            ("x-billing-model", "demo-asr"),
            ("x-billing-usage", "7"),
            ("x-billing-metadata", r#"{"seconds":7}"#),
        ])
    );
    assert!(response_headers(&c_entry).is_empty());
    assert_eq!(metadata(&c_entry, "keymeter"), None);
    assert!(metadata(&c_entry, "envoy.filters.http.ext_authz").is_some());
    // (e) The entry is written when the last byte went to the client.
    let c_common = c_entry.common_properties.as_ref().unwrap();
    let c_start = to_system_time(c_common.start_time.as_ref().unwrap());
    let last_tx = to_duration(c_common.time_to_last_downstream_tx_byte.as_ref().unwrap());
    let total = to_duration(c_common.duration.as_ref().unwrap());
    assert!(
        last_tx >= Duration::from_millis(60),
        "two 30 ms pauses: {last_tx:?}"
    );
    assert!(total >= last_tx);
    assert!(c_start + last_tx <= c_done + Duration::from_millis(50));
    assert!(
        to_duration(c_common.time_to_last_upstream_rx_byte.as_ref().unwrap()) <= last_tx,
        "upstream done before downstream"
    );

    // (d) A denied request: 401 from ext_authz, no metadata at all, no upstream; the
    // (unknown) key is logged since it is in a listed header.
    let d = rig.post("/denied", &[("api-key", "sk-nope")]).await;
    assert_eq!(d.status, 401);
    let (_, d_entry) = rig.capture.entry_for("/denied").await;
    assert_eq!(response_code(&d_entry), 401);
    assert_eq!(
        d_entry.response.as_ref().unwrap().response_code_details,
        "ext_authz_denied"
    );
    let d_common = d_entry.common_properties.as_ref().unwrap();
    assert_eq!(d_common.metadata, None, "no ext_authz metadata when denied");
    assert_eq!(d_common.upstream_cluster, "");
    assert_eq!(d_common.upstream_request_attempt_count, 0);
    assert_eq!(d_common.time_to_first_upstream_tx_byte, None);
    let flags = d_common.response_flags.as_ref().expect("response_flags");
    let unauthorized = flags.unauthorized_details.as_ref().expect("unauthorized");
    assert_eq!(unauthorized.reason, Reason::ExternalService as i32);
    assert_eq!(
        request(&d_entry).request_headers,
        map(&[("api-key", "sk-nope")])
    );
    assert!(!request(&d_entry).request_id.is_empty());
    let missing = rig.post("/missing-key", &[]).await;
    assert_eq!(missing.status, 401);
    let (_, missing_entry) = rig.capture.entry_for("/missing-key").await;
    assert!(request(&missing_entry).request_headers.is_empty());

    // Header names are logged lowercase whatever the client wrote; a repeated request
    // header is logged joined with ",". (Check sees the same joined value: denied.)
    let port = rig.envoy.listener_port();
    assert_eq!(
        raw_post(port, "/spelling", &format!("API-Key: {GOOD}\r\n")).await,
        200
    );
    let (_, spelled) = rig.capture.entry_for("/spelling").await;
    assert_eq!(request(&spelled).request_headers, map(&[("api-key", GOOD)]));
    let two_keys = format!("api-key: {GOOD}\r\napi-key: sk-other\r\n");
    assert_eq!(raw_post(port, "/two-keys", &two_keys).await, 401);
    let (_, joined) = rig.capture.entry_for("/two-keys").await;
    assert_eq!(
        request(&joined).request_headers,
        map(&[("api-key", &format!("{GOOD},sk-other"))])
    );

    // Streams and messages: one stream per Envoy worker thread that logged; the
    // identifier only on a stream's first message; entries batched per flush.
    let messages = rig.capture.messages();
    let mut streams: HashMap<usize, Vec<&Captured>> = HashMap::new();
    for m in &messages {
        streams.entry(m.stream).or_default().push(m);
    }
    for (stream, msgs) in &streams {
        let id = msgs[0]
            .message
            .identifier
            .as_ref()
            .unwrap_or_else(|| panic!("first message of stream {stream} has no identifier"));
        assert_eq!(id.log_name, "keymeter");
        let node = id.node.as_ref().expect("identifier.node");
        assert_eq!(node.id, "", "the deployed config sets no node id");
        assert_eq!(node.cluster, "");
        assert_eq!(node.user_agent_name, "envoy");
        for later in &msgs[1..] {
            assert!(
                later.message.identifier.is_none(),
                "identifier only in the first message"
            );
        }
    }
    let entries = rig.capture.entries().len();
    println!(
        "{entries} entries in {} messages on {} streams",
        messages.len(),
        streams.len()
    );
    assert_eq!(entries, 11, "one entry per request (11 so far)");
    for m in &messages {
        match &m.message.log_entries {
            Some(LogEntries::HttpLogs(http)) => assert!(!http.log_entry.is_empty()),
            other => panic!("{other:?}"),
        }
    }

    // Five requests at once (within one flush interval): fewer messages than entries.
    let before = rig.capture.messages().len();
    let paths: Vec<String> = (0..5).map(|i| format!("/batch-{i}")).collect();
    let mut burst = tokio::task::JoinSet::new();
    for path in &paths {
        let send = http_client()
            .post(rig.envoy.url(path))
            .header("api-key", GOOD)
            .send();
        burst.spawn(async move { send.await.expect("burst request").status().as_u16() });
    }
    while let Some(status) = burst.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    for path in &paths {
        rig.capture.entry_for(path).await;
    }
    let batch_messages = rig.capture.messages().len() - before;
    println!("5 concurrent requests arrived in {batch_messages} messages");
    assert!(batch_messages < 5, "entries are batched: {batch_messages}");
}

/// (b) Without header_to_metadata, usage headers reach the client and the log's
/// `response.response_headers`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_header_to_metadata_usage_stays_in_response_headers() {
    let rig = Rig::start(true).await;

    let b = rig.post("/usage-in-headers", &[("api-key", GOOD)]).await;
    assert_eq!(b.status, 200);
    assert_eq!(
        b.header("x-billing-usage"),
        Some("42"),
        "the client sees it"
    );
    let (_, entry) = rig.capture.entry_for("/usage-in-headers").await;
    assert_eq!(
        response_headers(&entry),
        map(&[
            ("x-billing-module", "llm"),
            ("x-billing-model", "gpt-4"),
            ("x-billing-usage", "42"),
            ("x-billing-metadata", METADATA),
        ]),
        "only the listed response headers, lowercase"
    );
    assert_eq!(metadata(&entry, "keymeter"), None);
    let authz = metadata(&entry, "envoy.filters.http.ext_authz").unwrap();
    assert_eq!(authz["app_id"], "s:app-1");

    rig.post("/records", &[("api-key", GOOD)]).await;
    let (_, records) = rig.capture.entry_for("/records").await;
    assert_eq!(
        response_headers(&records),
        map(&[("x-billing-records", RECORDS)])
    );

    // A repeated header is logged joined with ",".
    rig.post("/usage-twice", &[("api-key", GOOD)]).await;
    let (_, twice) = rig.capture.entry_for("/usage-twice").await;
    assert_eq!(response_headers(&twice), map(&[("x-billing-usage", "1,2")]));

    // No 8 KiB limit on this path.
    let path = "/metadata-of-length-20000";
    rig.post(path, &[("api-key", GOOD)]).await;
    let (_, big) = rig.capture.entry_for(path).await;
    assert_eq!(response_headers(&big)["x-billing-metadata"].len(), 20000);

    // Trailers are unaffected by the filter.
    rig.post("/usage-in-trailers", &[("api-key", GOOD)]).await;
    let (_, c) = rig.capture.entry_for("/usage-in-trailers").await;
    assert_eq!(response_trailers(&c)["x-billing-usage"], "7");
}

/// The stream has no acks, so a server outage loses whatever Envoy flushes into a
/// stream that then fails. The deployed `grpc_stream_retry_policy` makes Envoy retry
/// a stream whose connection attempt fails, replaying what it buffered for it: a few
/// entries logged while the server is down arrive once it is back. The replay buffer
/// is 64 KB per stream and the stream's first message (the identifier, about 61 KB)
/// fills most of it, so a longer outage still loses entries.
/// (Measured without the policy: every entry flushed during the outage is lost.)
/// Envoy counts lost entries as `grpc_entries_flushed`, not `logs_dropped`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_entries_logged_while_the_server_is_down_arrive_when_it_is_back() {
    let mut rig = Rig::start(false).await;
    assert_eq!(rig.post("/before", &[("api-key", GOOD)]).await.status, 200);
    rig.capture.entry_for("/before").await;

    // A short outage with three requests: all three arrive, by a retried stream.
    let port = outage(&mut rig, "/short", 3).await;
    rig.capture_server = Some(CaptureServer::start(&rig.capture, port));
    for i in 0..3 {
        rig.capture.entry_for(&format!("/short-{i}")).await;
    }
    assert!(
        rig.envoy
            .stat("cluster.access_log_capture.upstream_rq_retry")
            .await
            > 0
    );
    assert_eq!(
        rig.envoy
            .stat("access_logs.grpc_access_log.logs_dropped")
            .await,
        0
    );

    // Forty requests: more than the replay buffer holds; most are lost, silently.
    let port = outage(&mut rig, "/long", 40).await;
    rig.capture_server = Some(CaptureServer::start(&rig.capture, port));
    assert_eq!(rig.post("/after", &[("api-key", GOOD)]).await.status, 200);
    rig.capture.entry_for("/after").await;
    let arrived = rig
        .capture
        .entries()
        .iter()
        .filter(|(_, e)| request(e).path.starts_with("/long-"))
        .count();
    println!("{arrived} of 40 entries logged during the outage arrived");
    assert!(arrived < 40, "{arrived}");
    assert!(
        rig.envoy
            .stat("cluster.access_log_capture.retry_or_shadow_abandoned")
            .await
            > 0
    );
    assert_eq!(
        rig.envoy
            .stat("access_logs.grpc_access_log.logs_dropped")
            .await,
        0
    );
    assert_eq!(
        rig.envoy
            .stat("access_logs.grpc_access_log.logs_written")
            .await,
        rig.envoy
            .stat("access_logs.grpc_access_log.grpc_entries_flushed")
            .await,
        "every entry counts as flushed, lost or not"
    );
}

/// Crashes the capture server, sends `count` requests (`{prefix}-{i}`) and lets
/// several flush intervals pass; returns the port to restart the server on.
async fn outage(rig: &mut Rig, prefix: &str, count: usize) -> u16 {
    let server = rig.capture_server.take().expect("capture server running");
    let port = server.port;
    server.crash();
    for i in 0..count {
        let path = format!("{prefix}-{i}");
        let during = rig.post(&path, &[("api-key", GOOD)]).await;
        assert_eq!(during.status, 200, "ext_authz is keymeter, still up");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        rig.capture
            .entries()
            .iter()
            .all(|(_, e)| !request(e).path.starts_with(prefix)),
        "nothing arrives while the server is down"
    );
    port
}
