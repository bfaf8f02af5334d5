//! `billing/keys/update` means to keymeter what it means to the SDK.
//!
//! Random sequences of update messages, built from what a billing server written
//! against the SDK may send (good entries, blocks without app ids, unknown statuses,
//! entries that are not objects, fields missing, `null` or of other types, unknown
//! fields, missing or float timestamps, repeated keys), go through keymeter's parser
//! and key store (`apply_billing_message`). After every message each key is compared
//! with two small models written here:
//!
//! - `sdk`: the SDK's rules as its source applies them (README, "What a
//!   `billing/keys/update` may hold");
//! - `expected`: the same rules with keymeter's documented stricter cases.
//!
//! keymeter must equal `expected` on every key (validity, app id, reason), and
//! `expected` must equal `sdk` on every key a request can present, except keys that
//! the model marks, each with the documented case that explains it. A mark is cleared
//! when a later entry puts both models in the same state again.

use std::collections::{HashMap, HashSet};

use keymeter::keys::KeyStore;
use keymeter::keys::sync::apply_billing_message;
use keymeter::keys::update::{MAX_FIELD_BYTES, SkipReason};
use keymeter::metrics::Metrics;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const MAX: usize = 1 << 20;

/// Keys the messages use: a few good ones (repeated often), one with inner spaces
/// (usable), and keys no HTTP request can carry (skipped by keymeter).
fn key_universe() -> Vec<String> {
    let mut keys: Vec<String> = [
        "sk-a",
        "sk-b",
        "sk-c",
        "sk two words",
        " sk-lead",
        "sk-trail ",
        "sk\ttab",
        "sk\nlf",
        "",
    ]
    .map(String::from)
    .to_vec();
    keys.push("k".repeat(MAX_FIELD_BYTES + 1));
    keys
}

fn app_ids() -> Vec<String> {
    let mut apps: Vec<String> = ["app-1", "app-2", "app with space", "", "app\r\nx-evil: 1"]
        .map(String::from)
        .to_vec();
    apps.push("a".repeat(MAX_FIELD_BYTES + 1));
    apps
}

/// A field: missing (`None`), or any JSON value, mostly one of `strings`.
fn field(strings: Vec<String>) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => prop_oneof![
            Just(json!(5)),
            Just(json!(1.5)),
            Just(json!(true)),
            Just(json!(["x"])),
            Just(json!({"x": 1})),
        ]
        .prop_map(Some),
        6 => prop::sample::select(strings).prop_map(|s| Some(Value::String(s))),
    ]
}

/// `api_key`: like [`field`], but never an array or object (the SDK would use it as a
/// dict key and raise; its behaviour there is not part of the contract).
fn api_key_field() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Value::Null)),
        1 => Just(Some(json!(42))),
        8 => prop::sample::select(key_universe()).prop_map(|s| Some(Value::String(s))),
    ]
}

fn status_field() -> impl Strategy<Value = Option<Value>> {
    let statuses = [
        "ok",
        "ok",
        "ok",
        "blocked",
        "blocked",
        "OK",
        "suspended",
        "",
    ]
    .map(String::from)
    .to_vec();
    field(statuses)
}

fn reason_field() -> impl Strategy<Value = Option<Value>> {
    field(["balance", "", "r\nwith lines"].map(String::from).to_vec())
}

fn entry() -> impl Strategy<Value = Value> {
    let object = (
        api_key_field(),
        field(app_ids()),
        status_field(),
        reason_field(),
        any::<bool>(),
    )
        .prop_map(|(api_key, app_id, status, reason, extra)| {
            let mut m = Map::new();
            for (name, v) in [
                ("api_key", api_key),
                ("app_id", app_id),
                ("status", status),
                ("reason", reason),
            ] {
                if let Some(v) = v {
                    m.insert(name.into(), v);
                }
            }
            if extra {
                m.insert("expires".into(), json!({"at": [1, 2]}));
            }
            Value::Object(m)
        });
    prop_oneof![
        8 => object,
        1 => prop_oneof![
            Just(json!(7)),
            Just(json!("sk-a")),
            Just(Value::Null),
            Just(json!(["sk-b", "ok"])),
            Just(json!(false)),
        ],
    ]
}

