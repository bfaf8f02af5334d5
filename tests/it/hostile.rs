//! Hostile input, at keymeter's gRPC port directly and through a real Envoy.
//!
//! - Garbage, truncated, lying and oversized gRPC messages on all three methods (Check,
//!   the access-log stream, the Report API) each get a gRPC status, never a dropped
//!   connection or a hang: broken gRPC framing is INTERNAL and a message over
//!   `listen.max_message_bytes` OUT_OF_RANGE on every method; content that does not
//!   decode is a deny answer (400) on Check, INTERNAL on Report, and counted on the
//!   access-log stream, which goes on ([`content_refusal_on`]). keymeter keeps serving
//!   afterwards.
//! - CheckRequests that decode but are nonsense are denied (401), not errors.
//! - Hostile HTTP requests through Envoy (huge headers, thousands of headers, non-UTF-8
//!   keys, a key in both header names, a repeated key header) are refused by Envoy or
//!   denied by keymeter, never reach the backend unless allowed, and keymeter's
//!   counters add up afterwards.
//!
//! The malformed messages are written frame by frame with `h2` (a gRPC client would
//! refuse to send them): a gRPC message is 1 flag byte (0: not compressed), a 4-byte
//! big-endian length, then the protobuf payload.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::backend::Reply;
use crate::support::keymeter::{
    Keymeter, billing, check, check_request, http_status, metric_sum, metric_value,
};
use crate::support::{
    Backend, Envoy, EnvoyPorts, Mosquitto, TestDir, free_port, http_client, wait_until,
};
use bytes::Bytes;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::data::accesslog::v3::{
    HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, Identifier, LogEntries,
};
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse,
    attribute_context::{HttpRequest, Request as AttrRequest},
};
use envoy_types::pb::google::protobuf::UInt32Value;
use keymeter::Config;
use keymeter::keys::KeyEntry;
use keymeter::proto::v1::{ReportRequest, ReportResponse, UsageRecord};
use prost::Message;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tonic::Code;
use tonic::codegen::http;

const GOOD: &str = "sk-hostile-0001";
const UNKNOWN: &str = "sk-hostile-unknown";
/// `listen.max_message_bytes` in these tests: the smallest value keymeter accepts.
const LIMIT: usize = 256 << 10;
const WAIT: Duration = Duration::from_secs(20);

const CHECK: &str = "/envoy.service.auth.v3.Authorization/Check";
const ACCESS_LOG: &str = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs";
const REPORT: &str = "/keymeter.v1.Usage/Report";

// ---------------------------------------------------------------------------------
// Raw gRPC over HTTP/2
// ---------------------------------------------------------------------------------

/// How a raw gRPC call ended, as the client saw it.
#[derive(Debug)]
struct Answer {
    /// The `grpc-status` (trailers, or headers of a trailers-only answer); `None` when
    /// the call ended without one (a transport error, described in `message`).
    code: Option<Code>,
    message: String,
    /// The response messages' bytes (frames included), for OK answers.
    body: Vec<u8>,
}

impl Answer {
    fn code(&self) -> Code {
        self.code
            .unwrap_or_else(|| panic!("no grpc-status, the call failed: {}", self.message))
    }

    fn summary(&self) -> String {
        let code = self
            .code
            .map_or("no status".to_string(), |c| format!("{c:?}"));
        let message: String = self.message.chars().take(70).collect();
        format!("{code}: {message}")
    }

    /// The single response message of an OK unary answer.
    fn decode<M: Message + Default>(&self) -> M {
        assert_eq!(self.code(), Code::Ok, "{}", self.message);
        let (payload, rest) = unframe(&self.body);
        assert!(rest.is_empty(), "one response message");
        M::decode(payload).expect("response decodes")
    }
}

