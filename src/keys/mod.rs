//! The key store: which API keys are valid right now, answered from memory.
//!
//! Two sources feed it, each a *layer*: the billing system over MQTT (and its snapshot
//! on disk) and an optional local keys file. How they combine, per key:
//! `blocked` in either layer wins (with that layer's reason, billing first); otherwise
//! `ok` in either layer allows, with the billing system's app id when it has one;
//! a key in neither layer is unknown. A local file can therefore add keys and block
//! keys, but never unblock a key the billing system blocked.
//!
//! Readers never block writers and never see half an update: a Check loads one
//! immutable [`KeyView`] through an `ArcSwap`. Each layer in a view is a large shared,
//! compact table (`table.rs`: no allocation per key) plus a small delta of the keys
//! updated since, so applying an update copies only the delta; when the delta grows
//! past a fraction of the table, the two are folded into a new table.

pub mod entry;
pub mod sync;
mod table;
pub mod update;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

pub use entry::{
    AsKeyEntry, EntryFields, KeyEntry, KeyEntryRef, KeyList, KeyListRef, KeyStatus, KeyUpdate,
};
use table::{KeyTable, Stated};

/// Updated keys tolerated in a layer's delta before it is folded into a new table:
/// small enough that cloning the delta per update is cheap, large enough that bursts of
/// updates rarely rebuild.
const MIN_DELTA_BEFORE_FOLD: usize = 4096;

/// A non-secret, stable identifier of a key for logs, metadata and support: the first
/// 8 bytes of its SHA-256, hex, prefixed so it is never mistaken for a key.
pub fn fingerprint(api_key: &str) -> String {
    Fingerprint::new(fingerprint_bits(api_key))
        .as_str()
        .to_string()
}

/// A fingerprint's text (`fp-` and 16 hex digits) on the stack: a Check writes it into
/// its answer without allocating.
pub struct Fingerprint([u8; 19]);

impl Fingerprint {
    pub fn new(bits: u64) -> Fingerprint {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = *b"fp-0000000000000000";
        for (i, byte) in bits.to_be_bytes().iter().enumerate() {
            text[3 + 2 * i] = HEX[usize::from(byte >> 4)];
            text[4 + 2 * i] = HEX[usize::from(byte & 0xf)];
        }
        Fingerprint(text)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written into it.
        std::str::from_utf8(&self.0).unwrap_or("fp-")
    }
}

fn fingerprint_bits(api_key: &str) -> u64 {
    let digest = Sha256::digest(api_key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// The numeric form of a fingerprint string, if it is one.
fn parse_fingerprint(fp: &str) -> Option<u64> {
    let hex = fp.strip_prefix("fp-")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The effective state of one key, as a Check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyInfo<'a> {
    pub api_key: &'a str,
    pub app_id: &'a str,
    pub blocked: bool,
    /// The billing system's (or the keys file's) reason for a block; empty when allowed.
    pub reason: &'a str,
    /// See [`fingerprint`]; text via [`Fingerprint::new`].
    pub fingerprint: u64,
}

impl KeyInfo<'_> {
    /// True when both say the same about the key (its fingerprint follows from it).
    fn states_same(&self, other: &Stated<'_>) -> bool {
        self.app_id == other.app_id && self.blocked == other.blocked && self.reason == other.reason
    }
}

pub use crate::metrics::label::Source;

/// A key stated after its layer's table was built.
#[derive(Debug, Clone)]
struct Changed {
    api_key: Arc<str>,
    app_id: Arc<str>,
    blocked: bool,
    reason: Arc<str>,
    fingerprint: u64,
}

impl Changed {
    fn info(&self) -> KeyInfo<'_> {
        KeyInfo {
            api_key: &self.api_key,
            app_id: &self.app_id,
            blocked: self.blocked,
            reason: &self.reason,
            fingerprint: self.fingerprint,
        }
    }
}

/// Statements newer than a layer's table (updates never remove a key: only `ok` and
/// `blocked` exist, and a full replacement rebuilds the table).
#[derive(Debug, Clone, Default)]
struct Delta {
    by_key: HashMap<Arc<str>, Changed>,
    by_fingerprint: HashMap<u64, Arc<str>>,
}

