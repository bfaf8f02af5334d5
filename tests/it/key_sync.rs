//! Key sync over a real mosquitto: a payload that is no key update changes nothing,
//! a message's bad entries are skipped one by one (also in a 100k-entry message), the
//! snapshot keeps known keys working across a restart with the broker down, the keys
//! file is reloaded on change, reconnects ask for the key list again, and a retained
//! key update is ignored.

use std::time::Duration;

use crate::support::keymeter::{Keymeter, billing, http_status};
use crate::support::{Mosquitto, MqttTestClient, TestDir, mqtt_options, wait_until};
use keymeter::Config;
use keymeter::config::MqttProtocol;
use keymeter::dev::billing::BillingStandIn;
use keymeter::keys::{KeyEntry, KeyList};

const WAIT: Duration = Duration::from_secs(10);

/// keymeter's answer to a Check carrying `key`, as the HTTP status Envoy would send.
async fn status_of(keymeter: &Keymeter, key: &str) -> i32 {
    http_status(&keymeter.check(&[("api-key", key)]).await)
}

/// `payload` from the billing system on `billing/keys/update`, acknowledged by the broker.
async fn publish_update(billing: &BillingStandIn, payload: &[u8]) {
    billing
        .publish_raw("billing/keys/update", payload.to_vec())
        .await
        .expect("publish a key update");
}

/// The billing system's list in most tests here: one valid key, one blocked.
fn good_and_bad() -> Vec<KeyEntry> {
    vec![
        KeyEntry::ok("app-1", "sk-good"),
        KeyEntry::blocked("app-2", "sk-bad", "balance"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_updates_leave_the_store_unchanged() {
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), good_and_bad()).await;
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.keys.max_update_bytes = 4096;
    let keymeter = Keymeter::start_ready(config).await;
    let before = keymeter.admin_get("/metrics").await.1;
    let keys_ok = crate::support::keymeter::metric_value(&before, "keymeter_keys{status=\"ok\"}");
    assert_eq!(keys_ok, 1.0);
    let applied = "keymeter_key_updates_applied_total";
    let applied_before = crate::support::keymeter::metric_value(&before, applied);

    // Valid, but over keys.max_update_bytes: it would block sk-good.
    let oversized = serde_json::to_vec(&keymeter::keys::KeyUpdate {
        updates: std::iter::once(KeyEntry::blocked("app-1", "sk-good", "x"))
            .chain((0..100).map(|i| KeyEntry::ok("app-1", &format!("sk-filler-{i:04}"))))
            .collect(),
        timestamp: 1,
    })
    .unwrap();
    assert!(oversized.len() > 4096);
    // Each would change sk-good or sk-bad if keymeter read anything out of it; none is
    // a key update at all, so each is rejected whole.
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("too_large", oversized),
        ("bad_json", b"{not json".to_vec()),
        ("bad_json", vec![0xff, 0xfe, 0x00]),
        (
            "bad_json",
            br#"{"updates": [{"app_id": "app-1", "api_key": "sk-good", "status": "blocked"}]"#
                .to_vec(),
        ),
        (
            "wrong_shape",
            br#"{"updates": "sk-good", "timestamp": 1}"#.to_vec(),
        ),
        (
            "wrong_shape",
            br#"{"updates": {"app_id": "app-2", "api_key": "sk-bad", "status": "ok"}}"#.to_vec(),
        ),
        (
            "wrong_shape",
            br#"[{"app_id": "app-1", "api_key": "sk-good", "status": "blocked"}]"#.to_vec(),
        ),
    ];
    for (_, payload) in &malformed {
        publish_update(&billing, payload).await;
    }
    let total = malformed.len() as f64;
    wait_until("every malformed update is counted", WAIT, || async {
        let text = keymeter.admin_get("/metrics").await.1;
        ["bad_json", "wrong_shape", "too_large"]
            .iter()
            .map(|r| {
                crate::support::keymeter::metric_value(
                    &text,
                    &format!("keymeter_key_updates_rejected_total{{reason=\"{r}\"}}"),
                )
            })
            .sum::<f64>()
            == total
    })
    .await;
    for (reason, _) in &malformed {
        let n = keymeter
            .metric(&format!(
                "keymeter_key_updates_rejected_total{{reason=\"{reason}\"}}"
            ))
            .await;
        assert!(n >= 1.0, "{reason} counted");
    }
    assert_eq!(status_of(&keymeter, "sk-good").await, 200);
    assert_eq!(status_of(&keymeter, "sk-bad").await, 403);
    assert_eq!(keymeter.metric("keymeter_keys{status=\"ok\"}").await, 1.0);
    assert_eq!(
        keymeter.metric("keymeter_keys{status=\"blocked\"}").await,
        1.0
    );
    assert_eq!(keymeter.metric(applied).await, applied_before);

    // A valid update after the garbage still applies.
    billing
        .publish_update(vec![KeyEntry::ok("app-2", "sk-bad")])
        .await
        .unwrap();
    wait_until("valid update applies", WAIT, || async {
        status_of(&keymeter, "sk-bad").await == 200
    })
    .await;
    keymeter.stop().await;
}

