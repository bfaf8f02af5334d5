//! Envoy with the shipped `deploy/envoy/envoy.yaml` fails closed (503, the backend never
//! reached) however keymeter fails: unreachable (`harness_smoke`), frozen so that
//! Checks time out, or answering a gRPC error instead of a decision: INTERNAL (what
//! keymeter answers a message it cannot decode), OUT_OF_RANGE (a message over
//! `listen.max_message_bytes`), UNAVAILABLE, or bytes that are not a CheckResponse.

use std::time::{Duration, Instant};

use crate::support::{
    Backend, ChildGuard, Envoy, EnvoyPorts, Paused, TestDir, binary, free_port, http_client,
};
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse,
};
use keymeter::keys::KeyEntry;
use tonic::{Request, Response, Status};

const KEY: &str = "sk-test-0001";
const WAIT: Duration = Duration::from_secs(20);

async fn get(envoy: &Envoy) -> u16 {
    http_client()
        .get(envoy.url("/v1/anything"))
        .header("api-key", KEY)
        .send()
        .await
        .expect("request through envoy")
        .status()
        .as_u16()
}

/// The real keymeter binary, frozen with SIGSTOP: its connection stays open, no Check
/// is answered, and Envoy's timeouts decide (measured: 503 after about 190 ms, three
/// tries timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_keymeter_times_out_and_envoy_answers_503() {
    let dir = TestDir::new("frozen");
    let keys = dir.path().join("keys.json");
    crate::support::keymeter::write_keys(&keys, vec![KeyEntry::ok("app-1", KEY)]);
    let (grpc, admin) = (free_port(), free_port());
    let config = binary::write_config(
        dir.path(),
        (grpc, admin),
        free_port(),
        "",
        &format!(
            "[keys]\nfile = \"{}\"\n[outbox]\ndir = \"{}\"\n",
            keys.display(),
            dir.path().join("outbox").display()
        ),
    );
    let mut keymeter = ChildGuard::spawn("keymeter", binary::command(&config), dir.path());
    binary::wait_ready(&mut keymeter, admin, WAIT).await;
    let backend = Backend::start().await;
    let envoy = Envoy::start(EnvoyPorts {
        keymeter_grpc: grpc,
        backend: backend.port(),
    })
    .await;
    assert_eq!(get(&envoy).await, 200, "allowed while keymeter answers");

    let paused = Paused::new(&keymeter);
    let started = Instant::now();
    assert_eq!(get(&envoy).await, 503);
    let waited = started.elapsed();
    println!("frozen keymeter: 503 after {waited:?}");
    // The Check (and the retries the shipped config allows) timed out.
    assert!(
        envoy
            .stat("cluster.keymeter.upstream_rq_per_try_timeout")
            .await
            >= 1
    );
    assert_eq!(
        backend.requests().len(),
        1,
        "the request reached the backend"
    );
    assert!(envoy.stat("http.ingress_http.ext_authz.error").await >= 1);

    drop(paused);
    assert_eq!(
        get(&envoy).await,
        200,
        "allowed again once keymeter answers"
    );
}

/// A stand-in Authorization server that fails every Check in one way.
#[derive(Clone, Copy, Debug)]
enum Failure {
    Internal,
    OutOfRange,
    Unavailable,
    /// An OK gRPC status whose message is not a CheckResponse.
    Garbage,
}

struct Failing(Failure);

#[tonic::async_trait]
impl Authorization for Failing {
    async fn check(
        &self,
        _request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Err(match self.0 {
            Failure::Internal => Status::internal("malformed CheckRequest"),
            Failure::OutOfRange => Status::out_of_range("Error, decoded message length too large"),
            Failure::Unavailable => Status::unavailable("shutting down"),
            Failure::Garbage => unreachable!("served by `garbage`"),
        })
    }
}

/// Answers every gRPC call on `listener` with status OK and a message that is not
/// valid protobuf (plain HTTP/2 frames, as no gRPC library would send them).
async fn serve_garbage(listener: tokio::net::TcpListener) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let Ok(mut connection) = h2::server::handshake(socket).await else {
                return;
            };
            while let Some(Ok((_request, mut respond))) = connection.accept().await {
                let response = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .body(())
                    .unwrap();
                let Ok(mut stream) = respond.send_response(response, false) else {
                    continue;
                };
                // Not compressed, 3 bytes: a field with wire type 7, which cannot be.
                let _ = stream.send_data(
                    bytes::Bytes::from_static(&[0, 0, 0, 0, 3, 0x0f, 0xff, 0xff]),
                    false,
                );
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let _ = stream.send_trailers(trailers);
            }
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keymeter_answering_errors_instead_of_decisions_is_failed_closed() {
    for failure in [
        Failure::Internal,
        Failure::OutOfRange,
        Failure::Unavailable,
        Failure::Garbage,
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = match failure {
            Failure::Garbage => tokio::spawn(serve_garbage(listener)),
            _ => tokio::spawn(async move {
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let _ = tonic::transport::Server::builder()
                    .add_service(AuthorizationServer::new(Failing(failure)))
                    .serve_with_incoming(incoming)
                    .await;
            }),
        };
        let backend = Backend::start().await;
        let envoy = Envoy::start(EnvoyPorts {
            keymeter_grpc: port,
            backend: backend.port(),
        })
        .await;
        assert_eq!(get(&envoy).await, 503, "{failure:?}");
        assert!(
            backend.requests().is_empty(),
            "{failure:?}: reached the backend"
        );
        assert!(
            envoy.stat("http.ingress_http.ext_authz.error").await >= 1,
            "{failure:?}: counted as an ext_authz error"
        );
        server.abort();
    }
}
