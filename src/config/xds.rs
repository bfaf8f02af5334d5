//! `[xds]`: local mode, the key list pushed into Envoy's `api_key_auth` over ECDS.

use serde::Deserialize;

use super::ConfigError;

/// The most allowed keys a pushed version may hold: measured with Envoy 1.40
/// (bench/README.md, "Local mode at scale").
pub const XDS_MAX_KEYS_LIMIT: usize = 1_000_000;

/// Local enforcement (`deploy/envoy/envoy-local.yaml`): keymeter serves Envoy's
/// Extension Config Discovery Service with an `api_key_auth` filter config holding
/// every allowed key, and Envoy checks keys itself.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct XdsConfig {
    /// Serve ECDS on the gRPC listener (the ext_authz Check is served either way).
    pub enabled: bool,
    /// The resource name, as in the Envoy filter's `config_discovery`.
    pub resource_name: String,
    /// At most one new version per this many milliseconds: changes in between are
    /// coalesced into the next version.
    pub push_interval_ms: u64,
    /// A key list with more allowed keys than this is not pushed (an error is logged
    /// and counted); Envoy keeps enforcing the last version.
    pub max_keys: usize,
}

impl Default for XdsConfig {
    fn default() -> Self {
        XdsConfig {
            enabled: false,
            resource_name: "keymeter.api_key_auth".into(),
            push_interval_ms: 100,
            max_keys: XDS_MAX_KEYS_LIMIT,
        }
    }
}

impl XdsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.resource_name;
        if name.is_empty() || name.len() > 256 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::invalid(
                "xds.resource_name",
                "must be 1 to 256 printable ASCII characters without spaces",
            ));
        }
        super::in_range("xds.push_interval_ms", self.push_interval_ms, 10..=60_000)?;
        if self.max_keys == 0 || self.max_keys > XDS_MAX_KEYS_LIMIT {
            return Err(ConfigError::invalid(
                "xds.max_keys",
                format!(
                    "must be 1 to {XDS_MAX_KEYS_LIMIT} (the largest list measured to work with Envoy 1.40)"
                ),
            ));
        }
        Ok(())
    }
}