/// One gRPC message frame: flag 0, the big-endian `length`, then `payload` (which may
/// be shorter than `length`: a lying prefix).
fn frame_claiming(length: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(0);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A correctly framed message.
fn frame(payload: &[u8]) -> Vec<u8> {
    frame_claiming(u32::try_from(payload.len()).unwrap(), payload)
}

fn unframe(body: &[u8]) -> (&[u8], &[u8]) {
    assert!(body.len() >= 5, "a framed message: {body:?}");
    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    body[5..].split_at(len)
}

/// Sends `body` as the request body of a gRPC call to `path` on one fresh HTTP/2
/// connection, ending the request stream after it if `end_stream`, and returns how the
/// call ended. `metadata` values are raw bytes (gRPC metadata = HTTP/2 headers).
async fn raw_grpc(
    port: u16,
    path: &str,
    metadata: &[(&str, &[u8])],
    body: Vec<u8>,
    end_stream: bool,
) -> Answer {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to keymeter's gRPC port");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.expect("h2 connection ready");
    let mut request = http::Request::post(format!("http://127.0.0.1:{port}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in metadata {
        request = request.header(*name, http::HeaderValue::from_bytes(value).unwrap());
    }
    let (response, mut send) = client
        .send_request(request.body(()).unwrap(), false)
        .expect("open the stream");
    // h2 buffers the data and sends it as flow control allows.
    send.send_data(Bytes::from(body), end_stream)
        .expect("queue the body");
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(response))
        .await
        .unwrap_or_else(|_| panic!("keymeter answers {path} within 10 s"));
    // Only now: the request stream stays open (when not ended) until the answer is in.
    drop(send);
    driver.abort();
    answer
}

async fn read_answer(response: h2::client::ResponseFuture) -> Answer {
    let failed = |what: &str, e: h2::Error| Answer {
        code: None,
        message: format!("{what}: {e}"),
        body: Vec::new(),
    };
    let response = match response.await {
        Ok(r) => r,
        Err(e) => return failed("response", e),
    };
    let http_status = response.status();
    // A trailers-only answer (every error tonic returns before a message).
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return Answer {
            code: Some(status.code()),
            message: status.message().to_string(),
            body: Vec::new(),
        };
    }
    let mut stream = response.into_body();
    let mut body = Vec::new();
    while let Some(chunk) = stream.data().await {
        match chunk {
            Ok(chunk) => {
                let _ = stream.flow_control().release_capacity(chunk.len());
                body.extend_from_slice(&chunk);
            }
            Err(e) => return failed("body", e),
        }
    }
    match stream.trailers().await {
        Ok(Some(trailers)) => match tonic::Status::from_header_map(&trailers) {
            Some(status) => Answer {
                code: Some(status.code()),
                message: status.message().to_string(),
                body,
            },
            None => Answer {
                code: None,
                message: format!("trailers without grpc-status (HTTP {http_status})"),
                body,
            },
        },
        Ok(None) => Answer {
            code: None,
            message: format!("no trailers (HTTP {http_status})"),
            body,
        },
        Err(e) => failed("trailers", e),
    }
}

// ---------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------

/// `len` bytes from xorshift64* seeded with `seed`: the same garbage on every run.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// Random bytes that prost itself refuses to decode as `M` (the first seed from
/// `seed` on whose bytes it fails), so the server cannot see a valid message in them.
fn garbage_for<M: Message + Default>(seed: u64) -> Vec<u8> {
    (seed..seed + 100)
        .map(|s| random_bytes(s, 1024))
        .find(|b| M::decode(&b[..]).is_err())
        .expect("random bytes that do not decode")
}

/// The first half of `message`'s encoding, checked to be undecodable.
fn truncated<M: Message + Default>(message: &M) -> Vec<u8> {
    let mut bytes = message.encode_to_vec();
    bytes.truncate(bytes.len() / 2);
    assert!(
        M::decode(&bytes[..]).is_err(),
        "the cut falls inside a field"
    );
    bytes
}

/// `build(pad)` for the `pad` at which its encoding is exactly `target` bytes.
fn sized<M: Message>(target: usize, build: impl Fn(usize) -> M) -> Vec<u8> {
    let mut pad = target;
    for _ in 0..8 {
        let bytes = build(pad).encode_to_vec();
        if bytes.len() == target {
            return bytes;
        }
        pad = (pad + target).checked_sub(bytes.len()).expect("pad fits");
    }
    panic!("no padding gives exactly {target} bytes");
}

/// A Check with an unknown key and a `x-pad` header of `pad` bytes.
fn padded_check(pad: usize) -> CheckRequest {
    check_request(&[("api-key", UNKNOWN), ("x-pad", &"p".repeat(pad))])
}

