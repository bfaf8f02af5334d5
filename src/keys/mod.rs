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
//! immutable [`KeyView`] through an `ArcSwap`. A view is a large shared `base` map plus a
//! small `overlay` of recent changes, so applying an update copies only the overlay;
//! when the overlay grows past a fraction of the base it is folded into a new base.

pub mod entry;
pub mod sync;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

pub use entry::{KeyEntry, KeyList, KeyStatus, KeyUpdate};

/// Overlay entries tolerated before folding into the base: small enough that cloning
/// it per update is cheap, large enough that bursts of updates rarely rebuild.
const MIN_OVERLAY_BEFORE_FOLD: usize = 4096;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub api_key: Arc<str>,
    /// Shared by every key of the app (interned).
    pub app_id: Arc<str>,
    pub blocked: bool,
    /// The billing system's reason for a block; empty when allowed (interned).
    pub reason: Arc<str>,
    /// See [`fingerprint`]; text via [`Fingerprint::new`].
    pub fingerprint: u64,
}

/// Where a key list came from; shown in logs and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Snapshot,
    File,
    Billing,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Snapshot => "snapshot",
            Source::File => "file",
            Source::Billing => "billing",
        }
    }
}

type KeyMap = HashMap<Arc<str>, Arc<KeyInfo>>;

/// Every key by value and by fingerprint.
#[derive(Default)]
struct Maps {
    by_key: KeyMap,
    by_fingerprint: HashMap<u64, Arc<KeyInfo>>,
}

/// An immutable view of every key; what a Check reads.
#[derive(Default)]
pub struct KeyView {
    base: Arc<Maps>,
    /// Changes since `base` was built; `None` means removed.
    overlay: HashMap<Arc<str>, Option<Arc<KeyInfo>>>,
    overlay_fingerprints: HashMap<u64, Option<Arc<KeyInfo>>>,
    len: usize,
    blocked: usize,
}

impl KeyView {
    /// O(1): at most two hash lookups, no locks, no I/O.
    pub fn get(&self, api_key: &str) -> Option<&KeyInfo> {
        match self.overlay.get(api_key) {
            Some(changed) => changed.as_deref(),
            None => self.base.by_key.get(api_key).map(|k| &**k),
        }
    }

    /// The key whose fingerprint (as in the Check's dynamic metadata) is `fp`.
    pub fn get_by_fingerprint(&self, fp: &str) -> Option<&KeyInfo> {
        let bits = parse_fingerprint(fp)?;
        match self.overlay_fingerprints.get(&bits) {
            Some(changed) => changed.as_deref(),
            None => self.base.by_fingerprint.get(&bits).map(|k| &**k),
        }
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
}

/// What each source says, kept only by the writer side.
#[derive(Default)]
struct Layers {
    billing: KeyMap,
    file: KeyMap,
    /// App ids and reasons repeat across many keys: one allocation each.
    interned: std::collections::HashSet<Arc<str>>,
}

impl Layers {
    fn intern(&mut self, s: &str) -> Arc<str> {
        if let Some(known) = self.interned.get(s) {
            return known.clone();
        }
        let new: Arc<str> = s.into();
        self.interned.insert(new.clone());
        new
    }
}

impl Layers {
    fn effective(&self, key: &str) -> Option<Arc<KeyInfo>> {
        let b = self.billing.get(key);
        let f = self.file.get(key);
        match (b, f) {
            (Some(b), _) if b.blocked => Some(b.clone()),
            (_, Some(f)) if f.blocked => Some(f.clone()),
            (Some(b), _) => Some(b.clone()),
            (None, f) => f.cloned(),
        }
    }
}

/// Counts of one applied change, for logs and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Entries taken into the layer.
    pub entries: usize,
    /// Entries skipped because their status is neither `ok` nor `blocked`.
    pub ignored: usize,
    /// Keys whose effective state changed.
    pub changed: usize,
}

pub struct KeyStore {
    view: ArcSwap<KeyView>,
    layers: Mutex<Layers>,
    loaded: watch::Sender<bool>,
    /// Bumped whenever the billing layer changes, so the snapshot writer knows.
    billing_version: watch::Sender<u64>,
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
            layers: Mutex::new(Layers::default()),
            loaded: watch::channel(false).0,
            billing_version: watch::channel(0).0,
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

