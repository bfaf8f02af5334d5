//! `[keys]`: where keys come from besides the billing system, and its message limit.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct KeysConfig {
    /// Local keys file (`{"keys": [...]}`), reloaded on change and on SIGHUP.
    pub file: Option<PathBuf>,
    /// How often the keys file is checked for changes.
    pub file_poll_interval_ms: u64,
    /// Where the last key list from the billing system is kept for fail-static restarts.
    pub snapshot: Option<PathBuf>,
    /// Larger `billing/keys/update` payloads are rejected whole.
    pub max_update_bytes: usize,
}

impl Default for KeysConfig {
    fn default() -> Self {
        KeysConfig {
            file: None,
            file_poll_interval_ms: 1000,
            snapshot: None,
            max_update_bytes: 64 << 20,
        }
    }
}

impl KeysConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        super::at_least("keys.file_poll_interval_ms", self.file_poll_interval_ms, 10)?;
        super::at_least("keys.max_update_bytes", self.max_update_bytes, 1024)
    }
}
