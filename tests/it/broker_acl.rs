//! Broker ACLs, with a real mosquitto enforcing the shipped
//! `deploy/mosquitto/billing.acl` (or that file with one grant removed), keymeter
//! logged in as `keymeter` and a billing client logged in as `billing`.
//!
//! A publish the ACL denies is dropped by the broker. Under MQTT 3.1.1 the broker still
//! acknowledges it, so keymeter deletes records nobody received (the documented
//! hazard, shown here); under MQTT 5 the PUBACK says "not authorized", and the records
//! stay in the outbox until the ACL lets them through. With the shipped ACL, only the
//! billing system can change the key list.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::keymeter::{Keymeter, http_status};
use crate::support::{
    Mosquitto, MosquittoOptions, MqttTestClient, TestDir, mqtt_options, wait_until,
};
use keymeter::Config;
use keymeter::clock::now_ms;
use keymeter::config::{MqttProtocol, Secret};
use keymeter::keys::KeyEntry;
use keymeter::proto::v1::usage_client::UsageClient;
use keymeter::proto::v1::{ReportRequest, UsageRecord};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const KEYMETER: (&str, &str) = ("keymeter", "keymeter-secret");
const BILLING: (&str, &str) = ("billing", "billing-secret");
/// Another client of the same broker, with a valid login of its own.
const INTRUDER: (&str, &str) = ("intruder", "intruder-secret");
const GOOD: &str = "sk-acl-0001";
/// The grant the misconfigured ACL lacks.
const REPORT_GRANT: &str = "user keymeter\ntopic write billing/report\n";

fn shipped_acl_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/mosquitto/billing.acl")
}

fn shipped_acl() -> String {
    std::fs::read_to_string(shipped_acl_path()).expect("read deploy/mosquitto/billing.acl")
}

/// The shipped ACL without keymeter's grant to publish `billing/report`.
fn acl_denying_reports() -> String {
    let acl = shipped_acl();
    assert_eq!(
        acl.matches(REPORT_GRANT).count(),
        1,
        "update the test together with deploy/mosquitto/billing.acl"
    );
    acl.replace(REPORT_GRANT, "user keymeter\n")
}

/// A broker with the `keymeter` and `billing` logins and an ACL, keymeter connected
/// to it, and the billing system's consumer of reports and heartbeats.
struct Rig {
    broker: Mosquitto,
    keymeter: Keymeter,
    billing: MqttTestClient,
    _dir: TestDir,
}

impl Rig {
    async fn start(protocol: MqttProtocol, acl: &str) -> Rig {
        let dir = TestDir::new("acl");
        let acl_path = dir.path().join("billing.acl");
        std::fs::write(&acl_path, acl).unwrap();
        let broker = Mosquitto::start_with(MosquittoOptions {
            users: &[KEYMETER, BILLING, INTRUDER],
            acl_file: Some(&acl_path),
            ..Default::default()
        })
        .await;

        let mut options = mqtt_options("billing", broker.port());
        options.set_credentials(BILLING.0, BILLING.1);
        let mut billing = MqttTestClient::connect(options).await;
        billing.subscribe("billing/report").await;
        billing.subscribe("billing/heartbeat").await;

        // Keys from a local file: the ACL tests need no billing key service.
        let keys = dir.path().join("keys.json");
        crate::support::keymeter::write_keys(&keys, vec![KeyEntry::ok("app-1", GOOD)]);
        let mut config = Config::for_local_broker("127.0.0.1", broker.port());
        config.mqtt.protocol = protocol;
        config.mqtt.username = KEYMETER.0.into();
        config.mqtt.password = Secret(KEYMETER.1.into());
        config.mqtt.heartbeat_interval_secs = 1;
        config.mqtt.reconnect_max_secs = 1;
        config.keys.file = Some(keys);
        let keymeter = Keymeter::start_ready(config).await;
        wait_until("keymeter connects", WAIT, || async {
            keymeter.metric("keymeter_mqtt_connected").await == 1.0
        })
        .await;
        Rig {
            broker,
            keymeter,
            billing,
            _dir: dir,
        }
    }

