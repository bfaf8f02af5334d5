//! Only Envoy and the billing system can move money: what a caller that is neither can
//! and cannot do to keymeter, through real processes.
//!
//! - A forged access-log entry that bills a key to another app is refused.
//! - The Report API is no key oracle, shares the Check's brute-force guard, and
//!   refuses timestamps outside its window.
//! - With `listen.report` the Report API has a port of its own that serves nothing else.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::keymeter::{Keymeter, billing};
use crate::support::{Mosquitto, TestDir, wait_until};
use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries,
};
use envoy_types::pb::google::protobuf::{Struct, Timestamp, UInt32Value, Value, value::Kind};
use keymeter::Config;
use keymeter::clock::now_ms;
use keymeter::config::InvalidKeyLimit;
use keymeter::keys::{KeyEntry, fingerprint};
use keymeter::proto::v1::usage_client::UsageClient;
use keymeter::proto::v1::{ReportRequest, UsageRecord};
use tonic::Code;

const GOOD: &str = "sk-test-0001";
const OTHER: &str = "sk-other-0002";
const WAIT: Duration = Duration::from_secs(15);

fn keys() -> Vec<KeyEntry> {
    vec![KeyEntry::ok("app-1", GOOD), KeyEntry::ok("app-2", OTHER)]
}

fn strings(pairs: &[(&str, &str)]) -> Struct {
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

/// An entry as Envoy would log a request allowed by the Check: the Check's metadata
/// (`app_id`, `key_fp`) and usage headers.
fn entry(path: &str, app_id: &str, key: &str, usage: &str) -> HttpAccessLogEntry {
    let fp = fingerprint(key);
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            start_time: Some(Timestamp {
                seconds: now_ms() / 1000,
                nanos: 0,
            }),
            metadata: Some(Metadata {
                filter_metadata: HashMap::from([(
                    "envoy.filters.http.ext_authz".to_string(),
                    strings(&[("app_id", app_id), ("key_fp", &fp)]),
                )]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        request: Some(HttpRequestProperties {
            path: path.into(),
            request_id: format!("forged-{path}"),
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: 200 }),
            response_code_details: "via_upstream".into(),
            response_headers: HashMap::from([
                ("x-billing-module".to_string(), "llm".to_string()),
                ("x-billing-model".to_string(), "gpt-4".to_string()),
                ("x-billing-usage".to_string(), usage.to_string()),
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Anyone who reaches the plaintext gRPC port can open an access-log stream; an entry
/// whose Check metadata names another app than the key's is refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_access_log_entry_for_another_app_bills_nothing() {
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), keys()).await;
    let keymeter =
        Keymeter::start_ready(Config::for_local_broker("127.0.0.1", broker.port())).await;
    let mut client =
        AccessLogServiceClient::connect(format!("http://127.0.0.1:{}", keymeter.grpc_port()))
            .await
            .unwrap();
    let message = StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![
                // GOOD's fingerprint, billed to app-2: not what a Check allowed.
                entry("/forged", "app-2", GOOD, "999999"),
                // The control: what Envoy logs for an allowed request.
                entry("/real", "app-1", GOOD, "7"),
            ],
        })),
    };
    client
        .stream_access_logs(tokio_stream::iter(vec![message]))
        .await
        .unwrap();
    let reports = billing.wait_for_reports(1, WAIT).await;
    wait_until("the forged entry is counted", WAIT, || async {
        keymeter
            .metric("keymeter_usage_entries_not_billed_total{reason=\"app_mismatch\"}")
            .await
            == 1.0
    })
    .await;
    assert_eq!(
        billing
            .wait_for_reports(2, Duration::from_millis(500))
            .await
            .len(),
        1
    );
    assert_eq!(reports[0]["usage"], 7);
    assert_eq!(reports[0]["app_id"], "app-1");
    keymeter.stop().await;
}

fn report(key: Option<&str>, records: Vec<UsageRecord>) -> tonic::Request<ReportRequest> {
    let mut request = tonic::Request::new(ReportRequest { records });
    if let Some(k) = key {
        request.metadata_mut().insert("api-key", k.parse().unwrap());
    }
    request
}

