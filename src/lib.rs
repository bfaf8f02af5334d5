//! keymeter: API-key checks and usage metering for an MQTT billing system, as an
//! Envoy ext_authz and access-log service.
//!
//! [`run`] is the whole server; `main` only parses the command line and calls it.

pub mod accesslog;
pub mod admin;
pub mod authz;
pub mod config;
pub mod dev;
mod grpc;
pub mod keys;
pub mod mqtt;
pub mod outbox;
pub mod peers;
mod protowire;
pub mod report;
mod server;
pub mod telemetry;
pub mod usage;
pub mod xds;

pub use config::Config;
pub use server::{Listeners, RunError, run};

/// keymeter's own gRPC API (`proto/`).
pub mod proto {
    pub mod v1 {
        tonic::include_proto!("keymeter.v1");
    }
}