/// An access-log message as Envoy sends it first on a stream: the identifier and one
/// entry, for a request that ext_authz denied (so it bills nothing), whose logged
/// `user-agent` is `pad` bytes long.
fn access_log_message(pad: usize) -> StreamAccessLogsMessage {
    let entry = HttpAccessLogEntry {
        request: Some(HttpRequestProperties {
            path: "/v1/hostile".into(),
            request_headers: HashMap::from([
                ("api-key".to_string(), UNKNOWN.to_string()),
                ("user-agent".to_string(), "u".repeat(pad)),
            ]),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: 401 }),
            response_code_details: "ext_authz_denied".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    StreamAccessLogsMessage {
        identifier: Some(Identifier {
            node: Some(Node {
                id: "hostile-test".into(),
                ..Default::default()
            }),
            log_name: "keymeter".into(),
        }),
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![entry],
        })),
    }
}

/// A Report with one record whose idempotency key is `pad` bytes long.
fn report_request(pad: usize) -> ReportRequest {
    ReportRequest {
        records: vec![UsageRecord {
            module: "batch".into(),
            model: "hostile".into(),
            usage: 7,
            metadata_json: r#"{"job": "hostile"}"#.into(),
            timestamp_ms: 0,
            idempotency_key: "i".repeat(pad),
        }],
    }
}

fn print_table(title: &str, header: (&str, &str, &str), rows: &[(String, String, String)]) {
    let w0 = rows.iter().map(|r| r.0.len()).chain([header.0.len()]).max();
    let w1 = rows.iter().map(|r| r.1.len()).chain([header.1.len()]).max();
    let (w0, w1) = (w0.unwrap_or(0), w1.unwrap_or(0));
    println!("\n{title}");
    println!("{:<w0$} | {:<w1$} | {}", header.0, header.1, header.2);
    println!(
        "{}-+-{}-+-{}",
        "-".repeat(w0),
        "-".repeat(w1),
        "-".repeat(40)
    );
    for (a, b, c) in rows {
        println!("{a:<w0$} | {b:<w1$} | {c}");
    }
}

/// The status keymeter answers on `path` to a well-framed message whose content does
/// not decode: the Report API answers INTERNAL; a Check is answered with a deny (an
/// error would leave the decision to Envoy's `failure_mode_allow`); the access-log
/// stream counts the message, uses what it can of it and goes on, so that one bad
/// message cannot cost the entries behind it (it ends normally when the client ends it).
fn content_refusal_on(path: &str) -> Code {
    if path == REPORT {
        Code::Internal
    } else {
        Code::Ok
    }
}

/// keymeter on a key file (no broker needed: nothing listens on its MQTT port).
async fn keymeter_with_key_file(max_message_bytes: usize) -> Keymeter {
    let dir = TestDir::new("hostile-keys");
    let keys = dir.path().join("keys.json");
    crate::support::keymeter::write_keys(&keys, vec![KeyEntry::ok("app-1", GOOD)]);
    let mut config = Config::for_local_broker("127.0.0.1", free_port());
    config.keys.file = Some(keys);
    config.listen.max_message_bytes = max_message_bytes;
    let mut keymeter = Keymeter::start_ready(config).await;
    keymeter.hold(dir);
    keymeter
}

// ---------------------------------------------------------------------------------
// 1. gRPC garbage at keymeter directly
// ---------------------------------------------------------------------------------

