//! The core promise, through a real Envoy: keys from the billing system (a stand-in on
//! a real mosquitto) decide what reaches the backend.

use std::time::{Duration, Instant};

use crate::support::keymeter::{Keymeter, billing};
use crate::support::rig::{BLOCKED, EnvoyMode, GOOD, OTHER, Rig, default_config, three_keys};
use crate::support::{Backend, Envoy, EnvoyPorts, Mosquitto, http_client, wait_until};
use keymeter::Config;
use keymeter::keys::KeyEntry;

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: String,
}

async fn get(envoy: &Envoy, headers: &[(&str, &str)]) -> Answer {
    let mut req = http_client().get(envoy.url("/v1/chat/completions"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.expect("request through Envoy");
    Answer {
        status: r.status().as_u16(),
        headers: r.headers().clone(),
        body: r.text().await.unwrap(),
    }
}

fn error_of(a: &Answer) -> String {
    assert_eq!(
        a.headers.get("content-type").map(|v| v.to_str().unwrap()),
        Some("application/json"),
        "deny body is JSON"
    );
    let body: serde_json::Value = serde_json::from_str(&a.body).expect("deny body parses");
    assert!(body["message"].is_string(), "{body}");
    body["error"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_allows_valid_keys_and_denies_the_rest() {
    let Rig {
        billing,
        keymeter,
        backend,
        envoy,
        broker: _broker,
    } = Rig::start(
        three_keys(),
        default_config,
        Backend::start().await,
        EnvoyMode::ExtAuthz,
    )
    .await;
    assert!(
        billing.keys_requests() >= 1,
        "keymeter asked for the key list on connect"
    );

    let missing = get(&envoy, &[]).await;
    assert_eq!(missing.status, 401);
    assert_eq!(error_of(&missing), "missing_api_key");
    assert!(missing.headers.contains_key("www-authenticate"));

    let unknown = get(&envoy, &[("api-key", "sk-unknown-key")]).await;
    assert_eq!(unknown.status, 401);
    assert_eq!(error_of(&unknown), "invalid_api_key");
    assert!(
        !unknown.body.contains("sk-unknown-key"),
        "the key is never echoed"
    );

    let blocked = get(&envoy, &[("api-key", BLOCKED)]).await;
    assert_eq!(blocked.status, 403);
    assert_eq!(error_of(&blocked), "blocked_api_key");
    assert!(
        blocked.body.contains("balance"),
        "the billing reason reaches the client"
    );
    assert!(!blocked.body.contains(BLOCKED));
    assert!(!blocked.headers.contains_key("www-authenticate"));
    assert!(
        backend.requests().is_empty(),
        "no denied request reached the backend"
    );

    // Both header names; a client-chosen app id is overwritten.
    let ok = get(
        &envoy,
        &[("api-key", GOOD), ("x-billing-app-id", "spoofed")],
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let ok2 = get(&envoy, &[("apikey", OTHER)]).await;
    assert_eq!(ok2.status, 200, "{}", ok2.body);
    let seen = backend.requests();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("x-billing-app-id"), Some("app-1"));
    assert_eq!(
        seen[0].header("api-key"),
        Some(GOOD),
        "key header kept by default"
    );
    assert_eq!(seen[1].header("x-billing-app-id"), Some("app-2"));

    let allowed = keymeter
        .metric("keymeter_check_requests_total{outcome=\"allowed\"}")
        .await;
    assert_eq!(allowed, 2.0);
    assert_eq!(
        keymeter
            .metric("keymeter_check_requests_total{outcome=\"invalid_key\"}")
            .await,
        1.0
    );

    // A key blocked by the billing system while running is denied within a second.
    let started = Instant::now();
    billing
        .publish_update(vec![KeyEntry::blocked("app-1", GOOD, "balance")])
        .await
        .unwrap();
    wait_until(
        "the blocked key is denied",
        Duration::from_secs(5),
        || async { get(&envoy, &[("api-key", GOOD)]).await.status == 403 },
    )
    .await;
    let propagation = started.elapsed();
    println!("block propagation (billing publish -> Envoy denies): {propagation:?}");
    assert!(
        propagation < Duration::from_secs(1),
        "block took {propagation:?} to reach Envoy"
    );
    assert_eq!(get(&envoy, &[("apikey", OTHER)]).await.status, 200);
    keymeter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_key_header_keeps_the_key_from_the_backend() {
    let config = |port| {
        let mut config = default_config(port);
        config.check.strip_key_header = true;
        config
    };
    let Rig {
        keymeter,
        backend,
        envoy,
        billing: _billing,
        broker: _broker,
    } = Rig::start(
        vec![KeyEntry::ok("app-1", GOOD)],
        config,
        Backend::start().await,
        EnvoyMode::ExtAuthz,
    )
    .await;
    assert_eq!(get(&envoy, &[("api-key", GOOD)]).await.status, 200);
    let seen = backend.requests();
    assert_eq!(seen[0].header("api-key"), None);
    assert_eq!(seen[0].header("x-billing-app-id"), Some("app-1"));
    keymeter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_a_key_list_is_loaded() {
    // A port nobody listens on: keymeter starts, cannot connect, has no keys.
    let dead_port = crate::support::free_port();
    let keymeter = Keymeter::start(Config::for_local_broker("127.0.0.1", dead_port)).await;
    wait_until("admin port answers", Duration::from_secs(10), || async {
        keymeter.readyz().await.0 != 0
    })
    .await;
    let (code, body) = keymeter.readyz().await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("no key list"), "{body}");
    assert_eq!(keymeter.admin_get("/healthz").await.0, 200);
    let serving = grpc_health(keymeter.grpc_port()).await;
    assert_eq!(serving, "NotServing");
    // Checks still answer (deny), they do not error.
    let r = keymeter.check(&[("api-key", GOOD)]).await;
    assert_eq!(crate::support::keymeter::http_status(&r), 401);
    keymeter.stop().await;
}

/// Envoy need not wait for keymeter: it fails closed (503) until keymeter is up, then
/// uses it at once, and its health check sees keymeter as serving once keys are loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keymeter_started_after_envoy_is_used_once_it_is_up() {
    let broker = Mosquitto::start().await;
    let _billing = billing(broker.port(), vec![KeyEntry::ok("app-1", GOOD)]).await;
    let backend = Backend::start().await;
    // Nothing listens there yet: Envoy sees keymeter as down.
    let grpc_port = crate::support::free_port();
    let envoy = Envoy::start(EnvoyPorts {
        keymeter_grpc: grpc_port,
        backend: backend.port(),
    })
    .await;
    assert_eq!(
        get(&envoy, &[("api-key", GOOD)]).await.status,
        503,
        "fails closed"
    );
    assert!(backend.requests().is_empty());

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", grpc_port))
        .await
        .unwrap();
    let started = Instant::now();
    let keymeter = Keymeter::start_on(
        listener,
        Config::for_local_broker("127.0.0.1", broker.port()),
    )
    .await;
    keymeter.wait_ready().await;
    wait_until(
        "Envoy allows through the late keymeter",
        Duration::from_secs(10),
        || async { get(&envoy, &[("api-key", GOOD)]).await.status == 200 },
    )
    .await;
    println!(
        "first allowed request {:?} after keymeter started",
        started.elapsed()
    );
    assert_eq!(get(&envoy, &[("api-key", "sk-nope")]).await.status, 401);
    wait_until(
        "Envoy's health check sees keymeter serving",
        Duration::from_secs(20),
        || envoy.cluster_healthy("keymeter"),
    )
    .await;
    keymeter.stop().await;
}

async fn grpc_health(port: u16) -> String {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = HealthClient::new(channel);
    let r = c
        .check(HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .unwrap()
        .into_inner();
    format!("{:?}", r.status())
}

/// The brute-force guard through Envoy: past the limit of invalid keys an address gets
/// 429 with retry-after, while its valid key keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_invalid_keys_from_one_address_get_429() {
    let config = |port| {
        let mut config = default_config(port);
        config.check.invalid_key_limit = Some(keymeter::config::InvalidKeyLimit {
            max_attempts: 3,
            window_secs: 60,
            max_clients: 1000,
            ..Default::default()
        });
        config
    };
    let Rig {
        keymeter,
        envoy,
        billing: _billing,
        backend: _backend,
        broker: _broker,
    } = Rig::start(
        vec![KeyEntry::ok("app-1", GOOD)],
        config,
        Backend::start().await,
        EnvoyMode::ExtAuthz,
    )
    .await;
    for _ in 0..3 {
        assert_eq!(get(&envoy, &[("api-key", "sk-guess")]).await.status, 401);
    }
    let limited = get(&envoy, &[("api-key", "sk-guess-again")]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(error_of(&limited), "too_many_invalid_keys");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(
        get(&envoy, &[("api-key", GOOD)]).await.status,
        200,
        "valid keys unharmed"
    );
    assert_eq!(
        keymeter
            .metric("keymeter_check_requests_total{outcome=\"rate_limited\"}")
            .await,
        1.0
    );
    keymeter.stop().await;
}
