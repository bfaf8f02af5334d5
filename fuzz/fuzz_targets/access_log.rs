//! The access-log decoder on arbitrary bytes: a message walk, every entry decoded and
//! judged, and nothing panics.
#![no_main]

use keymeter::accesslog::wire::{decode_entry, decode_message};
use keymeter::accesslog::{EXT_AUTHZ_NAMESPACE, Rules, entry_outcome};
use keymeter::config::{CheckConfig, UsageConfig};
use keymeter::keys::{KeyEntry, KeyStore};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = KeyStore::new();
    keys.apply_billing_update(&[KeyEntry::ok("app-1", "sk-good")]);
    let check = CheckConfig::default();
    let usage = UsageConfig::default();
    let rules = Rules {
        check: &check,
        usage: &usage,
    };
    let (message, _) = decode_message(data);
    for raw in message.http_entries.iter().copied().chain([data]) {
        if let Ok(entry) = decode_entry(raw, &["keymeter", EXT_AUTHZ_NAMESPACE]) {
            let _ = entry_outcome(&entry, &keys.view(), &rules);
        }
    }
});