/// What one source says: a compact table plus the statements made since it was built.
#[derive(Clone, Default)]
struct Layer {
    table: Arc<KeyTable>,
    delta: Arc<Delta>,
}

impl Layer {
    fn get(&self, api_key: &str) -> Option<KeyInfo<'_>> {
        match self.delta.by_key.get(api_key) {
            Some(changed) => Some(changed.info()),
            None => self.table.get(api_key),
        }
    }

    fn get_by_fingerprint(&self, bits: u64) -> Option<KeyInfo<'_>> {
        match self.delta.by_fingerprint.get(&bits) {
            Some(key) => self.delta.by_key.get(key).map(Changed::info),
            None => self.table.get_by_fingerprint(bits),
        }
    }

    fn is_empty(&self) -> bool {
        self.table.len() == 0 && self.delta.by_key.is_empty()
    }

    /// Every key of the layer once, newest statement.
    fn iter(&self) -> impl Iterator<Item = KeyInfo<'_>> {
        let delta = &self.delta.by_key;
        self.table
            .iter()
            .filter(move |k| !delta.contains_key(k.api_key))
            .chain(delta.values().map(Changed::info))
    }

    /// The same statements in one new table, with an empty delta.
    fn folded(&self) -> Layer {
        let n = self.table.len() + self.delta.by_key.len();
        Layer {
            table: Arc::new(KeyTable::build(self.iter().map(stated), n)),
            delta: Arc::default(),
        }
    }
}

fn stated<'a>(k: KeyInfo<'a>) -> Stated<'a> {
    Stated {
        api_key: k.api_key,
        app_id: k.app_id,
        blocked: k.blocked,
        reason: k.reason,
    }
}

/// An immutable view of every key; what a Check reads.
#[derive(Default)]
pub struct KeyView {
    billing: Layer,
    file: Layer,
    len: usize,
    blocked: usize,
}

impl KeyView {
    /// O(1): a few hash lookups, no locks, no I/O, no allocation.
    /// An empty layer answers without hashing (see `KeyTable::get`).
    pub fn get(&self, api_key: &str) -> Option<KeyInfo<'_>> {
        effective(self.billing.get(api_key), self.file.get(api_key))
    }

    /// The key whose fingerprint (as in the Check's dynamic metadata) is `fp`.
    pub fn get_by_fingerprint(&self, fp: &str) -> Option<KeyInfo<'_>> {
        let bits = parse_fingerprint(fp)?;
        effective(
            self.billing.get_by_fingerprint(bits),
            self.file.get_by_fingerprint(bits),
        )
    }

    /// Number of known keys (allowed and blocked).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn blocked(&self) -> usize {
        self.blocked
    }

    /// Every key a Check would allow, once each, with its effective app id (the
    /// billing system's when both layers have it), in no particular order.
    pub fn for_each_allowed(&self, mut f: impl FnMut(&str, &str)) {
        let file_blocks = |key: &str| self.file.get(key).is_some_and(|k| k.blocked);
        for k in self.billing.iter() {
            if !k.blocked && !file_blocks(k.api_key) {
                f(k.api_key, k.app_id);
            }
        }
        for k in self.file.iter() {
            if !k.blocked && self.billing.get(k.api_key).is_none() {
                f(k.api_key, k.app_id);
            }
        }
    }

    /// (keys, blocked keys), counted from scratch.
    fn count(&self) -> (usize, usize) {
        if self.file.is_empty() && self.billing.delta.by_key.is_empty() {
            return (self.billing.table.len(), self.billing.table.blocked());
        }
        let (mut len, mut blocked) = (0, 0);
        let file_blocks = |key: &str| self.file.get(key).is_some_and(|f| f.blocked);
        for k in self.billing.iter() {
            len += 1;
            blocked += usize::from(k.blocked || file_blocks(k.api_key));
        }
        for k in self.file.iter() {
            if self.billing.get(k.api_key).is_none() {
                len += 1;
                blocked += usize::from(k.blocked);
            }
        }
        (len, blocked)
    }
}

/// How the two sources combine: a block in either wins (billing's first), otherwise
/// billing's statement, otherwise the file's.
fn effective<'a>(billing: Option<KeyInfo<'a>>, file: Option<KeyInfo<'a>>) -> Option<KeyInfo<'a>> {
    match (billing, file) {
        (Some(b), _) if b.blocked => Some(b),
        (_, Some(f)) if f.blocked => Some(f),
        (Some(b), _) => Some(b),
        (None, f) => f,
    }
}

