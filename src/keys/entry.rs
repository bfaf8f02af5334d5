//! The billing system's key entry and the JSON documents that carry lists of them.
//!
//! One shape serves three places: `billing/keys/update` messages (`{"updates": [...]}`),
//! the local keys file and the snapshot (`{"keys": [...]}`). Full lists are parsed as
//! [`KeyListRef`], whose strings borrow from the file's bytes: a million keys cost no
//! allocation per key on their way into the store. Update messages are read more
//! leniently, entry by entry (`update.rs`), into the same [`KeyEntryRef`].

use std::borrow::Cow;

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
        struct Status;
        impl serde::de::Visitor<'_> for Status {
            type Value = KeyStatus;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key status string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<KeyStatus, E> {
                Ok(match s {
                    "ok" => KeyStatus::Ok,
                    "blocked" => KeyStatus::Blocked,
                    _ => KeyStatus::Other(s.to_string()),
                })
            }
        }
        d.deserialize_str(Status)
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

/// A key entry whose strings borrow from the document it was parsed from.
#[derive(Debug, Clone, Deserialize)]
pub struct KeyEntryRef<'a> {
    #[serde(borrow)]
    pub app_id: Cow<'a, str>,
    #[serde(borrow)]
    pub api_key: Cow<'a, str>,
    pub status: KeyStatus,
    #[serde(default, borrow)]
    pub reason: Cow<'a, str>,
}

/// The fields of a key entry, however it was parsed.
#[derive(Debug, Clone, Copy)]
pub struct EntryFields<'a> {
    pub app_id: &'a str,
    pub api_key: &'a str,
    pub status: &'a KeyStatus,
    pub reason: &'a str,
}

/// Anything the key store can take entries from.
pub trait AsKeyEntry {
    fn fields(&self) -> EntryFields<'_>;
}

impl AsKeyEntry for KeyEntry {
    fn fields(&self) -> EntryFields<'_> {
        EntryFields {
            app_id: &self.app_id,
            api_key: &self.api_key,
            status: &self.status,
            reason: &self.reason,
        }
    }
}

impl AsKeyEntry for KeyEntryRef<'_> {
    fn fields(&self) -> EntryFields<'_> {
        EntryFields {
            app_id: &self.app_id,
            api_key: &self.api_key,
            status: &self.status,
            reason: &self.reason,
        }
    }
}

/// Payload of `billing/keys/update` as the billing system's stand-in writes it. keymeter
/// never parses a message into this strict shape: see `update::parse`.
#[derive(Debug, Clone, Serialize)]
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

/// [`KeyList`] as parsed from a keys file or snapshot, borrowing its strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyListRef<'a> {
    #[serde(borrow)]
    pub keys: Vec<KeyEntryRef<'a>>,
    #[serde(default)]
    pub saved_at: Option<i64>,
}
