//! Keeping the key store in sync: billing-system update messages, the local keys
//! file (polled, and reloaded on SIGHUP) and the fail-static snapshot on disk.
//!
//! An update message applies entry by entry (`update.rs`): its usable entries apply
//! as one atomic change, each unusable entry is skipped on its own, counted by reason
//! and logged by position. Only a message that is not a key update at all (not JSON,
//! not an object, too large) changes nothing. The keys file and the snapshot are
//! validated whole before anything is applied: one bad entry rejects the file, naming
//! the entry. Every rejection is counted by reason and logged.

use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::clock::now_ms;

use tokio_util::sync::CancellationToken;

use super::update::{self, MAX_FIELD_BYTES, ParsedUpdate, SkipReason, Skipped};
use super::{Applied, AsKeyEntry, KeyList, KeyListRef, KeyStatus, KeyStore, Source};
use crate::metrics::Metrics;

/// Skipped entries named in the one log line of a message; the rest are only counted.
const SKIPS_LOGGED: usize = 20;

pub use crate::metrics::label::ListRejection;

/// Why a key list was rejected whole, with what an operator needs to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub reason: ListRejection,
    pub detail: String,
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason.as_str(), self.detail)
    }
}

fn rejected(reason: ListRejection, detail: impl Into<String>) -> Rejected {
    Rejected {
        reason,
        detail: detail.into(),
    }
}

/// Parses a `billing/keys/update` payload, judging each entry on its own. Fails only
/// when the payload is over `max_bytes`, not JSON, not a JSON object, or its `updates`
/// is neither an array nor `null`.
pub fn parse_update(payload: &[u8], max_bytes: usize) -> Result<ParsedUpdate<'_>, Rejected> {
    if payload.len() > max_bytes {
        return Err(rejected(
            ListRejection::TooLarge,
            format!("{} bytes, limit {max_bytes}", payload.len()),
        ));
    }
    update::parse(payload).map_err(json_rejection)
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
        Category::Data => rejected(ListRejection::WrongShape, e.to_string()),
        Category::Syntax | Category::Eof | Category::Io => {
            rejected(ListRejection::BadJson, e.to_string())
        }
    }
}

/// A full list must hold only entries an update message would apply unchanged: the
/// first one that breaks a rule rejects the list, named by its position.
fn validate_entries<E: AsKeyEntry>(entries: &[E]) -> Result<(), Rejected> {
    for (i, e) in entries.iter().enumerate() {
        let e = e.fields();
        let bad = |what: &str| rejected(ListRejection::InvalidEntry, format!("entry {i}: {what}"));
        let mut broken = update::check_api_key(e.api_key);
        // A block may leave its app id empty; one it states must be usable.
        if broken.is_ok() && (*e.status == KeyStatus::Ok || !e.app_id.is_empty()) {
            broken = update::check_app_id(e.app_id);
        }
        if let Err(reason) = broken {
            return Err(bad(reason.describe()));
        }
        if e.reason.len() > MAX_FIELD_BYTES {
            return Err(bad("reason longer than 1024 bytes"));
        }
    }
    Ok(())
}

/// Metrics after a successful change from `source`.
fn record_applied(store: &KeyStore, metrics: &Metrics, source: Source, applied: Applied) {
    metrics.key_updates_applied.inc();
    metrics.key_entries_ignored.inc_by(applied.ignored as u64);
    metrics.key_list_applied(source, now_ms() / 1000);
    let view = store.view();
    metrics.set_key_counts(view.len(), view.blocked());
    metrics.ready.set(1);
    tracing::info!(
        source = source.as_str(),
        entries = applied.entries,
        changed = applied.changed,
        ignored = applied.ignored,
        skipped = applied.skipped,
        keys = view.len(),
        "key list applied"
    );
}

/// Handles one `billing/keys/update` payload: every usable entry applies, in order, as
/// one atomic change; unusable entries are skipped, counted and logged (position and
/// reason, never a key). A payload that is no key update at all changes nothing.
pub fn apply_billing_message(
    store: &KeyStore,
    metrics: &Metrics,
    payload: &[u8],
    max_bytes: usize,
) -> Result<Applied, Rejected> {
    match parse_update(payload, max_bytes) {
        Ok(update) => {
            let mut applied = store.apply_billing_update(&update.entries);
            applied.ignored += update.ignored;
            applied.skipped = update.skipped.len();
            record_skipped(metrics, &update.skipped, update.total());
            record_applied(store, metrics, Source::Billing, applied);
            Ok(applied)
        }
        Err(r) => {
            metrics.key_update_rejected(r.reason);
            tracing::warn!(
                reason = r.reason.as_str(),
                detail = %r.detail,
                bytes = payload.len(),
                "rejected billing key update; key store unchanged"
            );
            Err(r)
        }
    }
}

