//! A raw API key never reaches a log line, a metric or a deny body, even at `trace`
//! level: the real binary runs a whole end-to-end flow through Envoy (allowed, unknown,
//! blocked and missing keys, metered responses, the Report API, key updates good and
//! malformed) and every line it wrote is searched for every key it saw.

use std::time::Duration;

use crate::support::backend::Reply;
use crate::support::keymeter::{billing, check, http_status, try_check};
use crate::support::{
    Backend, ChildGuard, Envoy, EnvoyPorts, Mosquitto, TestDir, binary, free_port, http_client,
};
use keymeter::keys::KeyEntry;
use keymeter::proto::v1::usage_client::UsageClient;
use keymeter::proto::v1::{ReportRequest, UsageRecord};

const GOOD: &str = "sk-secret-good-4f8a2c";
const BLOCKED: &str = "sk-secret-blocked-77d1e0";
const UNKNOWN: &str = "sk-secret-unknown-a9b3c5";
const ADDED: &str = "sk-secret-added-later-0e6d";
const IN_BAD_UPDATE: &str = "sk-secret-in-bad-update-51c2";
const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_raw_key_in_trace_logs_metrics_or_deny_bodies() {
    let dir = TestDir::new("nokeylogs");
    let broker = Mosquitto::start().await;
    let billing = billing(
        broker.port(),
        vec![
            KeyEntry::ok("app-1", GOOD),
            KeyEntry::blocked("app-2", BLOCKED, "balance"),
        ],
    )
    .await;
    let (grpc, admin) = (free_port(), free_port());
    let config = binary::write_config(
        dir.path(),
        (grpc, admin),
        broker.port(),
        "",
        &format!(
            "[keys]\nsnapshot = \"{}\"\n[outbox]\ndir = \"{}\"\n\
             [log]\nformat = \"json\"\nlevel = \"trace\"\n",
            dir.path().join("snapshot.json").display(),
            dir.path().join("outbox").display(),
        ),
    );
    let mut keymeter = ChildGuard::spawn("keymeter", binary::command(&config), dir.path());
    keymeter
        .wait_for("keys from the billing system", WAIT, || async {
            try_check(grpc, &[("api-key", GOOD)])
                .await
                .is_some_and(|r| http_status(&r) == 200)
        })
        .await;

    let backend = Backend::start_replying(|_| {
        Reply::ok()
            .header("x-billing-module", "llm")
            .header("x-billing-model", "gpt-4")
            .header("x-billing-usage", "5")
            .chunk("ok")
    })
    .await;
    let envoy = Envoy::start(EnvoyPorts {
        keymeter_grpc: grpc,
        backend: backend.port(),
    })
    .await;
    let mut bodies = String::new();
    for headers in [
        vec![("api-key", GOOD)],
        vec![("apikey", GOOD)],
        vec![("api-key", BLOCKED)],
        vec![("api-key", UNKNOWN)],
        vec![],
    ] {
        let mut req = http_client().post(envoy.url("/v1/chat"));
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let body = r.text().await.unwrap();
        if status != 200 {
            bodies.push_str(&body);
        }
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut report = tonic::Request::new(ReportRequest {
        records: vec![UsageRecord {
            module: "batch".into(),
            model: "m".into(),
            usage: 1,
            ..Default::default()
        }],
    });
    report
        .metadata_mut()
        .insert("api-key", GOOD.parse().unwrap());
    UsageClient::new(channel.clone())
        .report(report)
        .await
        .expect("report accepted");
    let mut denied = tonic::Request::new(ReportRequest::default());
    denied
        .metadata_mut()
        .insert("api-key", UNKNOWN.parse().unwrap());
    let status = UsageClient::new(channel).report(denied).await.unwrap_err();
    bodies.push_str(status.message());

    // A key in a skipped entry and in a message rejected whole (it stops mid-JSON);
    // the good update goes last, so once it applies the two before were handled.
    for bad in [
        format!(
            r#"{{"updates": [{{"app_id": 5, "api_key": "{IN_BAD_UPDATE}", "status": "ok"}}], "timestamp": 1}}"#
        ),
        format!(r#"{{"updates": [{{"app_id": "a", "api_key": "{IN_BAD_UPDATE}", "status": "ok"}}"#),
    ] {
        billing
            .publish_raw("billing/keys/update", bad.into_bytes())
            .await
            .unwrap();
    }
    billing
        .publish_update(vec![KeyEntry::ok("app-3", ADDED)])
        .await
        .unwrap();
    keymeter
        .wait_for("the added key works", WAIT, || async {
            http_status(&check(grpc, &[("api-key", ADDED)]).await) == 200
        })
        .await;
    let reports = billing.wait_for_reports(3, WAIT).await;
    assert_eq!(
        reports.len(),
        3,
        "two metered requests and one report: {reports:?}"
    );
    let metrics = get_text(format!("http://127.0.0.1:{admin}/metrics")).await;
    let readyz = get_text(format!("http://127.0.0.1:{admin}/readyz")).await;
    let exit = keymeter.terminate(Duration::from_secs(10)).await;
    assert!(exit.success());

    let logs = std::fs::read_to_string(keymeter.stderr_log()).unwrap()
        + &std::fs::read_to_string(keymeter.stdout_log()).unwrap();
    let lines = logs.lines().count();
    assert!(lines > 100, "trace logging is on: only {lines} lines");
    assert!(
        logs.contains("rejected billing key update"),
        "the malformed update was seen"
    );
    assert!(
        logs.contains("skipped unusable entries of a billing key update"),
        "the entry without a usable app id was seen"
    );
    for key in [GOOD, BLOCKED, UNKNOWN, ADDED, IN_BAD_UPDATE] {
        for (what, text) in [
            ("logs", &logs),
            ("metrics", &metrics),
            ("readyz", &readyz),
            ("deny bodies", &bodies),
        ] {
            let hit = text.lines().find(|l| l.contains(key));
            assert!(hit.is_none(), "raw key {key} in {what}: {hit:?}");
        }
    }
    println!("searched {lines} log lines at trace level: no raw key");
}

async fn get_text(url: String) -> String {
    let response = http_client().get(url).send().await.unwrap();
    response.text().await.unwrap()
}
