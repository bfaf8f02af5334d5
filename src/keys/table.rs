//! One source's keys in a compact, immutable table: the bulk of the key store.
//!
//! A million keys must load in well under two seconds and fit in a few hundred bytes
//! each at most, so a table keeps no per-key allocation: every key, app id and reason
//! lives in one text buffer, each key is a fixed-size [`Record`] pointing into it, and
//! two index tables hold record numbers, one found by the key's hash, one by its
//! fingerprint. Changes after a table is built live in a small delta next to it (see
//! `super::Layer`) until the next rebuild.

use std::collections::HashMap;
use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::{KeyInfo, fingerprint_bits};

/// Distinct app ids / reasons remembered while building, so repeats share text. Lists
/// where every key has its own app id stop deduplicating there instead of growing a
/// second index as large as the table.
const MAX_SHARED_STRINGS: usize = 65_536;

type SharedStrings<'a> = HashMap<&'a str, Span, foldhash::fast::RandomState>;

/// One key; the strings are spans of [`KeyTable::text`].
#[derive(Clone, Copy)]
struct Record {
    fingerprint: u64,
    key: Span,
    app_id: Span,
    reason: Span,
    blocked: bool,
}

#[derive(Clone, Copy)]
struct Span {
    start: u32,
    len: u32,
}

/// A key as one source states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stated<'a> {
    pub api_key: &'a str,
    pub app_id: &'a str,
    pub blocked: bool,
    pub reason: &'a str,
}

#[derive(Default)]
pub(crate) struct KeyTable {
    text: String,
    records: Vec<Record>,
    by_key: HashTable<u32>,
    by_fingerprint: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
    blocked: usize,
}

impl KeyTable {
    /// A table of `keys`; when a key repeats, the last statement wins. `hint` is the
    /// expected number of keys (sizes the buffers once).
    pub fn build<'a>(keys: impl IntoIterator<Item = Stated<'a>>, hint: usize) -> KeyTable {
        let mut t = KeyTable {
            text: String::with_capacity(hint * 24),
            records: Vec::with_capacity(hint),
            by_key: HashTable::with_capacity(hint),
            by_fingerprint: HashTable::with_capacity(hint),
            hasher: foldhash::fast::RandomState::default(),
            blocked: 0,
        };
        let mut shared = SharedStrings::default();
        for k in keys {
            let app_id = t.shared_span(&mut shared, k.app_id);
            let reason = t.shared_span(&mut shared, k.reason);
            let hash = t.hasher.hash_one(k.api_key);
            let found = t.by_key.find(hash, |&i| {
                span_str(&t.text, t.records[i as usize].key) == k.api_key
            });
            if let Some(&i) = found {
                let old = &mut t.records[i as usize];
                t.blocked = t.blocked + usize::from(k.blocked) - usize::from(old.blocked);
                old.app_id = app_id;
                old.reason = reason;
                old.blocked = k.blocked;
                continue;
            }
            let key = push_text(&mut t.text, k.api_key);
            let fingerprint = fingerprint_bits(k.api_key);
            let i = u32::try_from(t.records.len()).expect("a key table holds at most 2^32 keys");
            t.records.push(Record {
                fingerprint,
                key,
                app_id,
                reason,
                blocked: k.blocked,
            });
            t.blocked += usize::from(k.blocked);
            let (text, records, hasher) = (&t.text, &t.records, &t.hasher);
            t.by_key.insert_unique(hash, i, |&j| {
                hasher.hash_one(span_str(text, records[j as usize].key))
            });
            t.by_fingerprint
                .insert_unique(fingerprint, i, |&j| records[j as usize].fingerprint);
        }
        t.text.shrink_to_fit();
        t.records.shrink_to_fit();
        t
    }

    /// The span of `s` in the text, reusing an earlier copy when one is remembered.
    fn shared_span<'a>(&mut self, shared: &mut SharedStrings<'a>, s: &'a str) -> Span {
        if let Some(span) = shared.get(s) {
            return *span;
        }
        let span = push_text(&mut self.text, s);
        if shared.len() < MAX_SHARED_STRINGS {
            shared.insert(s, span);
        }
        span
    }

    pub fn get(&self, api_key: &str) -> Option<KeyInfo<'_>> {
        if self.records.is_empty() {
            return None;
        }
        let hash = self.hasher.hash_one(api_key);
        self.by_key
            .find(hash, |&i| self.key_of(i) == api_key)
            .map(|&i| self.info(i))
    }

    pub fn get_by_fingerprint(&self, fingerprint: u64) -> Option<KeyInfo<'_>> {
        self.by_fingerprint
            .find(fingerprint, |&i| {
                self.records[i as usize].fingerprint == fingerprint
            })
            .map(|&i| self.info(i))
    }

    pub fn iter(&self) -> impl Iterator<Item = KeyInfo<'_>> {
        (0..self.records.len() as u32).map(|i| self.info(i))
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn blocked(&self) -> usize {
        self.blocked
    }

    fn key_of(&self, i: u32) -> &str {
        span_str(&self.text, self.records[i as usize].key)
    }

    fn info(&self, i: u32) -> KeyInfo<'_> {
        let r = &self.records[i as usize];
        KeyInfo {
            api_key: span_str(&self.text, r.key),
            app_id: span_str(&self.text, r.app_id),
            blocked: r.blocked,
            reason: span_str(&self.text, r.reason),
            fingerprint: r.fingerprint,
        }
    }
}

fn push_text(text: &mut String, s: &str) -> Span {
    let start = u32::try_from(text.len()).expect("a key table holds at most 4 GiB of text");
    text.push_str(s);
    Span {
        start,
        len: s.len() as u32,
    }
}

fn span_str(text: &str, span: Span) -> &str {
    let start = span.start as usize;
    // Spans are only ever made by `push_text` on this text, at char boundaries.
    text.get(start..start + span.len as usize).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stated<'a>(api_key: &'a str, app_id: &'a str, blocked: bool) -> Stated<'a> {
        Stated {
            api_key,
            app_id,
            blocked,
            reason: if blocked { "r" } else { "" },
        }
    }

    #[test]
    fn finds_every_key_by_value_and_fingerprint_and_last_statement_wins() {
        let keys: Vec<String> = (0..5000).map(|i| format!("sk-{i}")).collect();
        let t = KeyTable::build(
            keys.iter()
                .map(|k| stated(k, "app", false))
                .chain([stated("sk-7", "other", true)]),
            10,
        );
        assert_eq!(t.len(), 5000);
        assert_eq!(t.blocked(), 1);
        for k in &keys {
            let info = t.get(k).unwrap();
            assert_eq!(info.api_key, k);
            assert_eq!(t.get_by_fingerprint(fingerprint_bits(k)), Some(info));
        }
        let seven = t.get("sk-7").unwrap();
        assert!(seven.blocked);
        assert_eq!((seven.app_id, seven.reason), ("other", "r"));
        assert_eq!(t.get("sk-5000"), None);
        assert_eq!(t.get(""), None);
        assert_eq!(t.iter().count(), 5000);
    }

    #[test]
    fn repeated_app_ids_are_stored_once() {
        let keys: Vec<String> = (0..1000).map(|i| format!("key-{i:04}")).collect();
        let t = KeyTable::build(keys.iter().map(|k| stated(k, "an-app-id", false)), 1000);
        assert_eq!(t.text.len(), 1000 * 8 + "an-app-id".len());
        assert_eq!(KeyTable::default().get("x"), None);
    }
}