/// Every malformed message on every method gets a gRPC status within 10 s (broken
/// framing: INTERNAL; one byte over `max_message_bytes`: OUT_OF_RANGE, also when only
/// the 5-byte header claiming 1 GiB has arrived; content: see [`content_refusal_on`]). A message of exactly `max_message_bytes` is still decoded, nothing
/// malformed reaches a handler's counters, and keymeter keeps answering correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_garbage_gets_clean_errors_and_keymeter_keeps_serving() {
    let keymeter = keymeter_with_key_file(LIMIT).await;
    let port = keymeter.grpc_port();
    let key: &[u8] = GOOD.as_bytes();
    let unknown: &[u8] = UNKNOWN.as_bytes();

    struct Method {
        name: &'static str,
        path: &'static str,
        /// `api-key` metadata sent with every call of this method.
        key: Option<&'static [u8]>,
        random: Vec<u8>,
        truncated: Vec<u8>,
        valid: Vec<u8>,
        at_limit: Vec<u8>,
        over_limit: Vec<u8>,
    }
    let methods = [
        Method {
            name: "Check",
            path: CHECK,
            key: None,
            random: garbage_for::<CheckRequest>(1),
            truncated: truncated(&padded_check(300)),
            valid: check_request(&[("api-key", GOOD)]).encode_to_vec(),
            at_limit: sized(LIMIT, padded_check),
            over_limit: sized(LIMIT + 1, padded_check),
        },
        Method {
            name: "StreamAccessLogs",
            path: ACCESS_LOG,
            key: None,
            random: garbage_for::<StreamAccessLogsMessage>(1),
            truncated: truncated(&access_log_message(300)),
            valid: access_log_message(10).encode_to_vec(),
            at_limit: sized(LIMIT, access_log_message),
            over_limit: sized(LIMIT + 1, access_log_message),
        },
        Method {
            name: "Report",
            path: REPORT,
            key: Some(key),
            random: garbage_for::<ReportRequest>(1),
            truncated: truncated(&report_request(300)),
            valid: report_request(10).encode_to_vec(),
            at_limit: sized(LIMIT, report_request),
            over_limit: sized(LIMIT + 1, report_request),
        },
    ];

    // (method, what was sent, the answer, the expected status)
    let mut seen: Vec<(&str, String, Answer, Code)> = Vec::new();
    for m in &methods {
        let metadata: Vec<(&str, &[u8])> = m.key.iter().map(|k| ("api-key", *k)).collect();
        let call = |body: Vec<u8>, end_stream: bool| {
            let metadata = metadata.clone();
            async move { raw_grpc(port, m.path, &metadata, body, end_stream).await }
        };
        // (a) random bytes, properly framed.
        let a = call(frame(&m.random), true).await;
        if m.path == CHECK {
            assert_eq!(http_status(&a.decode::<CheckResponse>()), 400, "a deny");
        }
        seen.push((
            m.name,
            "random bytes (1 KiB)".into(),
            a,
            content_refusal_on(m.path),
        ));
        // (b) a valid message cut in half, framed with its cut length.
        let a = call(frame(&m.truncated), true).await;
        if m.path == CHECK {
            assert_eq!(http_status(&a.decode::<CheckResponse>()), 400, "a deny");
        }
        let case = "valid message cut in half".into();
        seen.push((m.name, case, a, content_refusal_on(m.path)));
        // (c) the length prefix claims 1000 bytes, 10 follow, then the stream ends:
        // broken gRPC framing is a transport fault on every method.
        let a = call(frame_claiming(1000, &m.random[..10]), true).await;
        let case = "length prefix 1000, body 10, end".into();
        seen.push((m.name, case, a, Code::Internal));
        // (c') a frame header cut short: 3 of its 5 bytes.
        let a = call(vec![0, 0, 0], true).await;
        let case = "frame header cut (3 of 5 bytes)".into();
        seen.push((m.name, case, a, Code::Internal));
        // (d) a valid message one byte over the limit, sent whole.
        let a = call(frame(&m.over_limit), true).await;
        let case = format!("valid message, {} B (limit + 1)", LIMIT + 1);
        seen.push((m.name, case, a, Code::OutOfRange));
        // (d') only a header claiming 1 GiB, the stream left open: refused without
        // waiting for (or buffering) a body.
        let a = call(frame_claiming(1 << 30, &[]), false).await;
        let case = "header claims 1 GiB, no body, open".into();
        seen.push((m.name, case, a, Code::OutOfRange));

        // A message of exactly the limit is decoded and answered by the handler:
        // Check denies its unknown key, the access log takes its entry, Report refuses
        // the unknown key (which it looks at only after decoding).
        let case = format!("valid message, {LIMIT} B (= limit)");
        let a = if m.path == REPORT {
            raw_grpc(
                port,
                m.path,
                &[("api-key", unknown)],
                frame(&m.at_limit),
                true,
            )
            .await
        } else {
            call(frame(&m.at_limit), true).await
        };
        if m.path == CHECK {
            assert_eq!(http_status(&a.decode::<CheckResponse>()), 401);
        }
        let expected = if m.path == REPORT {
            Code::Unauthenticated
        } else {
            Code::Ok
        };
        seen.push((m.name, case, a, expected));

        // After all of it, a valid message on a fresh connection is served normally.
        let a = call(frame(&m.valid), true).await;
        match m.path {
            CHECK => assert_eq!(http_status(&a.decode::<CheckResponse>()), 200),
            REPORT => assert_eq!(a.decode::<ReportResponse>().record_ids.len(), 1),
            _ => {}
        }
        seen.push((m.name, "valid message afterwards".into(), a, Code::Ok));
    }

    // A valid access-log message, garbage, and a valid one again on the same stream:
    // both valid ones are processed, the garbage is counted, the stream goes on.
    let mut body = frame(&access_log_message(10).encode_to_vec());
    body.extend(frame(&methods[1].random));
    body.extend(frame(&access_log_message(10).encode_to_vec()));
    let a = raw_grpc(port, ACCESS_LOG, &[], body, true).await;
    let case = "valid, random bytes, valid".into();
    seen.push(("StreamAccessLogs", case, a, Code::Ok));

    // Report: a key that is not visible ASCII in the first header name, the valid key
    // in the second: the first is a wrong key, as it is for a Check through Envoy.
    let a = raw_grpc(
        port,
        REPORT,
        &[("api-key", b"sk-\xff\xfe"), ("apikey", key)],
        frame(&report_request(10).encode_to_vec()),
        true,
    )
    .await;
    let case = "api-key non-UTF-8 + apikey valid".into();
    seen.push(("Report", case, a, Code::Unauthenticated));

    let rows: Vec<_> = seen
        .iter()
        .map(|(method, case, a, expected)| {
            (
                method.to_string(),
                case.clone(),
                format!("{} (expected {expected:?})", a.summary()),
            )
        })
        .collect();
    print_table(
        "gRPC garbage straight at keymeter (max_message_bytes = 256 KiB)",
        ("method", "sent", "gRPC status: message"),
        &rows,
    );
    for (method, case, a, expected) in &seen {
        assert_eq!(a.code(), *expected, "{method}, {case}: {}", a.message);
        if a.code() == Code::OutOfRange {
            assert!(a.message.contains("too large"), "{}", a.message);
        }
    }

    // keymeter is alive and correct.
    assert_eq!(keymeter.admin_get("/healthz").await.0, 200);
    assert_eq!(keymeter.readyz().await.0, 200);
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", GOOD)]).await),
        200
    );
    assert_eq!(
        http_status(&keymeter.check(&[("apikey", UNKNOWN)]).await),
        401
    );

    // Only the decodable Checks reached the handler: per method, the one at the limit
    // (unknown key) and the valid one; then the two above.
    let (_, metrics) = keymeter.admin_get("/metrics").await;
    let checks = |outcome: &str| {
        metric_value(
            &metrics,
            &format!("keymeter_check_requests_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(checks("allowed"), 2.0, "{metrics}");
    assert_eq!(checks("invalid_key"), 2.0);
    assert_eq!(checks("missing_key"), 0.0);
    assert_eq!(checks("malformed"), 2.0, "random bytes and the cut message");
    // Access log: the at-limit message, the valid one, the two around the garbage.
    // The three messages that break (random twice, cut in half) are counted, and
    // nothing of them was taken for an entry.
    assert_eq!(
        metric_value(&metrics, "keymeter_access_log_entries_total{kind=\"http\"}"),
        4.0,
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "keymeter_usage_entries_not_billed_total{reason=\"denied\"}"
        ),
        4.0
    );
    assert_eq!(
        metric_value(&metrics, "keymeter_access_log_messages_malformed_total"),
        3.0
    );
    // Only the transport faults ended streams: (c), (c'), (d), (d').
    assert_eq!(
        metric_value(&metrics, "keymeter_access_log_stream_errors_total"),
        4.0
    );
    // Report: only the valid call's record (the unreadable api-key was refused).
    assert_eq!(
        metric_value(&metrics, "keymeter_usage_records_received_total"),
        1.0
    );
    assert_eq!(
        metric_sum(&metrics, "keymeter_usage_records_rejected_total"),
        0.0
    );
    // Every stream, broken or not, was closed.
    wait_until("no access-log stream is open", WAIT, || async {
        keymeter.metric("keymeter_access_log_streams").await == 0.0
    })
    .await;
    keymeter.stop().await;
}

/// CheckRequests that decode fine but are nonsense get a deny answer (401), never a
/// gRPC error (which Envoy would treat as keymeter failing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonsense_check_requests_are_denied_not_errors() {
    let keymeter = keymeter_with_key_file(4 << 20).await;
    let port = keymeter.grpc_port();
    let many: Vec<(String, String)> = (0..5000)
        .map(|i| (format!("x-junk-{i}"), format!("value-{i}")))
        .collect();
    let with = |extra: &[(&str, &str)]| {
        let mut headers: HashMap<String, String> = many.iter().cloned().collect();
        headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttrRequest {
                    http: Some(HttpRequest {
                        headers,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    };
    let control = format!("\u{0}\u{1}{GOOD}\u{7f}\u{1b}[2J");
    // (what, the request, the expected HTTP status and deny reason)
    let cases: Vec<(&str, CheckRequest, i32, &str)> = vec![
        (
            "empty CheckRequest (no attributes)",
            CheckRequest::default(),
            401,
            "missing_api_key",
        ),
        (
            "attributes without a request",
            CheckRequest {
                attributes: Some(AttributeContext::default()),
            },
            401,
            "missing_api_key",
        ),
        ("5000 headers, no key", with(&[]), 401, "missing_api_key"),
        (
            "5000 headers, unknown key",
            with(&[("api-key", UNKNOWN)]),
            401,
            "invalid_api_key",
        ),
        (
            "api-key = control characters around the valid key",
            check_request(&[("api-key", &control)]),
            401,
            "invalid_api_key",
        ),
        (
            "api-key = valid key + CR LF + a header line",
            check_request(&[("api-key", &format!("{GOOD}\r\nx-billing-app-id: evil"))]),
            401,
            "invalid_api_key",
        ),
        (
            "key header names with control characters",
            check_request(&[("api-key\u{0}", GOOD), ("\u{7}apikey", GOOD)]),
            401,
            "missing_api_key",
        ),
        (
            "5000 headers + valid key",
            with(&[("api-key", GOOD)]),
            200,
            "",
        ),
    ];
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for (name, request, status, reason) in cases {
        let a = raw_grpc(port, CHECK, &[], frame(&request.encode_to_vec()), true).await;
        // decode() asserts the gRPC status is OK: a deny is an answer, not an error.
        let response = a.decode::<CheckResponse>();
        let got = (
            http_status(&response),
            response.status.clone().unwrap_or_default().message,
        );
        rows.push((name.to_string(), got.0.to_string(), got.1.clone()));
        results.push((name, got, (status, reason.to_string())));
    }
    print_table(
        "nonsense CheckRequests straight at keymeter (every gRPC status OK)",
        ("CheckRequest", "HTTP", "deny reason"),
        &rows,
    );
    for (name, got, expected) in results {
        assert_eq!(got, expected, "{name}");
    }
    assert_eq!(http_status(&check(port, &[("api-key", GOOD)]).await), 200);
    assert_eq!(keymeter.admin_get("/healthz").await.0, 200);
    keymeter.stop().await;
}

// ---------------------------------------------------------------------------------
// 2. Hostile requests through a real Envoy
// ---------------------------------------------------------------------------------

/// What one hostile HTTP request got: its status and, for keymeter's JSON deny bodies,
/// their `error`; or the client's error.
type Got = Result<(u16, String), String>;

fn outcome(got: &Got) -> String {
    match got {
        Ok((status, error)) => format!("{status} {error}"),
        Err(e) => format!("error: {e}"),
    }
}

async fn send(envoy: &Envoy, headers: Vec<(&str, HeaderValue)>) -> Got {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        // append: a name given twice is sent twice.
        map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), value);
    }
    let response = http_client()
        .get(envoy.url("/v1/hostile"))
        .headers(map)
        .send()
        .await
        .map_err(|e| format!("{e:?}").chars().take(120).collect::<String>())?;
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    let error = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_default();
    Ok((status, error))
}