/// Counts the skipped entries of one message by reason, and logs them in one line.
fn record_skipped(metrics: &Metrics, skipped: &[Skipped], total: usize) {
    if skipped.is_empty() {
        return;
    }
    let mut counts = [0u64; SkipReason::ALL.len()];
    for s in skipped {
        if let Some(i) = SkipReason::ALL.iter().position(|r| *r == s.reason) {
            counts[i] += 1;
        }
    }
    for (reason, n) in SkipReason::ALL.iter().zip(counts) {
        if n > 0 {
            metrics.key_entries_skipped(*reason, n);
        }
    }
    let mut listed = String::new();
    for s in skipped.iter().take(SKIPS_LOGGED) {
        let _ = write!(
            listed,
            "{}{}: {}",
            if listed.is_empty() { "" } else { ", " },
            s.index,
            s.reason
        );
    }
    if skipped.len() > SKIPS_LOGGED {
        let _ = write!(listed, ", and {} more", skipped.len() - SKIPS_LOGGED);
    }
    tracing::warn!(
        skipped = skipped.len(),
        entries = total,
        skipped_entries = %listed,
        "skipped unusable entries of a billing key update (index: reason); the other entries applied"
    );
}

/// Loads the snapshot into the billing layer at start-up. A missing file is normal
/// (first start); an unreadable or corrupt one is logged and ignored, since the
/// billing system will send a fresh list once connected.
pub fn load_snapshot(store: &KeyStore, metrics: &Metrics, path: &Path) {
    // keymeter writes the snapshot itself, never as a symlink: one planted at its name
    // (to feed in another list) is refused, as the write side refuses to follow one.
    let bytes = match crate::files::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "no key snapshot yet");
            return;
        }
        Err(e) => {
            metrics.key_update_rejected(ListRejection::SnapshotUnreadable);
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
            tracing::error!(path = %path.display(), reason = r.reason.as_str(), detail = %r.detail,
                "ignoring corrupt key snapshot");
        }
    }
}