fn record(usage: u64, timestamp_ms: i64) -> UsageRecord {
    UsageRecord {
        module: "batch".into(),
        model: "embeddings".into(),
        usage,
        timestamp_ms,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_api_is_no_key_oracle_and_guards_like_the_check() {
    let broker = Mosquitto::start().await;
    let _billing = billing(broker.port(), keys()).await;
    let outbox = TestDir::new("outbox");
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.outbox.dir = outbox.path().to_path_buf();
    config.check.invalid_key_limit = Some(InvalidKeyLimit {
        max_attempts: 3,
        window_secs: 60,
        max_clients: 100,
        ..Default::default()
    });
    config.usage.report_max_age_secs = 24 * 3600;
    let mut keymeter = Keymeter::start_ready(config).await;
    keymeter.hold(outbox);
    let mut client = UsageClient::connect(format!("http://127.0.0.1:{}", keymeter.grpc_port()))
        .await
        .unwrap();
    let code = |r: Result<tonic::Response<_>, tonic::Status>| match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    };

    // An empty call says nothing about the key: the same answer for every key.
    for key in [Some(GOOD), Some("sk-guess"), None] {
        assert_eq!(
            code(client.report(report(key, vec![])).await),
            Code::InvalidArgument,
            "{key:?}"
        );
    }

    // Timestamps: within the window, or refused (and nothing of the call recorded).
    let now = now_ms();
    for (ts, want) in [
        (now - 3_600_000, Code::Ok),
        (0, Code::Ok),
        (now - 25 * 3_600_000, Code::InvalidArgument),
        (now + 3_600_000, Code::InvalidArgument),
        (-1, Code::InvalidArgument),
    ] {
        let got = code(client.report(report(Some(GOOD), vec![record(1, ts)])).await);
        assert_eq!(got, want, "timestamp {ts}");
    }
    assert_eq!(
        keymeter
            .metric("keymeter_usage_records_received_total")
            .await,
        2.0
    );

    // Invalid keys count against the caller's address, as for Checks: the fourth
    // within the window is refused outright; a valid key from there still works.
    for attempt in 1..=3 {
        let got = code(
            client
                .report(report(Some("sk-guess"), vec![record(1, 0)]))
                .await,
        );
        assert_eq!(got, Code::Unauthenticated, "attempt {attempt}");
    }
    let status = client
        .report(report(Some("sk-guess"), vec![record(1, 0)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(
        status.message().contains("too_many_invalid_keys"),
        "{}",
        status.message()
    );
    assert_eq!(
        code(client.report(report(Some(GOOD), vec![record(1, 0)])).await),
        Code::Ok
    );
    keymeter.stop().await;
}

/// A record's time in the outbox is counted from when keymeter took it, not from the
/// work's own timestamp: a report of yesterday's work does not look like a backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_ages_records_from_when_keymeter_took_them() {
    let mut broker = Mosquitto::start().await;
    let _billing = billing(broker.port(), keys()).await;
    let keymeter =
        Keymeter::start_ready(Config::for_local_broker("127.0.0.1", broker.port())).await;
    broker.stop().await;
    let mut client = UsageClient::connect(format!("http://127.0.0.1:{}", keymeter.grpc_port()))
        .await
        .unwrap();
    let yesterday = now_ms() - 24 * 3_600_000;
    client
        .report(report(Some(GOOD), vec![record(5, yesterday)]))
        .await
        .unwrap();
    wait_until("the record waits in the outbox", WAIT, || async {
        keymeter.metric("keymeter_outbox_pending_records").await == 1.0
    })
    .await;
    let age = keymeter
        .metric("keymeter_outbox_oldest_unpublished_age_seconds")
        .await;
    assert!(age < 60.0, "aged {age} s");
    keymeter.stop().await;
}

/// A retry with the same idempotency key, also after a restart, gets the original
/// record ids and records nothing new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_report_records_nothing_new_even_after_a_restart() {
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), keys()).await;
    let outbox = TestDir::new("outbox");
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.outbox.dir = outbox.path().to_path_buf();
    let keymeter = Keymeter::start_ready(config.clone()).await;
    let with_key = |usage: u64, key: &str| UsageRecord {
        idempotency_key: key.into(),
        ..record(usage, 0)
    };
    let call = || {
        report(
            Some(GOOD),
            vec![with_key(10, "job-1"), with_key(20, "job-2"), record(30, 0)],
        )
    };
    let mut client = UsageClient::connect(format!("http://127.0.0.1:{}", keymeter.grpc_port()))
        .await
        .unwrap();
    let first = client.report(call()).await.unwrap().into_inner().record_ids;
    assert_eq!(billing.wait_for_reports(3, WAIT).await.len(), 3);

    // The retry: the keyed records are not recorded again, the unkeyed one is new.
    let second = client.report(call()).await.unwrap().into_inner().record_ids;
    assert_eq!(second[..2], first[..2]);
    assert_ne!(second[2], first[2]);
    assert_eq!(billing.wait_for_reports(4, WAIT).await.len(), 4);
    keymeter.stop().await;

    let mut keymeter = Keymeter::start_ready(config).await;
    keymeter.hold(outbox);
    let mut client = UsageClient::connect(format!("http://127.0.0.1:{}", keymeter.grpc_port()))
        .await
        .unwrap();
    let third = client
        .report(report(
            Some(GOOD),
            vec![with_key(10, "job-1"), with_key(40, "job-3")],
        ))
        .await
        .unwrap()
        .into_inner()
        .record_ids;
    assert_eq!(third[0], first[0], "remembered across the restart");
    let reports = billing.wait_for_reports(5, WAIT).await;
    let settle = billing
        .wait_for_reports(6, Duration::from_millis(500))
        .await;
    assert_eq!(settle.len(), 5, "{reports:?}");
    let usages: Vec<u64> = settle
        .iter()
        .map(|r| r["usage"].as_u64().unwrap())
        .collect();
    assert_eq!(usages.iter().filter(|u| **u == 10).count(), 1, "{usages:?}");
    assert_eq!(usages.iter().filter(|u| **u == 40).count(), 1, "{usages:?}");
    keymeter.stop().await;
}