    /// `n` records through the Report API; their record ids.
    async fn report(&self, n: u64) -> BTreeSet<String> {
        let channel = tonic::transport::Endpoint::from_shared(format!(
            "http://127.0.0.1:{}",
            self.keymeter.grpc_port()
        ))
        .unwrap()
        .connect()
        .await
        .unwrap();
        let records = (1..=n)
            .map(|i| UsageRecord {
                module: "acl".into(),
                model: "test".into(),
                usage: i,
                metadata_json: String::new(),
                timestamp_ms: now_ms(),
                idempotency_key: format!("acl-{i}"),
            })
            .collect();
        let mut request = tonic::Request::new(ReportRequest { records });
        request
            .metadata_mut()
            .insert("api-key", GOOD.parse().unwrap());
        let ids = UsageClient::new(channel)
            .report(request)
            .await
            .expect("the Report API accepts the records")
            .into_inner()
            .record_ids;
        assert_eq!(ids.len() as u64, n);
        ids.into_iter().collect()
    }

    /// The record ids of the reports the billing client receives before the first
    /// heartbeat keymeter published after `since_ms`. keymeter publishes in order and
    /// the broker forwards one client's messages in order, so a report keymeter sent
    /// before that heartbeat and the broker let through has arrived by then.
    async fn reports_before_a_heartbeat_after(&mut self, since_ms: i64) -> Vec<String> {
        let mut ids = Vec::new();
        loop {
            let message = self.billing.recv(WAIT).await;
            let body: Value = serde_json::from_slice(&message.payload).unwrap();
            match message.topic.as_str() {
                "billing/report" => ids.push(body["record_id"].as_str().unwrap().to_owned()),
                "billing/heartbeat" if body["timestamp"].as_i64().unwrap() > since_ms => {
                    return ids;
                }
                _ => {}
            }
        }
    }

    async fn metric(&self, sample: &str) -> f64 {
        self.keymeter.metric(sample).await
    }
}

const PUBLISHED: &str = "keymeter_usage_records_published_total";
const PENDING: &str = "keymeter_outbox_pending_records";
const REFUSED_REPORTS: &str =
    "keymeter_publish_refused_total{message=\"report\",reason=\"not_authorized\"}";

/// The hazard MQTT 5 exists for here: under 3.1.1 mosquitto acknowledges the publishes
/// its ACL drops, keymeter counts the records as published and deletes them, and the
/// billing system never sees them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mqtt_3_1_1_records_the_acl_denies_are_acknowledged_and_lost() {
    let mut rig = Rig::start(MqttProtocol::V311, &acl_denying_reports()).await;
    rig.report(3).await;
    wait_until("the broker acknowledges the 3 records", WAIT, || async {
        rig.metric(PUBLISHED).await == 3.0 && rig.metric(PENDING).await == 0.0
    })
    .await;
    rig.broker
        .process()
        .wait_for_log("Denied PUBLISH from keymeter-", WAIT)
        .await;
    let delivered = rig.reports_before_a_heartbeat_after(now_ms()).await;
    assert!(delivered.is_empty(), "{delivered:?}");
    // keymeter's books balance: as far as it can tell, the records were delivered.
    rig.keymeter.assert_no_record_unaccounted().await;
    let (_, metrics) = rig.keymeter.admin_get("/metrics").await;
    assert_eq!(
        crate::support::keymeter::metric_sum(&metrics, "keymeter_publish_refused_total"),
        0.0,
        "MQTT 3.1.1 cannot tell"
    );
    rig.keymeter.stop().await;
}

