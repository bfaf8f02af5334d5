//! Key sync over a real mosquitto: malformed updates change nothing, the snapshot
//! keeps known keys working across a restart with the broker down, the keys file is
//! reloaded on change, and reconnects ask for the key list again.

mod support;

use std::time::Duration;

use keymeter::Config;
use keymeter::keys::{KeyEntry, KeyList};
use support::keymeter::{Keymeter, billing, http_status};
use support::{Mosquitto, TestDir, wait_until};

const WAIT: Duration = Duration::from_secs(10);

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
    let keys_ok = support::keymeter::metric_value(&before, "keymeter_keys{status=\"ok\"}");
    assert_eq!(keys_ok, 1.0);

    // Valid, but over keys.max_update_bytes: it would block sk-good.
    let oversized = serde_json::to_vec(&keymeter::keys::KeyUpdate {
        updates: std::iter::once(KeyEntry::blocked("app-1", "sk-good", "x"))
            .chain((0..100).map(|i| KeyEntry::ok("app-1", &format!("sk-filler-{i:04}"))))
            .collect(),
        timestamp: 1,
    })
    .unwrap();
    assert!(oversized.len() > 4096);
    let malformed: Vec<(&str, Vec<u8>)> = vec![
        ("too_large", oversized),
        ("bad_json", b"{not json".to_vec()),
        ("bad_json", vec![0xff, 0xfe, 0x00]),
        ("wrong_shape", br#"{"updates": "sk-good", "timestamp": 1}"#.to_vec()),
        ("wrong_shape", br#"[{"app_id": "app-1", "api_key": "sk-good", "status": "blocked"}]"#.to_vec()),
        (
            "wrong_shape",
            br#"{"updates": [{"app_id": "app-1", "api_key": "sk-good", "status": "blocked", "reason": 5}], "timestamp": 1}"#.to_vec(),
        ),
        // Would block sk-good and unblock sk-bad, but one entry is invalid: nothing applies.
        (
            "invalid_entry",
            br#"{"updates": [{"app_id": "app-1", "api_key": "sk-good", "status": "blocked", "reason": "x"}, {"app_id": "app-2", "api_key": "sk-bad", "status": "ok", "reason": ""}, {"app_id": "app-9", "api_key": "", "status": "ok", "reason": ""}], "timestamp": 1}"#.to_vec(),
        ),
    ];
    for (_, payload) in &malformed {
        billing
            .publish_raw("billing/keys/update", payload.clone())
            .await
            .unwrap();
    }
    let total = malformed.len() as f64;
    wait_until("every malformed update is counted", WAIT, || async {
        let text = keymeter.admin_get("/metrics").await.1;
        ["bad_json", "wrong_shape", "invalid_entry", "too_large"]
            .iter()
            .map(|r| {
                support::keymeter::metric_value(
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
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-good")]).await),
        200
    );
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-bad")]).await),
        403
    );
    assert_eq!(keymeter.metric("keymeter_keys{status=\"ok\"}").await, 1.0);
    assert_eq!(
        keymeter.metric("keymeter_keys{status=\"blocked\"}").await,
        1.0
    );

    // A valid update after the garbage still applies.
    billing
        .publish_update(vec![KeyEntry::ok("app-2", "sk-bad")])
        .await
        .unwrap();
    wait_until("valid update applies", WAIT, || async {
        http_status(&keymeter.check(&[("api-key", "sk-bad")]).await) == 200
    })
    .await;
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
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-good")]).await),
        200
    );
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-bad")]).await),
        403
    );
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-other")]).await),
        401
    );
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
    let mut config = Config::for_local_broker("127.0.0.1", support::free_port());
    config.keys.file = Some(file.clone());
    config.keys.file_poll_interval_ms = 50;
    let keymeter = Keymeter::start_ready(config).await;
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-file")]).await),
        200
    );

    write(vec![
        KeyEntry::blocked("local", "sk-file", "revoked"),
        KeyEntry::ok("local", "sk-new"),
    ]);
    wait_until("file change applies", WAIT, || async {
        http_status(&keymeter.check(&[("api-key", "sk-file")]).await) == 403
    })
    .await;
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-new")]).await),
        200
    );

    // A broken file is rejected and the previous keys stay.
    std::fs::write(&file, b"{\"keys\": [oops").unwrap();
    wait_until("broken file counted", WAIT, || async {
        keymeter
            .metric("keymeter_keys_file_reloads_total{result=\"error\"}")
            .await
            >= 1.0
    })
    .await;
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-new")]).await),
        200
    );
    keymeter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_requests_the_key_list_again_and_heartbeats_flow() {
    let mut broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", "sk-good")]).await;
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
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
    assert_eq!(
        http_status(&keymeter.check(&[("api-key", "sk-good")]).await),
        200,
        "fail-static"
    );
    broker.start_again().await;
    wait_until(
        "keymeter reconnects and asks again",
        Duration::from_secs(20),
        || async { billing.keys_requests() > requests_before },
    )
    .await;
    wait_until("the new list applies", WAIT, || async {
        http_status(&keymeter.check(&[("api-key", "sk-good")]).await) == 403
    })
    .await;
    assert!(keymeter.metric("keymeter_mqtt_connections_total").await >= 2.0);
    keymeter.stop().await;
}
