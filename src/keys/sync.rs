//! Keeping the key store in sync: billing-system update messages, the local keys
//! file (polled, and reloaded on SIGHUP) and the fail-static snapshot on disk.
//!
//! Every input is parsed and validated whole before anything is applied, so a bad
//! message or file changes nothing; it is counted by reason and logged.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::{Applied, AsKeyEntry, KeyList, KeyListRef, KeyStatus, KeyStore, KeyUpdate, Source};
use crate::admin::metrics::Metrics;

/// Longest accepted API key or app id: far above real keys, small enough to bound memory.
const MAX_FIELD_BYTES: usize = 1024;

/// Why a key list was rejected whole; `reason` is the metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub reason: &'static str,
    pub detail: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

fn rejected(reason: &'static str, detail: impl Into<String>) -> Rejected {
    Rejected {
        reason,
        detail: detail.into(),
    }
}

/// Parses and validates a `billing/keys/update` payload.
pub fn parse_update(payload: &[u8], max_bytes: usize) -> Result<KeyUpdate, Rejected> {
    if payload.len() > max_bytes {
        return Err(rejected(
            "too_large",
            format!("{} bytes, limit {max_bytes}", payload.len()),
        ));
    }
    let update: KeyUpdate = serde_json::from_slice(payload).map_err(json_rejection)?;
    validate_entries(&update.updates)?;
    Ok(update)
}

/// Parses and validates a keys file or snapshot (`{"keys": [...]}`).
pub fn parse_key_list(bytes: &[u8]) -> Result<KeyListRef<'_>, Rejected> {
    let list: KeyListRef = serde_json::from_slice(bytes).map_err(json_rejection)?;
    validate_entries(&list.keys)?;
    Ok(list)
}

fn json_rejection(e: serde_json::Error) -> Rejected {
    use serde_json::error::Category;
    // serde_json's message names the field and position but never echoes values.
    match e.classify() {
        Category::Data => rejected("wrong_shape", e.to_string()),
        Category::Syntax | Category::Eof | Category::Io => rejected("bad_json", e.to_string()),
    }
}

fn validate_entries<E: AsKeyEntry>(entries: &[E]) -> Result<(), Rejected> {
    for (i, e) in entries.iter().enumerate() {
        let e = e.fields();
        let bad = |what: &str| rejected("invalid_entry", format!("entry {i}: {what}"));
        if e.api_key.is_empty() {
            return Err(bad("empty api_key"));
        }
        if e.api_key.len() > MAX_FIELD_BYTES {
            return Err(bad("api_key longer than 1024 bytes"));
        }
        if e.api_key.chars().any(|c| c.is_control() || c == ' ') {
            return Err(bad("api_key contains spaces or control characters"));
        }
        if e.app_id.is_empty() && *e.status == KeyStatus::Ok {
            return Err(bad("empty app_id"));
        }
        if e.app_id.len() > MAX_FIELD_BYTES || e.reason.len() > MAX_FIELD_BYTES {
            return Err(bad("app_id or reason longer than 1024 bytes"));
        }
    }
    Ok(())
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Metrics after a successful change from `source`.
fn record_applied(store: &KeyStore, metrics: &Metrics, source: Source, applied: Applied) {
    metrics.key_updates_applied.inc();
    metrics.key_entries_ignored.inc_by(applied.ignored as u64);
    metrics.key_list_applied(source.as_str(), now_ms() / 1000);
    let view = store.view();
    metrics.set_key_counts(view.len(), view.blocked());
    metrics.ready.set(1);
    tracing::info!(
        source = source.as_str(),
        entries = applied.entries,
        changed = applied.changed,
        ignored = applied.ignored,
        keys = view.len(),
        "key list applied"
    );
}

/// Handles one `billing/keys/update` payload: all of it, or (on any error) none of it.
pub fn apply_billing_message(
    store: &KeyStore,
    metrics: &Metrics,
    payload: &[u8],
    max_bytes: usize,
) -> Result<Applied, Rejected> {
    match parse_update(payload, max_bytes) {
        Ok(update) => {
            let applied = store.apply_billing_update(&update.updates);
            record_applied(store, metrics, Source::Billing, applied);
            Ok(applied)
        }
        Err(r) => {
            metrics.key_update_rejected(r.reason);
            tracing::warn!(
                reason = r.reason,
                detail = %r.detail,
                bytes = payload.len(),
                "rejected billing key update; key store unchanged"
            );
            Err(r)
        }
    }
}

/// Loads the snapshot into the billing layer at start-up. A missing file is normal
/// (first start); an unreadable or corrupt one is logged and ignored, since the
/// billing system will send a fresh list once connected.
pub fn load_snapshot(store: &KeyStore, metrics: &Metrics, path: &Path) {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "no key snapshot yet");
            return;
        }
        Err(e) => {
            metrics.key_update_rejected("snapshot_unreadable");
            tracing::error!(path = %path.display(), error = %e, "cannot read key snapshot");
            return;
        }
    };
    match parse_key_list(&bytes) {
        Ok(list) => {
            let applied = store.replace_billing(Source::Snapshot, &list.keys);
            record_applied(store, metrics, Source::Snapshot, applied);
        }
        Err(r) => {
            metrics.key_update_rejected(r.reason);
            tracing::error!(path = %path.display(), reason = r.reason, detail = %r.detail,
                "ignoring corrupt key snapshot");
        }
    }
}