/// Writes `list` to `path` atomically: temp file, fsync, rename, fsync the directory.
/// The file holds raw keys, so it is created readable by its owner only (0600), and a
/// missing directory is created private (0700). The temp file is created anew
/// (`O_CREAT|O_EXCL|O_NOFOLLOW`): a leftover or a planted symlink at its name is
/// removed, never written through.
pub fn write_key_list(path: &Path, list: &KeyList) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    crate::files::create_private_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    {
        let mut f = crate::files::create_temp(&tmp)?;
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
    let bytes =
        std::fs::read(path).map_err(|e| rejected(ListRejection::FileUnreadable, e.to_string()));
    let result = bytes
        .as_deref()
        .map_err(Rejected::clone)
        .and_then(parse_key_list);
    match result {
        Ok(list) => {
            let applied = store.replace_file(&list.keys);
            metrics.keys_file_reload(true);
            record_applied(store, metrics, Source::File, applied);
            Ok(())
        }
        Err(r) => {
            metrics.keys_file_reload(false);
            metrics.key_update_rejected(r.reason);
            tracing::error!(path = %path.display(), reason = r.reason.as_str(), detail = %r.detail,
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

    /// No reason is listed (and pre-created as a series) that nothing can produce.
    #[test]
    fn every_rejection_reason_has_a_path_that_produces_it() {
        let reasons = [
            parse_update(b"{", MAX).unwrap_err().reason,
            parse_update(br#"{"updates": 1}"#, MAX).unwrap_err().reason,
            parse_key_list(br#"{"keys": [{"app_id": "a", "api_key": "", "status": "ok"}]}"#)
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
        ];
        let mut seen: Vec<_> = reasons.iter().map(|r| r.as_str()).collect();
        seen.push(ListRejection::SnapshotUnreadable.as_str());
        seen.sort();
        let mut all = ListRejection::ALL.map(ListRejection::as_str);
        all.sort();
        assert_eq!(seen, all, "each reason has a path that produces it");
    }

    #[test]
    fn only_a_payload_that_is_no_key_update_is_rejected() {
        let cases: &[(&[u8], &str)] = &[
            (b"not json", "bad_json"),
            (b"{\"updates\": [", "bad_json"),
            (b"{\"updates\": 5, \"timestamp\": 1}", "wrong_shape"),
            (
                b"[{\"api_key\": \"k\", \"status\": \"blocked\"}]",
                "wrong_shape",
            ),
        ];
        for (payload, reason) in cases {
            let r = parse_update(payload, MAX).unwrap_err();
            assert_eq!(
                r.reason.as_str(),
                *reason,
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
        let big = vec![b' '; 2048];
        assert_eq!(
            parse_update(&big, 1024).unwrap_err().reason,
            ListRejection::TooLarge
        );
        // What the strict parser used to reject whole now applies entry by entry.
        for payload in [
            &b"{\"timestamp\": 1}"[..],
            br#"{"updates": [{"app_id": 1, "api_key": "k", "status": "ok"}], "timestamp": 1}"#,
            br#"{"updates": [{"app_id": "a", "api_key": "", "status": "ok"}], "timestamp": 1}"#,
        ] {
            assert!(parse_update(payload, MAX).is_ok());
        }
    }

    #[test]
    fn rejected_message_changes_nothing_and_is_counted() {
        let store = KeyStore::new();
        let metrics = Metrics::new();
        store.apply_billing_update(&[KeyEntry::ok("a", "good")]);
        let payload = br#"{"updates": [{"app_id": "a", "api_key": "good", "status": "blocked", "reason": "x"}], "timestamp": 2"#;
        assert!(apply_billing_message(&store, &metrics, payload, MAX).is_err());
        assert!(!store.view().get("good").unwrap().blocked);
        assert!(
            metrics
                .render()
                .contains("keymeter_key_updates_rejected_total{reason=\"bad_json\"} 1")
        );
    }

    #[test]
    fn bad_entries_are_skipped_counted_and_the_rest_applies() {
        let store = KeyStore::new();
        let metrics = Metrics::new();
        store.apply_billing_update(&[KeyEntry::ok("a", "good"), KeyEntry::ok("app-9", "k9")]);
        let payload = br#"{"updates": [
            {"app_id": "a", "api_key": "good", "status": "blocked", "reason": "x"},
            {"app_id": "a", "api_key": "", "status": "ok"},
            "garbage",
            {"api_key": "k9", "status": "blocked"},
            {"app_id": "b", "api_key": "new", "status": "ok"},
            {"app_id": null, "api_key": "new2", "status": "ok"},
            {"app_id": "b", "api_key": "new3", "status": "suspended"}
        ]}"#;
        let applied = apply_billing_message(&store, &metrics, payload, MAX).unwrap();
        assert_eq!(
            (
                applied.entries,
                applied.ignored,
                applied.skipped,
                applied.changed
            ),
            (3, 1, 3, 3)
        );
        let view = store.view();
        assert!(view.get("good").unwrap().blocked);
        let k9 = view.get("k9").unwrap();
        assert!(k9.blocked);
        assert_eq!(
            k9.app_id, "app-9",
            "a block without app id keeps the known one"
        );
        assert_eq!(view.get("new").unwrap().app_id, "b");
        assert!(view.get("new2").is_none() && view.get("new3").is_none());
        let text = metrics.render();
        for sample in [
            "keymeter_key_entries_skipped_total{reason=\"no_api_key\"} 1",
            "keymeter_key_entries_skipped_total{reason=\"not_an_object\"} 1",
            "keymeter_key_entries_skipped_total{reason=\"no_app_id\"} 1",
            "keymeter_key_entries_ignored_total 1",
            "keymeter_key_updates_applied_total 1",
            "keymeter_key_updates_rejected_total{reason=\"invalid_entry\"} 0",
        ] {
            assert!(text.contains(sample), "{sample} in\n{text}");
        }
    }

    /// Readers load one view per Check: whatever they load holds all of a message or
    /// none of it, even while a large message with bad entries is being applied.
    #[test]
    fn a_check_never_sees_half_a_message() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let store = Arc::new(KeyStore::new());
        let metrics = Metrics::new();
        store.apply_billing_update(&[KeyEntry::ok("a", "first"), KeyEntry::ok("a", "last")]);
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let (store, done) = (store.clone(), done.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let view = store.view();
                    let first = view.get("first").unwrap().blocked;
                    let last = view.get("last").unwrap().blocked;
                    assert_eq!(first, last, "half a message visible after {reads} reads");
                    reads += 1;
                }
                reads
            })
        };
        for round in 0..10 {
            let status = if round % 2 == 0 { "blocked" } else { "ok" };
            let mut entries = vec![format!(
                r#"{{"app_id": "a", "api_key": "first", "status": "{status}"}}"#
            )];
            for i in 0..5_000 {
                entries.push(format!(
                    r#"{{"app_id": "a", "api_key": "fill-{round}-{i}", "status": "ok"}}"#
                ));
                if i % 1000 == 0 {
                    entries.push(r#"{"api_key": "no-app", "status": "ok"}"#.into());
                }
            }
            entries.push(format!(
                r#"{{"app_id": "a", "api_key": "last", "status": "{status}"}}"#
            ));
            let payload = format!(r#"{{"updates": [{}]}}"#, entries.join(","));
            let applied = apply_billing_message(&store, &metrics, payload.as_bytes(), MAX).unwrap();
            assert_eq!(applied.skipped, 5);
        }
        done.store(true, Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    }

    /// The worked example in README "Where keys come from" does what the README says.
    #[test]
    fn the_readme_example_does_what_the_readme_says() {
        let readme = include_str!("../../README.md");
        let example = readme
            .split("A worked example")
            .nth(1)
            .and_then(|r| r.split("```json\n").nth(1))
            .and_then(|r| r.split("```").next())
            .expect("README has the worked example");
        let store = KeyStore::new();
        let metrics = Metrics::new();
        store.apply_billing_update(&[KeyEntry::ok("app-0", "sk-old")]);
        let applied = apply_billing_message(&store, &metrics, example.as_bytes(), MAX).unwrap();
        assert_eq!((applied.entries, applied.skipped), (3, 2));
        let view = store.view();
        let state = |key| view.get(key).map(|k| (k.app_id, k.blocked));
        assert_eq!(state("sk-live-1"), Some(("app-1", false)));
        assert_eq!(state("sk-live-4"), Some(("app-4", false)));
        assert_eq!(state("sk-old"), Some(("app-0", true)));
        assert_eq!(state("sk-live-2"), None);
        let text = metrics.render();
        for reason in ["no_app_id", "not_an_object"] {
            let sample = format!("keymeter_key_entries_skipped_total{{reason=\"{reason}\"}} 1");
            assert!(text.contains(&sample), "{sample}");
        }
    }

    #[test]
    fn the_keys_file_stays_strict_and_names_the_entry() {
        for (list, detail) in [
            (
                &br#"{"keys": [{"app_id": "a", "api_key": "k", "status": "ok"}, {"app_id": "a", "api_key": " k", "status": "ok"}]}"#[..],
                "entry 1: api_key has a control character or a leading or trailing space",
            ),
            (
                br#"{"keys": [{"app_id": "", "api_key": "k", "status": "ok"}]}"#,
                "entry 0: ok entry whose app_id is missing, null, empty or not a string",
            ),
            (
                br#"{"keys": [{"app_id": "a\r\n", "api_key": "k", "status": "blocked"}]}"#,
                "entry 0: app_id has a control character",
            ),
        ] {
            let r = parse_key_list(list).unwrap_err();
            assert_eq!(
                (r.reason, r.detail.as_str()),
                (ListRejection::InvalidEntry, detail)
            );
        }
        // What the billing layer can hold, the snapshot can hold: inner spaces, blocks
        // without an app id.
        let ok = br#"{"keys": [{"app_id": "a", "api_key": "sk two", "status": "ok"}, {"app_id": "", "api_key": "k", "status": "blocked", "reason": ""}]}"#;
        assert_eq!(parse_key_list(ok).unwrap().keys.len(), 2);
    }

    #[test]
    fn rejection_detail_never_echoes_a_key() {
        let payload = br#"{"updates": [{"app_id": "a", "api_key": "sk-secret-value", "status": 7}], "timestamp": 1"#;
        let r = parse_update(payload, MAX).unwrap_err();
        assert!(!r.detail.contains("sk-secret-value"), "{}", r.detail);
        let list =
            br#"{"keys": [{"app_id": "a", "api_key": "sk-secret\u0000value", "status": "ok"}]}"#;
        let r = parse_key_list(list).unwrap_err();
        assert!(!r.detail.contains("sk-secret"), "{}", r.detail);
    }

    #[test]
    fn snapshot_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.snapshot.json");
        let list = KeyList {
            keys: vec![KeyEntry::ok("a", "k1"), KeyEntry::blocked("b", "k2", "r")],
            saved_at: Some(1),
        };
        // A symlink planted at the temp file's name is replaced, not written through.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"not the snapshot").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(".keys.snapshot.json.tmp")).unwrap();
        write_key_list(&path, &list).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"not the snapshot");
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
    fn a_symlink_at_the_snapshot_path_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let planted = dir.path().join("planted.json");
        let list = KeyList {
            keys: vec![KeyEntry::ok("a", "k-planted")],
            saved_at: Some(1),
        };
        write_key_list(&planted, &list).unwrap();
        let path = dir.path().join("keys.snapshot.json");
        std::os::unix::fs::symlink(&planted, &path).unwrap();
        let store = KeyStore::new();
        let metrics = Metrics::new();
        load_snapshot(&store, &metrics, &path);
        assert!(!store.is_loaded());
        assert!(store.view().get("k-planted").is_none());
        assert!(
            metrics
                .render()
                .contains("keymeter_key_updates_rejected_total{reason=\"snapshot_unreadable\"} 1")
        );
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
