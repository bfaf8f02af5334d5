//! Local enforcement through a real Envoy (`deploy/envoy/envoy-local.yaml`): keymeter
//! pushes the live key list into Envoy's own `api_key_auth` filter over ECDS, the key
//! list comes from a billing stand-in on a real mosquitto, and metering goes through
//! the access log as in ext_authz mode.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::backend::Reply;
use crate::support::keymeter::{Keymeter, billing};
use crate::support::rig::{BLOCKED, EnvoyMode, GOOD, OTHER, Rig, three_keys};
use crate::support::{
    Backend, Envoy, EnvoyPorts, Mosquitto, STARTUP_TIMEOUT, http_client, wait_until,
};
use keymeter::Config;
use keymeter::keys::KeyEntry;
use keymeter::metrics::Metrics;
use keymeter::xds::{FilterSettings, Version, XdsServer, encode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const NEW: &str = "sk-new-0003";
/// The bound for a billing change to reach Envoy's decisions.
const WITHIN: Duration = Duration::from_secs(1);

fn local_config(broker_port: u16) -> Config {
    let mut config = Config::for_local_broker("127.0.0.1", broker_port);
    config.xds.enabled = true;
    config
}

async fn status(envoy: &Envoy, headers: &[(&str, &str)]) -> u16 {
    let mut req = http_client().get(envoy.url("/v1/chat/completions"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send()
        .await
        .expect("request through Envoy")
        .status()
        .as_u16()
}

/// Sends requests with `key` until one answers `want`; the time from `since` to it.
async fn time_until(envoy: &Envoy, key: &str, want: u16, since: Instant) -> Duration {
    let deadline = since + Duration::from_secs(10);
    loop {
        if status(envoy, &[("api-key", key)]).await == want {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{key} never answered {want} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A broker with a billing stand-in serving GOOD, OTHER and BLOCKED, keymeter in local
/// mode, and Envoy with the shipped local config in front of `backend`.
async fn local_mode(backend: Backend) -> Rig {
    Rig::start(three_keys(), local_config, backend, EnvoyMode::Local).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_billing_update_reaches_envoys_own_filter_within_a_second() {
    let Rig {
        billing,
        keymeter,
        backend,
        envoy,
        broker: _broker,
    } = local_mode(Backend::start().await).await;

    // Envoy is /ready only with the first list: decisions are right at once.
    assert_eq!(status(&envoy, &[]).await, 401, "no key");
    assert_eq!(status(&envoy, &[("api-key", "sk-unknown")]).await, 401);
    assert_eq!(
        status(&envoy, &[("api-key", BLOCKED)]).await,
        401,
        "blocked keys get Envoy's 401 in local mode"
    );
    assert!(
        backend.requests().is_empty(),
        "no denied request reached the backend"
    );
    let spoofed = [("api-key", GOOD), ("x-billing-app-id", "spoofed")];
    assert_eq!(status(&envoy, &spoofed).await, 200);
    assert_eq!(status(&envoy, &[("apikey", OTHER)]).await, 200);
    let seen = backend.requests();
    assert_eq!(
        seen[0].header("x-billing-app-id"),
        Some("app-1"),
        "overwritten"
    );
    assert_eq!(seen[0].header("api-key"), Some(GOOD), "key header kept");
    assert_eq!(seen[1].header("x-billing-app-id"), Some("app-2"));

    // A key the billing system adds is allowed, and a block denies it, each within 1 s.
    assert_eq!(status(&envoy, &[("api-key", NEW)]).await, 401);
    let published = Instant::now();
    billing
        .publish_update(vec![KeyEntry::ok("app-4", NEW)])
        .await
        .unwrap();
    let allowed_after = time_until(&envoy, NEW, 200, published).await;
    let published = Instant::now();
    billing
        .publish_update(vec![KeyEntry::blocked("", NEW, "balance")])
        .await
        .unwrap();
    let denied_after = time_until(&envoy, NEW, 401, published).await;
    println!(
        "local mode: publish → allowed by Envoy in {allowed_after:?}, block → denied in {denied_after:?}"
    );
    assert!(
        allowed_after < WITHIN,
        "added key allowed after {allowed_after:?}"
    );
    assert!(
        denied_after < WITHIN,
        "blocked key denied after {denied_after:?}"
    );
    assert_eq!(
        backend
            .requests()
            .last()
            .unwrap()
            .header("x-billing-app-id"),
        Some("app-4")
    );

    assert_eq!(keymeter.metric("keymeter_xds_envoys_connected").await, 1.0);
    assert!(keymeter.metric("keymeter_xds_acks_total").await >= 3.0);
    assert_eq!(keymeter.metric("keymeter_xds_nacks_total").await, 0.0);
    assert_eq!(
        keymeter.metric("keymeter_xds_keys").await,
        2.0,
        "GOOD and OTHER"
    );
    assert_eq!(
        keymeter
            .metric("keymeter_check_requests_total{outcome=\"allowed\"}")
            .await,
        0.0,
        "no ext_authz Check in local mode"
    );
    // Envoy's own filter decided (polling above sent more requests than these).
    assert!(envoy.stat("http.ingress_http.api_key_auth.allowed").await >= 4);
    assert!(
        envoy
            .stat("http.ingress_http.api_key_auth.unauthorized")
            .await
            >= 5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_keeps_the_last_list_while_keymeter_is_down_and_gets_the_current_one_back() {
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", GOOD)]).await;
    let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_port = grpc.local_addr().unwrap().port();
    let keymeter = Keymeter::start_on(grpc, local_config(broker.port())).await;
    keymeter.wait_ready().await;
    let backend = Backend::start().await;
    let envoy = Envoy::start_local(EnvoyPorts {
        keymeter_grpc: grpc_port,
        backend: backend.port(),
    })
    .await;
    assert_eq!(status(&envoy, &[("api-key", GOOD)]).await, 200);

    keymeter.stop().await;
    // The billing system changes its mind while keymeter is away.
    billing.set_keys(vec![
        KeyEntry::blocked("app-1", GOOD, "balance"),
        KeyEntry::ok("app-4", NEW),
    ]);
    wait_until("Envoy sees keymeter gone", STARTUP_TIMEOUT, || async {
        envoy.stat("cluster.keymeter.upstream_cx_active").await == 0
    })
    .await;
    for _ in 0..20 {
        assert_eq!(
            status(&envoy, &[("api-key", GOOD)]).await,
            200,
            "fail-static: the last list still allows"
        );
        assert_eq!(
            status(&envoy, &[("api-key", NEW)]).await,
            401,
            "and still denies"
        );
    }

    let restarted = Instant::now();
    let grpc = TcpListener::bind(("127.0.0.1", grpc_port)).await.unwrap();
    let keymeter = Keymeter::start_on(grpc, local_config(broker.port())).await;
    let allowed_after = time_until(&envoy, NEW, 200, restarted).await;
    let denied_after = time_until(&envoy, GOOD, 401, restarted).await;
    println!(
        "keymeter restarted: Envoy reconnected and enforces the current list after {allowed_after:?} (new key allowed) / {denied_after:?} (blocked key denied)"
    );
    assert_eq!(keymeter.metric("keymeter_xds_envoys_connected").await, 1.0);
    assert_eq!(keymeter.metric("keymeter_xds_nacks_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_2xx_request_is_billed_once_with_its_app_and_denials_are_not() {
    let backend = Backend::start_replying(|_| {
        Reply::ok()
            .header("x-billing-module", "llm")
            .header("x-billing-model", "gpt-4")
            .header("x-billing-usage", "7")
            .chunk("ok")
    })
    .await;
    let Rig {
        billing,
        keymeter,
        envoy,
        broker: _broker,
        backend: _backend,
    } = local_mode(backend).await;

    const N: usize = 40;
    for i in 0..N {
        let (header, key) = if i % 2 == 0 {
            ("api-key", GOOD)
        } else {
            ("apikey", OTHER)
        };
        let r = http_client()
            .get(envoy.url("/v1/chat"))
            .header(header, key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.headers().get("x-billing-usage").is_none(),
            "usage hidden from clients"
        );
    }
    for key in ["sk-unknown", BLOCKED] {
        assert_eq!(status(&envoy, &[("api-key", key)]).await, 401);
    }
    assert_eq!(status(&envoy, &[]).await, 401);

    let reports = billing.wait_for_reports(N, Duration::from_secs(20)).await;
    assert_eq!(reports.len(), N, "one record per 2xx request");
    let ids: HashSet<&str> = reports
        .iter()
        .filter_map(|r| r["record_id"].as_str())
        .collect();
    assert_eq!(ids.len(), N, "distinct record ids");
    for r in &reports {
        let want = match r["api_key"].as_str() {
            Some(GOOD) => "app-1",
            Some(OTHER) => "app-2",
            other => panic!("record for an unexpected key {other:?}"),
        };
        assert_eq!(r["app_id"], want);
        assert_eq!(
            (r["module"].as_str(), r["usage"].as_i64()),
            (Some("llm"), Some(7))
        );
    }
    // The three denials reach the log as api_key_auth's 401s: none bills.
    wait_until(
        "the denials are logged",
        Duration::from_secs(10),
        || async {
            crate::support::keymeter::metric_sum(
                &keymeter.admin_get("/metrics").await.1,
                "keymeter_usage_entries_not_billed_total",
            ) >= 3.0
        },
    )
    .await;
    assert_eq!(
        keymeter
            .metric("keymeter_usage_entries_not_billed_total{reason=\"denied\"}")
            .await,
        3.0,
        "Envoy's api_key_auth denials count as denied"
    );
    keymeter.assert_no_record_unaccounted().await;
    assert_eq!(billing.reports().len(), N, "nothing billed late");
}

/// keymeter's ECDS service on its own, fed versions by the test, with a real Envoy.
struct Feed {
    port: u16,
    publish: tokio::sync::watch::Sender<Option<Arc<Version>>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl Feed {
    async fn start() -> Feed {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (publish, versions) = tokio::sync::watch::channel(None);
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        let server = XdsServer::new(
            Arc::new(settings()),
            versions,
            metrics.clone(),
            4 << 20,
            stop.clone(),
        );
        let token = stop.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    token.cancelled_owned(),
                ),
        );
        Feed {
            port,
            publish,
            metrics,
            stop,
        }
    }

    fn push(&self, settings: &FilterSettings, keys: &[(&str, &str)]) {
        let v = encode(settings, keys.iter().copied(), Instant::now()).unwrap();
        self.publish.send_replace(Some(Arc::new(v)));
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn settings() -> FilterSettings {
    FilterSettings {
        resource_name: "keymeter.api_key_auth".into(),
        key_headers: vec!["api-key".into(), "apikey".into()],
        forward_header: "x-billing-app-id".into(),
        hide_credentials: false,
        max_keys: 1000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_envoy_rejects_is_counted_and_the_last_accepted_one_stays() {
    let feed = Feed::start().await;
    feed.push(&settings(), &[(GOOD, "app-1")]);
    let backend = Backend::start().await;
    let envoy = Envoy::start_local(EnvoyPorts {
        keymeter_grpc: feed.port,
        backend: backend.port(),
    })
    .await;
    assert_eq!(status(&envoy, &[("api-key", GOOD)]).await, 200);
    assert_eq!(feed.metrics.xds.acks.get(), 1);

    // A config Envoy refuses: a key source that names nothing.
    let mut broken = settings();
    broken.key_headers.push(String::new());
    feed.push(&broken, &[(GOOD, "app-1"), (NEW, "app-4")]);
    wait_until("Envoy's NACK", Duration::from_secs(10), || async {
        feed.metrics.xds.nacks.get() == 1
    })
    .await;
    assert_eq!(
        status(&envoy, &[("api-key", GOOD)]).await,
        200,
        "last version kept"
    );
    assert_eq!(
        status(&envoy, &[("api-key", NEW)]).await,
        401,
        "the rejected one not applied"
    );
    assert_eq!(feed.metrics.xds.acks.get(), 1);
    assert_eq!(feed.metrics.xds.pushes.get(), 2);

    // The next good version goes through.
    feed.push(&settings(), &[(NEW, "app-4")]);
    let pushed = Instant::now();
    let allowed_after = time_until(&envoy, NEW, 200, pushed).await;
    println!("after a NACK, the next version applied in {allowed_after:?}");
    assert_eq!(status(&envoy, &[("api-key", GOOD)]).await, 401);
    assert_eq!(feed.metrics.xds.acks.get(), 2);
    assert_eq!(feed.metrics.xds.nacks.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_first_list_envoy_denies_everything() {
    // Nothing answers on keymeter's port: Envoy waits initial_fetch_timeout (10 s) for
    // a list, then starts with the deny-all default_config.
    let backend = Backend::start().await;
    let started = Instant::now();
    let envoy = Envoy::start_local(EnvoyPorts {
        keymeter_grpc: crate::support::free_port(),
        backend: backend.port(),
    })
    .await;
    println!(
        "Envoy /ready without keymeter after {:?}",
        started.elapsed()
    );
    for key in [GOOD, "anything"] {
        assert_eq!(status(&envoy, &[("api-key", key)]).await, 401);
    }
    assert!(backend.requests().is_empty());
}

/// The pushed list holds raw keys: with mTLS allow-lists, only Envoy's identity may
/// subscribe; another certificate from the same CA (a batch job's) is refused before
/// anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mtls_only_envoys_identity_gets_the_key_list() {
    use crate::support::TestPki;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::extension::v3::extension_config_discovery_service_client::ExtensionConfigDiscoveryServiceClient;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

    let pki = TestPki::generate();
    let broker = Mosquitto::start().await;
    let _billing = billing(broker.port(), vec![KeyEntry::ok("app-1", GOOD)]).await;
    let mut config = local_config(broker.port());
    config.listen.grpc_tls = Some(pki.grpc_tls_for_envoy_and_job());
    let keymeter = Keymeter::start_ready(config).await;
    let subscribe = |cert: &std::path::Path, key: &std::path::Path| {
        let tls = ClientTlsConfig::new()
            .domain_name("localhost")
            .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca_cert).unwrap()))
            .identity(Identity::from_pem(
                std::fs::read(cert).unwrap(),
                std::fs::read(key).unwrap(),
            ));
        let url = format!("https://127.0.0.1:{}", keymeter.grpc_port());
        async move {
            let channel = Endpoint::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(DiscoveryRequest {
                node: Some(Node {
                    id: "probe".into(),
                    ..Default::default()
                }),
                resource_names: vec!["keymeter.api_key_auth".into()],
                type_url: keymeter::xds::TYPED_EXTENSION_CONFIG_TYPE.into(),
                ..Default::default()
            })
            .await
            .unwrap();
            let mut stream = ExtensionConfigDiscoveryServiceClient::new(channel)
                .stream_extension_configs(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let first = stream.message().await?;
            drop(tx);
            Ok::<_, tonic::Status>(first)
        }
    };
    let refused = subscribe(&pki.job_cert, &pki.job_key).await;
    assert_eq!(
        refused.unwrap_err().code(),
        tonic::Code::PermissionDenied,
        "a job's certificate gets no keys"
    );
    let answer = subscribe(&pki.client_cert, &pki.client_key)
        .await
        .expect("Envoy's identity subscribes")
        .expect("a first version");
    assert_eq!(answer.resources.len(), 1);
    assert_eq!(
        keymeter
            .metric("keymeter_grpc_peers_refused_total{service=\"key_list\"}")
            .await,
        1.0
    );
}
