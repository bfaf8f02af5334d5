//! `[mqtt]` and `[topics]`: the billing system's broker and the topics of its contract.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, Secret};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Required (checked by `validate`): without it nothing is metered and no key list
    /// arrives.
    pub host: String,
    pub port: u16,
    pub username: String,
    /// Prefer `KEYMETER_MQTT_PASSWORD`; never printed.
    #[cfg_attr(test, serde(skip_serializing))]
    pub password: Secret,
    /// Empty means `keymeter-<hostname>`: unique per replica, stable across restarts.
    pub client_id: String,
    pub keep_alive_secs: u64,
    /// Reconnect backoff doubles from 100 ms up to this cap.
    pub reconnect_max_secs: u64,
    pub heartbeat_interval_secs: u64,
    /// Ask for the key list again when no `keys_update` answered the last request
    /// within this time (the billing system may have been down when we connected).
    pub keys_request_retry_secs: u64,
    /// `"3.1.1"`, what the billing SDK speaks, or `"5"`, whose PUBACK says whether the
    /// broker accepted a publish: a record the broker refuses (e.g. its ACL denies
    /// `billing/report`) then stays in the outbox instead of being deleted unread.
    pub protocol: MqttProtocol,
    pub tls: TlsConfig,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: String::new(),
            port: 8883,
            username: String::new(),
            password: Secret::default(),
            client_id: String::new(),
            keep_alive_secs: 30,
            reconnect_max_secs: 30,
            heartbeat_interval_secs: 10,
            keys_request_retry_secs: 30,
            protocol: MqttProtocol::default(),
            tls: TlsConfig::default(),
        }
    }
}

/// The MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub enum MqttProtocol {
    #[default]
    #[serde(rename = "3.1.1")]
    V311,
    #[serde(rename = "5")]
    V5,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// TLS to the broker; on by default like the billing SDK.
    pub enabled: bool,
    /// PEM CA bundle; empty means the system's trust roots.
    pub ca_file: Option<PathBuf>,
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// Accept any broker certificate. Dangerous; logged as a warning at start-up.
    pub insecure_skip_verify: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            enabled: true,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            insecure_skip_verify: false,
        }
    }
}

/// The billing system's topics (`billing/…`, as its SDK uses them).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct Topics {
    pub report: String,
    pub keys_request: String,
    pub keys_update: String,
    pub heartbeat: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            report: "billing/report".into(),
            keys_request: "billing/keys/request".into(),
            keys_update: "billing/keys/update".into(),
            heartbeat: "billing/heartbeat".into(),
        }
    }
}

impl MqttConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.host.trim().is_empty() {
            return Err(ConfigError::invalid(
                "mqtt.host",
                "must be set: the billing system's broker",
            ));
        }
        super::in_range("mqtt.port", self.port, 1..=65535)?;
        super::in_range("mqtt.keep_alive_secs", self.keep_alive_secs, 5..=65535)?;
        super::at_least("mqtt.reconnect_max_secs", self.reconnect_max_secs, 1)?;
        super::at_least(
            "mqtt.heartbeat_interval_secs",
            self.heartbeat_interval_secs,
            1,
        )?;
        super::at_least(
            "mqtt.keys_request_retry_secs",
            self.keys_request_retry_secs,
            1,
        )?;
        if self.client_id.len() > 128 {
            return Err(ConfigError::invalid(
                "mqtt.client_id",
                "longer than 128 bytes",
            ));
        }
        let tls = &self.tls;
        if tls.client_cert_file.is_some() != tls.client_key_file.is_some() {
            return Err(ConfigError::invalid(
                "mqtt.tls.client_cert_file",
                "client_cert_file and client_key_file must be set together",
            ));
        }
        if tls.enabled {
            for (key, file) in [
                ("mqtt.tls.ca_file", &tls.ca_file),
                ("mqtt.tls.client_cert_file", &tls.client_cert_file),
                ("mqtt.tls.client_key_file", &tls.client_key_file),
            ] {
                if let Some(f) = file {
                    super::readable_file(key, f)?;
                }
            }
        }
        Ok(())
    }
}

impl Topics {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, topic) in [
            ("topics.report", &self.report),
            ("topics.keys_request", &self.keys_request),
            ("topics.keys_update", &self.keys_update),
            ("topics.heartbeat", &self.heartbeat),
        ] {
            if topic.is_empty() || topic.contains(['+', '#', '\0']) {
                return Err(ConfigError::invalid(
                    key,
                    "must be a non-empty topic name without wildcards",
                ));
            }
        }
        Ok(())
    }
}
