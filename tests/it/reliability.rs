//! Faults keymeter must survive without losing an accepted record: a SIGKILL after the
//! Report API acknowledged records, fsyncs that block or fail under the Report API
//! (injected by an `LD_PRELOAD` layer), and an exhausted outbox budget (new records are
//! refused loudly while Checks keep working).

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use crate::support::fsync_fault::{FsyncFault, FsyncMode};
use crate::support::keymeter::{billing, check, http_status, metric};
use crate::support::{ChildGuard, Mosquitto, TestDir, binary, free_port, wait_until};
use keymeter::keys::KeyEntry;
use keymeter::proto::v1::usage_client::UsageClient;
use keymeter::proto::v1::{ReportRequest, UsageRecord};

const GOOD: &str = "sk-reliable-0001";
const WAIT: Duration = Duration::from_secs(20);

async fn report_client(grpc: u16) -> UsageClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{grpc}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    UsageClient::new(channel)
}

fn report(records: Vec<UsageRecord>) -> tonic::Request<ReportRequest> {
    let mut req = tonic::Request::new(ReportRequest { records });
    req.metadata_mut().insert("api-key", GOOD.parse().unwrap());
    req
}

fn record(usage: u64, idempotency_key: String, metadata_json: String) -> UsageRecord {
    UsageRecord {
        module: "batch".into(),
        model: "nightly".into(),
        usage,
        metadata_json,
        timestamp_ms: 0,
        idempotency_key,
    }
}

/// The `keymeter` binary with a config file; keys come from a local file so it is
/// ready without the broker. Its outbox is `dir/outbox`, with `outbox` settings added.
fn keymeter_binary(
    dir: &TestDir,
    broker_port: u16,
    (grpc, admin): (u16, u16),
    outbox: &str,
) -> Command {
    let keys = dir.path().join("keys.json");
    crate::support::keymeter::write_keys(&keys, vec![KeyEntry::ok("app-1", GOOD)]);
    let config = binary::write_config(
        dir.path(),
        (grpc, admin),
        broker_port,
        "reconnect_max_secs = 1",
        &format!(
            "[keys]\nfile = \"{}\"\n[outbox]\ndir = \"{}\"\n{outbox}\n[log]\nformat = \"json\"\n",
            keys.display(),
            dir.path().join("outbox").display()
        ),
    );
    binary::command(&config)
}

/// The JSON log line of `process` whose message contains `needle`.
fn log_line(process: &ChildGuard, needle: &str) -> serde_json::Value {
    let logs = process.logs();
    let line = logs
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no log line with {needle:?}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
}

/// The Report API answers only once records are fsynced: a SIGKILL right after loses
/// none of them, and the restarted keymeter delivers every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_acknowledged_by_the_report_api_survive_sigkill() {
    let dir = TestDir::new("sigkill");
    let mut broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![]).await;
    // The broker is down while records are reported: they can only be in the outbox.
    broker.stop().await;
    let (grpc, admin) = (free_port(), free_port());
    let mut keymeter = ChildGuard::spawn(
        "keymeter",
        keymeter_binary(&dir, broker.port(), (grpc, admin), ""),
        dir.path(),
    );
    binary::wait_ready(&mut keymeter, admin, WAIT).await;

    let mut client = report_client(grpc).await;
    let mut acknowledged = HashSet::new();
    for call in 0..50 {
        let records = (0..4)
            .map(|i| record(1 + i, format!("job-{call}-{i}"), String::new()))
            .collect();
        let ids = client
            .report(report(records))
            .await
            .expect("accepted")
            .into_inner()
            .record_ids;
        acknowledged.extend(ids);
    }
    keymeter.kill(); // SIGKILL: no shutdown, no flush
    assert_eq!(acknowledged.len(), 200);

    broker.start_again().await;
    keymeter.start();
    binary::wait_ready(&mut keymeter, admin, WAIT).await;
    let reports = billing.wait_for_reports(acknowledged.len(), WAIT).await;
    let delivered: Vec<&str> = reports
        .iter()
        .filter_map(|r| r["record_id"].as_str())
        .collect();
    let unique: HashSet<&str> = delivered.iter().copied().collect();
    let missing: Vec<&String> = acknowledged
        .iter()
        .filter(|id| !unique.contains(id.as_str()))
        .collect();
    println!(
        "SIGKILL: {} acknowledged, {} delivered, {} duplicates, {} missing",
        acknowledged.len(),
        delivered.len(),
        delivered.len() - unique.len(),
        missing.len()
    );
    assert!(missing.is_empty(), "lost acknowledged records: {missing:?}");
}