/// Counts of one applied change, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Entries taken into the layer.
    pub entries: usize,
    /// Entries skipped because their status is neither `ok` nor `blocked`.
    pub ignored: usize,
    /// Entries of an update message that keymeter could not use (see
    /// [`update::SkipReason`]); the rest of their message applied.
    pub skipped: usize,
    /// Keys whose state changed (for an update: as a Check sees it; for a full list:
    /// in that source's layer).
    pub changed: usize,
}

pub struct KeyStore {
    view: ArcSwap<KeyView>,
    /// Serializes writers; readers never take it.
    writer: Mutex<()>,
    loaded: watch::Sender<bool>,
    /// Bumped whenever the billing layer changes, so the snapshot writer knows.
    billing_version: watch::Sender<u64>,
    /// Bumped whenever a new view is published, whatever layer changed (billing
    /// update, snapshot, keys file): what the xDS pusher follows.
    view_version: watch::Sender<u64>,
}

impl Default for KeyStore {
    fn default() -> Self {
        KeyStore::new()
    }
}

impl KeyStore {
    pub fn new() -> KeyStore {
        KeyStore {
            view: ArcSwap::from_pointee(KeyView::default()),
            writer: Mutex::new(()),
            loaded: watch::channel(false).0,
            billing_version: watch::channel(0).0,
            view_version: watch::channel(0).0,
        }
    }

    /// The current view; cheap (an atomic load and refcount bump).
    pub fn view(&self) -> arc_swap::Guard<Arc<KeyView>> {
        self.view.load()
    }

    /// True once any key list was loaded (snapshot, file or billing system).
    pub fn is_loaded(&self) -> bool {
        *self.loaded.borrow()
    }

    /// Resolves once any key list is loaded.
    pub async fn wait_loaded(&self) {
        let mut rx = self.loaded.subscribe();
        // The sender lives as long as the store, so this only returns once loaded.
        let _ = rx.wait_for(|loaded| *loaded).await;
    }

    /// Changes each time the billing layer changes.
    pub fn billing_changes(&self) -> watch::Receiver<u64> {
        self.billing_version.subscribe()
    }

