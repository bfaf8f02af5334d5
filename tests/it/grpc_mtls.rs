//! mTLS on keymeter's own gRPC listener: Envoy presents a client certificate signed by
//! the configured CA and everything (Check, access log) works through it; clients
//! without a certificate, or speaking plaintext, are refused.

use std::time::Duration;

use crate::support::backend::Reply;
use crate::support::keymeter::{Keymeter, billing, check_request};
use crate::support::{
    Backend, Envoy, EnvoyPorts, Mosquitto, TestPki, http_client, render_deploy_config,
};
use keymeter::Config;
use keymeter::keys::KeyEntry;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

const GOOD: &str = "sk-mtls-0001";

/// The deployed Envoy config with TLS (client certificate included) towards keymeter.
fn envoy_config(ports: EnvoyPorts, pki: &TestPki) -> String {
    let yaml = render_deploy_config(ports);
    let anchor = "    - name: keymeter\n";
    assert!(
        yaml.contains(anchor),
        "keymeter cluster in deploy/envoy/envoy.yaml"
    );
    let tls = format!(
        "{anchor}      transport_socket:\n\
         \x20       name: envoy.transport_sockets.tls\n\
         \x20       typed_config:\n\
         \x20         \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext\n\
         \x20         sni: localhost\n\
         \x20         common_tls_context:\n\
         \x20           alpn_protocols: [h2]\n\
         \x20           tls_certificates:\n\
         \x20             - certificate_chain: {{filename: \"{}\"}}\n\
         \x20               private_key: {{filename: \"{}\"}}\n\
         \x20           validation_context:\n\
         \x20             trusted_ca: {{filename: \"{}\"}}\n",
        pki.client_cert.display(),
        pki.client_key.display(),
        pki.ca_cert.display(),
    );
    yaml.replacen(anchor, &tls, 1)
}

async fn tls_channel(
    port: u16,
    pki: &TestPki,
    with_client_cert: bool,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let identity = with_client_cert.then_some((&pki.client_cert, &pki.client_key));
    tls_channel_as(port, pki, identity).await
}