/// Writes `list` to `path` atomically: temp file, fsync, rename, fsync the directory.
/// The file holds raw keys, so it is created readable by its owner only.
pub fn write_key_list(path: &Path, list: &KeyList) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&tmp)?;
        let json = serde_json::to_vec(list).map_err(std::io::Error::other)?;
        f.write_all(&json)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Writes the billing layer to the snapshot whenever it changes, and once more at
/// shutdown so the newest list survives a restart.
pub async fn run_snapshot_writer(
    store: Arc<KeyStore>,
    metrics: Arc<Metrics>,
    path: PathBuf,
    shutdown: CancellationToken,
) {
    let mut changes = store.billing_changes();
    changes.mark_unchanged();
    loop {
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            r = changes.changed() => r.is_err(),
        };
        if changes.has_changed().unwrap_or(false) || !stopping {
            changes.mark_unchanged();
            let (store, target) = (store.clone(), path.clone());
            let result = tokio::task::spawn_blocking(move || {
                let list = KeyList {
                    keys: store.billing_entries(),
                    saved_at: Some(now_ms()),
                };
                write_key_list(&target, &list).map(|_| list.keys.len())
            })
            .await;
            match result {
                Ok(Ok(n)) => {
                    metrics.snapshot_writes.inc();
                    tracing::debug!(path = %path.display(), keys = n, "key snapshot written");
                }
                Ok(Err(e)) => {
                    metrics.snapshot_write_errors.inc();
                    tracing::error!(path = %path.display(), error = %e, "cannot write key snapshot");
                }
                Err(e) => {
                    metrics.snapshot_write_errors.inc();
                    tracing::error!(error = %e, "key snapshot task failed");
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Identity of a file version: reloading only when this changes keeps polling cheap.
fn file_stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    let md = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&md);
    #[cfg(not(unix))]
    let ino = 0;
    Some((md.modified().ok()?, md.len(), ino))
}

/// Reads and applies the keys file. Errors leave the file layer as it was.
pub fn load_keys_file(store: &KeyStore, metrics: &Metrics, path: &Path) -> Result<(), Rejected> {
    let bytes = std::fs::read(path).map_err(|e| rejected("file_unreadable", e.to_string()));
    let result = bytes
        .as_deref()
        .map_err(Rejected::clone)
        .and_then(parse_key_list);
    match result {
        Ok(list) => {
            let applied = store.replace_file(&list.keys);
            metrics.keys_file_reload("ok");
            record_applied(store, metrics, Source::File, applied);
            Ok(())
        }
        Err(r) => {
            metrics.keys_file_reload("error");
            metrics.key_update_rejected(r.reason);
            tracing::error!(path = %path.display(), reason = r.reason, detail = %r.detail,
                "keys file rejected; keeping the keys loaded before");
            Err(r)
        }
    }
}

/// Reloads the keys file when it changes (polled, which also sees Kubernetes'
/// ConfigMap symlink swaps) or when the process receives SIGHUP.
pub async fn run_file_watcher(
    store: Arc<KeyStore>,
    metrics: Arc<Metrics>,
    path: PathBuf,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut last = file_stamp(&path);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let forced = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            _ = hangup => true,
        };
        let stamp = file_stamp(&path);
        if forced || stamp != last {
            if forced {
                tracing::info!(path = %path.display(), "SIGHUP: reloading keys file");
            }
            last = stamp;
            let (s, m, p) = (store.clone(), metrics.clone(), path.clone());
            let _ = tokio::task::spawn_blocking(move || load_keys_file(&s, &m, &p)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyEntry;

    const MAX: usize = 1 << 20;

    /// The metric pre-creates a series per reason; a new reason must be added there.
    #[test]
    fn every_rejection_reason_is_a_known_metric_label() {
        use crate::admin::metrics::KEY_UPDATE_REJECTIONS;
        let reasons = [
            parse_update(b"{", MAX).unwrap_err().reason,
            parse_update(br#"{"updates": 1}"#, MAX).unwrap_err().reason,
            parse_update(
                br#"{"updates": [{"app_id": "a", "api_key": "", "status": "ok"}]}"#,
                MAX,
            )
            .unwrap_err()
            .reason,
            parse_update(b"{}", 1).unwrap_err().reason,
            load_keys_file(
                &KeyStore::default(),
                &Metrics::new(),
                Path::new("/nonexistent/keys.json"),
            )
            .unwrap_err()
            .reason,
            "snapshot_unreadable",
        ];
        for reason in reasons {
            assert!(KEY_UPDATE_REJECTIONS.contains(&reason), "{reason}");
        }
    }

    #[test]
    fn parses_the_billing_format() {
        let payload = br#"{"updates": [{"app_id": "app-1", "api_key": "sk-test-0001", "status": "ok", "reason": ""}, {"app_id": "app-2", "api_key": "sk-blocked", "status": "blocked", "reason": "balance"}], "timestamp": 1}"#;
        let u = parse_update(payload, MAX).unwrap();
        assert_eq!(u.updates.len(), 2);
        assert_eq!(u.updates[1].status, KeyStatus::Blocked);
        assert_eq!(u.updates[1].reason, "balance");
    }

    #[test]
    fn malformed_messages_are_rejected_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "bad_json"),
            (b"{\"updates\": [", "bad_json"),
            (b"{\"updates\": 5, \"timestamp\": 1}", "wrong_shape"),
            (b"{\"timestamp\": 1}", "wrong_shape"),
            (
                br#"{"updates": [{"app_id": 1, "api_key": "k", "status": "ok"}], "timestamp": 1}"#,
                "wrong_shape",
            ),
            (
                br#"{"updates": [{"app_id": "a", "api_key": "", "status": "ok"}], "timestamp": 1}"#,
                "invalid_entry",
            ),
            (
                br#"{"updates": [{"app_id": "", "api_key": "k", "status": "ok"}], "timestamp": 1}"#,
                "invalid_entry",
            ),
        ];
        for (payload, reason) in cases {
            let r = parse_update(payload, MAX).unwrap_err();
            assert_eq!(r.reason, *reason, "{}", String::from_utf8_lossy(payload));
        }
        let big = vec![b' '; 2048];
        assert_eq!(parse_update(&big, 1024).unwrap_err().reason, "too_large");
    }

    #[test]
    fn rejected_message_changes_nothing_and_is_counted() {
        let store = KeyStore::new();
        let metrics = Metrics::new();
        store.apply_billing_update(&[KeyEntry::ok("a", "good")]);
        // Valid JSON that would block `good`, but with one invalid entry: all or nothing.
        let payload = br#"{"updates": [{"app_id": "a", "api_key": "good", "status": "blocked", "reason": "x"}, {"app_id": "a", "api_key": "", "status": "ok"}], "timestamp": 2}"#;
        assert!(apply_billing_message(&store, &metrics, payload, MAX).is_err());
        assert!(!store.view().get("good").unwrap().blocked);
        assert!(
            metrics
                .render()
                .contains("keymeter_key_updates_rejected_total{reason=\"invalid_entry\"} 1")
        );
    }

    #[test]
    fn rejection_detail_never_echoes_a_key() {
        let payload = br#"{"updates": [{"app_id": "a", "api_key": "sk-secret-value", "status": 7}], "timestamp": 1}"#;
        let r = parse_update(payload, MAX).unwrap_err();
        assert!(!r.detail.contains("sk-secret-value"), "{}", r.detail);
    }

    #[test]
    fn snapshot_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.snapshot.json");
        let list = KeyList {
            keys: vec![KeyEntry::ok("a", "k1"), KeyEntry::blocked("b", "k2", "r")],
            saved_at: Some(1),
        };
        write_key_list(&path, &list).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let store = KeyStore::new();
        load_snapshot(&store, &Metrics::new(), &path);
        assert!(store.is_loaded());
        assert!(store.view().get("k2").unwrap().blocked);
        assert_eq!(store.billing_entries(), list.keys);
    }

    #[test]
    fn corrupt_snapshot_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        std::fs::write(&path, b"{\"keys\": [").unwrap();
        let store = KeyStore::new();
        load_snapshot(&store, &Metrics::new(), &path);
        assert!(!store.is_loaded());
    }
}
