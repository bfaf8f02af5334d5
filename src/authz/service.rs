//! The gRPC service for `envoy.service.auth.v3.Authorization/Check`, serving raw
//! protobuf bytes: the request goes to [`AuthzService::check_bytes`] undecoded and the
//! answer comes back already encoded (see `wire.rs` for why).

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tonic::body::Body;
use tonic::server::{Grpc, NamedService, UnaryService};
use tonic::{Request, Response, Status};

use super::AuthzService;
use crate::grpc::RawCodec;

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// The `Authorization` gRPC service.
#[derive(Clone)]
pub struct CheckServer {
    inner: Arc<AuthzService>,
    max_message_bytes: usize,
}

impl CheckServer {
    pub fn new(inner: AuthzService, max_message_bytes: usize) -> CheckServer {
        CheckServer {
            inner: Arc::new(inner),
            max_message_bytes,
        }
    }
}

impl NamedService for CheckServer {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

struct Check(Arc<AuthzService>);

impl UnaryService<Bytes> for Check {
    type Response = Bytes;
    type Future = Ready<Result<Response<Bytes>, Status>>;

    fn call(&mut self, request: Request<Bytes>) -> Self::Future {
        // Decided synchronously: an in-memory lookup, nothing to await.
        ready(Ok(Response::new(self.0.check_bytes(request.get_ref()))))
    }
}

impl<B> tower_service::Service<http::Request<B>> for CheckServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<http::Response<Body>, Infallible>> + Send>,
    >;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != CHECK_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let inner = self.inner.clone();
        let max = self.max_message_bytes;
        Box::pin(async move {
            let mut grpc = Grpc::new(RawCodec).apply_max_message_size_config(Some(max), None);
            Ok(grpc.unary(Check(inner), request).await)
        })
    }
}