    /// Changes each time a new view is published, from any source (billing, snapshot,
    /// keys file).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.view_version.subscribe()
    }

    /// The billing layer as a list, for the snapshot.
    pub fn billing_entries(&self) -> Vec<KeyEntry> {
        let view = self.view.load();
        let mut out: Vec<KeyEntry> = view
            .billing
            .iter()
            .map(|k| KeyEntry {
                app_id: k.app_id.to_string(),
                api_key: k.api_key.to_string(),
                status: if k.blocked {
                    KeyStatus::Blocked
                } else {
                    KeyStatus::Ok
                },
                reason: k.reason.to_string(),
            })
            .collect();
        out.sort_by(|a, b| a.api_key.cmp(&b.api_key));
        out
    }

    /// Applies billing-system entries on top of what it said before (an update message),
    /// in order. A `blocked` entry with an empty app id keeps the app id the billing
    /// system gave the key before (for the deny's metrics and the snapshot).
    /// One atomic change: readers see either all of it or none of it.
    pub fn apply_billing_update<E: AsKeyEntry>(&self, entries: &[E]) -> Applied {
        let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.view.load_full();
        let mut applied = Applied::default();
        let mut delta = (*old.billing.delta).clone();
        let mut touched: Vec<Arc<str>> = Vec::new();
        for e in entries {
            let Some(mut new) = stated_entry(e.fields(), &mut applied) else {
                continue;
            };
            let current = match delta.by_key.get(new.api_key) {
                Some(changed) => Some(changed.info()),
                None => old.billing.table.get(new.api_key),
            };
            if new.blocked && new.app_id.is_empty() {
                new.app_id = current.map_or("", |c| c.app_id);
            }
            if current.is_some_and(|c| c.states_same(&new)) {
                continue;
            }
            // Owned before the delta changes: `new` may borrow from it.
            let key: Arc<str> = new.api_key.into();
            let fingerprint = fingerprint_bits(new.api_key);
            let changed = Changed {
                api_key: key.clone(),
                app_id: new.app_id.into(),
                blocked: new.blocked,
                reason: new.reason.into(),
                fingerprint,
            };
            delta.by_fingerprint.insert(fingerprint, key.clone());
            delta.by_key.insert(key.clone(), changed);
            touched.push(key);
        }
        if touched.is_empty() {
            self.loaded
                .send_if_modified(|l| !std::mem::replace(l, true));
            return applied;
        }
        let mut view = KeyView {
            billing: Layer {
                table: old.billing.table.clone(),
                delta: Arc::new(delta),
            },
            file: old.file.clone(),
            len: old.len,
            blocked: old.blocked,
        };
        touched.sort_unstable();
        touched.dedup();
        let (mut len, mut blocked) = (old.len, old.blocked);
        for key in &touched {
            let (before, after) = (old.get(key), view.get(key));
            if before != after {
                applied.changed += 1;
                len = len + usize::from(after.is_some()) - usize::from(before.is_some());
                blocked = blocked + usize::from(after.is_some_and(|k| k.blocked))
                    - usize::from(before.is_some_and(|k| k.blocked));
            }
        }
        (view.len, view.blocked) = (len, blocked);
        let fold_at = MIN_DELTA_BEFORE_FOLD.max(view.billing.table.len() / 8);
        if view.billing.delta.by_key.len() > fold_at {
            view.billing = view.billing.folded();
        }
        self.publish(view, guard);
        // Only news from the billing system is written to the snapshot.
        self.billing_version.send_modify(|v| *v += 1);
        applied
    }

    /// Replaces the billing layer (loading a snapshot at start-up).
    pub fn replace_billing<E: AsKeyEntry>(&self, source: Source, entries: &[E]) -> Applied {
        let applied = self.replace(false, entries);
        if source == Source::Billing && applied.changed > 0 {
            self.billing_version.send_modify(|v| *v += 1);
        }
        applied
    }

    /// Replaces the file layer with the file's full content.
    pub fn replace_file<E: AsKeyEntry>(&self, entries: &[E]) -> Applied {
        self.replace(true, entries)
    }

    /// Builds one layer anew from a full list; the other layer is kept.
    fn replace<E: AsKeyEntry>(&self, file: bool, entries: &[E]) -> Applied {
        let mut applied = Applied::default();
        let table = KeyTable::build(
            entries
                .iter()
                .filter_map(|e| stated_entry(e.fields(), &mut applied)),
            entries.len(),
        );
        let layer = Layer {
            table: Arc::new(table),
            delta: Arc::default(),
        };
        let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.view.load_full();
        let old_layer = if file { &old.file } else { &old.billing };
        applied.changed = layer
            .iter()
            .filter(|k| {
                !old_layer
                    .get(k.api_key)
                    .is_some_and(|o| o.states_same(&stated(*k)))
            })
            .count()
            + old_layer
                .iter()
                .filter(|k| layer.get(k.api_key).is_none())
                .count();
        let (billing, file_layer) = if file {
            (old.billing.clone(), layer)
        } else {
            (layer, old.file.clone())
        };
        let mut view = KeyView {
            billing,
            file: file_layer,
            len: 0,
            blocked: 0,
        };
        (view.len, view.blocked) = view.count();
        self.publish(view, guard);
        applied
    }

    /// Makes `view` the one Checks read, then releases the writer lock.
    fn publish(&self, view: KeyView, writer: std::sync::MutexGuard<'_, ()>) {
        self.view.store(Arc::new(view));
        drop(writer);
        self.view_version.send_modify(|v| *v += 1);
        self.loaded
            .send_if_modified(|l| !std::mem::replace(l, true));
    }
}