/// Messages that the strict parser used to reject whole: each now applies all it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_entries_are_skipped_and_the_rest_of_their_message_applies() {
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), good_and_bad()).await;
    let keymeter =
        Keymeter::start_ready(Config::for_local_broker("127.0.0.1", broker.port())).await;
    let skipped =
        |reason: &str| format!("keymeter_key_entries_skipped_total{{reason=\"{reason}\"}}");

    // Blocks sk-good, unblocks sk-bad; its third entry has no key.
    publish_update(&billing, br#"{"updates": [{"app_id": "app-1", "api_key": "sk-good", "status": "blocked", "reason": "x"}, {"app_id": "app-2", "api_key": "sk-bad", "status": "ok", "reason": ""}, {"app_id": "app-9", "api_key": "", "status": "ok", "reason": ""}], "timestamp": 1}"#).await;
    wait_until("the usable entries apply", WAIT, || async {
        status_of(&keymeter, "sk-good").await == 403
    })
    .await;
    assert_eq!(status_of(&keymeter, "sk-bad").await, 200);
    assert_eq!(keymeter.metric(&skipped("no_api_key")).await, 1.0);

    // A mistyped reason does not stop a block; an "ok" whose app id is not a string is
    // skipped (not stored without an app); an unknown status changes nothing.
    publish_update(&billing, br#"{"updates": [{"app_id": "app-2", "api_key": "sk-bad", "status": "blocked", "reason": 5}, {"app_id": 3, "api_key": "sk-new", "status": "ok"}, {"app_id": "app-1", "api_key": "sk-good", "status": "OK"}], "timestamp": 2}"#).await;
    wait_until("the block with a mistyped reason applies", WAIT, || async {
        status_of(&keymeter, "sk-bad").await == 403
    })
    .await;
    assert_eq!(status_of(&keymeter, "sk-new").await, 401);
    assert_eq!(status_of(&keymeter, "sk-good").await, 403);
    assert_eq!(keymeter.metric(&skipped("no_app_id")).await, 1.0);
    assert_eq!(
        keymeter.metric("keymeter_key_entries_ignored_total").await,
        1.0
    );
    assert_eq!(
        keymeter
            .metric("keymeter_key_updates_rejected_total{reason=\"invalid_entry\"}")
            .await,
        0.0
    );
    keymeter.stop().await;
}

/// A billing system's full list in one message, with a few broken entries: the rest
/// applies, in one change, and the snapshot is written once for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_entry_message_with_10_bad_entries_applies_the_other_99990() {
    a_100k_entry_message_applies_all_but_its_bad_entries(MqttProtocol::V311).await;
}

/// MQTT 5 clients announce the largest packet they accept (rumqttc's default is
/// 10 KiB): a key list of megabytes must arrive all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100k_entry_message_arrives_and_applies_over_mqtt_5() {
    a_100k_entry_message_applies_all_but_its_bad_entries(MqttProtocol::V5).await;
}

