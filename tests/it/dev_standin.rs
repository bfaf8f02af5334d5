//! The dev-mode stand-ins: the embedded broker and the billing stand-in speak the
//! billing system's wire contract (README, "For the billing system") to an ordinary
//! MQTT client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use keymeter::config::Topics;
use keymeter::dev::{BillingStandIn, EmbeddedBroker, StandInOptions, load_keys_file};
use keymeter::keys::KeyEntry;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn example_keys_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/keys.json")
}

fn example_keys_json() -> Value {
    let text = std::fs::read_to_string(example_keys_path()).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    doc["keys"].clone()
}

fn stand_in_options(addr: SocketAddr, keys: Vec<KeyEntry>) -> StandInOptions {
    StandInOptions {
        host: addr.ip().to_string(),
        port: addr.port(),
        topics: Topics::default(),
        keys,
        print_reports: false,
    }
}

async fn broker_and_stand_in() -> (EmbeddedBroker, BillingStandIn) {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).unwrap();
    assert_ne!(broker.addr().port(), 0);
    let keys = load_keys_file(example_keys_path()).unwrap();
    let stand_in = BillingStandIn::start(stand_in_options(broker.addr(), keys))
        .await
        .unwrap();
    (broker, stand_in)
}

/// A plain MQTT client playing keymeter's side.
struct Peer {
    client: AsyncClient,
    publishes: mpsc::UnboundedReceiver<Publish>,
    acks: mpsc::UnboundedReceiver<Packet>,
}

impl Peer {
    async fn connect(addr: SocketAddr, name: &str) -> Peer {
        let mut opts = MqttOptions::new(
            format!("{name}-{}", std::process::id()),
            addr.ip().to_string(),
            addr.port(),
        );
        opts.set_max_packet_size(64 << 20, 64 << 20);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let (pub_tx, publishes) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if pub_tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(
                        p @ (Packet::ConnAck(_) | Packet::SubAck(_) | Packet::PubAck(_)),
                    )) => {
                        if ack_tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Peer {
            client,
            publishes,
            acks,
        }
    }

    async fn next_ack(&mut self, want: fn(&Packet) -> bool) {
        tokio::time::timeout(WAIT, async {
            loop {
                let p = self.acks.recv().await.unwrap();
                if want(&p) {
                    return;
                }
            }
        })
        .await
        .expect("ack not received in time");
    }

    async fn subscribe(&mut self, topic: &str) {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .unwrap();
        self.next_ack(|p| matches!(p, Packet::SubAck(_))).await;
    }

    async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        self.next_ack(|p| matches!(p, Packet::PubAck(_))).await;
    }

    async fn next_publish(&mut self) -> Publish {
        tokio::time::timeout(WAIT, self.publishes.recv())
            .await
            .expect("no message in time")
            .unwrap()
    }
}

