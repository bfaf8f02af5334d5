//! The billing system's key entry and the JSON documents that carry lists of them.
//!
//! One shape serves three places: `billing/keys/update` messages (`{"updates": [...]}`),
//! the local keys file and the snapshot (`{"keys": [...]}`).

use serde::{Deserialize, Serialize};

/// Status of a key as the billing system states it.
///
/// Anything other than `ok` or `blocked` is ignored (billing contract), so it is kept
/// as `Other` instead of failing the whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStatus {
    Ok,
    Blocked,
    Other(String),
}

impl KeyStatus {
    pub fn as_str(&self) -> &str {
        match self {
            KeyStatus::Ok => "ok",
            KeyStatus::Blocked => "blocked",
            KeyStatus::Other(s) => s,
        }
    }
}

impl Serialize for KeyStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for KeyStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "ok" => KeyStatus::Ok,
            "blocked" => KeyStatus::Blocked,
            _ => KeyStatus::Other(s),
        })
    }
}

/// One key as the billing system publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEntry {
    pub app_id: String,
    pub api_key: String,
    pub status: KeyStatus,
    #[serde(default)]
    pub reason: String,
}

impl KeyEntry {
    pub fn ok(app_id: &str, api_key: &str) -> Self {
        KeyEntry {
            app_id: app_id.into(),
            api_key: api_key.into(),
            status: KeyStatus::Ok,
            reason: String::new(),
        }
    }

    pub fn blocked(app_id: &str, api_key: &str, reason: &str) -> Self {
        KeyEntry {
            app_id: app_id.into(),
            api_key: api_key.into(),
            status: KeyStatus::Blocked,
            reason: reason.into(),
        }
    }
}

/// Payload of `billing/keys/update`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyUpdate {
    pub updates: Vec<KeyEntry>,
    pub timestamp: i64,
}

/// The keys file and the snapshot: a full list of keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyList {
    pub keys: Vec<KeyEntry>,
    /// When the list was written (epoch ms); set in snapshots, optional in key files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_at: Option<i64>,
}