    /// The billing layer as a list, for the snapshot.
    pub fn billing_entries(&self) -> Vec<KeyEntry> {
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<KeyEntry> = layers
            .billing
            .iter()
            .map(|(key, info)| KeyEntry {
                app_id: info.app_id.to_string(),
                api_key: key.to_string(),
                status: if info.blocked {
                    KeyStatus::Blocked
                } else {
                    KeyStatus::Ok
                },
                reason: info.reason.to_string(),
            })
            .collect();
        out.sort_by(|a, b| a.api_key.cmp(&b.api_key));
        out
    }

    /// Applies billing-system entries on top of what it said before (an update message).
    pub fn apply_billing_update(&self, entries: &[KeyEntry]) -> Applied {
        self.apply(Source::Billing, entries, false)
    }

    /// Replaces the billing layer (loading a snapshot at start-up).
    pub fn replace_billing(&self, source: Source, entries: &[KeyEntry]) -> Applied {
        self.apply(source, entries, true)
    }

    /// Replaces the file layer with the file's full content.
    pub fn replace_file(&self, entries: &[KeyEntry]) -> Applied {
        self.apply(Source::File, entries, true)
    }

    /// One atomic change: readers see either all of it or none of it.
    fn apply(&self, source: Source, entries: &[KeyEntry], replace: bool) -> Applied {
        let mut applied = Applied::default();
        let mut guard = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        let layers = &mut *guard;
        let mut touched: Vec<Arc<str>> = Vec::with_capacity(entries.len());
        let mut layer = std::mem::take(match source {
            Source::File => &mut layers.file,
            Source::Billing | Source::Snapshot => &mut layers.billing,
        });
        if replace {
            touched.extend(layer.drain().map(|(k, _)| k));
        }
        layer.reserve(entries.len());
        for e in entries {
            let blocked = match e.status {
                KeyStatus::Ok => false,
                KeyStatus::Blocked => true,
                KeyStatus::Other(_) => {
                    applied.ignored += 1;
                    continue;
                }
            };
            applied.entries += 1;
            let key: Arc<str> = e.api_key.as_str().into();
            let info = Arc::new(KeyInfo {
                api_key: key.clone(),
                app_id: layers.intern(&e.app_id),
                blocked,
                reason: layers.intern(if blocked { &e.reason } else { "" }),
                fingerprint: fingerprint_bits(&e.api_key),
            });
            layer.insert(key.clone(), info);
            touched.push(key);
        }
        *match source {
            Source::File => &mut layers.file,
            Source::Billing | Source::Snapshot => &mut layers.billing,
        } = layer;

        let old = self.view.load_full();
        let fold_at = MIN_OVERLAY_BEFORE_FOLD.max(old.base.by_key.len() / 8);
        let view = if touched.len() > fold_at {
            // A large change (a full list, a snapshot): build the new view directly
            // instead of going through the overlay key by key.
            let base = Self::build_base(layers);
            applied.changed = touched.len();
            KeyView {
                len: base.by_key.len(),
                blocked: base.by_key.values().filter(|k| k.blocked).count(),
                base: Arc::new(base),
                overlay: HashMap::new(),
                overlay_fingerprints: HashMap::new(),
            }
        } else {
            let mut overlay = old.overlay.clone();
            let mut overlay_fingerprints = old.overlay_fingerprints.clone();
            let (mut len, mut blocked) = (old.len, old.blocked);
            touched.sort_unstable();
            touched.dedup();
            for key in touched {
                let before = old.get(&key).cloned();
                let after = layers.effective(&key);
                if before.as_ref() == after.as_deref() {
                    continue;
                }
                applied.changed += 1;
                len = len + after.is_some() as usize - before.is_some() as usize;
                blocked = blocked + after.as_ref().is_some_and(|k| k.blocked) as usize
                    - before.as_ref().is_some_and(|k| k.blocked) as usize;
                overlay_fingerprints.insert(fingerprint_bits(&key), after.clone());
                overlay.insert(key, after);
            }
            if overlay.len() > fold_at {
                let base = Self::build_base(layers);
                KeyView {
                    len: base.by_key.len(),
                    blocked: base.by_key.values().filter(|k| k.blocked).count(),
                    base: Arc::new(base),
                    overlay: HashMap::new(),
                    overlay_fingerprints: HashMap::new(),
                }
            } else {
                KeyView {
                    base: old.base.clone(),
                    overlay,
                    overlay_fingerprints,
                    len,
                    blocked,
                }
            }
        };
        self.view.store(Arc::new(view));
        self.loaded
            .send_if_modified(|l| !std::mem::replace(l, true));
        drop(guard);
        // The snapshot itself need not be written back; only news from the billing
        // system is.
        if source == Source::Billing && applied.changed > 0 {
            self.billing_version.send_modify(|v| *v += 1);
        }
        applied
    }