/// An entry as a layer states it, or `None` (counted as ignored) when its status is
/// neither `ok` nor `blocked`.
fn stated_entry<'a>(e: EntryFields<'a>, applied: &mut Applied) -> Option<Stated<'a>> {
    let blocked = match e.status {
        KeyStatus::Ok => false,
        KeyStatus::Blocked => true,
        KeyStatus::Other(_) => {
            applied.ignored += 1;
            return None;
        }
    };
    applied.entries += 1;
    Some(Stated {
        api_key: e.api_key,
        app_id: e.app_id,
        blocked,
        reason: if blocked { e.reason } else { "" },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key's (app id, blocked, reason) as a Check would see it now.
    fn lookup(store: &KeyStore, key: &str) -> Option<(String, bool, String)> {
        let view = store.view();
        let k = view.get(key)?;
        Some((k.app_id.to_string(), k.blocked, k.reason.to_string()))
    }

    #[test]
    fn updates_apply_and_latest_status_wins() {
        let s = KeyStore::new();
        assert!(!s.is_loaded());
        s.apply_billing_update(&[KeyEntry::ok("app-1", "k1"), KeyEntry::ok("app-2", "k2")]);
        assert!(s.is_loaded());
        assert_eq!(lookup(&s, "k1").unwrap().0, "app-1");
        let applied = s.apply_billing_update(&[KeyEntry::blocked("app-1", "k1", "balance")]);
        assert_eq!(applied.changed, 1);
        assert_eq!(
            lookup(&s, "k1").unwrap(),
            ("app-1".into(), true, "balance".into())
        );
        // Saying the same again changes nothing.
        let again = s.apply_billing_update(&[KeyEntry::blocked("app-1", "k1", "balance")]);
        assert_eq!((again.entries, again.changed), (1, 0));
        assert!(lookup(&s, "nope").is_none());
        assert_eq!(s.view().len(), 2);
        assert_eq!(s.view().blocked(), 1);
    }

    #[test]
    fn unknown_status_is_ignored() {
        let s = KeyStore::new();
        s.apply_billing_update(&[KeyEntry::ok("a", "k")]);
        let mut odd = KeyEntry::ok("a", "k");
        odd.status = KeyStatus::Other("suspended".into());
        let applied = s.apply_billing_update(&[odd]);
        assert_eq!(applied.ignored, 1);
        assert!(!lookup(&s, "k").unwrap().1);
    }

    #[test]
    fn block_in_either_layer_wins_and_file_cannot_unblock() {
        let s = KeyStore::new();
        s.apply_billing_update(&[
            KeyEntry::blocked("a", "billing-blocked", "balance"),
            KeyEntry::ok("a", "shared"),
        ]);
        s.replace_file(&[
            KeyEntry::ok("local", "billing-blocked"),
            KeyEntry::blocked("local", "shared", "local block"),
            KeyEntry::ok("local", "file-only"),
        ]);
        assert!(lookup(&s, "billing-blocked").unwrap().1);
        assert_eq!(
            lookup(&s, "shared").unwrap(),
            ("local".into(), true, "local block".into())
        );
        assert_eq!(lookup(&s, "file-only").unwrap().0, "local");
        assert_eq!((s.view().len(), s.view().blocked()), (3, 2));
        // The billing system's news still combines with the file's say.
        s.apply_billing_update(&[KeyEntry::blocked("a", "file-only", "balance")]);
        assert_eq!(
            lookup(&s, "file-only").unwrap(),
            ("a".into(), true, "balance".into())
        );
        assert_eq!((s.view().len(), s.view().blocked()), (3, 3));
        // Reloading the file without a key removes only the file's say on it.
        s.replace_file::<KeyEntry>(&[]);
        assert!(!lookup(&s, "shared").unwrap().1);
        assert!(lookup(&s, "file-only").unwrap().1);
        assert_eq!((s.view().len(), s.view().blocked()), (3, 2));
    }

    #[test]
    fn folding_the_delta_keeps_every_key() {
        let s = KeyStore::new();
        let many: Vec<KeyEntry> = (0..10_000)
            .map(|i| KeyEntry::ok("app", &format!("key-{i}")))
            .collect();
        s.apply_billing_update(&many);
        for chunk in many.chunks(700) {
            let blocked: Vec<KeyEntry> = chunk
                .iter()
                .map(|e| KeyEntry::blocked("app", &e.api_key, "r"))
                .collect();
            s.apply_billing_update(&blocked);
        }
        let v = s.view();
        assert_eq!(v.len(), 10_000);
        assert_eq!(v.blocked(), 10_000);
        assert!(v.get("key-9999").unwrap().blocked);
        assert!(v.billing.delta.by_key.len() <= MIN_DELTA_BEFORE_FOLD);
        assert!(
            v.billing.table.len() > MIN_DELTA_BEFORE_FOLD,
            "folded at least once"
        );
        for i in [0, 1234, 9999] {
            let key = format!("key-{i}");
            let by_fp = v.get_by_fingerprint(&fingerprint(&key)).unwrap();
            assert_eq!((by_fp.api_key, by_fp.blocked), (key.as_str(), true));
        }
        assert_eq!(v.count(), (10_000, 10_000));
    }

    #[test]
    fn billing_entries_round_trip_for_the_snapshot() {
        let s = KeyStore::new();
        let entries = vec![KeyEntry::ok("a", "k1"), KeyEntry::blocked("b", "k2", "r")];
        s.apply_billing_update(&entries);
        s.replace_file(&[KeyEntry::ok("f", "file-key")]);
        assert_eq!(s.billing_entries(), entries);
        let restored = KeyStore::new();
        restored.replace_billing(Source::Snapshot, &s.billing_entries());
        assert!(lookup(&restored, "k2").unwrap().1);
        assert_eq!(restored.billing_entries(), entries);
    }

    #[test]
    fn only_billing_news_schedules_a_snapshot_write() {
        let s = KeyStore::new();
        let changes = s.billing_changes();
        let many: Vec<KeyEntry> = (0..10_000)
            .map(|i| KeyEntry::ok("app-1", &format!("k{i}")))
            .collect();
        s.replace_billing(Source::Snapshot, &many);
        assert!(
            !changes.has_changed().unwrap(),
            "a loaded snapshot is not rewritten"
        );
        s.apply_billing_update(&[KeyEntry::blocked("app-1", "k1", "balance")]);
        assert!(changes.has_changed().unwrap());
    }

    #[test]
    fn allowed_keys_are_what_a_check_allows_and_every_layer_notifies() {
        let s = KeyStore::new();
        let changes = s.changes();
        s.replace_billing(
            Source::Snapshot,
            &[
                KeyEntry::ok("a", "both"),
                KeyEntry::ok("a", "file-blocks"),
                KeyEntry::blocked("a", "billing-blocked", "r"),
            ],
        );
        assert!(changes.has_changed().unwrap(), "a snapshot load notifies");
        let mut changes = s.changes();
        s.replace_file(&[
            KeyEntry::ok("f", "both"),
            KeyEntry::blocked("f", "file-blocks", "local"),
            KeyEntry::ok("f", "billing-blocked"),
            KeyEntry::ok("f", "file-only"),
        ]);
        assert!(changes.has_changed().unwrap(), "a keys file notifies");
        changes.mark_unchanged();
        s.apply_billing_update(&[KeyEntry::ok("b", "new")]);
        assert!(changes.has_changed().unwrap(), "a billing update notifies");
        let mut allowed = Vec::new();
        s.view()
            .for_each_allowed(|k, app| allowed.push((k.to_string(), app.to_string())));
        allowed.sort();
        let expect = [("both", "a"), ("file-only", "f"), ("new", "b")];
        assert_eq!(allowed, expect.map(|(k, a)| (k.to_string(), a.to_string())));
        for (k, app) in &allowed {
            let info = s.view().get(k).map(|i| (i.app_id.to_string(), i.blocked));
            assert_eq!(info, Some((app.clone(), false)));
        }
    }

    #[test]
    fn fingerprint_is_stable_and_does_not_contain_the_key() {
        let fp = fingerprint("sk-test-0001");
        assert_eq!(fp, fingerprint("sk-test-0001"));
        assert_ne!(fp, fingerprint("sk-test-0002"));
        assert!(!fp.contains("sk-test"));
        assert_eq!(fp.len(), 3 + 16);
        let s = KeyStore::new();
        s.apply_billing_update(&[KeyEntry::ok("a", "sk-test-0001")]);
        assert_eq!(s.view().get_by_fingerprint(&fp).unwrap().app_id, "a");
        assert!(s.view().get_by_fingerprint("fp-0000000000000000").is_none());
        assert!(s.view().get_by_fingerprint("sk-test-0001").is_none());
        s.replace_file::<KeyEntry>(&[]);
        s.apply_billing_update(&[KeyEntry::blocked("a", "sk-test-0001", "r")]);
        assert!(s.view().get_by_fingerprint(&fp).unwrap().blocked);
    }
}