async fn a_100k_entry_message_applies_all_but_its_bad_entries(protocol: MqttProtocol) {
    const ENTRIES: usize = 100_000;
    let dir = TestDir::new("big-update");
    let snapshot = dir.path().join("keys.snapshot.json");
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), good_and_bad()).await;
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.mqtt.protocol = protocol;
    config.keys.snapshot = Some(snapshot.clone());
    let keymeter = Keymeter::start_ready(config).await;
    let snapshot_keys = || {
        std::fs::read(&snapshot)
            .ok()
            .and_then(|b| serde_json::from_slice::<KeyList>(&b).ok())
            .map_or(0, |l| l.keys.len())
    };
    // The file is renamed into place just before the write is counted: wait for both.
    wait_until("the first list is in the snapshot", WAIT, || async {
        snapshot_keys() == 2 && keymeter.metric("keymeter_snapshot_writes_total").await >= 1.0
    })
    .await;
    let writes_before = keymeter.metric("keymeter_snapshot_writes_total").await;

    let bad: [&str; 10] = [
        "17",
        "null",
        r#"["sk-big-x", "ok"]"#,
        r#"{"app_id": "app-big", "status": "ok"}"#,
        r#"{"app_id": "app-big", "api_key": null, "status": "ok"}"#,
        r#"{"app_id": "app-big", "api_key": "", "status": "ok"}"#,
        r#"{"app_id": "app-big", "api_key": "sk-big-\n", "status": "ok"}"#,
        r#"{"api_key": "sk-big-noapp", "status": "ok"}"#,
        r#"{"app_id": "", "api_key": "sk-big-emptyapp", "status": "ok"}"#,
        r#"{"app_id": "app\r\nx: y", "api_key": "sk-big-crlf", "status": "ok"}"#,
    ];
    let mut entries: Vec<String> = (0..ENTRIES - bad.len())
        .map(|i| {
            format!(r#"{{"app_id": "app-big", "api_key": "sk-big-{i:06}", "status": "ok", "reason": ""}}"#)
        })
        .collect();
    for (n, b) in bad.iter().enumerate() {
        entries.insert(n * (ENTRIES / bad.len()) + 5_000, b.to_string());
    }
    let payload = format!(r#"{{"updates": [{}], "timestamp": 1}}"#, entries.join(", "));
    let started = std::time::Instant::now();
    publish_update(&billing, payload.as_bytes()).await;
    let want_ok = (1 + ENTRIES - bad.len()) as f64;
    wait_until(
        "99,990 new keys are valid",
        Duration::from_secs(60),
        || async { keymeter.metric("keymeter_keys{status=\"ok\"}").await == want_ok },
    )
    .await;
    let elapsed = started.elapsed();
    println!(
        "100k-entry key update ({} MB, 10 bad entries, MQTT {protocol:?}): published -> 99,990 keys valid in {elapsed:?}",
        payload.len() / 1_000_000
    );
    let skips = [
        ("not_an_object", 3.0),
        ("no_api_key", 3.0),
        ("api_key_not_header_safe", 1.0),
        ("no_app_id", 2.0),
        ("app_id_not_header_safe", 1.0),
    ];
    assert_eq!(skips.iter().map(|(_, n)| n).sum::<f64>(), bad.len() as f64);
    for (reason, n) in skips {
        let sample = format!("keymeter_key_entries_skipped_total{{reason=\"{reason}\"}}");
        assert_eq!(keymeter.metric(&sample).await, n, "{sample}");
    }
    for key in ["sk-big-000000", "sk-big-049999", "sk-big-099989", "sk-good"] {
        assert_eq!(status_of(&keymeter, key).await, 200, "{key}");
    }
    for key in [
        "sk-big-noapp",
        "sk-big-emptyapp",
        "sk-big-crlf",
        "sk-big-099990",
    ] {
        assert_eq!(status_of(&keymeter, key).await, 401, "{key}");
    }
    wait_until("the snapshot holds the new list", WAIT, || async {
        snapshot_keys() == 2 + ENTRIES - bad.len()
            && keymeter.metric("keymeter_snapshot_writes_total").await > writes_before
    })
    .await;
    assert_eq!(
        keymeter.metric("keymeter_snapshot_writes_total").await,
        writes_before + 1.0,
        "one message, one snapshot write"
    );
    keymeter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_authorizes_known_keys_after_a_restart_with_the_broker_down() {
    let dir = TestDir::new("snapshot");
    let snapshot = dir.path().join("keys.snapshot.json");
    let mut broker = Mosquitto::start().await;
    let billing = billing(broker.port(), good_and_bad()).await;
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.keys.snapshot = Some(snapshot.clone());
    let keymeter = Keymeter::start_ready(config.clone()).await;
    wait_until("snapshot holds both keys", WAIT, || async {
        std::fs::read(&snapshot)
            .ok()
            .and_then(|b| serde_json::from_slice::<KeyList>(&b).ok())
            .is_some_and(|l| l.keys.len() == 2)
    })
    .await;
    keymeter.stop().await;
    billing.stop().await;
    broker.stop().await;

    let keymeter = Keymeter::start(config).await;
    keymeter.wait_ready().await;
    let (_, body) = keymeter.readyz().await;
    assert!(
        body.contains("mqtt: disconnected") || body.contains("mqtt: connecting"),
        "{body}"
    );
    assert_eq!(status_of(&keymeter, "sk-good").await, 200);
    assert_eq!(status_of(&keymeter, "sk-bad").await, 403);
    assert_eq!(status_of(&keymeter, "sk-other").await, 401);
    keymeter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_file_is_reloaded_when_it_changes() {
    let dir = TestDir::new("keysfile");
    let file = dir.path().join("keys.json");
    // Atomic replace, as an operator's tooling (or a ConfigMap update) does.
    let write = |keys: Vec<KeyEntry>| {
        let list = KeyList {
            keys,
            saved_at: None,
        };
        keymeter::keys::sync::write_key_list(&file, &list).unwrap();
    };
    write(vec![KeyEntry::ok("local", "sk-file")]);
    // No broker at all: the file alone makes keymeter ready.
    let mut config = Config::for_local_broker("127.0.0.1", crate::support::free_port());
    config.keys.file = Some(file.clone());
    config.keys.file_poll_interval_ms = 50;
    let keymeter = Keymeter::start_ready(config).await;
    assert_eq!(status_of(&keymeter, "sk-file").await, 200);

    write(vec![
        KeyEntry::blocked("local", "sk-file", "revoked"),
        KeyEntry::ok("local", "sk-new"),
    ]);
    wait_until("file change applies", WAIT, || async {
        status_of(&keymeter, "sk-file").await == 403
    })
    .await;
    assert_eq!(status_of(&keymeter, "sk-new").await, 200);

    // A broken file is rejected and the previous keys stay.
    std::fs::write(&file, b"{\"keys\": [oops").unwrap();
    wait_until("broken file counted", WAIT, || async {
        keymeter
            .metric("keymeter_keys_file_reloads_total{result=\"error\"}")
            .await
            >= 1.0
    })
    .await;
    assert_eq!(status_of(&keymeter, "sk-new").await, 200);
    keymeter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_requests_the_key_list_again_and_heartbeats_flow() {
    reconnect_asks_for_the_key_list_again(MqttProtocol::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_requests_the_key_list_again_and_heartbeats_flow_over_mqtt_5() {
    reconnect_asks_for_the_key_list_again(MqttProtocol::V5).await;
}

async fn reconnect_asks_for_the_key_list_again(protocol: MqttProtocol) {
    let mut broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", "sk-good")]).await;
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.mqtt.protocol = protocol;
    config.mqtt.heartbeat_interval_secs = 1;
    config.mqtt.reconnect_max_secs = 1;
    // keymeter may reconnect before the billing system does; it then asks again.
    config.mqtt.keys_request_retry_secs = 1;
    let keymeter = Keymeter::start_ready(config).await;
    wait_until("two heartbeats arrive", WAIT, || async {
        billing.heartbeats() >= 2
    })
    .await;
    let requests_before = billing.keys_requests();

    broker.stop().await;
    wait_until("keymeter notices the broker is gone", WAIT, || async {
        keymeter.metric("keymeter_mqtt_connected").await == 0.0
    })
    .await;
    // Meanwhile the billing system blocks the key; keymeter learns it on reconnect.
    billing.set_keys(vec![KeyEntry::blocked("app-1", "sk-good", "balance")]);
    assert_eq!(status_of(&keymeter, "sk-good").await, 200, "fail-static");
    broker.start_again().await;
    wait_until(
        "keymeter reconnects and asks again",
        Duration::from_secs(20),
        || async { billing.keys_requests() > requests_before },
    )
    .await;
    wait_until("the new list applies", WAIT, || async {
        status_of(&keymeter, "sk-good").await == 403
    })
    .await;
    assert!(keymeter.metric("keymeter_mqtt_connections_total").await >= 2.0);
    keymeter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_key_update_is_ignored_and_live_ones_apply() {
    retained_key_update_is_ignored(MqttProtocol::V311).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_key_update_is_ignored_and_live_ones_apply_over_mqtt_5() {
    retained_key_update_is_ignored(MqttProtocol::V5).await;
}

/// Publishes `payload` on `billing/keys/update` with the retain flag.
async fn publish_retained(client: &MqttTestClient, payload: &[u8]) {
    client
        .client()
        .publish(
            "billing/keys/update",
            rumqttc::QoS::AtLeastOnce,
            true,
            payload.to_vec(),
        )
        .await
        .expect("queue PUBLISH");
}

/// A retained `billing/keys/update` reaches every new subscriber, however old it is and
/// whoever stored it: keymeter ignores it (counted, logged). Live updates apply, also
/// one published with the retain flag: the broker sets the flag only on a retained
/// message it delivers because of a new subscription.
async fn retained_key_update_is_ignored(protocol: MqttProtocol) {
    let broker = Mosquitto::start().await;
    // Stored before keymeter connects: adds a key and blocks the billing system's.
    let planted = br#"{"updates": [{"app_id": "app-x", "api_key": "sk-planted", "status": "ok", "reason": ""}, {"app_id": "app-1", "api_key": "sk-good", "status": "blocked", "reason": "planted"}], "timestamp": 1}"#;
    let mut planter = MqttTestClient::connect(mqtt_options("planter", broker.port())).await;
    planter.subscribe("billing/keys/update").await;
    publish_retained(&planter, planted).await;
    // Its own copy coming back means the broker has stored it.
    assert_eq!(planter.recv(WAIT).await.payload.as_ref(), planted);

    let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", "sk-good")]).await;
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.mqtt.protocol = protocol;
    let keymeter = Keymeter::start_ready(config).await;
    let ignored = "keymeter_key_updates_ignored_total{reason=\"retained\"}";
    wait_until("the retained update is counted", WAIT, || async {
        keymeter.metric(ignored).await == 1.0
    })
    .await;
    assert_eq!(status_of(&keymeter, "sk-planted").await, 401);
    assert_eq!(status_of(&keymeter, "sk-good").await, 200);

    billing
        .publish_update(vec![KeyEntry::ok("app-2", "sk-live")])
        .await
        .unwrap();
    wait_until("a live update applies", WAIT, || async {
        status_of(&keymeter, "sk-live").await == 200
    })
    .await;
    let live_retained = br#"{"updates": [{"app_id": "app-3", "api_key": "sk-live-retained", "status": "ok", "reason": ""}], "timestamp": 2}"#;
    publish_retained(&planter, live_retained).await;
    wait_until(
        "a live update with the retain flag applies",
        WAIT,
        || async { status_of(&keymeter, "sk-live-retained").await == 200 },
    )
    .await;
    assert_eq!(keymeter.metric(ignored).await, 1.0);
    assert_eq!(status_of(&keymeter, "sk-planted").await, 401);
    assert_eq!(status_of(&keymeter, "sk-good").await, 200);
    keymeter.stop().await;
}
