//! Key updates as a billing server built against the SDK sends them, through the real
//! stack: a stand-in publishes on a real mosquitto, keymeter applies, and requests go
//! through a real Envoy running the shipped `deploy/envoy/envoy.yaml`.

use std::time::{Duration, Instant};

use crate::support::keymeter::{Keymeter, billing};
use crate::support::{Backend, Envoy, EnvoyPorts, Mosquitto, http_client, wait_until};
use keymeter::Config;
use keymeter::dev::billing::BillingStandIn;
use keymeter::keys::KeyEntry;

const WAIT: Duration = Duration::from_secs(10);
const GOOD: &str = "sk-e2e-good";

/// Broker, billing stand-in (serving one valid key), keymeter, backend and Envoy.
struct Stack {
    billing: BillingStandIn,
    keymeter: Keymeter,
    backend: Backend,
    envoy: Envoy,
    _broker: Mosquitto,
}

impl Stack {
    async fn start() -> Stack {
        let broker = Mosquitto::start().await;
        let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", GOOD)]).await;
        let keymeter =
            Keymeter::start_ready(Config::for_local_broker("127.0.0.1", broker.port())).await;
        let backend = Backend::start().await;
        let envoy = Envoy::start(EnvoyPorts {
            keymeter_grpc: keymeter.grpc_port(),
            backend: backend.port(),
        })
        .await;
        assert_eq!(get(&envoy, GOOD).await.0, 200);
        Stack {
            billing,
            keymeter,
            backend,
            envoy,
            _broker: broker,
        }
    }

    /// Publishes `payload` on `billing/keys/update` as the billing system.
    async fn publish(&self, payload: &str) {
        self.billing
            .publish_raw("billing/keys/update", payload.as_bytes().to_vec())
            .await
            .expect("publish a key update");
    }

    async fn status(&self, key: &str) -> u16 {
        get(&self.envoy, key).await.0
    }

    async fn wait_for_status(&self, key: &str, want: u16) {
        wait_until(&format!("{key:?} gets {want}"), WAIT, || async {
            self.status(key).await == want
        })
        .await;
    }

    async fn metric(&self, sample: &str) -> f64 {
        self.keymeter.metric(sample).await
    }

    /// Entries skipped so far for `reason`.
    async fn skipped(&self, reason: &str) -> f64 {
        let sample = format!("keymeter_key_entries_skipped_total{{reason=\"{reason}\"}}");
        self.metric(&sample).await
    }
}