fn parse(p: &Publish) -> Value {
    serde_json::from_slice(&p.payload).unwrap()
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn keys_request_is_answered_with_the_full_key_list() {
    let (broker, stand_in) = broker_and_stand_in().await;
    let mut peer = Peer::connect(broker.addr(), "keymeter-test").await;
    peer.subscribe("billing/keys/update").await;

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    peer.publish("billing/keys/request", r#"{"timestamp": 1795648614249}"#)
        .await;
    let update = peer.next_publish().await;
    assert_eq!(update.topic, "billing/keys/update");
    let update = parse(&update);
    assert_eq!(update["updates"], example_keys_json());
    assert_eq!(update["updates"].as_array().unwrap().len(), 3);
    assert!(update["timestamp"].as_i64().unwrap() >= before);
    assert_eq!(
        update.as_object().unwrap().len(),
        2,
        "only updates and timestamp"
    );
    assert_eq!(stand_in.keys_requests(), 1);

    // A replaced list is what later requests get.
    stand_in.set_keys(vec![KeyEntry::blocked("app-9", "sk-new", "fraud")]);
    peer.publish("billing/keys/request", r#"{"timestamp": 2}"#)
        .await;
    let update = parse(&peer.next_publish().await);
    assert_eq!(
        update["updates"],
        json!([{"app_id": "app-9", "api_key": "sk-new", "status": "blocked", "reason": "fraud"}])
    );
    assert_eq!(stand_in.keys_requests(), 2);
    stand_in.stop().await;
}

#[tokio::test]
async fn reports_and_heartbeats_are_recorded() {
    let (broker, stand_in) = broker_and_stand_in().await;
    let mut peer = Peer::connect(broker.addr(), "keymeter-reporter").await;

    let report = json!({
        "app_id": "app-1", "api_key": "sk-test-0001", "module": "llm", "model": "gpt-4",
        "usage": 150, "timestamp": 1795648616249_i64,
        "metadata": {"prompt_tokens": 100, "completion_tokens": 50, "note": "h\u{e9}llo"}
    });
    peer.publish("billing/report", report.to_string()).await;
    assert_eq!(
        stand_in.wait_for_reports(1, WAIT).await,
        vec![report.clone()]
    );

    peer.publish("billing/report", &b"not json \xff"[..]).await;
    let reports = stand_in.wait_for_reports(2, WAIT).await;
    assert_eq!(reports.len(), 2);
    assert_eq!(reports[1], Value::String("not json \u{fffd}".into()));
    assert_eq!(stand_in.unparsable_reports(), 1);

    // Nothing more arrives: the wait times out and returns what is there.
    let started = Instant::now();
    let reports = stand_in
        .wait_for_reports(3, Duration::from_millis(200))
        .await;
    assert_eq!(reports.len(), 2);
    assert!(started.elapsed() >= Duration::from_millis(200));

    peer.publish(
        "billing/heartbeat",
        r#"{"type": "heartbeat", "timestamp": 1}"#,
    )
    .await;
    eventually("the heartbeat", || stand_in.heartbeats() == 1).await;
    assert_eq!(stand_in.keys_requests(), 0);
}

#[tokio::test]
async fn publish_update_reaches_subscribers() {
    let (broker, stand_in) = broker_and_stand_in().await;
    let mut peer = Peer::connect(broker.addr(), "keymeter-sub").await;
    peer.subscribe("billing/keys/update").await;

    let updates = vec![
        KeyEntry::blocked("app-1", "sk-test-0001", "balance"),
        KeyEntry::ok("app-4", "sk-test-0004"),
    ];
    stand_in.publish_update(updates).await.unwrap();
    let update = parse(&peer.next_publish().await);
    assert_eq!(
        update["updates"],
        json!([
            {"app_id": "app-1", "api_key": "sk-test-0001", "status": "blocked", "reason": "balance"},
            {"app_id": "app-4", "api_key": "sk-test-0004", "status": "ok", "reason": ""}
        ])
    );
    assert!(update["timestamp"].is_i64());

    // Raw bytes go out untouched, for malformed-payload tests.
    stand_in
        .publish_raw("billing/keys/update", b"{\"updates\": 7".to_vec())
        .await
        .unwrap();
    assert_eq!(&peer.next_publish().await.payload[..], b"{\"updates\": 7");

    // A clean stop sends DISCONNECT and returns without waiting out its grace period.
    let started = Instant::now();
    stand_in.stop().await;
    assert!(started.elapsed() < Duration::from_millis(900));
}

#[tokio::test]
async fn multi_megabyte_key_lists_pass_the_embedded_broker() {
    let (broker, stand_in) = broker_and_stand_in().await;
    let many: Vec<KeyEntry> = (0..40_000)
        .map(|i| KeyEntry::ok(&format!("app-{i}"), &format!("sk-load-{i:032}")))
        .collect();
    stand_in.set_keys(many);
    let mut peer = Peer::connect(broker.addr(), "keymeter-big").await;
    peer.subscribe("billing/keys/update").await;
    peer.publish("billing/keys/request", r#"{"timestamp": 3}"#)
        .await;
    let update = peer.next_publish().await;
    assert!(update.payload.len() > 2 << 20, "{}", update.payload.len());
    let update = parse(&update);
    let updates = update["updates"].as_array().unwrap();
    assert_eq!(updates.len(), 40_000);
    assert_eq!(
        updates[39_999]["api_key"],
        format!("sk-load-{:032}", 39_999)
    );
}

#[tokio::test]
async fn several_stand_ins_coexist_and_stop_on_drop() {
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().unwrap()).unwrap();
    let a = BillingStandIn::start(stand_in_options(broker.addr(), vec![]))
        .await
        .unwrap();
    let b = BillingStandIn::start(stand_in_options(broker.addr(), vec![]))
        .await
        .unwrap();
    assert_ne!(a.client_id(), b.client_id());
    assert!(a.client_id().starts_with("billing-standin-"));
    drop(a);

    // `b` still works after `a` went away.
    let mut peer = Peer::connect(broker.addr(), "keymeter-both").await;
    peer.publish("billing/report", r#"{"usage": 1}"#).await;
    assert_eq!(b.wait_for_reports(1, WAIT).await, vec![json!({"usage": 1})]);
}

#[tokio::test]
async fn start_fails_when_nothing_listens() {
    // Port 1 (tcpmux) has no listener here; a port picked with bind(:0) could be
    // taken meanwhile by a broker of a test running in parallel.
    let port = 1;
    let started = Instant::now();
    let err = BillingStandIn::start(stand_in_options(
        SocketAddr::from(([127, 0, 0, 1], port)),
        vec![],
    ))
    .await
    .unwrap_err();
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn stand_in_reconnects_and_resubscribes_after_the_broker_restarts() {
    // The shared harness: a missing mosquitto fails the test, it never skips.
    let mut mosquitto = crate::support::Mosquitto::start().await;
    let addr = SocketAddr::from(([127, 0, 0, 1], mosquitto.port()));
    let keys = load_keys_file(example_keys_path()).unwrap();
    let stand_in = BillingStandIn::start(stand_in_options(addr, keys))
        .await
        .unwrap();

    // SIGKILL: nothing is saved, so the restarted broker knows no session.
    mosquitto.kill();
    mosquitto.start_again().await;

    // The fresh broker knows no subscriptions: an answer proves the stand-in
    // reconnected and subscribed again. Requests sent before that go unanswered,
    // as with the real billing system, so keep asking.
    let mut peer = Peer::connect(addr, "keymeter-restart").await;
    peer.subscribe("billing/keys/update").await;
    let deadline = Instant::now() + WAIT;
    let update = loop {
        assert!(Instant::now() < deadline, "stand-in never answered");
        peer.publish("billing/keys/request", r#"{"timestamp": 4}"#)
            .await;
        if let Ok(Some(p)) =
            tokio::time::timeout(Duration::from_millis(300), peer.publishes.recv()).await
        {
            break p;
        }
    };
    assert_eq!(parse(&update)["updates"], example_keys_json());
    stand_in.stop().await;
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `keymeter dev` keeps its outbox (usage records hold API keys) in a fresh private
/// directory with a random name under the temp dir, never a predictable path, and
/// removes it when it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_keeps_its_outbox_in_a_private_temp_dir_and_removes_it() {
    let tmp = crate::support::TestDir::new("dev-tmp");
    let (grpc, admin) = (crate::support::free_port(), crate::support::free_port());
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_keymeter"));
    command
        .arg("dev")
        .arg("--keys")
        .arg(example_keys_path())
        .args(["--grpc", &format!("127.0.0.1:{grpc}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .env("TMPDIR", tmp.path())
        .env_remove("RUST_LOG");
    let mut dev = crate::support::ChildGuard::spawn("keymeter-dev", command, tmp.path());
    crate::support::binary::wait_ready(&mut dev, admin, WAIT).await;

    let scratch: Vec<PathBuf> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(scratch.len(), 1, "one scratch directory: {scratch:?}");
    let scratch = &scratch[0];
    let name = scratch.file_name().unwrap().to_string_lossy().into_owned();
    let suffix = name
        .strip_prefix("keymeter-dev-")
        .expect("named keymeter-dev-*");
    assert!(suffix.len() >= 6, "a random part in {name}");
    assert!(
        !name.contains(&dev.pid().unwrap().to_string()),
        "not derived from the pid: {name}"
    );
    assert_eq!(mode(scratch), 0o700);
    let outbox = scratch.join("outbox");
    assert_eq!(mode(&outbox), 0o700);
    assert!(outbox.join("lock").is_file());
    assert!(
        dev.logs().contains(&outbox.display().to_string()),
        "the banner names the outbox"
    );

    let exit = dev.terminate(WAIT).await;
    assert!(exit.success(), "{exit}");
    assert!(!scratch.exists(), "removed on exit");
}
