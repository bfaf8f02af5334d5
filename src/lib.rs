//! keymeter: API-key checks and usage metering for an MQTT billing system, as an
//! Envoy ext_authz and access-log service.
//!
//! [`run`] is the whole server; `main` only parses the command line and calls it.

pub mod accesslog;
pub mod admin;
pub mod authz;
pub mod clock;
pub mod config;
pub mod dev;
pub mod files;
mod grpc;
pub mod keys;
mod listen;
mod log_limit;
pub mod metrics;
pub mod mqtt;
pub mod outbox;
pub mod peers;
pub mod preflight;
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

    /// The encoded descriptors of `proto/`, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/keymeter_descriptor.bin"));
}