/// (status, `error` of a deny body) of a request carrying `api-key: key`.
async fn get(envoy: &Envoy, key: &str) -> (u16, String) {
    let r = http_client()
        .get(envoy.url("/v1/chat/completions"))
        .header("api-key", key)
        .send()
        .await
        .expect("request through Envoy");
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    let error = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|b| b["error"].as_str().map(String::from))
        .unwrap_or_default();
    (status, error)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_entry_between_two_good_ones_allows_both_good_keys() {
    let stack = Stack::start().await;
    // The middle entry is an "ok" without an app id: the SDK would make sk-e2e-noapp
    // valid with no app, keymeter skips it. No timestamp either.
    stack
        .publish(
            r#"{"updates": [
                {"app_id": "app-2", "api_key": "sk-e2e-first", "status": "ok", "reason": ""},
                {"api_key": "sk-e2e-noapp", "status": "ok"},
                {"app_id": "app-3", "api_key": "sk-e2e-last", "status": "ok", "reason": ""}
            ]}"#,
        )
        .await;
    stack.wait_for_status("sk-e2e-last", 200).await;
    assert_eq!(stack.status("sk-e2e-first").await, 200);
    assert_eq!(
        get(&stack.envoy, "sk-e2e-noapp").await,
        (401, "invalid_api_key".into())
    );
    let mut apps: Vec<(String, String)> = stack
        .backend
        .requests()
        .iter()
        .map(|r| {
            let header = |name| r.header(name).unwrap_or_default().to_string();
            (header("api-key"), header("x-billing-app-id"))
        })
        .filter(|(key, _)| key != GOOD)
        .collect();
    apps.sort();
    assert_eq!(
        apps,
        [("sk-e2e-first", "app-2"), ("sk-e2e-last", "app-3")]
            .map(|(k, a)| (k.to_string(), a.to_string())),
        "each good key reaches the backend with its own app id"
    );
    assert_eq!(stack.skipped("no_app_id").await, 1.0);

    // A non-object entry costs only itself too (the SDK would lose the rest).
    stack
        .publish(
            r#"{"updates": ["sk-e2e-x", {"app_id": "app-4", "api_key": "sk-e2e-after", "status": "ok"}], "timestamp": 2}"#,
        )
        .await;
    stack.wait_for_status("sk-e2e-after", 200).await;
    assert_eq!(stack.skipped("not_an_object").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_without_app_id_turns_200_into_403_within_a_second() {
    let stack = Stack::start().await;
    let started = Instant::now();
    // As a billing server may send it: no app_id, reason null, no timestamp.
    stack
        .publish(&format!(
            r#"{{"updates": [{{"api_key": "{GOOD}", "status": "blocked", "reason": null}}]}}"#
        ))
        .await;
    wait_until("the blocked key is denied", WAIT, || async {
        stack.status(GOOD).await == 403
    })
    .await;
    let took = started.elapsed();
    println!("block without app id (billing publish -> Envoy denies): {took:?}");
    assert!(took < Duration::from_secs(1), "block took {took:?}");
    assert_eq!(
        get(&stack.envoy, GOOD).await,
        (403, "blocked_api_key".into())
    );
    assert_eq!(stack.metric("keymeter_keys{status=\"blocked\"}").await, 1.0);
    let skipped = "keymeter_key_entries_skipped_total";
    let text = stack.keymeter.admin_get("/metrics").await.1;
    assert!(
        text.lines()
            .filter(|l| l.starts_with(skipped))
            .all(|l| l.ends_with(" 0")),
        "a block is never skipped:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_without_or_with_odd_timestamps_apply() {
    let stack = Stack::start().await;
    for (key, timestamp) in [
        ("sk-e2e-no-ts", ""),
        ("sk-e2e-float-ts", r#", "timestamp": 1795648614.249"#),
        (
            "sk-e2e-string-ts",
            r#", "timestamp": "2026-11-27T10:00:00Z""#,
        ),
        ("sk-e2e-null-ts", r#", "timestamp": null"#),
    ] {
        stack
            .publish(&format!(
                r#"{{"updates": [{{"app_id": "app-t", "api_key": "{key}", "status": "ok", "note": "unknown fields are ignored"}}]{timestamp}, "version": 2}}"#
            ))
            .await;
        stack.wait_for_status(key, 200).await;
    }
    assert_eq!(
        stack
            .metric("keymeter_key_updates_rejected_total{reason=\"wrong_shape\"}")
            .await,
        0.0
    );
}

/// Envoy and keymeter trim only the ends of a header value: a key with inner spaces
/// arrives as it is (and is accepted), a key with a leading or trailing space could
/// never match (and is skipped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_inner_spaces_work_and_keys_with_outer_spaces_are_skipped() {
    let stack = Stack::start().await;
    stack
        .publish(
            r#"{"updates": [
                {"app_id": "app-s", "api_key": "sk two words", "status": "ok"},
                {"app_id": "app-s", "api_key": " sk-lead", "status": "ok"},
                {"app_id": "app-s", "api_key": "sk-trail ", "status": "ok"},
                {"app_id": "app-s", "api_key": "sk-done", "status": "ok"}
            ]}"#,
        )
        .await;
    stack.wait_for_status("sk-done", 200).await;
    assert_eq!(stack.status("sk two words").await, 200);
    // Extra spaces around it are trimmed on the way: the same key.
    assert_eq!(stack.status("  sk two words ").await, 200);
    // Spaces move neither inside a key nor merge: a different key.
    assert_eq!(stack.status("sk two  words").await, 401);
    // What a client sends for the outer-space keys arrives trimmed, so only the
    // trimmed key could ever match; it is unknown.
    assert_eq!(stack.status(" sk-lead").await, 401);
    assert_eq!(stack.status("sk-trail ").await, 401);
    assert_eq!(stack.skipped("api_key_not_header_safe").await, 2.0);
    let seen = stack.backend.requests();
    let last = seen.last().expect("the backend saw the allowed requests");
    assert_eq!(last.header("x-billing-app-id"), Some("app-s"));
}
