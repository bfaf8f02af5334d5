//! Configuration: one TOML file, environment overrides for secrets and deploy-time
//! values, typed fields, unknown keys rejected, and every error naming its key.
//!
//! One file per section, each with its struct, its defaults (written once, in its
//! `Default`) and its `validate`; checks across sections are here. What needs the
//! machine (files readable, directories writable) is `preflight::check`.

mod check;
mod env;
mod keys;
mod listen;
mod log;
mod mqtt;
mod outbox;
mod usage;
mod xds;

use std::fmt::Display;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use check::{CheckConfig, InvalidKeyLimit};
pub use env::override_names as env_override_names;
pub use keys::KeysConfig;
pub use listen::{GrpcTlsConfig, ListenConfig, PeerAllowList};
pub use log::{LogConfig, LogFormat};
pub use mqtt::{MqttConfig, MqttProtocol, TlsConfig, Topics};
pub use outbox::{FsyncMode, OutboxSettings};
pub use usage::{RouteRule, StatusClass, UsageConfig, UsageHeaders};
pub use xds::{XDS_MAX_KEYS_LIMIT, XdsConfig};

/// Exit code for a bad configuration or command line (sysexits.h `EX_USAGE`).
pub const EXIT_USAGE: i32 = 64;

/// A configuration error, always naming the offending key (or env var, or file).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: &'static str, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Every section has its defaults; `[mqtt]` must still be present (`Config::parse`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    /// The billing system's broker. Required outside dev mode: without it nothing is
    /// metered and no key list arrives.
    pub mqtt: MqttConfig,
    pub topics: Topics,
    pub keys: KeysConfig,
    pub check: CheckConfig,
    pub usage: UsageConfig,
    pub outbox: OutboxSettings,
    pub log: LogConfig,
    /// Local enforcement: the key list pushed into Envoy's `api_key_auth` over ECDS.
    pub xds: XdsConfig,
}

impl Config {
    /// Reads `path`, applies environment overrides from the process environment, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path, |var| std::env::var(var).ok())
    }

    /// Parses TOML text with overrides from `env`; `path` only names the source in errors.
    pub fn parse(
        text: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: match e.span() {
                Some(span) => {
                    let (line, column) = line_and_column(text, span.start);
                    format!("line {line}, column {column}: {}", e.message())
                }
                None => e.message().to_string(),
            },
        })?;
        env::apply(&mut value, env)?;
        if !value.contains_key("mqtt") {
            return Err(ConfigError::invalid(
                "mqtt",
                "missing: keymeter needs the billing system's MQTT broker ([mqtt] host = ...) \
                 to receive keys and deliver usage. To try keymeter locally without a broker, \
                 run `keymeter dev`",
            ));
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
                let key = e.path().to_string();
                ConfigError::Invalid {
                    key,
                    message: e.into_inner().message().to_string(),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    /// Semantic checks serde cannot express, section by section, then across sections;
    /// each names its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen.validate()?;
        self.mqtt.validate()?;
        self.topics.validate()?;
        self.keys.validate()?;
        self.check.validate()?;
        self.usage.validate()?;
        self.outbox.validate()?;
        self.xds.validate()?;
        self.log.validate()?;
        if self.xds.enabled && self.check.strip_key_header {
            return Err(ConfigError::invalid(
                "check.strip_key_header",
                "cannot be true with xds.enabled: Envoy's api_key_auth would remove the key before \
                 the access log is written, and a request whose key is not logged cannot be billed",
            ));
        }
        Ok(())
    }

    /// The MQTT client id: configured, or `keymeter-<hostname>`.
    pub fn client_id(&self) -> String {
        if !self.mqtt.client_id.is_empty() {
            return self.mqtt.client_id.clone();
        }
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let host: String = host
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
            .take(100)
            .collect();
        format!("keymeter-{host}")
    }

    /// A configuration for a broker on loopback without TLS: dev mode and tests.
    pub fn for_local_broker(host: &str, port: u16) -> Config {
        Config {
            listen: ListenConfig {
                grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
                admin: SocketAddr::from(([127, 0, 0, 1], 0)),
                ..ListenConfig::default()
            },
            mqtt: MqttConfig {
                host: host.into(),
                port,
                reconnect_max_secs: 2,
                tls: TlsConfig {
                    enabled: false,
                    ..TlsConfig::default()
                },
                ..MqttConfig::default()
            },
            outbox: OutboxSettings {
                dir: scratch_outbox_dir(),
                ..OutboxSettings::default()
            },
            ..Config::default()
        }
    }
}