/// Hostile requests through the deployed Envoy config: what Envoy refuses (oversized
/// headers: 431) never reaches keymeter; what reaches keymeter is decided cleanly
/// (200/401, never 5xx); afterwards keymeter answers normally and its Check, access-log
/// and record counters add up exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_through_envoy_are_refused_cleanly() {
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", GOOD)]).await;
    let keymeter =
        Keymeter::start_ready(Config::for_local_broker("127.0.0.1", broker.port())).await;
    // Every request that reaches the backend bills one unit.
    let backend = Backend::start_replying(|_| {
        Reply::ok()
            .header("x-billing-module", "llm")
            .header("x-billing-model", "gpt-4")
            .header("x-billing-usage", "1")
            .chunk("ok")
    })
    .await;
    let envoy = Envoy::start(EnvoyPorts {
        keymeter_grpc: keymeter.grpc_port(),
        backend: backend.port(),
    })
    .await;

    let v = |s: &str| HeaderValue::from_str(s).unwrap();
    let good = || ("api-key", v(GOOD));
    let names: Vec<String> = (0..2000).map(|i| format!("x-hostile-{i}")).collect();
    let mut many_headers = vec![good()];
    many_headers.extend(names.iter().map(|n| (n.as_str(), v("1"))));
    let mut non_utf8_valid = GOOD.as_bytes().to_vec();
    non_utf8_valid.extend_from_slice(b"\xff\xfe");

    // (request, its headers, the expected status, who decided and why)
    type Case<'a> = (&'a str, Vec<(&'a str, HeaderValue)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "valid key (baseline)",
            vec![good()],
            200,
            "keymeter: allowed",
        ),
        (
            "valid key + 64 KiB header value",
            vec![good(), ("x-hostile", v(&"a".repeat(64 << 10)))],
            431,
            "Envoy: over max_request_headers_kb (60); no Check",
        ),
        (
            "valid key + 2000 headers",
            many_headers,
            431,
            "Envoy: over max_headers_count (100); no Check",
        ),
        (
            "api-key of 50 KiB (under Envoy's 60 KiB)",
            vec![("api-key", v(&"k".repeat(50 << 10)))],
            401,
            "keymeter: invalid_key",
        ),
        (
            "api-key non-UTF-8 bytes",
            vec![(
                "api-key",
                HeaderValue::from_bytes(b"\xc3\x28\xff\xfe\x80").unwrap(),
            )],
            401,
            "keymeter: invalid_key (Envoy turns bad bytes into \"!\")",
        ),
        (
            "api-key = valid key + non-UTF-8 bytes",
            vec![("api-key", HeaderValue::from_bytes(&non_utf8_valid).unwrap())],
            401,
            "keymeter: invalid_key (`<key>!!`)",
        ),
        (
            "api-key valid + apikey invalid",
            vec![good(), ("apikey", v(UNKNOWN))],
            200,
            "keymeter: api-key wins, allowed",
        ),
        (
            "api-key invalid + apikey valid",
            vec![("api-key", v(UNKNOWN)), ("apikey", v(GOOD))],
            401,
            "keymeter: api-key wins, invalid_key",
        ),
        (
            "api-key valid, sent twice",
            vec![good(), good()],
            401,
            "keymeter: invalid_key (Envoy joins the two with \",\")",
        ),
        (
            "api-key = NBSP + valid key + NBSP",
            vec![("api-key", v(&format!("\u{a0}{GOOD}\u{a0}")))],
            401,
            "keymeter: invalid_key (only ASCII spaces and tabs are padding)",
        ),
        (
            "api-key empty + apikey valid",
            vec![("api-key", v("")), ("apikey", v(GOOD))],
            200,
            "keymeter: empty api-key skipped, apikey used",
        ),
        (
            "valid key (afterwards)",
            vec![good()],
            200,
            "keymeter: allowed",
        ),
    ];
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for (name, headers, expected, why) in cases {
        let got = send(&envoy, headers).await;
        rows.push((name.to_string(), outcome(&got), why.to_string()));
        results.push((name, got, expected));
    }
    print_table(
        "hostile requests through Envoy (deploy/envoy/envoy.yaml)",
        ("request", "answer", "decided by"),
        &rows,
    );
    for (name, got, expected) in &results {
        let (status, error) = got.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(status, expected, "{name}");
        if *status == 401 {
            // keymeter saw a key, and it was not a valid one.
            assert_eq!(error, "invalid_api_key", "{name}");
        }
    }
    let count = |status: u16| {
        results
            .iter()
            .filter(|(_, got, _)| got.as_ref().is_ok_and(|(s, _)| *s == status))
            .count()
    };
    let (allowed, denied, refused_by_envoy) = (count(200), count(401), count(431));
    assert_eq!(allowed + denied + refused_by_envoy, results.len());

    // keymeter is fine and its counters add up.
    assert_eq!(keymeter.admin_get("/healthz").await.0, 200);
    assert_eq!(keymeter.readyz().await.0, 200);
    assert_eq!(
        backend.requests().len(),
        allowed,
        "only allowed requests reached the backend"
    );
    assert!(
        backend
            .requests()
            .iter()
            .all(|r| r.header("x-billing-app-id") == Some("app-1"))
    );
    let reports = billing.wait_for_reports(allowed, WAIT).await;
    assert!(
        reports
            .iter()
            .all(|r| r["app_id"] == "app-1" && r["api_key"] == GOOD),
        "{reports:?}"
    );
    let metric = |text: &str, sample: &str| metric_value(text, sample);
    let (_, text) = keymeter.admin_get("/metrics").await;
    let check = |outcome: &str| {
        metric(
            &text,
            &format!("keymeter_check_requests_total{{outcome=\"{outcome}\"}}"),
        )
    };
    // Every request Envoy did not refuse itself was checked exactly once.
    assert_eq!(check("allowed"), allowed as f64, "{text}");
    assert_eq!(check("invalid_key"), denied as f64);
    assert_eq!(check("missing_key") + check("blocked_key"), 0.0);
    // Envoy logs every request, the ones it refused with 431 too; keymeter counts each
    // entry once.
    wait_until("every access-log entry is counted", WAIT, || async {
        keymeter
            .metric("keymeter_access_log_entries_total{kind=\"http\"}")
            .await
            == results.len() as f64
    })
    .await;
    let not_billed = |text: &str, reason: &str| {
        metric(
            text,
            &format!("keymeter_usage_entries_not_billed_total{{reason=\"{reason}\"}}"),
        )
    };
    // Allowed requests bill once; denied ones are not billed as denied; the ones
    // Envoy refused are logged without their headers (no key), so they never bill.
    wait_until("every record is published", WAIT, || async {
        keymeter
            .metric("keymeter_usage_records_published_total")
            .await
            == allowed as f64
    })
    .await;
    let (_, text) = keymeter.admin_get("/metrics").await;
    let entries = metric(&text, "keymeter_access_log_entries_total{kind=\"http\"}");
    let not_billed_total = metric_sum(&text, "keymeter_usage_entries_not_billed_total");
    let received = metric(&text, "keymeter_usage_records_received_total");
    let published = metric(&text, "keymeter_usage_records_published_total");
    let pending = metric(&text, "keymeter_outbox_pending_records");
    let rejected = metric_sum(&text, "keymeter_usage_records_rejected_total");
    println!(
        "keymeter after the hostile requests: checks allowed={} invalid_key={}, \
         access-log entries={entries} (not billed {not_billed_total}), records received={received} \
         published={published} pending={pending} rejected={rejected}, reports on the broker={}",
        check("allowed"),
        check("invalid_key"),
        billing.reports().len()
    );
    assert_eq!(not_billed(&text, "denied"), denied as f64, "{text}");
    assert_eq!(not_billed(&text, "no_key"), refused_by_envoy as f64);
    assert_eq!(
        not_billed(&text, "unknown_key") + not_billed(&text, "no_usage"),
        0.0
    );
    assert_eq!(received, allowed as f64, "one record per allowed request");
    assert_eq!(received, published + pending + rejected, "record identity");
    assert_eq!(rejected, 0.0);
    assert_eq!(
        entries,
        received + not_billed_total,
        "every entry is billed or not billed for a reason"
    );
    assert_eq!(billing.reports().len(), allowed);
    keymeter.stop().await;
}
