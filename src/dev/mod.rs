//! The local dev mode's stand-ins for the outside world: an in-process MQTT broker
//! ([`broker::EmbeddedBroker`]) and a billing system ([`billing::BillingStandIn`]) that
//! answers key requests and prints the usage reports it receives. Tests use the
//! stand-in against a real mosquitto too.

pub mod billing;
pub mod broker;

use std::path::Path;

pub use billing::{BillingStandIn, StandInError, StandInOptions};
pub use broker::EmbeddedBroker;

use crate::keys::{KeyEntry, KeyList};

/// A fresh private directory (mode 0700, a random name under the system temp dir) for
/// dev mode's outbox, removed when dropped. Not a predictable path: another user of the
/// machine can neither read the records (they hold API keys) nor prepare the directory.
pub fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    tempfile::Builder::new()
        .prefix("keymeter-dev-")
        .permissions(std::fs::Permissions::from_mode(
            crate::files::PRIVATE_DIR_MODE,
        ))
        .tempdir()
}

/// Reads a keys file (`{"keys": [...]}`, the [`KeyList`] format) for the stand-in to
/// serve; the error names the file and the place in it that is wrong, but never
/// quotes a string from it (it could be an API key, and errors end up in logs).
/// The sample keys of `examples/keys.json`, built into the binary.
pub fn sample_keys() -> Result<Vec<KeyEntry>, String> {
    serde_json::from_str::<KeyList>(include_str!("../../examples/keys.json"))
        .map(|list| list.keys)
        .map_err(|e| format!("built-in sample keys: {e}"))
}

pub fn load_keys_file(path: impl AsRef<Path>) -> Result<Vec<KeyEntry>, String> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read keys file {}: {e}", path.display()))?;
    let de = &mut serde_json::Deserializer::from_str(&text);
    let list: KeyList = serde_path_to_error::deserialize(de).map_err(|e| {
        format!(
            "keys file {} is not a valid key list ({{\"keys\": [...]}}): at `{}`: {}",
            path.display(),
            e.path(),
            redact_strings(&e.inner().to_string())
        )
    })?;
    Ok(list.keys)
}

/// Replaces the content of every `string "..."` in a serde message (how serde quotes
/// an unexpected value) with `…`.
fn redact_strings(msg: &str) -> String {
    const MARK: &str = "string \"";
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(start) = rest.find(MARK) {
        out.push_str(&rest[..start + MARK.len()]);
        out.push('…');
        let quoted = &rest[start + MARK.len()..];
        // The value is Debug-escaped, so its closing quote is the first unescaped one.
        let mut escaped = false;
        let end = quoted.char_indices().find_map(|(i, c)| {
            let close = c == '"' && !escaped;
            escaped = c == '\\' && !escaped;
            close.then_some(i)
        });
        match end {
            Some(i) => rest = &quoted[i..],
            None => {
                rest = "\"";
                break;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_file_errors_name_the_file_and_hide_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad-keys.json");
        std::fs::write(&path, r#"{"keys": ["sk-secret-\"quoted", "sk-2"]}"#).unwrap();
        let err = load_keys_file(&path).unwrap_err();
        assert!(err.contains("bad-keys.json"), "{err}");
        assert!(err.contains("keys[0]"), "{err}");
        assert!(!err.contains("sk-"), "{err}");

        std::fs::write(&path, r#"{"keys": [{"app_id": "a", "api_key": "k"}]}"#).unwrap();
        let err = load_keys_file(&path).unwrap_err();
        assert!(err.contains("missing field `status`"), "{err}");

        let err = load_keys_file(dir.path().join("missing.json")).unwrap_err();
        assert!(err.contains("missing.json"), "{err}");
    }

    #[test]
    fn scratch_dirs_are_private_and_unpredictable() {
        use std::os::unix::fs::PermissionsExt;
        let (a, b) = (scratch_dir().unwrap(), scratch_dir().unwrap());
        assert_ne!(a.path(), b.path());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let path = a.path().to_path_buf();
        drop(a);
        assert!(!path.exists(), "removed when dropped");
    }

    #[test]
    fn redaction_keeps_the_rest_of_the_message() {
        assert_eq!(
            redact_strings(r#"invalid type: string "a\"b", expected x at line 1"#),
            r#"invalid type: string "…", expected x at line 1"#
        );
        assert_eq!(redact_strings("no strings"), "no strings");
        assert_eq!(redact_strings(r#"string "unterminated"#), r#"string "…""#);
    }
}
