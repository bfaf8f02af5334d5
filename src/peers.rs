//! Who may call which gRPC service: with mTLS on, every call's client certificate is
//! matched against the allow-list of the service it calls (`listen.grpc_tls.allow`).
//! Check and the access log move money, so only Envoy's identities may call them; the
//! Report API takes jobs' identities; the key list of local mode (ECDS) holds raw keys
//! and goes only to Envoy's identities. A refused call gets PERMISSION_DENIED before any
//! byte of it is read, is counted and logged with the peer's identities.
//!
//! Identities are the certificate's URI subject alternative names (SPIFFE IDs) and DNS
//! ones. Parsing a certificate costs more than a Check, so each distinct certificate
//! is parsed once and its identities kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::PeerAllowList;
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;

/// Distinct client certificates whose identities are kept; a fleet of Envoys rotating
/// certificates stays far below, and past it the cache starts over.
const MAX_CACHED_CERTIFICATES: usize = 4096;
/// At most one log line per this interval; the rest are counted.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

pub use crate::metrics::label::Guarded;

impl Guarded {
    /// The guarded service a gRPC path belongs to; `None` for the rest (health),
    /// which any client the CA signed may call.
    fn of_path(path: &str) -> Option<Guarded> {
        let service = path.strip_prefix('/')?.split('/').next()?;
        match service {
            "envoy.service.auth.v3.Authorization" => Some(Guarded::Check),
            "envoy.service.accesslog.v3.AccessLogService" => Some(Guarded::AccessLog),
            "keymeter.v1.Usage" => Some(Guarded::Report),
            "envoy.service.extension.v3.ExtensionConfigDiscoveryService" => Some(Guarded::KeyList),
            _ => None,
        }
    }
}

/// The URI and DNS subject alternative names of a DER certificate; empty when it does
/// not parse (it then matches no list).
pub fn identities(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            _ => None,
        })
        .collect()
}

struct Gate {
    allow: PeerAllowList,
    metrics: Arc<Metrics>,
    known: Mutex<HashMap<Vec<u8>, Arc<[String]>>>,
    refusals_logged: Mutex<LogLimiter>,
}

impl Gate {
    fn allowed(&self, service: Guarded) -> &[String] {
        match service {
            Guarded::Check | Guarded::AccessLog | Guarded::KeyList => &self.allow.envoy,
            Guarded::Report => &self.allow.report,
        }
    }

    fn identities_of(&self, der: &[u8]) -> Arc<[String]> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ids) = known.get(der) {
            return ids.clone();
        }
        if known.len() >= MAX_CACHED_CERTIFICATES {
            known.clear();
        }
        let ids: Arc<[String]> = identities(der).into();
        known.insert(der.to_vec(), ids.clone());
        ids
    }

    /// `Err` (PERMISSION_DENIED) when the caller may not call `path`.
    fn admit<B>(&self, request: &http::Request<B>) -> Result<(), Status> {
        let Some(service) = Guarded::of_path(request.uri().path()) else {
            return Ok(());
        };
        let allowed = self.allowed(service);
        if allowed.is_empty() {
            return Ok(());
        }
        let certs = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .and_then(|tls| tls.peer_certs());
        let ids = certs
            .as_deref()
            .and_then(|certs| certs.first())
            .map(|leaf| self.identities_of(leaf.as_ref()));
        if let Some(ids) = &ids
            && ids.iter().any(|id| allowed.contains(id))
        {
            return Ok(());
        }
        self.metrics.grpc_peer_refused(service);
        self.log_refusal(service, ids.as_deref().unwrap_or(&[]), request);
        Err(Status::permission_denied(format!(
            "this client certificate may not call {}",
            service.as_str()
        )))
    }

    fn log_refusal<B>(&self, service: Guarded, ids: &[String], request: &http::Request<B>) {
        let admitted = self
            .refusals_logged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit();
        if let Some(suppressed) = admitted {
            let peer = request
                .extensions()
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|tls| tls.get_ref().remote_addr());
            tracing::warn!(
                service = service.as_str(),
                peer = ?peer,
                identities = ?ids,
                suppressed_since_last_log = suppressed,
                "gRPC call refused: the client certificate is not on listen.grpc_tls.allow for this service"
            );
        }
    }
}

/// A tower layer putting the allow-lists in front of every gRPC service.
#[derive(Clone)]
pub struct PeerGate(Arc<Gate>);

impl PeerGate {
    pub fn new(allow: PeerAllowList, metrics: Arc<Metrics>) -> PeerGate {
        PeerGate(Arc::new(Gate {
            allow,
            metrics,
            known: Mutex::new(HashMap::new()),
            refusals_logged: Mutex::new(LogLimiter::new(REFUSAL_LOG_INTERVAL)),
        }))
    }
}

impl<S> tower_layer::Layer<S> for PeerGate {
    type Service = PeerGated<S>;

    fn layer(&self, inner: S) -> PeerGated<S> {
        PeerGated {
            gate: self.0.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct PeerGated<S> {
    gate: Arc<Gate>,
    inner: S,
}

pin_project_lite::pin_project! {
    /// The inner service's answer, or the refusal: no allocation on the way through.
    #[project = GateProj]
    pub enum GateFuture<F> {
        Admitted { #[pin] inner: F },
        Refused { answer: Option<http::Response<tonic::body::Body>> },
    }
}

impl<F, E> std::future::Future for GateFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<tonic::body::Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project() {
            GateProj::Admitted { inner } => inner.poll(cx),
            GateProj::Refused { answer } => Poll::Ready(Ok(answer
                .take()
                .expect("a refusal is polled to completion once"))),
        }
    }
}

impl<S, B> tower_service::Service<http::Request<B>> for PeerGated<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = GateFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.gate.admit(&request) {
            Ok(()) => GateFuture::Admitted {
                inner: self.inner.call(request),
            },
            Err(status) => GateFuture::Refused {
                answer: Some(status.into_http()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_the_services_they_guard() {
        assert_eq!(
            Guarded::of_path("/envoy.service.auth.v3.Authorization/Check"),
            Some(Guarded::Check)
        );
        assert_eq!(
            Guarded::of_path("/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"),
            Some(Guarded::AccessLog)
        );
        assert_eq!(
            Guarded::of_path("/keymeter.v1.Usage/Report"),
            Some(Guarded::Report)
        );
        assert_eq!(
            Guarded::of_path(
                "/envoy.service.extension.v3.ExtensionConfigDiscoveryService/StreamExtensionConfigs"
            ),
            Some(Guarded::KeyList)
        );
        assert_eq!(Guarded::of_path("/grpc.health.v1.Health/Check"), None);
        assert_eq!(Guarded::of_path(""), None);
    }

    #[test]
    fn identities_are_the_uri_and_dns_names() {
        let mut params = rcgen::CertificateParams::new(vec!["envoy.internal".into()]).unwrap();
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://cluster.local/ns/edge/sa/envoy"
                .try_into()
                .unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let mut ids = identities(cert.der());
        ids.sort();
        assert_eq!(
            ids,
            ["envoy.internal", "spiffe://cluster.local/ns/edge/sa/envoy"]
        );
        assert!(identities(b"not a certificate").is_empty());
    }
}
