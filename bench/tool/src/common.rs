//! What several subcommands share: the error type, the generated key names, the clock,
//! Envoy addresses, and JSON files.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use serde::Serialize;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The `i`th key of the generated list (`bench_tool keys`).
pub fn key_name(i: usize) -> String {
    format!("sk-bench-{i:08}")
}

/// The app of the `i`th key of the generated list.
pub fn app_name(i: usize) -> String {
    format!("app-{i:08}")
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn socket(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

/// The first position of `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Writes `value` as pretty JSON with a final newline.
pub fn write_json<T: Serialize>(out: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    std::fs::write(out, text).map_err(|e| format!("cannot write {}: {e}", out.display()).into())
}

/// `bench_tool get`: prints one field (`a.b.c`) of a JSON object file, strings without
/// quotes, numbers as plain numbers.
pub fn print_field(file: &Path, field: &str) -> Result<()> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(file)?)?;
    let mut cur = &v;
    for part in field.split('.') {
        cur = cur
            .get(part)
            .ok_or_else(|| format!("{}: no field {field}", file.display()))?;
    }
    match cur {
        serde_json::Value::String(s) => println!("{s}"),
        other => println!("{other}"),
    }
    Ok(())
}