fn message() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(entry(), 0..8),
        prop_oneof![
            Just(None),
            Just(Some(json!(1795648614249u64))),
            Just(Some(json!(1795648614.249))),
            Just(Some(json!("2026-01-01T00:00:00Z"))),
            Just(Some(Value::Null)),
        ],
        any::<bool>(),
    )
        .prop_map(|(updates, timestamp, extra)| {
            let mut m = Map::new();
            m.insert("updates".into(), Value::Array(updates));
            if let Some(t) = timestamp {
                m.insert("timestamp".into(), t);
            }
            if extra {
                m.insert("source".into(), json!({"server": "billing-2", "v": [1]}));
            }
            Value::Object(m)
        })
}

/// A key's state as the SDK keeps it.
#[derive(Debug, Clone, PartialEq)]
enum Sdk {
    /// Valid, with the entry's `app_id` (`None` when it was not a string).
    Valid(Option<String>),
    Blocked,
}

/// A key's state as keymeter documents it.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    app_id: String,
    blocked: bool,
    reason: String,
}

/// Why keymeter and the SDK may disagree on a key (README, "Where keys come from").
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stricter {
    /// The SDK loses the rest of a message after an entry that is not an object;
    /// keymeter skips only that entry.
    AfterNonObject,
    /// An `ok` entry without a usable app id: the SDK makes the key valid without an
    /// app, keymeter skips the entry.
    OkWithoutUsableAppId,
}

fn usable_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_FIELD_BYTES
        && !k.chars().any(char::is_control)
        && !k.starts_with(' ')
        && !k.ends_with(' ')
}

fn app_id_skip(app_id: Option<&str>) -> Option<SkipReason> {
    match app_id {
        None | Some("") => Some(SkipReason::NoAppId),
        Some(a) if a.len() > MAX_FIELD_BYTES => Some(SkipReason::AppIdTooLong),
        Some(a) if a.chars().any(char::is_control) => Some(SkipReason::AppIdNotHeaderSafe),
        Some(_) => None,
    }
}

#[derive(Default)]
struct Model {
    sdk: HashMap<String, Sdk>,
    expected: HashMap<String, Expected>,
    marked: HashMap<String, Stricter>,
    skipped: HashMap<&'static str, u64>,
}

impl Model {
    fn apply(&mut self, message: &Value) {
        let mut sdk_stopped = false;
        for entry in message["updates"].as_array().unwrap() {
            let Some(e) = entry.as_object() else {
                // SDK: raises inside its loop; the rest of the message is lost.
                sdk_stopped = true;
                *self.skipped.entry("not_an_object").or_default() += 1;
                continue;
            };
            let text = |name: &str| e.get(name).and_then(Value::as_str);
            let blocked = match text("status") {
                Some("ok") => false,
                Some("blocked") => true,
                _ => continue,
            };
            let key = text("api_key");
            let app_id = text("app_id");
            // The SDK's state, unless it stopped.
            let sdk_state = if blocked {
                Sdk::Blocked
            } else {
                Sdk::Valid(app_id.map(String::from))
            };
            if let (Some(k), false) = (key, sdk_stopped) {
                self.sdk.insert(k.to_string(), sdk_state);
            }
            // keymeter's state.
            let skip = match key {
                None | Some("") => Some(SkipReason::NoApiKey),
                Some(k) if k.len() > MAX_FIELD_BYTES => Some(SkipReason::ApiKeyTooLong),
                Some(k) if !usable_key(k) => Some(SkipReason::ApiKeyNotHeaderSafe),
                Some(_) if !blocked => app_id_skip(app_id),
                Some(_) => None,
            };
            let key = key.unwrap_or_default();
            if let Some(reason) = skip {
                *self.skipped.entry(reason.as_str()).or_default() += 1;
                if usable_key(key) && !sdk_stopped {
                    // Only an app id problem skips an entry with a usable key.
                    self.marked
                        .insert(key.to_string(), Stricter::OkWithoutUsableAppId);
                }
                continue;
            }
            let known_app = self.expected.get(key).map(|x| x.app_id.clone());
            let state = if blocked {
                let reason = text("reason").unwrap_or_default();
                Expected {
                    app_id: app_id
                        .filter(|a| app_id_skip(Some(a)).is_none())
                        .map(String::from)
                        .or(known_app)
                        .unwrap_or_default(),
                    blocked,
                    reason: reason.to_string(),
                }
            } else {
                Expected {
                    app_id: app_id.unwrap_or_default().to_string(),
                    blocked,
                    reason: String::new(),
                }
            };
            self.expected.insert(key.to_string(), state);
            if sdk_stopped {
                self.marked
                    .insert(key.to_string(), Stricter::AfterNonObject);
            } else {
                // Both applied this entry alike: any earlier divergence is gone.
                self.marked.remove(key);
            }
        }
    }
}

