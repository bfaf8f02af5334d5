//! Property tests: arbitrary bytes and structured near-misses fed to every parser of
//! outside input never panic, never change state when rejected, and always give a
//! reason.

use std::collections::HashMap;
use std::path::Path;

use keymeter::config::{Config, UsageConfig};
use keymeter::keys::sync::{ListRejection, apply_billing_message, parse_update};
use keymeter::keys::update::check_api_key;
use keymeter::keys::{KeyEntry, KeyStore};
use keymeter::metrics::Metrics;
use keymeter::usage::contract::{Declared, FieldNames, Limits, usages};
use proptest::prelude::*;
use serde_json::Value;

const MAX: usize = 1 << 20;

fn limits() -> Limits {
    Limits::from_config(&UsageConfig::default())
}

/// JSON-ish text built from the pieces real payloads are made of, so the parsers are
/// exercised past their first byte.
fn jsonish() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("\"updates\"".to_string()),
        Just("\"timestamp\"".to_string()),
        Just("\"app_id\"".to_string()),
        Just("\"api_key\"".to_string()),
        Just("\"status\"".to_string()),
        Just("\"ok\"".to_string()),
        Just("\"blocked\"".to_string()),
        Just("\"reason\"".to_string()),
        Just("null".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        "\"[a-z0-9-]{0,8}\"".prop_map(|s| s),
    ];
    prop::collection::vec(atom, 0..40).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn key_update_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        match parse_update(&bytes, MAX) {
            Ok(u) => prop_assert!(u.entries.iter().all(|e| check_api_key(&e.api_key).is_ok())),
            Err(r) => prop_assert!(matches!(r.reason, ListRejection::BadJson | ListRejection::WrongShape), "{}", r),
        }
    }

    /// A message is rejected whole exactly when it is no key update at all: not JSON,
    /// not an object, or `updates` neither an array nor null. A rejected one changes
    /// nothing; any other one applies (its bad entries are skipped one by one, see
    /// tests/it/key_update_model.rs).
    #[test]
    fn rejected_key_updates_change_nothing(text in jsonish()) {
        let store = KeyStore::new();
        let metrics = Metrics::new();
        store.apply_billing_update(&[KeyEntry::ok("app", "sk-before"), KeyEntry::blocked("app", "sk-blocked", "r")]);
        let before = store.billing_entries();
        let is_update = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => matches!(m.get("updates"), None | Some(Value::Null | Value::Array(_))),
            _ => false,
        };
        match apply_billing_message(&store, &metrics, text.as_bytes(), MAX) {
            Err(r) => {
                prop_assert!(!is_update, "rejected a key update: {} ({})", text, r);
                prop_assert!(matches!(r.reason, ListRejection::BadJson | ListRejection::WrongShape), "{}", r);
                prop_assert_eq!(store.billing_entries(), before);
            }
            Ok(_) => prop_assert!(is_update, "applied something that is no key update: {}", text),
        }
    }

    #[test]
    fn usage_headers_never_panic_and_accepted_values_are_valid(
        module in prop::option::of(".{0,20}"),
        model in prop::option::of(".{0,20}"),
        usage in prop::option::of(prop_oneof![".{0,24}", "-?[0-9]{1,25}", any::<u64>().prop_map(|n| n.to_string())]),
        metadata in prop::option::of(prop_oneof![jsonish(), ".{0,40}"]),
        records in prop::option::of(prop_oneof![jsonish(), ".{0,40}"]),
    ) {
        let mut headers = HashMap::new();
        let config = UsageConfig::default();
        let names = FieldNames::from_config(&config);
        for (name, value) in [(names.module, &module), (names.model, &model), (names.usage, &usage),
                              (names.metadata, &metadata), (names.records, &records)] {
            if let Some(v) = value {
                headers.insert(name.to_string(), v.clone());
            }
        }
        let declared = Declared::from_headers(&headers, &names);
        for verdict in usages(&declared, None, limits()) {
            match verdict {
                Ok(u) => {
                    prop_assert!(!u.module.trim().is_empty() && !u.model.trim().is_empty());
                    prop_assert!(u.usage <= i64::MAX as u64);
                    // Dropped metadata leaves none behind.
                    prop_assert!(u.metadata_dropped.is_none() || u.metadata.is_empty());
                }
                Err(reason) => prop_assert!(!reason.as_str().is_empty()),
            }
        }
    }

    #[test]
    fn usage_numbers_round_trip(n in 0..=i64::MAX as u64) {
        let headers = HashMap::from([
            ("x-billing-module".to_string(), "llm".to_string()),
            ("x-billing-model".to_string(), "m".to_string()),
            ("x-billing-usage".to_string(), n.to_string()),
        ]);
        let config = UsageConfig::default();
        let declared = Declared::from_headers(&headers, &FieldNames::from_config(&config));
        let u = usages(&declared, None, limits());
        prop_assert_eq!(u.len(), 1);
        prop_assert_eq!(u[0].as_ref().map(|u| u.usage), Ok(n));
    }

    #[test]
    fn config_loader_never_panics_and_errors_name_something(text in prop_oneof![
        ".{0,200}",
        prop::collection::vec(prop_oneof![
            Just("[mqtt]\n".to_string()), Just("host = \"b\"\n".to_string()),
            Just("port = ".to_string()), Just("[check]\n".to_string()),
            Just("key_headers = []\n".to_string()), Just("[outbox]\n".to_string()),
            Just("max_bytes = 1\n".to_string()), Just("[[usage.routes]]\n".to_string()),
            Just("usage = -1\n".to_string()), Just("\"x\"\n".to_string()),
            any::<i64>().prop_map(|n| format!("{n}\n")),
        ], 0..12).prop_map(|v| v.concat()),
    ]) {
        if let Err(e) = Config::parse(&text, Path::new("prop.toml"), |_| None) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
