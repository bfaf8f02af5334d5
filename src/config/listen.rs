//! `[listen]`: keymeter's two listeners, their TLS and their limits.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// gRPC: ext_authz Check, the access log, the Report API, grpc.health.v1.
    pub grpc: SocketAddr,
    /// Admin HTTP: /healthz, /readyz, /metrics.
    pub admin: SocketAddr,
    /// The Report API on its own address instead of `grpc` (with the same TLS and
    /// allow-lists), so that the network can admit jobs to it without letting them
    /// reach the Check and the access log (a NetworkPolicy selects ports, not
    /// methods).
    pub report: Option<SocketAddr>,
    /// TLS (and optionally mTLS) on the gRPC listener; plain when absent.
    pub grpc_tls: Option<GrpcTlsConfig>,
    /// Plaintext gRPC on an address other than loopback: whoever reaches it can bill
    /// any key, so it must be chosen explicitly (and is logged). Loopback (an Envoy or
    /// sidecar in the same pod) needs nothing.
    pub allow_plaintext: bool,
    /// Larger gRPC messages are refused (RESOURCE_EXHAUSTED) before they are decoded.
    /// Envoy's first access-log message carries its node description (~64 KiB).
    pub max_message_bytes: usize,
    /// Open gRPC connections at most; more are refused (reset at once, logged). Envoy
    /// opens about one per worker thread: 4096 serve some 2000 two-thread sidecars.
    pub grpc_max_connections: usize,
    /// An HTTP/2 PING goes to a gRPC connection quiet for this long...
    pub grpc_keepalive_interval_secs: u64,
    /// ...and it is closed if the PING is not answered within this time: a dead
    /// Envoy's connection is noticed within the sum.
    pub grpc_keepalive_timeout_secs: u64,
    /// Open admin connections at most. Past it, a new connection displaces the oldest
    /// one still waiting for its request (a slowloris), or is refused.
    pub admin_max_connections: usize,
    /// An admin connection that has not sent a whole request head within this time
    /// (from its start, or from the end of the previous response) is closed.
    pub admin_header_read_timeout_ms: u64,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig {
            // Loopback: an Envoy (or sidecar) in the same pod reaches it; anything
            // wider is an explicit choice (mTLS, or `allow_plaintext`).
            grpc: SocketAddr::from(([127, 0, 0, 1], 9191)),
            admin: SocketAddr::from(([0, 0, 0, 0], 9192)),
            report: None,
            grpc_tls: None,
            allow_plaintext: false,
            max_message_bytes: 4 << 20,
            grpc_max_connections: 4096,
            grpc_keepalive_interval_secs: 30,
            grpc_keepalive_timeout_secs: 10,
            // Probes, scrapes and port-forwards need a handful at a time.
            admin_max_connections: 64,
            // A probe or scrape sends its request head in one packet.
            admin_header_read_timeout_ms: 5000,
        }
    }
}

/// TLS on keymeter's own gRPC listener (Envoy is the client).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub struct GrpcTlsConfig {
    /// PEM certificate chain presented to Envoy.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// PEM CA bundle: when set, clients must present a certificate signed by it (mTLS).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Which client certificates may call which service (needs `client_ca_file`).
    #[serde(default)]
    pub allow: PeerAllowList,
}

/// Client identities allowed per service, each matched against the certificate's URI
/// subject alternative names (SPIFFE IDs such as
/// `spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway`) and DNS ones. An
/// empty list allows every certificate the client CA signed.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct PeerAllowList {
    /// Envoy: ext_authz Check, the access-log stream (they move money) and, in local
    /// mode, the key list.
    pub envoy: Vec<String>,
    /// Jobs: the Report API.
    pub report: Vec<String>,
}

impl PeerAllowList {
    pub fn is_empty(&self) -> bool {
        self.envoy.is_empty() && self.report.is_empty()
    }
}

impl ListenConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if let Some(t) = &self.grpc_tls {
            for (key, file) in [
                ("listen.grpc_tls.cert_file", Some(&t.cert_file)),
                ("listen.grpc_tls.key_file", Some(&t.key_file)),
                ("listen.grpc_tls.client_ca_file", t.client_ca_file.as_ref()),
            ] {
                if let Some(f) = file {
                    super::readable_file(key, f)?;
                }
            }
            if t.client_ca_file.is_none() && !t.allow.is_empty() {
                return Err(ConfigError::invalid(
                    "listen.grpc_tls.allow",
                    "needs listen.grpc_tls.client_ca_file: without client certificates there are no identities to allow",
                ));
            }
        } else {
            let grpc_listeners = [
                ("listen.grpc", Some(self.grpc)),
                ("listen.report", self.report),
            ];
            for (key, addr) in grpc_listeners {
                if let Some(addr) = addr
                    && !addr.ip().is_loopback()
                    && !self.allow_plaintext
                {
                    return Err(ConfigError::invalid(
                        key,
                        format!(
                            "{addr} is not loopback and [listen.grpc_tls] is not set: whoever reaches a plaintext gRPC port can bill any key. \
                             Configure mTLS (listen.grpc_tls with client_ca_file), listen on loopback (Envoy or a sidecar in the same pod), \
                             or set listen.allow_plaintext = true where the network is otherwise closed (NetworkPolicy)"
                        ),
                    ));
                }
            }
        }
        if let Some(report) = self.report
            && (overlap(report, self.grpc) || overlap(report, self.admin))
        {
            return Err(ConfigError::invalid(
                "listen.report",
                "must differ from listen.grpc and listen.admin (leave it out to serve the Report API on listen.grpc)",
            ));
        }
        if self.max_message_bytes < 256 << 10 {
            return Err(ConfigError::invalid(
                "listen.max_message_bytes",
                "must be at least 262144 (Envoy's access-log identifier alone is ~64 KiB)",
            ));
        }
        super::in_range(
            "listen.grpc_max_connections",
            self.grpc_max_connections,
            1..=1_000_000,
        )?;
        super::in_range(
            "listen.admin_max_connections",
            self.admin_max_connections,
            1..=1_000_000,
        )?;
        super::in_range(
            "listen.grpc_keepalive_interval_secs",
            self.grpc_keepalive_interval_secs,
            1..=3600,
        )?;
        super::in_range(
            "listen.grpc_keepalive_timeout_secs",
            self.grpc_keepalive_timeout_secs,
            1..=600,
        )?;
        super::in_range(
            "listen.admin_header_read_timeout_ms",
            self.admin_header_read_timeout_ms,
            100..=600_000,
        )
    }
}

/// Whether binding both addresses would take the same socket: the same port on the
/// same address, or on any address when one of them is the wildcard.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
