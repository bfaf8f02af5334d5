//! The shipped `deploy/envoy/envoy.yaml` as an edge proxy, with a real Envoy: what a
//! client writes into its request cannot choose who it is, what the backend is told,
//! or which records are billed.
//!
//! - Headers with underscores (`x_billing_app_id`, which many frameworks read as
//!   `x-billing-app-id`) are refused with 400 before the Check.
//! - A client's `x-request-id` (record ids build on Envoy's request id) and every
//!   `x-envoy-*` header it sends are dropped; a client's `x-billing-app-id` is
//!   overwritten by the Check's.
//! - The brute-force guard counts invalid keys by an address the client cannot
//!   choose: the TCP peer for direct clients whatever `X-Forwarded-For` they send, the
//!   address a trusted load balancer appended when `xff_num_trusted_hops` is 1.

use crate::support::keymeter::Keymeter;
use crate::support::{Backend, Envoy, EnvoyPorts, TestDir, free_port, http_client};
use keymeter::Config;
use keymeter::config::InvalidKeyLimit;
use keymeter::keys::KeyEntry;

const KEY: &str = "sk-test-0001";

/// keymeter on a keys file, its brute-force guard at 3 invalid keys a minute, behind
/// the shipped Envoy config (`trusted_hops` replaces `xff_num_trusted_hops: 0`).
async fn rig(trusted_hops: u32) -> (Keymeter, Backend, Envoy) {
    let dir = TestDir::new("edge");
    let keys = dir.path().join("keys.json");
    crate::support::keymeter::write_keys(&keys, vec![KeyEntry::ok("app-1", KEY)]);
    let mut config = Config::for_local_broker("127.0.0.1", free_port());
    config.keys.file = Some(keys);
    config.check.invalid_key_limit = Some(InvalidKeyLimit {
        max_attempts: 3,
        window_secs: 600,
        max_clients: 1000,
        ..Default::default()
    });
    let mut keymeter = Keymeter::start_ready(config).await;
    keymeter.hold(dir);
    let backend = Backend::start().await;
    let yaml = crate::support::render_deploy_config(EnvoyPorts {
        keymeter_grpc: keymeter.grpc_port(),
        backend: backend.port(),
    });
    let setting = "xff_num_trusted_hops: 0";
    assert!(yaml.contains(setting), "the shipped config sets {setting}");
    let yaml = yaml.replace(setting, &format!("xff_num_trusted_hops: {trusted_hops}"));
    let envoy = Envoy::start_with_config(yaml).await;
    (keymeter, backend, envoy)
}

async fn get(envoy: &Envoy, key: &str, headers: &[(&str, &str)]) -> u16 {
    let mut request = http_client()
        .get(envoy.url("/v1/chat"))
        .header("api-key", key);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_headers_cannot_choose_identity_or_app() {
    let (keymeter, backend, envoy) = rig(0).await;

    // An underscore header is refused before anything else happens.
    assert_eq!(
        get(&envoy, KEY, &[("x_billing_app_id", "app-evil")]).await,
        400
    );
    assert!(backend.requests().is_empty(), "reached the backend");
    assert_eq!(
        keymeter
            .metric("keymeter_check_requests_total{outcome=\"allowed\"}")
            .await,
        0.0,
        "never asked keymeter"
    );

    // What the backend is told comes from Envoy and keymeter, not from the client.
    let status = get(
        &envoy,
        KEY,
        &[
            ("x-request-id", "chosen-by-client"),
            ("x-billing-app-id", "app-evil"),
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-original-path", "/admin"),
            ("x-envoy-anything", "1"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let seen = backend.requests().pop().unwrap();
    assert_eq!(seen.header("x-billing-app-id"), Some("app-1"));
    let request_id = seen.header("x-request-id").expect("Envoy's request id");
    assert_ne!(request_id, "chosen-by-client");
    for (name, _) in &seen.headers {
        assert!(
            !name.starts_with("x-envoy-") || name == "x-envoy-expected-rq-timeout-ms",
            "{name} reached the backend"
        );
    }
    keymeter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guard_counts_the_peer_not_a_forwarded_for_the_client_wrote() {
    let (keymeter, _backend, envoy) = rig(0).await;
    // Three invalid keys, each claiming another address, in X-Forwarded-For and in
    // the header Envoy tells keymeter the client address with.
    for (i, claimed) in ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
        .iter()
        .enumerate()
    {
        let claims = [
            ("x-forwarded-for", *claimed),
            ("x-envoy-external-address", *claimed),
        ];
        let status = get(&envoy, "sk-guess", &claims).await;
        assert_eq!(status, 401, "attempt {}", i + 1);
    }
    // The fourth is over the limit whatever it claims; a valid key still works.
    assert_eq!(
        get(&envoy, "sk-guess", &[("x-forwarded-for", "198.51.100.99")]).await,
        429
    );
    assert_eq!(get(&envoy, "sk-guess", &[]).await, 429);
    assert_eq!(
        get(&envoy, KEY, &[("x-forwarded-for", "203.0.113.1")]).await,
        200
    );
    keymeter.stop().await;
}

/// Behind one trusted load balancer (`xff_num_trusted_hops: 1`): the address it
/// appended is the client's, and entries a client put in front of it change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_balancer_the_guard_counts_the_address_it_appended() {
    let (keymeter, _backend, envoy) = rig(1).await;
    let via_lb = |client_wrote: &str, lb_saw: &str| {
        if client_wrote.is_empty() {
            lb_saw.to_string()
        } else {
            format!("{client_wrote}, {lb_saw}")
        }
    };
    for claimed in ["", "203.0.113.1", "203.0.113.2, 203.0.113.3"] {
        let xff = via_lb(claimed, "198.51.100.7");
        assert_eq!(
            get(&envoy, "sk-guess", &[("x-forwarded-for", &xff)]).await,
            401
        );
    }
    let xff = via_lb("203.0.113.4", "198.51.100.7");
    assert_eq!(
        get(&envoy, "sk-guess", &[("x-forwarded-for", &xff)]).await,
        429,
        "the client at 198.51.100.7 is over the limit"
    );
    // Another client behind the same balancer is not.
    let xff = via_lb("", "198.51.100.8");
    assert_eq!(
        get(&envoy, "sk-guess", &[("x-forwarded-for", &xff)]).await,
        401
    );
    keymeter.stop().await;
}
