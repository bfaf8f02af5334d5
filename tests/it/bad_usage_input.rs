//! A backend that now and then answers with broken usage headers must cost only those
//! responses their records, never the good requests served beside them.
//!
//! Through the shipped `deploy/envoy/envoy.yaml` (`header_to_metadata` on, so header
//! bytes reach keymeter as they came) and a real mosquitto: 16 client connections send
//! 608 good requests mixed with responses whose usage headers or trailers are not
//! UTF-8 (Latin-1, as Python's `http.server` sends them), oversized, contain Envoy's
//! `!` mark, NUL or CR. Every good request's record must be on the broker, every bad
//! one must land under its documented verdict, and the access-log stream must never
//! be restarted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::support::keymeter::{Keymeter, billing, metric_sum, metric_value};
use crate::support::raw_backend::{RawBackend, with_headers, with_trailers};
use crate::support::{Envoy, EnvoyPorts, Mosquitto, TestDir, wait_until};
use keymeter::Config;
use keymeter::keys::KeyEntry;
use serde_json::{Value, json};

const KEY: &str = "sk-test-0001";
const CONNECTIONS: usize = 16;
const GOOD_REQUESTS: usize = 608;
/// How often each bad response is served.
const REPEATS: usize = 8;
const WAIT: Duration = Duration::from_secs(30);