/// The Report API answers only once its records are fsynced, which a SIGKILL cannot
/// tell from the page cache: here fsyncs of the outbox are held, then failed, under the
/// real binary (an `LD_PRELOAD` layer). A held fsync holds the answer; a failed one is
/// an error (never OK), counted and logged, and the refused records are not published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_api_answers_only_after_fsync_and_refuses_when_fsync_fails() {
    let dir = TestDir::new("report-fsync");
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![]).await;
    let (grpc, admin) = (free_port(), free_port());
    let fault = FsyncFault::new(
        &dir.path().join("fsync-control"),
        &dir.path().join("outbox"),
    );
    let mut command = keymeter_binary(&dir, broker.port(), (grpc, admin), "");
    fault.apply(&mut command);
    let mut keymeter = ChildGuard::spawn("keymeter", command, dir.path());
    binary::wait_ready(&mut keymeter, admin, WAIT).await;
    let mut client = report_client(grpc).await;

    // Every fsync under the outbox blocks: the call waits for its segment's.
    let mut held_client = client.clone();
    fault
        .answers_only_after_fsync(
            async move {
                held_client
                    .report(report(vec![record(1, "held".into(), String::new())]))
                    .await
            },
            Duration::from_millis(500),
        )
        .await
        .expect("answered once the fsync returned");

    // Every fsync fails: the call is refused, counted and logged.
    fault.set(FsyncMode::Fail);
    let refused = (0..2)
        .map(|i| record(2, format!("refused-{i}"), String::new()))
        .collect();
    let status = client.report(report(refused)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(metric(admin, "keymeter_outbox_fsync_errors_total").await > 0.0);
    let refused_records = "keymeter_usage_records_rejected_total{reason=\"outbox_error\"}";
    assert_eq!(metric(admin, refused_records).await, 2.0);
    keymeter.wait_for_log("outbox fsync failed", WAIT).await;
    let line = log_line(&keymeter, "outbox fsync failed");
    assert_eq!(line["level"], "ERROR", "{line}");
    assert!(
        line["dir"].as_str().is_some_and(|d| d.ends_with("outbox")),
        "{line}"
    );

    // The disk is back: calls succeed again. The refused records are never published;
    // the accepted ones, before and after them, are.
    fault.set(FsyncMode::Pass);
    let after = client
        .report(report(vec![record(3, "after".into(), String::new())]))
        .await
        .expect("accepted again")
        .into_inner()
        .record_ids;
    wait_until(
        "the record reported after the failure arrives",
        WAIT,
        || {
            let arrived = billing
                .reports()
                .iter()
                .any(|r| r["record_id"] == after[0].as_str());
            std::future::ready(arrived)
        },
    )
    .await;
    // A set: a QoS 1 repeat of an accepted record is allowed, a refused record is not.
    let usages: HashSet<u64> = billing
        .reports()
        .iter()
        .filter_map(|r| r["usage"].as_u64())
        .collect();
    assert_eq!(
        usages,
        HashSet::from([1, 3]),
        "records of the refused call were published"
    );
    println!(
        "fsync fault: {} fsync calls seen, {} failed",
        fault.calls().len(),
        fault.calls().iter().filter(|c| c.ok == Some(false)).count()
    );
}

/// A full outbox refuses new records (Report API: RESOURCE_EXHAUSTED; metric and an
/// error log line) without dropping stored ones, and Checks keep being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_outbox_budget_refuses_new_records_and_checks_go_on() {
    let dir = TestDir::new("budget");
    let mut broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![]).await;
    let (grpc, admin) = (free_port(), free_port());
    let budget = "max_bytes = 1048576\nsegment_bytes = 65536";
    let mut keymeter = ChildGuard::spawn(
        "keymeter",
        keymeter_binary(&dir, broker.port(), (grpc, admin), budget),
        dir.path(),
    );
    binary::wait_ready(&mut keymeter, admin, WAIT).await;
    wait_until("keymeter connects to the broker", WAIT, || async {
        metric(admin, "keymeter_mqtt_connected").await == 1.0
    })
    .await;
    broker.stop().await;
    wait_until("keymeter sees the broker gone", WAIT, || async {
        metric(admin, "keymeter_mqtt_connected").await == 0.0
    })
    .await;

    // ~7 KiB records, 16 per call: the 1 MiB budget is full after a handful of calls.
    let metadata = format!("{{\"blob\": \"{}\"}}", "x".repeat(7000));
    let mut client = report_client(grpc).await;
    let mut accepted = 0;
    let mut refused = None;
    for call in 0..40 {
        let records = (0..16)
            .map(|i| record(1, format!("fill-{call}-{i}"), metadata.clone()))
            .collect();
        match client.report(report(records)).await {
            Ok(r) => accepted += r.into_inner().record_ids.len(),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("the budget fills up");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(accepted > 0);
    let full = metric(
        admin,
        "keymeter_usage_records_rejected_total{reason=\"outbox_full\"}",
    )
    .await;
    assert_eq!(full, 16.0, "the refused call's records are counted");
    let budget = metric(admin, "keymeter_outbox_budget_bytes").await;
    let disk = metric(admin, "keymeter_outbox_disk_bytes").await;
    assert!(disk > 0.8 * budget, "disk {disk} of budget {budget}");
    // The operator is told, at error level, with the numbers and no key.
    let message = "outbox full: usage records rejected";
    keymeter.wait_for_log(message, WAIT).await;
    let line = log_line(&keymeter, message);
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["max_bytes"], 1_048_576, "{line}");
    assert!(line["needed"].as_u64().unwrap() > line["available"].as_u64().unwrap());
    assert!(!keymeter.logs().contains(GOOD), "a raw key in the logs");
    // Checks do not depend on the outbox.
    assert_eq!(http_status(&check(grpc, &[("api-key", GOOD)]).await), 200);
    assert_eq!(
        http_status(&check(grpc, &[("api-key", "sk-nope")]).await),
        401
    );

    // When the broker is back, everything stored is delivered and space frees up.
    broker.start_again().await;
    let reports = billing.wait_for_reports(accepted, WAIT).await;
    assert_eq!(reports.len(), accepted);
    let records = (0..16)
        .map(|i| record(1, format!("after-{i}"), String::new()))
        .collect();
    client
        .report(report(records))
        .await
        .expect("accepted again");
    println!("outbox budget: {accepted} records stored, next call refused with {status:?}");
}
