//! Faults keymeter must survive without losing an accepted record: a SIGKILL after the
//! Report API acknowledged records, and an exhausted outbox budget (new records are
//! refused loudly while Checks keep working).

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use keymeter::Config;
use keymeter::keys::KeyEntry;
use keymeter::proto::v1::usage_client::UsageClient;
use keymeter::proto::v1::{ReportRequest, UsageRecord};
use support::keymeter::{Keymeter, billing, check, http_status};
use support::{ChildGuard, Mosquitto, TestDir, binary, free_port, wait_until};

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
/// ready without the broker.
fn keymeter_binary(dir: &TestDir, broker_port: u16, grpc: u16, admin: u16) -> Command {
    let keys = dir.path().join("keys.json");
    binary::write_keys(&keys, vec![KeyEntry::ok("app-1", GOOD)]);
    let config = binary::write_config(
        dir.path(),
        (grpc, admin),
        broker_port,
        "reconnect_max_secs = 1",
        &format!(
            "[keys]\nfile = \"{}\"\n[outbox]\ndir = \"{}\"\n[log]\nformat = \"json\"\n",
            keys.display(),
            dir.path().join("outbox").display()
        ),
    );
    binary::command(&config)
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
        keymeter_binary(&dir, broker.port(), grpc, admin),
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

/// A full outbox refuses new records (Report API: RESOURCE_EXHAUSTED; metric and log)
/// without dropping stored ones, and Checks keep being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_outbox_budget_refuses_new_records_and_checks_go_on() {
    let mut broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", GOOD)]).await;
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.outbox.max_bytes = 1 << 20;
    config.outbox.segment_bytes = 64 << 10;
    config.mqtt.reconnect_max_secs = 1;
    let keymeter = Keymeter::start_ready(config).await;
    broker.stop().await;
    wait_until("keymeter sees the broker gone", WAIT, || async {
        keymeter.metric("keymeter_mqtt_connected").await == 0.0
    })
    .await;

    // ~7 KiB records, 16 per call: the 1 MiB budget is full after a handful of calls.
    let metadata = format!("{{\"blob\": \"{}\"}}", "x".repeat(7000));
    let mut client = report_client(keymeter.grpc_port()).await;
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
    let full = keymeter
        .metric("keymeter_usage_records_rejected_total{reason=\"outbox_full\"}")
        .await;
    assert_eq!(full, 16.0, "the refused call's records are counted");
    let budget = keymeter.metric("keymeter_outbox_budget_bytes").await;
    let disk = keymeter.metric("keymeter_outbox_disk_bytes").await;
    assert!(disk > 0.8 * budget, "disk {disk} of budget {budget}");
    // Checks do not depend on the outbox.
    assert_eq!(
        http_status(&check(keymeter.grpc_port(), &[("api-key", GOOD)]).await),
        200
    );
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-nope")]).await),
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
