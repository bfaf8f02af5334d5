//! `[check]`: where a request's key is found and what an answer carries.

use serde::Deserialize;

use super::{ConfigError, check_header_name};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct CheckConfig {
    /// Request headers searched for the key, in order; the first present wins.
    pub key_headers: Vec<String>,
    /// Also accept `authorization: Bearer <key>` (after `key_headers`).
    pub accept_bearer: bool,
    /// Header set on allowed requests with the key's app id (overwrites a client's own).
    pub app_id_header: String,
    /// Remove the key headers before the request reaches the backend.
    pub strip_key_header: bool,
    /// Realm in `www-authenticate` on 401 answers.
    pub realm: String,
    /// Brute-force guard per client address; off when absent.
    pub invalid_key_limit: Option<InvalidKeyLimit>,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            key_headers: vec!["api-key".into(), "apikey".into()],
            accept_bearer: false,
            app_id_header: "x-billing-app-id".into(),
            strip_key_header: false,
            realm: "keymeter".into(),
            invalid_key_limit: None,
        }
    }
}

/// Too many invalid keys from one address within `window_secs` and it gets 429 with
/// `retry-after` until the window ends; valid keys from it are never affected.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct InvalidKeyLimit {
    pub max_attempts: u32,
    pub window_secs: u64,
    /// Addresses tracked at once, bounding memory; beyond it new ones are not limited.
    pub max_clients: usize,
    /// Request header holding the client's address, when the Check's peer address is
    /// a proxy's. Envoy configured as an edge (`use_remote_address`, as
    /// `deploy/envoy/envoy.yaml`) sets `x-envoy-external-address` to the address that
    /// `xff_num_trusted_hops` leaves trusted and drops a client's own value; empty
    /// means the Check's source address. Only for an Envoy that overwrites it: an
    /// address a client can write is one it can change to escape the guard.
    pub client_address_header: String,
}

impl Default for InvalidKeyLimit {
    fn default() -> Self {
        InvalidKeyLimit {
            max_attempts: 20,
            window_secs: 60,
            max_clients: 100_000,
            client_address_header: "x-envoy-external-address".into(),
        }
    }
}

impl CheckConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.key_headers.is_empty() && !self.accept_bearer {
            return Err(ConfigError::invalid(
                "check.key_headers",
                "empty and accept_bearer is false: no request could carry a key",
            ));
        }
        for h in &self.key_headers {
            check_header_name("check.key_headers", h)?;
        }
        check_header_name("check.app_id_header", &self.app_id_header)?;
        if let Some(l) = &self.invalid_key_limit {
            super::at_least("check.invalid_key_limit.max_attempts", l.max_attempts, 1)?;
            super::in_range(
                "check.invalid_key_limit.window_secs",
                l.window_secs,
                1..=86_400,
            )?;
            super::at_least("check.invalid_key_limit.max_clients", l.max_clients, 1)?;
        }
        Ok(())
    }
}