/// What keymeter makes of a response.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// Not billed: `keymeter_usage_records_rejected_total{reason}`.
    Rejected(&'static str),
    /// Not billed: `keymeter_usage_entries_not_billed_total{reason}`.
    NotBilled(&'static str),
    /// Billed with exactly this record (no record id, no timestamp), and counted under
    /// `keymeter_usage_metadata_dropped_total{reason}` when the metadata was dropped.
    Billed(Value, Option<&'static str>),
}

struct Case {
    name: &'static str,
    response: Vec<u8>,
    /// The status the client sees.
    status: u16,
    verdict: Verdict,
}

/// The usage headers of a bad response, `module: bad` so its records (if any) are
/// told from the good ones, with `replace` swapped in.
fn bad_fields(replace: (&'static str, &[u8])) -> Vec<(&'static str, Vec<u8>)> {
    let mut fields: Vec<(&'static str, Vec<u8>)> = vec![
        ("x-billing-module", b"bad".to_vec()),
        ("x-billing-model", b"m".to_vec()),
        ("x-billing-usage", b"1".to_vec()),
    ];
    fields.retain(|(name, _)| *name != replace.0);
    fields.push((replace.0, replace.1.to_vec()));
    fields
}

fn as_refs<'a>(fields: &'a [(&'static str, Vec<u8>)]) -> Vec<(&'static str, &'a [u8])> {
    fields.iter().map(|(n, v)| (*n, v.as_slice())).collect()
}

fn in_headers(replace: (&'static str, &[u8])) -> Vec<u8> {
    with_headers(&as_refs(&bad_fields(replace)))
}

fn in_trailers(replace: (&'static str, &[u8])) -> Vec<u8> {
    with_trailers(&as_refs(&bad_fields(replace)))
}

fn billed(model: &str, metadata: Option<Value>) -> Value {
    let mut v =
        json!({"app_id": "app-1", "api_key": KEY, "module": "bad", "model": model, "usage": 1});
    if let Some(m) = metadata {
        v["metadata"] = m;
    }
    v
}

/// Every kind of bad value, in headers (moved to metadata by `header_to_metadata`,
/// raw bytes) and in trailers (logged by Envoy, which replaces bytes that are not UTF-8
/// with `!`). The verdicts are the README's rule table.
fn cases() -> Vec<Case> {
    let big = "x".repeat(9000);
    let big_metadata = format!("{{\"blob\": \"{big}\"}}");
    let latin1_records: &[u8] = b"[{\"module\": \"bad\", \"model\": \"caf\xe9\", \"usage\": 1}]";
    let c = |name, response, status, verdict| Case {
        name,
        response,
        status,
        verdict,
    };
    use Verdict::*;
    vec![
        c(
            "header model Latin-1",
            in_headers(("x-billing-model", b"caf\xe9")),
            200,
            Rejected("not_utf8"),
        ),
        c(
            "header module Latin-1",
            in_headers(("x-billing-module", b"\xe9t\xe9")),
            200,
            Rejected("not_utf8"),
        ),
        c(
            "header usage Latin-1",
            in_headers(("x-billing-usage", b"1\xe9")),
            200,
            Rejected("not_utf8"),
        ),
        c(
            "header metadata Latin-1",
            in_headers(("x-billing-metadata", b"{\"note\": \"caf\xe9\"}")),
            200,
            Billed(billed("m", None), Some("not_utf8")),
        ),
        c(
            "header records Latin-1",
            in_headers(("x-billing-records", latin1_records)),
            200,
            Rejected("not_utf8"),
        ),
        c(
            "header model with !",
            in_headers(("x-billing-model", b"caf!")),
            200,
            Rejected("not_utf8"),
        ),
        // header_to_metadata drops values of 8 KiB or more and still removes them.
        c(
            "header model 9000 B",
            in_headers(("x-billing-model", big.as_bytes())),
            200,
            Rejected("model_missing"),
        ),
        c(
            "header usage 9000 B",
            in_headers(("x-billing-usage", "1".repeat(9000).as_bytes())),
            200,
            Rejected("usage_missing"),
        ),
        c(
            "header metadata 9000 B",
            in_headers(("x-billing-metadata", big_metadata.as_bytes())),
            200,
            Billed(billed("m", None), None),
        ),
        c(
            "header records 9000 B",
            with_headers(&[("x-billing-records", format!("[{big_metadata}]").as_bytes())]),
            200,
            NotBilled("no_usage"),
        ),
        // Envoy refuses a response with NUL in a header (502 to the client).
        c(
            "header model with NUL",
            in_headers(("x-billing-model", b"ca\x00f")),
            502,
            NotBilled("no_usage"),
        ),
        // Envoy's HTTP/1 parser drops a bare CR inside a header value.
        c(
            "header model with CR",
            in_headers(("x-billing-model", b"ca\rf")),
            200,
            Billed(billed("caf", None), None),
        ),
        c(
            "trailer model Latin-1",
            in_trailers(("x-billing-model", b"caf\xe9")),
            200,
            Rejected("not_utf8"),
        ),
        c(
            "trailer usage Latin-1",
            in_trailers(("x-billing-usage", b"1\xe9")),
            200,
            Rejected("usage_not_a_number"),
        ),
        c(
            "trailer metadata Latin-1",
            in_trailers(("x-billing-metadata", b"{\"note\": \"caf\xe9\"}")),
            200,
            Billed(billed("m", Some(json!({"note": "caf!"}))), None),
        ),
        c(
            "trailer metadata 9000 B",
            in_trailers(("x-billing-metadata", big_metadata.as_bytes())),
            200,
            Billed(billed("m", None), Some("too_large")),
        ),
        c(
            "trailer records Latin-1",
            in_trailers(("x-billing-records", latin1_records)),
            200,
            Rejected("not_utf8"),
        ),
        // Envoy drops trailers holding NUL: nothing declared.
        c(
            "trailer model with NUL",
            in_trailers(("x-billing-model", b"ca\x00f")),
            200,
            NotBilled("no_usage"),
        ),
        c(
            "trailer model with CR",
            in_trailers(("x-billing-model", b"ca\rf")),
            200,
            Billed(billed("caf", None), None),
        ),
    ]
}

/// A good response: usage `1000 + i`, metadata naming `i`.
fn good(i: usize) -> Vec<u8> {
    let usage = (1000 + i).to_string();
    let metadata = format!("{{\"i\": {i}}}");
    with_headers(&[
        ("x-billing-module", b"llm"),
        ("x-billing-model", b"gpt-4"),
        ("x-billing-usage", usage.as_bytes()),
        ("x-billing-metadata", metadata.as_bytes()),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_usage_header_costs_only_its_own_record() {
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", KEY)]).await;
    let outbox = TestDir::new("outbox");
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.outbox.dir = outbox.path().to_path_buf();
    let mut keymeter = Keymeter::start_ready(config).await;
    keymeter.hold(outbox);

    let cases = Arc::new(cases());
    let responses = cases.clone();
    let backend = RawBackend::start(move |path| {
        let (kind, n) = path.trim_start_matches('/').split_once('/').unwrap();
        let n: usize = n.parse().unwrap();
        match kind {
            "good" => good(n),
            _ => responses[n].response.clone(),
        }
    })
    .await;
    // The shipped configuration, header_to_metadata included.
    let envoy = Envoy::start(EnvoyPorts {
        keymeter_grpc: keymeter.grpc_port(),
        backend: backend.port(),
    })
    .await;

    // Each connection alternates good requests and bad ones.
    let bad_total = cases.len() * REPEATS;
    let mut workers = Vec::new();
    for w in 0..CONNECTIONS {
        let url = envoy.url("");
        let cases = cases.clone();
        workers.push(tokio::spawn(async move {
            // One client per worker: its own connection to Envoy.
            let client = reqwest::Client::builder()
                .no_proxy()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let goods = (w..GOOD_REQUESTS).step_by(CONNECTIONS);
            let bads = (w..bad_total).step_by(CONNECTIONS);
            let mut statuses = Vec::new();
            for (i, j) in goods
                .map(Some)
                .zip(bads.map(Some).chain(std::iter::repeat(None)))
            {
                let i = i.unwrap();
                let r = client
                    .get(format!("{url}/good/{i}"))
                    .header("api-key", KEY)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200, "good request {i}");
                r.bytes().await.unwrap();
                if let Some(j) = j {
                    let case = j % cases.len();
                    let r = client
                        .get(format!("{url}/bad/{case}"))
                        .header("api-key", KEY)
                        .send()
                        .await
                        .unwrap();
                    statuses.push((case, r.status().as_u16()));
                    let _ = r.bytes().await;
                }
            }
            statuses
        }));
    }
    let mut served_bad: BTreeMap<usize, usize> = BTreeMap::new();
    for worker in workers {
        for (case, status) in worker.await.unwrap() {
            assert_eq!(status, cases[case].status, "{}", cases[case].name);
            *served_bad.entry(case).or_default() += 1;
        }
    }
    assert_eq!(served_bad.values().sum::<usize>(), bad_total);
    assert!(served_bad.values().all(|&n| n == REPEATS), "{served_bad:?}");

    // What the broker must get: every good record, and the bad responses that bill.
    let billed_bad: Vec<&Value> = cases
        .iter()
        .filter_map(|c| match &c.verdict {
            Verdict::Billed(v, _) => Some(v),
            _ => None,
        })
        .collect();
    let expected = GOOD_REQUESTS + billed_bad.len() * REPEATS;
    let reports = billing.wait_for_reports(expected, WAIT).await;
    let settle = billing
        .wait_for_reports(expected + 1, Duration::from_millis(500))
        .await;
    assert_eq!(settle.len(), reports.len(), "more records than expected");

    let strip = |mut v: Value| {
        let o = v.as_object_mut().unwrap();
        o.remove("timestamp");
        o.remove("record_id");
        v
    };
    let mut good_seen: HashMap<u64, usize> = HashMap::new();
    let mut bad_seen: Vec<Value> = Vec::new();
    for r in &reports {
        if r["module"] == "llm" {
            let i = r["metadata"]["i"]
                .as_u64()
                .expect("a good record keeps its metadata");
            assert_eq!(r["usage"].as_u64(), Some(1000 + i), "{r}");
            assert_eq!(
                (r["model"].as_str(), r["app_id"].as_str()),
                (Some("gpt-4"), Some("app-1"))
            );
            *good_seen.entry(i).or_default() += 1;
        } else {
            bad_seen.push(strip(r.clone()));
        }
    }
    let missing: Vec<usize> = (0..GOOD_REQUESTS)
        .filter(|i| !good_seen.contains_key(&(*i as u64)))
        .collect();
    assert!(
        missing.is_empty(),
        "good requests without a record: {missing:?}"
    );
    assert!(
        good_seen.values().all(|&n| n == 1),
        "a good request billed twice"
    );
    for v in &billed_bad {
        let want = REPEATS * billed_bad.iter().filter(|b| b == &v).count();
        let n = bad_seen.iter().filter(|b| b == v).count();
        assert_eq!(n, want, "records like {v}");
    }
    assert_eq!(bad_seen.len(), billed_bad.len() * REPEATS, "{bad_seen:?}");

    // Every bad response is counted under its reason, and nothing else is.
    let mut rejected: BTreeMap<&str, f64> = BTreeMap::new();
    let mut not_billed: BTreeMap<&str, f64> = BTreeMap::new();
    let mut dropped: BTreeMap<&str, f64> = BTreeMap::new();
    for c in cases.iter() {
        let n = REPEATS as f64;
        match c.verdict {
            Verdict::Rejected(r) => *rejected.entry(r).or_default() += n,
            Verdict::NotBilled(r) => *not_billed.entry(r).or_default() += n,
            Verdict::Billed(_, Some(r)) => *dropped.entry(r).or_default() += n,
            Verdict::Billed(_, None) => {}
        }
    }
    let metrics = keymeter.admin_get("/metrics").await.1;
    for (family, want) in [
        ("keymeter_usage_records_rejected_total", &rejected),
        ("keymeter_usage_entries_not_billed_total", &not_billed),
        ("keymeter_usage_metadata_dropped_total", &dropped),
    ] {
        for (reason, n) in want {
            let sample = format!("{family}{{reason=\"{reason}\"}}");
            assert_eq!(metric_value(&metrics, &sample), *n, "{sample}");
        }
        let total: f64 = want.values().sum();
        assert_eq!(
            metric_sum(&metrics, family),
            total,
            "{family}: only the expected reasons"
        );
    }
    println!(
        "{GOOD_REQUESTS} good and {bad_total} bad requests over {CONNECTIONS} connections: {} records, rejected {rejected:?}, not billed {not_billed:?}, metadata dropped {dropped:?}",
        reports.len()
    );

    // Nothing was skipped, nothing failed to decode, and no stream was restarted:
    // every stream ever opened is still open.
    let v = |s: &str| metric_value(&metrics, s);
    assert_eq!(
        v("keymeter_access_log_entries_skipped_total{reason=\"malformed\"}"),
        0.0
    );
    assert_eq!(v("keymeter_access_log_messages_malformed_total"), 0.0);
    assert_eq!(v("keymeter_access_log_stream_errors_total"), 0.0);
    let opened = v("keymeter_access_log_streams_opened_total");
    assert!(opened >= 1.0);
    assert_eq!(
        v("keymeter_access_log_streams"),
        opened,
        "a stream was closed"
    );
    // Envoy's side: every entry written to the stream, none dropped.
    let total_requests = (GOOD_REQUESTS + bad_total) as u64;
    assert_eq!(
        envoy.stat("access_logs.grpc_access_log.logs_dropped").await,
        0
    );
    assert_eq!(
        envoy.stat("access_logs.grpc_access_log.logs_written").await,
        total_requests
    );
    assert_eq!(
        v("keymeter_access_log_entries_total{kind=\"http\"}"),
        total_requests as f64
    );

    wait_until("the outbox drains", WAIT, || async {
        keymeter.metric("keymeter_outbox_pending_records").await == 0.0
    })
    .await;
    keymeter.assert_no_record_unaccounted().await;
    assert_eq!(
        keymeter
            .metric("keymeter_usage_records_published_total")
            .await,
        reports.len() as f64
    );
    keymeter.stop().await;
}
