//! Metering through a real Envoy and a real mosquitto: backends set usage headers (or
//! trailers), Envoy streams its access log to keymeter, and the billing system (a
//! stand-in subscribed to `billing/report`) receives exactly one record per request.

use std::collections::HashSet;
use std::time::Duration;

use crate::support::backend::{ReceivedResponse, Reply};
use crate::support::keymeter::{Keymeter, billing};
use crate::support::{
    Backend, Envoy, EnvoyPorts, Mosquitto, RecordedRequest, TestDir, http_client, wait_until,
};
use keymeter::Config;
use keymeter::clock::now_ms;
use keymeter::config::{RouteRule, StatusClass};
use keymeter::dev::billing::BillingStandIn;
use keymeter::keys::KeyEntry;
use serde_json::{Value, json};

const GOOD: &str = "sk-test-0001";
const BLOCKED: &str = "sk-blocked";
const WAIT: Duration = Duration::from_secs(20);

fn keys() -> Vec<KeyEntry> {
    vec![
        KeyEntry::ok("app-1", GOOD),
        KeyEntry::blocked("app-3", BLOCKED, "balance"),
    ]
}

/// The backend of these tests: what it bills depends on the path.
fn reply(req: &RecordedRequest) -> Reply {
    let path = req.path.split('?').next().unwrap_or_default();
    let usage = |module: &str, model: &str, usage: &str| {
        Reply::ok()
            .header("x-billing-module", module)
            .header("x-billing-model", model)
            .header("x-billing-usage", usage)
            .chunk("ok")
    };
    match path {
        "/v1/chat" => usage("llm", "gpt-4", "150").header(
            "x-billing-metadata",
            r#"{"prompt_tokens": 100, "completion_tokens": 50, "note": "héllo"}"#,
        ),
        "/v1/speech" => usage("tts", "eleven", "12"),
        // Streaming: usage known at the end, in trailers (which win over headers).
        "/v1/stream" => Reply::ok()
            .header("x-billing-module", "asr")
            .header("x-billing-model", "whisper")
            .header("x-billing-usage", "1")
            .chunk("partial transcript\n")
            .chunk("more transcript\n")
            .trailer("x-billing-usage", "37")
            .trailer("x-billing-metadata", r#"{"seconds": 37}"#),
        "/v1/combo" => Reply::ok()
            .header(
                "x-billing-records",
                r#"[{"module": "llm", "model": "gpt-4", "usage": 20, "metadata": {"prompt_tokens": 15}}, {"module": "tts", "model": "eleven", "usage": 64}]"#,
            )
            .chunk("ok"),
        "/bad/not-a-number" => usage("llm", "gpt-4", "lots"),
        "/bad/negative" => usage("llm", "gpt-4", "-5"),
        "/bad/overflow" => usage("llm", "gpt-4", "99999999999999999999"),
        "/bad/empty-model" => usage("llm", " ", "1"),
        // Bad metadata is dropped and the usage still bills.
        "/bad/metadata-array" => usage("tts", "eleven", "12").header("x-billing-metadata", "[1, 2]"),
        "/bad/metadata-huge" => {
            // Over keymeter's usage.max_metadata_bytes in that test (1 KiB), under the
            // 8 KiB at which Envoy's header_to_metadata drops a value.
            let huge = format!("{{\"blob\": \"{}\"}}", "x".repeat(2000));
            usage("tts", "eleven", "12").header("x-billing-metadata", &huge)
        }
        "/v1/search" => Reply::ok().chunk("results"),
        "/v1/search-broken" => Reply::status(503).chunk("down"),
        _ => Reply::ok().chunk("no usage here"),
    }
}

/// Envoy with the shipped config, or with it minus its `header_to_metadata` filter
/// (usage then reaches keymeter only as response headers in the access log).
async fn start_envoy(ports: EnvoyPorts, header_to_metadata: bool) -> Envoy {
    if header_to_metadata {
        Envoy::start(ports).await
    } else {
        Envoy::start_with_config(
            crate::support::envoy::render_deploy_config_without_header_to_metadata(ports),
        )
        .await
    }
}

struct Rig {
    broker: Mosquitto,
    billing: BillingStandIn,
    keymeter: Keymeter,
    _backend: Backend,
    envoy: Envoy,
}

impl Rig {
    async fn start(header_to_metadata: bool, tweak: impl FnOnce(&mut Config)) -> Rig {
        let broker = Mosquitto::start().await;
        let billing = billing(broker.port(), keys()).await;
        let outbox = TestDir::new("outbox");
        let mut config = Config::for_local_broker("127.0.0.1", broker.port());
        config.outbox.dir = outbox.path().to_path_buf();
        tweak(&mut config);
        let mut keymeter = Keymeter::start_ready(config).await;
        keymeter.hold(outbox);
        let backend = Backend::start_replying(reply).await;
        let ports = EnvoyPorts {
            keymeter_grpc: keymeter.grpc_port(),
            backend: backend.port(),
        };
        let envoy = start_envoy(ports, header_to_metadata).await;
        Rig {
            broker,
            billing,
            keymeter,
            _backend: backend,
            envoy,
        }
    }

    async fn post(&self, path: &str, key: Option<&str>) -> ReceivedResponse {
        let mut req = http_client().post(self.envoy.url(path)).body("hello world");
        if let Some(k) = key {
            req = req.header("api-key", k);
        }
        ReceivedResponse::read(req.send().await.expect("request through Envoy")).await
    }

    /// Waits for exactly `n` reports in total, then a little longer to catch extras.
    async fn reports(&self, n: usize) -> Vec<Value> {
        let got = self.billing.wait_for_reports(n, WAIT).await;
        assert!(
            got.len() >= n,
            "expected {n} reports, got {}: {got:?}",
            got.len()
        );
        // Extras would come with the same flush; the access log flushes every 100 ms.
        let settle = self
            .billing
            .wait_for_reports(n + 1, Duration::from_millis(500))
            .await;
        assert_eq!(settle.len(), n, "more reports than requests: {settle:?}");
        settle
    }

    async fn metric(&self, sample: &str) -> f64 {
        self.keymeter.metric(sample).await
    }

    /// received + replayed = published + pending + rejected, read from /metrics.
    async fn assert_identity(&self) {
        self.keymeter.assert_no_record_unaccounted().await;
    }
}

fn without_volatile(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    o.remove("timestamp");
    o.remove("record_id");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_headers_become_exactly_one_report_each_and_stay_hidden_from_clients() {
    let rig = Rig::start(true, |_| {}).await;
    let before = now_ms();
    for _ in 0..3 {
        let r = rig.post("/v1/chat", Some(GOOD)).await;
        assert_eq!(r.status, 200);
        // header_to_metadata moved them into metadata: the client never sees them.
        for h in [
            "x-billing-usage",
            "x-billing-module",
            "x-billing-model",
            "x-billing-metadata",
        ] {
            assert_eq!(r.header(h), None, "{h} leaked to the client");
        }
    }
    assert_eq!(rig.post("/v1/speech", Some(GOOD)).await.status, 200);
    let reports = rig.reports(4).await;
    let after = now_ms();

    let chat = json!({"app_id": "app-1", "api_key": GOOD, "module": "llm", "model": "gpt-4",
        "usage": 150, "metadata": {"prompt_tokens": 100, "completion_tokens": 50, "note": "héllo"}});
    let speech = json!({"app_id": "app-1", "api_key": GOOD, "module": "tts", "model": "eleven", "usage": 12});
    let bodies: Vec<Value> = reports.iter().cloned().map(without_volatile).collect();
    assert_eq!(
        bodies.iter().filter(|b| **b == chat).count(),
        3,
        "{bodies:?}"
    );
    assert_eq!(
        bodies.iter().filter(|b| **b == speech).count(),
        1,
        "{bodies:?}"
    );
    let mut ids = HashSet::new();
    for r in &reports {
        assert!(r["usage"].is_u64(), "usage is a JSON integer: {r}");
        let ts = r["timestamp"].as_i64().expect("timestamp is an integer");
        assert!(
            (before..=after).contains(&ts),
            "timestamp {ts} is when the request completed"
        );
        assert!(ids.insert(r["record_id"].as_str().expect("record id").to_string()));
    }
    assert!(
        r_has_no_metadata(&reports, "tts"),
        "empty metadata is left out"
    );
    rig.assert_identity().await;
}

fn r_has_no_metadata(reports: &[Value], module: &str) -> bool {
    reports
        .iter()
        .filter(|r| r["module"] == module)
        .all(|r| r.get("metadata").is_none())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_headers_trailers_and_several_records_per_response() {
    let rig = Rig::start(false, |_| {}).await;
    let chat = rig.post("/v1/chat", Some(GOOD)).await;
    assert_eq!(
        chat.header("x-billing-usage"),
        Some("150"),
        "no header_to_metadata here"
    );
    let stream = rig.post("/v1/stream", Some(GOOD)).await;
    assert_eq!(stream.status, 200);
    assert_eq!(stream.text(), "partial transcript\nmore transcript\n");
    assert_eq!(rig.post("/v1/combo", Some(GOOD)).await.status, 200);
    let reports = rig.reports(4).await;

    let asr: Vec<&Value> = reports.iter().filter(|r| r["module"] == "asr").collect();
    assert_eq!(asr.len(), 1);
    assert_eq!(asr[0]["usage"], 37, "trailers win over headers");
    assert_eq!(asr[0]["metadata"], json!({"seconds": 37}));
    let combo: Vec<&Value> = reports
        .iter()
        .filter(|r| r["usage"] == 20 || r["usage"] == 64)
        .collect();
    assert_eq!(combo.len(), 2, "{reports:?}");
    assert_ne!(combo[0]["record_id"], combo[1]["record_id"]);
    assert!(
        reports
            .iter()
            .any(|r| r["module"] == "llm" && r["usage"] == 150)
    );
    rig.assert_identity().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_and_keyless_requests_never_bill_and_route_defaults_do() {
    let rig = Rig::start(true, |c| {
        c.usage.routes = vec![RouteRule {
            host: None,
            path_prefix: "/v1/search".into(),
            method: Some("POST".into()),
            status: StatusClass::Success,
            module: "search".into(),
            model: "default".into(),
            usage: 1,
        }];
    })
    .await;
    assert_eq!(rig.post("/v1/chat", Some(BLOCKED)).await.status, 403);
    assert_eq!(rig.post("/v1/chat", Some("sk-unknown")).await.status, 401);
    assert_eq!(rig.post("/v1/chat", None).await.status, 401);
    // A route default bills a successful search; a failed one (503) is not billed.
    assert_eq!(rig.post("/v1/search?q=rust", Some(GOOD)).await.status, 200);
    assert_eq!(rig.post("/v1/search-broken", Some(GOOD)).await.status, 503);
    // An allowed request whose backend declares nothing.
    assert_eq!(rig.post("/other", Some(GOOD)).await.status, 200);

    let reports = rig.reports(1).await;
    assert_eq!(
        without_volatile(reports[0].clone()),
        json!({"app_id": "app-1", "api_key": GOOD, "module": "search", "model": "default", "usage": 1})
    );
    wait_until("every entry is accounted for", WAIT, || async {
        rig.metric("keymeter_access_log_entries_total{kind=\"http\"}")
            .await
            == 6.0
    })
    .await;
    assert_eq!(
        rig.metric("keymeter_usage_entries_not_billed_total{reason=\"denied\"}")
            .await,
        3.0
    );
    assert_eq!(
        rig.metric("keymeter_usage_entries_not_billed_total{reason=\"no_usage\"}")
            .await,
        2.0
    );
    rig.assert_identity().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_usage_values_are_rejected_and_counted_while_good_ones_still_bill() {
    // The shipped config (header_to_metadata on), metadata limited to 1 KiB.
    let rig = Rig::start(true, |c| c.usage.max_metadata_bytes = 1024).await;
    let rejected = [
        ("/bad/not-a-number", "usage_not_a_number"),
        ("/bad/negative", "usage_negative"),
        ("/bad/overflow", "usage_overflow"),
        ("/bad/empty-model", "model_missing"),
    ];
    let metadata_dropped = [
        ("/bad/metadata-array", "not_object"),
        ("/bad/metadata-huge", "too_large"),
    ];
    for path in rejected.iter().chain(&metadata_dropped).map(|(p, _)| p) {
        assert_eq!(rig.post("/v1/speech", Some(GOOD)).await.status, 200);
        assert_eq!(
            rig.post(path, Some(GOOD)).await.status,
            200,
            "the client is served either way"
        );
    }
    // Every good request bills, and so do the two with bad metadata, without it.
    let n = rejected.len() + 2 * metadata_dropped.len();
    let reports = rig.reports(n).await;
    assert!(reports.iter().all(|r| r["module"] == "tts"), "{reports:?}");
    assert!(r_has_no_metadata(&reports, "tts"), "{reports:?}");
    for (path, reason) in rejected {
        let n = rig
            .metric(&format!(
                "keymeter_usage_records_rejected_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert_eq!(n, 1.0, "{path} counted as {reason}");
    }
    for (path, reason) in metadata_dropped {
        let n = rig
            .metric(&format!(
                "keymeter_usage_metadata_dropped_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert_eq!(n, 1.0, "{path} counted as {reason}");
    }
    rig.assert_identity().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_made_while_the_broker_is_down_are_delivered_after_it_returns() {
    let mut rig = Rig::start(true, |c| c.mqtt.reconnect_max_secs = 1).await;
    assert_eq!(rig.post("/v1/speech", Some(GOOD)).await.status, 200);
    rig.reports(1).await;

    rig.broker.stop().await;
    const DOWN: usize = 20;
    for _ in 0..DOWN {
        assert_eq!(
            rig.post("/v1/chat", Some(GOOD)).await.status,
            200,
            "Checks keep working"
        );
    }
    wait_until("records wait in the outbox", WAIT, || async {
        rig.metric("keymeter_outbox_pending_records").await == DOWN as f64
    })
    .await;
    assert!(
        rig.metric("keymeter_outbox_oldest_unpublished_age_seconds")
            .await
            >= 0.0
    );
    rig.broker.start_again().await;

    let reports = rig.reports(1 + DOWN).await;
    let ids: HashSet<&str> = reports
        .iter()
        .map(|r| r["record_id"].as_str().unwrap())
        .collect();
    let duplicates = reports.len() - ids.len();
    println!(
        "broker outage: {DOWN} records made while down, {} delivered, {duplicates} duplicates",
        reports.len() - 1
    );
    assert_eq!(duplicates, 0);
    wait_until("outbox drained", WAIT, || async {
        rig.metric("keymeter_outbox_pending_records").await == 0.0
    })
    .await;
    rig.assert_identity().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_pending_at_a_graceful_stop_are_delivered_after_the_restart() {
    let outbox = TestDir::new("outbox");
    let mut broker = Mosquitto::start().await;
    let billing = billing(broker.port(), keys()).await;
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.outbox.dir = outbox.path().to_path_buf();
    config.mqtt.reconnect_max_secs = 1;
    let keymeter = Keymeter::start_ready(config.clone()).await;
    let backend = Backend::start_replying(reply).await;
    let grpc = keymeter.grpc_port();
    let envoy = Envoy::start(EnvoyPorts {
        keymeter_grpc: grpc,
        backend: backend.port(),
    })
    .await;
    broker.stop().await;
    const PENDING: usize = 10;
    for _ in 0..PENDING {
        let r = http_client()
            .post(envoy.url("/v1/chat"))
            .header("api-key", GOOD)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    wait_until("records wait in the outbox", WAIT, || async {
        keymeter.metric("keymeter_outbox_pending_records").await == PENDING as f64
    })
    .await;
    keymeter.assert_no_record_unaccounted().await;
    keymeter.stop().await; // graceful: what a SIGTERM does
    broker.start_again().await;

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", grpc))
        .await
        .unwrap();
    let mut keymeter = Keymeter::start_on(listener, config).await;
    keymeter.hold(outbox);
    let reports = billing.wait_for_reports(PENDING, WAIT).await;
    assert_eq!(reports.len(), PENDING, "{reports:?}");
    let ids: HashSet<&str> = reports
        .iter()
        .map(|r| r["record_id"].as_str().unwrap())
        .collect();
    println!(
        "restart: {PENDING} pending records, {} delivered, {} duplicates",
        reports.len(),
        reports.len() - ids.len()
    );
    assert_eq!(ids.len(), PENDING);
    assert_eq!(
        keymeter
            .metric("keymeter_outbox_replayed_records_total")
            .await,
        PENDING as f64
    );
    wait_until("the outbox drains", WAIT, || async {
        keymeter.metric("keymeter_outbox_pending_records").await == 0.0
    })
    .await;
    keymeter.assert_no_record_unaccounted().await;
    keymeter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_api_records_usage_for_valid_keys_only() {
    use keymeter::proto::v1::usage_client::UsageClient;
    use keymeter::proto::v1::{ReportRequest, UsageRecord};
    let rig = Rig::start(true, |_| {}).await;
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://127.0.0.1:{}",
        rig.keymeter.grpc_port()
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut client = UsageClient::new(channel);
    let call = |key: Option<&str>, records: Vec<UsageRecord>| {
        let mut req = tonic::Request::new(ReportRequest { records });
        if let Some(k) = key {
            req.metadata_mut().insert("api-key", k.parse().unwrap());
        }
        req
    };
    // Work that finished an hour ago (within usage.report_max_age_secs).
    let finished = now_ms() - 3_600_000;
    let record = |usage: u64, idem: &str| UsageRecord {
        module: "batch".into(),
        model: "nightly-embeddings".into(),
        usage,
        metadata_json: r#"{"documents": 1200}"#.into(),
        timestamp_ms: finished,
        idempotency_key: idem.into(),
    };

    let ids = client
        .report(call(
            Some(GOOD),
            vec![record(1200, "job-42"), record(3, "")],
        ))
        .await
        .expect("accepted")
        .into_inner()
        .record_ids;
    assert_eq!(ids.len(), 2);
    let reports = rig.reports(2).await;
    let job = reports.iter().find(|r| r["usage"] == 1200).unwrap();
    assert_eq!(
        without_volatile(job.clone()),
        json!({"app_id": "app-1", "api_key": GOOD, "module": "batch", "model": "nightly-embeddings",
               "usage": 1200, "metadata": {"documents": 1200}})
    );
    assert_eq!(job["timestamp"], finished);
    assert_eq!(job["record_id"], ids[0]);

    // The same idempotency key gives the same record id and records nothing new.
    let again = client
        .report(call(Some(GOOD), vec![record(1200, "job-42")]))
        .await
        .unwrap()
        .into_inner()
        .record_ids;
    assert_eq!(again[0], ids[0]);

    let denied = |r: Result<tonic::Response<_>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        denied(client.report(call(None, vec![record(1, "")])).await),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        denied(
            client
                .report(call(Some("sk-unknown"), vec![record(1, "")]))
                .await
        ),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        denied(
            client
                .report(call(Some(BLOCKED), vec![record(1, "")]))
                .await
        ),
        tonic::Code::PermissionDenied
    );
    let mut bad = record(1, "");
    bad.metadata_json = "[1]".into();
    let status = client
        .report(call(Some(GOOD), vec![record(5, ""), bad]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("metadata_not_object"),
        "{}",
        status.message()
    );
    // Nothing of the retry nor of the rejected call was recorded: the first two only.
    let all = rig.reports(2).await;
    assert!(all.iter().all(|r| r["usage"] != 5));
    rig.assert_identity().await;
}

/// Envoy turns bytes that are not UTF-8 into '!' before logging them; such a value is
/// rejected as `not_utf8` and the requests around it in the same stream still bill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_usage_headers_are_rejected_and_the_stream_carries_on() {
    use axum::body::Body;
    use axum::http::{HeaderValue, Response};
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), keys()).await;
    let backend = Backend::start_with(|req: &RecordedRequest| {
        let model = if req.path.starts_with("/bad") {
            HeaderValue::from_bytes(b"gpt-\xff\xfe").unwrap()
        } else {
            HeaderValue::from_static("gpt-4")
        };
        Response::builder()
            .header("x-billing-module", "llm")
            .header("x-billing-model", model)
            .header("x-billing-usage", "3")
            .body(Body::from("ok"))
            .unwrap()
    })
    .await;
    // The shipped config hands the raw bytes over as metadata; without
    // header_to_metadata Envoy logs the header with `!` for each bad byte.
    let mut billed = 0;
    for header_to_metadata in [true, false] {
        let keymeter =
            Keymeter::start_ready(Config::for_local_broker("127.0.0.1", broker.port())).await;
        let ports = EnvoyPorts {
            keymeter_grpc: keymeter.grpc_port(),
            backend: backend.port(),
        };
        let envoy = start_envoy(ports, header_to_metadata).await;
        for path in ["/good/1", "/bad/1", "/good/2"] {
            let r = http_client()
                .post(envoy.url(path))
                .header("api-key", GOOD)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
        }
        billed += 2;
        let reports = billing.wait_for_reports(billed, WAIT).await;
        wait_until("the bad value is counted", WAIT, || async {
            keymeter
                .metric("keymeter_usage_records_rejected_total{reason=\"not_utf8\"}")
                .await
                == 1.0
        })
        .await;
        assert_eq!(reports.len(), billed, "{reports:?}");
        assert!(reports.iter().all(|r| r["model"] == "gpt-4"), "{reports:?}");
        wait_until("the outbox drains", WAIT, || async {
            keymeter.metric("keymeter_outbox_pending_records").await == 0.0
        })
        .await;
        keymeter.assert_no_record_unaccounted().await;
        keymeter.stop().await;
    }
}