/// Under MQTT 5 the same ACL makes the broker answer "not authorized": the records
/// stay in the outbox, are counted and retried, and once the ACL is fixed (and the
/// broker reloaded) they are delivered, each once, with their record ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mqtt_5_refused_records_stay_in_the_outbox_until_the_acl_lets_them_through() {
    let mut rig = Rig::start(MqttProtocol::V5, &acl_denying_reports()).await;
    let ids = rig.report(3).await;
    // Refused, then refused again when retried.
    wait_until("3 records refused twice", WAIT, || async {
        rig.metric(REFUSED_REPORTS).await >= 6.0
    })
    .await;
    assert_eq!(rig.metric(PUBLISHED).await, 0.0);
    assert_eq!(rig.metric(PENDING).await, 3.0);
    let delivered = rig.reports_before_a_heartbeat_after(now_ms()).await;
    assert!(delivered.is_empty(), "{delivered:?}");

    rig.broker.replace_acl(&shipped_acl()).await;
    let mut delivered = BTreeSet::new();
    while delivered.len() < ids.len() {
        let message = rig.billing.recv(WAIT).await;
        if message.topic == "billing/report" {
            let body: Value = serde_json::from_slice(&message.payload).unwrap();
            let id = body["record_id"].as_str().unwrap().to_owned();
            assert!(delivered.insert(id.clone()), "{id} delivered twice");
        }
    }
    assert_eq!(delivered, ids);
    wait_until("the outbox drains", WAIT, || async {
        rig.metric(PENDING).await == 0.0 && rig.metric(PUBLISHED).await == 3.0
    })
    .await;
    rig.keymeter.assert_no_record_unaccounted().await;
    rig.keymeter.stop().await;
}

/// A client that logs in as `login` and publishes `payload` on `billing/keys/update`;
/// keep it until the broker has dealt with the publish.
async fn publish_key_update_as(
    port: u16,
    login: (&str, &str),
    client: &str,
    payload: &str,
) -> MqttTestClient {
    let mut options = mqtt_options(client, port);
    options.set_credentials(login.0, login.1);
    let publisher = MqttTestClient::connect(options).await;
    publisher.publish("billing/keys/update", payload).await;
    publisher
}

/// With the shipped ACL, a key update from anyone but the billing system (another
/// service's login, or keymeter's own) is dropped by the broker and never reaches
/// keymeter; the billing system's applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_billing_system_can_change_the_key_list() {
    let mut rig = Rig::start(MqttProtocol::V311, &shipped_acl()).await;
    let status = |key: &'static str| {
        let keymeter = &rig.keymeter;
        async move { http_status(&keymeter.check(&[("api-key", key)]).await) }
    };
    assert_eq!(status(GOOD).await, 200);
    let applied = "keymeter_key_updates_applied_total";
    let applied_before = rig.metric(applied).await;

    let injected = r#"{"updates": [{"app_id": "app-evil", "api_key": "sk-injected", "status": "ok", "reason": ""}, {"app_id": "app-1", "api_key": "sk-acl-0001", "status": "blocked", "reason": "x"}], "timestamp": 1}"#;
    let port = rig.broker.port();
    let _intruder = publish_key_update_as(port, INTRUDER, "intruder", injected).await;
    rig.broker
        .process()
        .wait_for_log("Denied PUBLISH from intruder-", WAIT)
        .await;
    let _stolen = publish_key_update_as(port, KEYMETER, "stolen-keymeter-login", injected).await;
    rig.broker
        .process()
        .wait_for_log("Denied PUBLISH from stolen-keymeter-login-", WAIT)
        .await;

    // The billing system's own update goes through, after both were dropped.
    let genuine = r#"{"updates": [{"app_id": "app-2", "api_key": "sk-genuine", "status": "ok", "reason": ""}], "timestamp": 2}"#;
    let _billing = publish_key_update_as(port, BILLING, "billing-keys", genuine).await;
    wait_until("the billing system's update applies", WAIT, || async {
        status("sk-genuine").await == 200
    })
    .await;
    assert_eq!(status("sk-injected").await, 401);
    assert_eq!(status(GOOD).await, 200, "the injected block did not apply");
    assert_eq!(rig.metric(applied).await, applied_before + 1.0);
    rig.keymeter.stop().await;
}