/// A TLS channel presenting the certificate and key at `identity`, if any.
async fn tls_channel_as(
    port: u16,
    pki: &TestPki,
    identity: Option<(&std::path::PathBuf, &std::path::PathBuf)>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca_cert).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    Endpoint::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn grpc_check(channel: tonic::transport::Channel) -> Result<i32, tonic::Status> {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let r = AuthorizationClient::new(channel)
        .check(check_request(&[("api-key", GOOD)]))
        .await?;
    Ok(crate::support::keymeter::http_status(&r.into_inner()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_talks_to_keymeter_over_mutual_tls_and_others_are_refused() {
    let pki = TestPki::generate();
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", GOOD)]).await;
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.listen.grpc_tls = Some(pki.grpc_tls());
    let keymeter = Keymeter::start_ready(config).await;
    let backend = Backend::start_replying(|_| {
        Reply::ok()
            .header("x-billing-module", "llm")
            .header("x-billing-model", "gpt-4")
            .header("x-billing-usage", "9")
            .chunk("ok")
    })
    .await;
    let ports = EnvoyPorts {
        keymeter_grpc: keymeter.grpc_port(),
        backend: backend.port(),
    };
    let envoy = Envoy::start_with_config(envoy_config(ports, &pki)).await;

    let status = |key: &'static str| {
        let url = envoy.url("/v1/chat");
        async move {
            http_client()
                .post(url)
                .header("api-key", key)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(GOOD).await, 200, "Check over mTLS allows");
    assert_eq!(status("sk-nope").await, 401, "and denies");
    // The access log travels the same mTLS connection pool.
    let reports = billing.wait_for_reports(1, Duration::from_secs(20)).await;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0]["usage"], 9);

    // A TLS client with the right CA but no certificate is refused.
    let without = match tls_channel(keymeter.grpc_port(), &pki, false).await {
        Ok(channel) => grpc_check(channel).await.map_err(|s| s.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(
        without.is_err(),
        "no client certificate must be refused: {without:?}"
    );
    // With one it works.
    let with = tls_channel(keymeter.grpc_port(), &pki, true).await.unwrap();
    assert_eq!(grpc_check(with).await.unwrap(), 200);
    // Plaintext gRPC is refused.
    let plain =
        crate::support::keymeter::try_check(keymeter.grpc_port(), &[("api-key", GOOD)]).await;
    assert!(plain.is_none(), "plaintext must not be answered");
    keymeter.stop().await;
}

/// With `listen.grpc_tls.allow`, a certificate from the right CA is not enough: Check
/// and the access log take only Envoy's identity, the Report API only the job's. A
/// forged access-log stream from another certificate bills nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_takes_only_its_allowed_identities() {
    use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
    use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
    use keymeter::proto::v1::usage_client::UsageClient;
    use keymeter::proto::v1::{ReportRequest, UsageRecord};
    use tonic::Code;

    let pki = TestPki::generate();
    let broker = Mosquitto::start().await;
    let billing = billing(broker.port(), vec![KeyEntry::ok("app-1", GOOD)]).await;
    let mut config = Config::for_local_broker("127.0.0.1", broker.port());
    config.listen.grpc_tls = Some(pki.grpc_tls_for_envoy_and_job());
    let keymeter = Keymeter::start_ready(config).await;
    let port = keymeter.grpc_port();

    // Envoy, with its certificate, through the shipped config: allowed and billed.
    let backend = Backend::start_replying(|_| {
        Reply::ok()
            .header("x-billing-module", "llm")
            .header("x-billing-model", "gpt-4")
            .header("x-billing-usage", "9")
            .chunk("ok")
    })
    .await;
    let envoy = Envoy::start_with_config(envoy_config(
        EnvoyPorts {
            keymeter_grpc: port,
            backend: backend.port(),
        },
        &pki,
    ))
    .await;
    let r = http_client()
        .post(envoy.url("/v1/chat"))
        .header("api-key", GOOD)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        billing
            .wait_for_reports(1, Duration::from_secs(20))
            .await
            .len(),
        1
    );

    let channel = |cert: &std::path::PathBuf, key: &std::path::PathBuf| {
        let (cert, key) = (cert.clone(), key.clone());
        let pki = &pki;
        async move {
            tls_channel_as(port, pki, Some((&cert, &key)))
                .await
                .unwrap()
        }
    };
    let envoy_ch = channel(&pki.client_cert, &pki.client_key).await;
    let job_ch = channel(&pki.job_cert, &pki.job_key).await;
    let intruder_ch = channel(&pki.intruder_cert, &pki.intruder_key).await;

    let check =
        |ch: tonic::transport::Channel| async move { grpc_check(ch).await.map_err(|s| s.code()) };
    let report = |ch: tonic::transport::Channel| async move {
        let mut request = tonic::Request::new(ReportRequest {
            records: vec![UsageRecord {
                module: "batch".into(),
                model: "m".into(),
                usage: 1,
                ..Default::default()
            }],
        });
        request
            .metadata_mut()
            .insert("api-key", GOOD.parse().unwrap());
        UsageClient::new(ch)
            .report(request)
            .await
            .map(|_| ())
            .map_err(|s| s.code())
    };
    // A forged entry that would bill GOOD 1,000,000 units.
    let forged_log = |ch: tonic::transport::Channel| async move {
        let message = StreamAccessLogsMessage {
            identifier: None,
            log_entries: Some(
                envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::LogEntries::HttpLogs(
                    envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::HttpAccessLogEntries {
                        log_entry: vec![envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry {
                            request: Some(envoy_types::pb::envoy::data::accesslog::v3::HttpRequestProperties {
                                request_headers: [("api-key".to_string(), GOOD.to_string())].into(),
                                ..Default::default()
                            }),
                            response: Some(envoy_types::pb::envoy::data::accesslog::v3::HttpResponseProperties {
                                response_headers: [
                                    ("x-billing-module".to_string(), "llm".to_string()),
                                    ("x-billing-model".to_string(), "forged".to_string()),
                                    ("x-billing-usage".to_string(), "1000000".to_string()),
                                ]
                                .into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                    },
                ),
            ),
        };
        AccessLogServiceClient::new(ch)
            .stream_access_logs(tokio_stream::iter(vec![message]))
            .await
            .map(|_| ())
            .map_err(|s| s.code())
    };

    assert_eq!(check(envoy_ch.clone()).await, Ok(200));
    assert_eq!(report(envoy_ch.clone()).await, Err(Code::PermissionDenied));
    assert_eq!(report(job_ch.clone()).await, Ok(()));
    assert_eq!(check(job_ch.clone()).await, Err(Code::PermissionDenied));
    assert_eq!(
        forged_log(job_ch.clone()).await,
        Err(Code::PermissionDenied)
    );
    assert_eq!(
        check(intruder_ch.clone()).await,
        Err(Code::PermissionDenied)
    );
    assert_eq!(
        report(intruder_ch.clone()).await,
        Err(Code::PermissionDenied)
    );
    assert_eq!(
        forged_log(intruder_ch.clone()).await,
        Err(Code::PermissionDenied)
    );

    // Envoy's record and the job's report, nothing forged.
    let reports = billing.wait_for_reports(2, Duration::from_secs(20)).await;
    let settle = billing
        .wait_for_reports(3, Duration::from_millis(500))
        .await;
    assert_eq!(settle.len(), 2, "{settle:?}");
    assert!(
        reports.iter().all(|r| r["model"] != "forged"),
        "{reports:?}"
    );
    for (service, n) in [("check", 2.0), ("access_log", 2.0), ("report", 2.0)] {
        assert_eq!(
            keymeter
                .metric(&format!(
                    "keymeter_grpc_peers_refused_total{{service=\"{service}\"}}"
                ))
                .await,
            n,
            "{service}"
        );
    }
    keymeter.stop().await;
}