/// With `listen.report`, the Report API answers only on its own port, and that port
/// serves nothing that moves money for Envoy: a NetworkPolicy can then admit jobs to
/// it without letting them reach the Check or the access log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_api_on_its_own_port_is_apart_from_the_check_and_the_access_log() {
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), keys()).await;
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.listen.report = Some("127.0.0.1:0".parse().unwrap());
    let keymeter = Keymeter::start_ready(config).await;
    let url = |port: u16| format!("http://127.0.0.1:{port}");

    // The Report API: on its port, not on the gRPC port.
    let mut jobs = UsageClient::connect(url(keymeter.report_port()))
        .await
        .unwrap();
    let ids = jobs
        .report(report(Some(GOOD), vec![record(5, 0)]))
        .await
        .expect("the Report API answers on listen.report")
        .into_inner()
        .record_ids;
    assert_eq!(ids.len(), 1);
    let mut envoys_port = UsageClient::connect(url(keymeter.grpc_port()))
        .await
        .unwrap();
    let status = envoys_port
        .report(report(Some(GOOD), vec![record(6, 0)]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // The Check and the access log: on the gRPC port, not on the Report API's.
    assert_eq!(
        keymeter
            .check(&[("api-key", GOOD)])
            .await
            .status
            .unwrap()
            .code,
        0
    );
    let check =
        crate::support::keymeter::try_check(keymeter.report_port(), &[("api-key", GOOD)]).await;
    assert!(check.is_none(), "no Check on the Report API's port");
    let mut forger = AccessLogServiceClient::connect(url(keymeter.report_port()))
        .await
        .unwrap();
    let message = StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: vec![entry("/forged", "app-1", GOOD, "999")],
        })),
    };
    let status = forger
        .stream_access_logs(tokio_stream::iter(vec![message]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");

    // Only the job's record reached the billing system.
    let reports = billing.wait_for_reports(1, WAIT).await;
    assert_eq!(
        billing
            .wait_for_reports(2, Duration::from_millis(500))
            .await
            .len(),
        1
    );
    assert_eq!(reports[0]["usage"], 5);
    keymeter.assert_no_record_unaccounted().await;
    keymeter.stop().await;
}
