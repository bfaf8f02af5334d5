//! The end-to-end rig most request-path tests start with: a real mosquitto, the
//! billing stand-in serving a key list on it, keymeter (in-process) on that broker,
//! a backend, and a real Envoy in front of it that asks keymeter.

use keymeter::Config;
use keymeter::dev::billing::BillingStandIn;
use keymeter::keys::KeyEntry;

use super::keymeter::{Keymeter, billing};
use super::{Backend, Envoy, EnvoyPorts, Mosquitto};

/// Two valid keys (apps `app-1` and `app-2`) and one blocked for "balance" (`app-3`):
/// the key list of [`three_keys`].
pub const GOOD: &str = "sk-test-0001";
pub const OTHER: &str = "sk-test-0002";
pub const BLOCKED: &str = "sk-blocked";

/// GOOD, OTHER and BLOCKED as the billing system lists them.
pub fn three_keys() -> Vec<KeyEntry> {
    vec![
        KeyEntry::ok("app-1", GOOD),
        KeyEntry::ok("app-2", OTHER),
        KeyEntry::blocked("app-3", BLOCKED, "balance"),
    ]
}

/// Which shipped Envoy config runs in front of the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvoyMode {
    /// `deploy/envoy/envoy.yaml`: ext_authz Check per request.
    ExtAuthz,
    /// `deploy/envoy/envoy-local.yaml`: Envoy's own `api_key_auth`, keys over ECDS.
    Local,
}

/// Field order is drop order: Envoy and keymeter stop before the broker goes.
pub struct Rig {
    pub billing: BillingStandIn,
    pub keymeter: Keymeter,
    pub backend: Backend,
    pub envoy: Envoy,
    pub broker: Mosquitto,
}

impl Rig {
    /// Starts the broker and the billing stand-in serving `keys`, keymeter with
    /// `config(broker port)` once it is ready, and Envoy (`mode`) in front of `backend`.
    pub async fn start(
        keys: Vec<KeyEntry>,
        config: impl FnOnce(u16) -> Config,
        backend: Backend,
        mode: EnvoyMode,
    ) -> Rig {
        let broker = Mosquitto::start().await;
        let billing = billing(broker.port(), keys).await;
        let keymeter = Keymeter::start_ready(config(broker.port())).await;
        let ports = EnvoyPorts {
            keymeter_grpc: keymeter.grpc_port(),
            backend: backend.port(),
        };
        let envoy = match mode {
            EnvoyMode::ExtAuthz => Envoy::start(ports).await,
            EnvoyMode::Local => Envoy::start_local(ports).await,
        };
        Rig {
            billing,
            keymeter,
            backend,
            envoy,
            broker,
        }
    }
}

/// keymeter's default config on the broker at `port` (loopback).
pub fn default_config(port: u16) -> Config {
    Config::for_local_broker("127.0.0.1", port)
}