/// One sample of Prometheus text; 0 when absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn key_updates_mean_to_keymeter_what_they_mean_to_the_sdk(
        messages in prop::collection::vec(message(), 1..7)
    ) {
        let store = KeyStore::new();
        let metrics = Metrics::new();
        let mut model = Model::default();
        let universe = key_universe();
        for (n, message) in messages.iter().enumerate() {
            let payload = serde_json::to_vec(message).unwrap();
            let applied = apply_billing_message(&store, &metrics, &payload, MAX);
            prop_assert!(applied.is_ok(), "message {n} rejected: {applied:?}");
            model.apply(message);
            let view = store.view();
            for key in &universe {
                let got = view.get(key).map(|k| Expected {
                    app_id: k.app_id.to_string(),
                    blocked: k.blocked,
                    reason: k.reason.to_string(),
                });
                // keymeter follows its documented rules exactly.
                prop_assert_eq!(&got, &model.expected.get(key).cloned(),
                    "key {:?} after message {}: {}", key, n, message);
                if !usable_key(key) {
                    prop_assert!(got.is_none(), "a key no request can carry is never stored");
                    continue;
                }
                // And those rules agree with the SDK except where the model marks it.
                if model.marked.contains_key(key) {
                    continue;
                }
                let sdk = model.sdk.get(key);
                match (sdk, &got) {
                    (None, None) => {}
                    (Some(Sdk::Blocked), Some(g)) => prop_assert!(g.blocked, "key {key:?}: {message}"),
                    (Some(Sdk::Valid(app)), Some(g)) => {
                        prop_assert!(!g.blocked, "key {key:?}: {message}");
                        prop_assert_eq!(app.as_deref(), Some(g.app_id.as_str()));
                    }
                    _ => prop_assert!(false, "key {key:?}: SDK {sdk:?}, keymeter {got:?}, after {message}"),
                }
            }
            // Every skipped entry is counted under its reason.
            let text = metrics.render();
            for reason in SkipReason::ALL {
                let name = format!("keymeter_key_entries_skipped_total{{reason=\"{reason}\"}}");
                let want = model.skipped.get(reason.as_str()).copied().unwrap_or(0);
                prop_assert_eq!(sample(&text, &name), want as f64, "{}", name);
            }
        }
    }
}

/// The generators reach every documented stricter case and every skip reason, so the
/// property above is not vacuous.
#[test]
fn the_generators_reach_every_case() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut model = Model::default();
    let mut marks = HashSet::new();
    for _ in 0..2000 {
        let m = message().new_tree(&mut runner).unwrap().current();
        model.apply(&m);
        marks.extend(model.marked.values().map(|w| format!("{w:?}")));
    }
    for reason in SkipReason::ALL {
        assert!(
            model.skipped.contains_key(reason.as_str()),
            "{reason} never generated"
        );
    }
    assert!(marks.contains("AfterNonObject") && marks.contains("OkWithoutUsableAppId"));
}