    /// Every key's effective state, from scratch.
    fn build_base(layers: &Layers) -> Maps {
        let n = layers.billing.len() + layers.file.len();
        let mut base = Maps {
            by_key: KeyMap::with_capacity(n),
            by_fingerprint: HashMap::with_capacity(n),
        };
        for key in layers.billing.keys().chain(layers.file.keys()) {
            if !base.by_key.contains_key(key)
                && let Some(info) = layers.effective(key)
            {
                base.by_fingerprint.insert(info.fingerprint, info.clone());
                base.by_key.insert(key.clone(), info);
            }
        }
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(store: &KeyStore, key: &str) -> Option<KeyInfo> {
        store.view().get(key).cloned()
    }

    #[test]
    fn updates_apply_and_latest_status_wins() {
        let s = KeyStore::new();
        assert!(!s.is_loaded());
        s.apply_billing_update(&[KeyEntry::ok("app-1", "k1"), KeyEntry::ok("app-2", "k2")]);
        assert!(s.is_loaded());
        assert_eq!(&*lookup(&s, "k1").unwrap().app_id, "app-1");
        s.apply_billing_update(&[KeyEntry::blocked("app-1", "k1", "balance")]);
        let k1 = lookup(&s, "k1").unwrap();
        assert!(k1.blocked);
        assert_eq!(&*k1.reason, "balance");
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
        assert!(!lookup(&s, "k").unwrap().blocked);
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
        assert!(lookup(&s, "billing-blocked").unwrap().blocked);
        let shared = lookup(&s, "shared").unwrap();
        assert!(shared.blocked);
        assert_eq!(&*shared.reason, "local block");
        assert_eq!(&*lookup(&s, "file-only").unwrap().app_id, "local");
        // Reloading the file without a key removes only the file's say on it.
        s.replace_file(&[]);
        assert!(!lookup(&s, "shared").unwrap().blocked);
        assert!(lookup(&s, "file-only").is_none());
        assert_eq!(s.view().len(), 2);
    }

    #[test]
    fn folding_the_overlay_keeps_every_key() {
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
        assert!(v.overlay.len() <= MIN_OVERLAY_BEFORE_FOLD.max(v.base.by_key.len() / 8));
        let fp = fingerprint("key-1234");
        assert_eq!(&*v.get_by_fingerprint(&fp).unwrap().api_key, "key-1234");
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
        assert!(lookup(&restored, "k2").unwrap().blocked);
    }

    #[test]
    fn only_billing_news_schedules_a_snapshot_write_and_app_ids_are_shared() {
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
        let v = s.view();
        assert!(Arc::ptr_eq(
            &v.get("k1").unwrap().app_id,
            &v.get("k9999").unwrap().app_id
        ));
        drop(v);
        s.apply_billing_update(&[KeyEntry::blocked("app-1", "k1", "balance")]);
        assert!(changes.has_changed().unwrap());
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
        assert_eq!(&*s.view().get_by_fingerprint(&fp).unwrap().app_id, "a");
        assert!(s.view().get_by_fingerprint("fp-0000000000000000").is_none());
        assert!(s.view().get_by_fingerprint("sk-test-0001").is_none());
        s.replace_file(&[]);
        s.apply_billing_update(&[KeyEntry::blocked("a", "sk-test-0001", "r")]);
        assert!(s.view().get_by_fingerprint(&fp).unwrap().blocked);
    }
}
