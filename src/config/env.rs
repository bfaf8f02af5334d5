//! Environment overrides: secrets and values that differ per deployment, applied to
//! the TOML before it is typed, so an override is checked like the file's own value.

use super::ConfigError;

/// What an environment override holds, so `KEYMETER_MQTT_PORT=abc` is an error naming
/// the variable instead of a type error deep in serde.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Int,
    Bool,
}

/// Each variable, the key it sets and what it holds.
const OVERRIDES: &[(&str, &[&str], Kind)] = &[
    ("KEYMETER_MQTT_HOST", &["mqtt", "host"], Kind::Str),
    ("KEYMETER_MQTT_PORT", &["mqtt", "port"], Kind::Int),
    ("KEYMETER_MQTT_USERNAME", &["mqtt", "username"], Kind::Str),
    ("KEYMETER_MQTT_PASSWORD", &["mqtt", "password"], Kind::Str),
    ("KEYMETER_MQTT_CLIENT_ID", &["mqtt", "client_id"], Kind::Str),
    ("KEYMETER_MQTT_PROTOCOL", &["mqtt", "protocol"], Kind::Str),
    (
        "KEYMETER_MQTT_TLS_ENABLED",
        &["mqtt", "tls", "enabled"],
        Kind::Bool,
    ),
    (
        "KEYMETER_MQTT_TLS_CA_FILE",
        &["mqtt", "tls", "ca_file"],
        Kind::Str,
    ),
    ("KEYMETER_GRPC_LISTEN", &["listen", "grpc"], Kind::Str),
    ("KEYMETER_ADMIN_LISTEN", &["listen", "admin"], Kind::Str),
    ("KEYMETER_REPORT_LISTEN", &["listen", "report"], Kind::Str),
    ("KEYMETER_KEYS_FILE", &["keys", "file"], Kind::Str),
    ("KEYMETER_KEYS_SNAPSHOT", &["keys", "snapshot"], Kind::Str),
    ("KEYMETER_OUTBOX_DIR", &["outbox", "dir"], Kind::Str),
    ("KEYMETER_LOG_FORMAT", &["log", "format"], Kind::Str),
    ("KEYMETER_LOG_LEVEL", &["log", "level"], Kind::Str),
];

/// Names of the environment overrides, for `--help` and the README.
pub fn override_names() -> impl Iterator<Item = &'static str> {
    OVERRIDES.iter().map(|(var, _, _)| *var)
}

/// Sets in `table` every key whose variable `env` has.
pub(super) fn apply(
    table: &mut toml::Table,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    for (var, path, kind) in OVERRIDES {
        if let Some(raw) = env(var) {
            set_path(table, path, value(var, &raw, *kind)?);
        }
    }
    Ok(())
}

fn value(var: &'static str, raw: &str, kind: Kind) -> Result<toml::Value, ConfigError> {
    match kind {
        Kind::Str => Ok(toml::Value::String(raw.to_string())),
        Kind::Int => raw
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| ConfigError::Env {
                var,
                message: format!("`{raw}` is not an integer"),
            }),
        Kind::Bool => match raw.trim() {
            "true" | "1" => Ok(toml::Value::Boolean(true)),
            "false" | "0" => Ok(toml::Value::Boolean(false)),
            _ => Err(ConfigError::Env {
                var,
                message: format!("`{raw}` is not true/false"),
            }),
        },
    }
}

pub(super) fn set_path(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    let (last, parents) = path.split_last().expect("override paths are non-empty");
    let mut t = table;
    for p in parents {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            // A scalar where a table belongs: replace it so serde reports the real key.
            *entry = toml::Value::Table(toml::Table::new());
        }
        t = entry.as_table_mut().expect("just made a table");
    }
    t.insert(last.to_string(), value);
}
