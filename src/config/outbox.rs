//! `[outbox]`: the durable queue between the ingress and the broker.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// Fsync policy of the outbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(rename_all = "lowercase")]
pub enum FsyncMode {
    /// fsync every group-committed batch: nothing written is lost to a power cut.
    Batch,
    /// fsync every `fsync_interval_ms`: a power cut may lose that much; a crash of
    /// keymeter alone loses nothing (the data is in the kernel).
    #[default]
    Interval,
}

/// The durable outbox between the access log and the broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct OutboxSettings {
    pub dir: PathBuf,
    /// Disk budget for unpublished records; when full, new records are rejected
    /// (counted and logged) while Checks keep working.
    pub max_bytes: u64,
    pub segment_bytes: u64,
    pub fsync: FsyncMode,
    pub fsync_interval_ms: u64,
    /// Records published but not yet acknowledged by the broker, at most.
    pub max_inflight: u16,
}

impl Default for OutboxSettings {
    fn default() -> Self {
        OutboxSettings {
            dir: PathBuf::from("/var/lib/keymeter/outbox"),
            max_bytes: 1 << 30,
            segment_bytes: 16 << 20,
            fsync: FsyncMode::default(),
            fsync_interval_ms: 50,
            max_inflight: 100,
        }
    }
}

impl OutboxSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.max_bytes < 1 << 20 {
            return Err(ConfigError::invalid(
                "outbox.max_bytes",
                "must be at least 1 MiB",
            ));
        }
        if self.segment_bytes < 64 * 1024 || self.segment_bytes > self.max_bytes {
            return Err(ConfigError::invalid(
                "outbox.segment_bytes",
                "must be at least 64 KiB and at most outbox.max_bytes",
            ));
        }
        if self.fsync == FsyncMode::Interval && self.fsync_interval_ms == 0 {
            return Err(ConfigError::invalid(
                "outbox.fsync_interval_ms",
                "must be at least 1 (or use fsync = \"batch\")",
            ));
        }
        super::at_least("outbox.max_inflight", self.max_inflight, 1)
    }
}