/// A secret string: deserializes like a `String`, prints as `<redacted>`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<empty>"
        } else {
            "<redacted>"
        })
    }
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A fresh outbox directory under the system temp dir, for dev mode and tests.
fn scratch_outbox_dir() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("keymeter-outbox-{}-{n}", std::process::id()))
}

/// `key` must be within `range` (inclusive).
fn in_range<T: PartialOrd + Display>(
    key: &str,
    value: T,
    range: RangeInclusive<T>,
) -> Result<(), ConfigError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("must be {} to {}", range.start(), range.end()),
        ))
    }
}

/// `key` must be at least `min`.
fn at_least<T: PartialOrd + Display>(key: &str, value: T, min: T) -> Result<(), ConfigError> {
    if value >= min {
        Ok(())
    } else {
        Err(ConfigError::invalid(key, format!("must be at least {min}")))
    }
}

/// A file named by `key` must be a readable file (what it holds is `preflight`'s).
fn readable_file(key: &str, file: &Path) -> Result<(), ConfigError> {
    if file.is_file() {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("{} is not a readable file", file.display()),
        ))
    }
}

/// HTTP/2 header names as Envoy hands them over: lowercase token characters.
fn check_header_name(key: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("`{name}` is not a lowercase header name"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"), |_| None)
    }

    const MINIMAL: &str = "[mqtt]\nhost = \"broker.example\"\n";

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.mqtt.port, 8883);
        assert!(c.mqtt.tls.enabled);
        assert!(!c.mqtt.tls.insecure_skip_verify);
        assert_eq!(c.check.key_headers, ["api-key", "apikey"]);
        assert!(!c.check.strip_key_header);
        assert_eq!(c.topics, Topics::default());
    }

    #[test]
    fn missing_mqtt_mentions_dev_mode() {
        let e = parse("").unwrap_err().to_string();
        assert!(e.contains("keymeter dev"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse("[mqtt]\nhost = \"b\"\nportt = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("portt"), "{e}");
    }

    #[test]
    fn wrong_type_is_named_with_its_path() {
        let e = parse("[mqtt]\nhost = \"b\"\n[mqtt.tls]\nenabled = \"yes\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mqtt.tls.enabled"), "{e}");
    }

    #[test]
    fn env_overrides_apply_and_bad_values_name_the_variable() {
        let c = Config::parse(MINIMAL, Path::new("t"), |v| match v {
            "KEYMETER_MQTT_PASSWORD" => Some("s3cret".into()),
            "KEYMETER_MQTT_PORT" => Some("1883".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.mqtt.password.expose(), "s3cret");
        assert_eq!(c.mqtt.port, 1883);
        let c = Config::parse(MINIMAL, Path::new("t"), |v| {
            (v == "KEYMETER_OUTBOX_DIR").then(|| "/data/outbox".to_string())
        })
        .unwrap();
        assert_eq!(c.outbox.dir, Path::new("/data/outbox"));
        let c = Config::parse(MINIMAL, Path::new("t"), |v| {
            (v == "KEYMETER_MQTT_PROTOCOL").then(|| "5".to_string())
        })
        .unwrap();
        assert_eq!(c.mqtt.protocol, MqttProtocol::V5);
        let e = Config::parse(MINIMAL, Path::new("t"), |v| {
            (v == "KEYMETER_MQTT_PORT").then(|| "abc".to_string())
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("KEYMETER_MQTT_PORT"), "{e}");
    }

    #[test]
    fn password_is_never_serialized() {
        let c = Config::parse(MINIMAL, Path::new("t"), |v| {
            (v == "KEYMETER_MQTT_PASSWORD").then(|| "s3cret".to_string())
        })
        .unwrap();
        let dumped = toml::to_string(&c).unwrap();
        assert!(!dumped.contains("s3cret"), "{dumped}");
        let debugged = format!("{c:?}");
        assert!(!debugged.contains("s3cret"), "{debugged}");
    }

    #[test]
    fn mqtt_protocol_is_3_1_1_unless_5_is_asked_for() {
        assert_eq!(parse(MINIMAL).unwrap().mqtt.protocol, MqttProtocol::V311);
        let five = parse("[mqtt]\nhost = \"b\"\nprotocol = \"5\"\n").unwrap();
        assert_eq!(five.mqtt.protocol, MqttProtocol::V5);
        let three = parse("[mqtt]\nhost = \"b\"\nprotocol = \"3.1.1\"\n").unwrap();
        assert_eq!(three.mqtt.protocol, MqttProtocol::V311);
        for bad in ["\"4\"", "\"3.1\"", "5"] {
            let e = parse(&format!("[mqtt]\nhost = \"b\"\nprotocol = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("mqtt.protocol"), "{bad}: {e}");
        }
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let e = parse("[mqtt]\nhost = \"b\"\n[check]\napp_id_header = \"X Bad\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("check.app_id_header"), "{e}");
        let e = parse("[mqtt]\nhost = \"b\"\n[topics]\nreport = \"billing/#\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("topics.report"), "{e}");
    }

    #[test]
    fn a_report_listener_is_checked_like_the_grpc_one() {
        let c = parse(&format!("{MINIMAL}[listen]\nreport = \"127.0.0.1:9193\"\n")).unwrap();
        assert_eq!(
            c.listen.report,
            Some(SocketAddr::from(([127, 0, 0, 1], 9193)))
        );
        assert_eq!(parse(MINIMAL).unwrap().listen.report, None);
        for bad in [
            "report = \"127.0.0.1:9191\"",
            "report = \"0.0.0.0:9191\"\nallow_plaintext = true",
            "report = \"0.0.0.0:9192\"\nallow_plaintext = true",
            "report = \"0.0.0.0:9193\"",
        ] {
            let e = parse(&format!("{MINIMAL}[listen]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("listen.report"), "{bad}: {e}");
        }
        let open = "report = \"0.0.0.0:9193\"\nallow_plaintext = true";
        assert!(parse(&format!("{MINIMAL}[listen]\n{open}\n")).is_ok());
    }

    #[test]
    fn xds_is_off_by_default_and_its_bad_values_are_named() {
        let c = parse(MINIMAL).unwrap();
        assert!(!c.xds.enabled);
        assert_eq!(c.xds.resource_name, "keymeter.api_key_auth");
        assert_eq!(c.xds.push_interval_ms, 100);
        let c = parse(&format!(
            "{MINIMAL}[xds]\nenabled = true\nmax_keys = 5000\n"
        ))
        .unwrap();
        assert!(c.xds.enabled);
        assert_eq!(c.xds.max_keys, 5000);
        for (bad, key) in [
            ("resource_name = \"\"", "xds.resource_name"),
            ("resource_name = \"a b\"", "xds.resource_name"),
            ("push_interval_ms = 1", "xds.push_interval_ms"),
            ("max_keys = 0", "xds.max_keys"),
            ("max_keys = 1000001", "xds.max_keys"),
            ("enable = true", "enable"),
            (
                "enabled = true\n[check]\nstrip_key_header = true",
                "check.strip_key_header",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}[xds]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/keymeter.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let c = Config::parse(&text, &path, |_| None);
        // The example names a CA file that only exists in a deployment.
        match c {
            Ok(_) => {}
            Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "mqtt.tls.ca_file"),
            Err(e) => panic!("{e}"),
        }
    }
    /// Every key of the structs: a configuration with every optional part set, as
    /// TOML. An array (`usage.routes`) is one key.
    fn every_key() -> Vec<String> {
        let mut full = Config::for_local_broker("b", 1);
        full.listen.grpc_tls = Some(GrpcTlsConfig {
            cert_file: "c".into(),
            key_file: "k".into(),
            client_ca_file: Some("ca".into()),
            allow: PeerAllowList::default(),
        });
        full.listen.report = Some(SocketAddr::from(([127, 0, 0, 1], 9193)));
        full.mqtt.tls.ca_file = Some("ca".into());
        full.mqtt.tls.client_cert_file = Some("c".into());
        full.mqtt.tls.client_key_file = Some("k".into());
        full.keys.file = Some("f".into());
        full.keys.snapshot = Some("s".into());
        full.check.invalid_key_limit = Some(InvalidKeyLimit::default());
        full.usage.routes = vec![RouteRule::search_example()];
        let mut keys = Vec::new();
        leaves("", &toml::Value::try_from(&full).unwrap(), &mut keys);
        keys
    }

    fn leaves(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&key, v, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }

    /// The example config with its commented-out keys and tables put back.
    #[test]
    fn example_config_shows_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/keymeter.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[')
                        || rest.split_once(" = ").is_some_and(|(k, _)| {
                            k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                        }) =>
                {
                    rest
                }
                _ => l,
            })
            .fold(String::new(), |acc, l| acc + l + "\n");
        let table: toml::Value = toml::from_str(&uncommented).unwrap();
        let mut shown = Vec::new();
        leaves("", &table, &mut shown);
        let missing: Vec<_> = every_key()
            .into_iter()
            .filter(|k| !shown.contains(k))
            .collect();
        assert!(
            missing.is_empty(),
            "keys missing from deploy/keymeter.example.toml: {missing:?}"
        );
    }

    /// The README's configuration table: each row's keys (`.x` and bare `x` after the
    /// first name siblings of it) and the backticked values of its default column.
    fn readme_rows() -> Vec<(Vec<String>, Vec<String>)> {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("### Configuration").expect("section")..];
        let ticked = |cell: &str| -> Vec<String> {
            cell.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_string)
                .collect()
        };
        section
            .lines()
            .skip_while(|l| !l.starts_with("| key |"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|line| {
                let cells: Vec<&str> = line.split('|').map(str::trim).collect();
                let names = ticked(cells[1]);
                let first = names[0].clone();
                let parent = &first[..first.rfind('.').expect("a dotted key")];
                let keys = names
                    .iter()
                    .map(|n| match n {
                        _ if n == &first => first.clone(),
                        _ if n.starts_with('.') => format!("{parent}{n}"),
                        _ if n.contains('.') => n.clone(),
                        _ => format!("{parent}.{n}"),
                    })
                    .collect();
                (keys, ticked(cells[2]))
            })
            .collect()
    }

    fn with(key: &str, value: Option<toml::Value>) -> Result<Config, ConfigError> {
        let mut table: toml::Table = toml::from_str(MINIMAL).unwrap();
        let path: Vec<&str> = key.split('.').collect();
        match value {
            Some(v) => env::set_path(&mut table, &path, v),
            // Only the tables above the key.
            None => {
                let mut t = &mut table;
                for p in &path[..path.len() - 1] {
                    t = t
                        .entry(p.to_string())
                        .or_insert_with(|| toml::Value::Table(Default::default()))
                        .as_table_mut()
                        .unwrap();
                }
            }
        }
        parse(&toml::to_string(&table).unwrap())
    }

    /// Every key the README documents exists, every key of the structs is documented,
    /// and every default the README states as a value is the real one.
    #[test]
    fn readme_table_names_every_key_with_its_real_default() {
        let rows = readme_rows();
        let documented: Vec<&String> = rows.iter().flat_map(|(k, _)| k).collect();
        let mut value_checked = 0;
        for (keys, defaults) in &rows {
            for (i, key) in keys.iter().enumerate() {
                // A key that exists fails with a type error at its own path.
                let wrong = with(key, Some(toml::Value::Table(Default::default())));
                match wrong {
                    Err(ConfigError::Invalid { key: at, message }) => assert!(
                        at == *key && !message.contains("unknown field"),
                        "README key {key} is not a config key: {at}: {message}"
                    ),
                    other => panic!("README key {key}: a table was accepted: {other:?}"),
                }
                let stated = match defaults.len() {
                    1 => &defaults[0],
                    n if n == keys.len() => &defaults[i],
                    _ => {
                        println!("not value-checked: {key} {defaults:?}");
                        continue;
                    }
                };
                if stated.contains('…') || stated.contains('<') {
                    println!("not value-checked: {key} {defaults:?}");
                    continue; // a pattern, not a value
                }
                let value = toml::from_str::<toml::Table>(&format!("v = {stated}"))
                    .map(|mut t| t.remove("v").unwrap())
                    .unwrap_or_else(|_| toml::Value::String(stated.clone()));
                let Ok(base) = with(key, None) else {
                    println!("not value-checked: {key} {defaults:?}");
                    continue; // its section needs more (files) than a default
                };
                let set = with(key, Some(value)).unwrap_or_else(|e| {
                    panic!("README default `{stated}` of {key} is not a valid value: {e}")
                });
                assert_eq!(
                    set, base,
                    "README default of {key} is `{stated}`, not the real one"
                );
                value_checked += 1;
            }
        }
        assert!(value_checked >= 55, "only {value_checked} defaults checked");

        let missing: Vec<_> = every_key()
            .into_iter()
            .filter(|k| !documented.contains(&k))
            .collect();
        assert!(
            missing.is_empty(),
            "config keys missing from the README table: {missing:?}"
        );
    }
}
