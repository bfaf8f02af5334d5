//! Reading deployment manifests in tests: every YAML document of a folder, values
//! by dotted path (`spec.rules.0.to`), and the two duration syntaxes they use.
//!
//! Accessors panic with the path and the value they found, so a reshaped
//! manifest fails with a message that says where.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

/// One YAML document and the file it came from.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub file: String,
    pub value: Value,
}

impl Manifest {
    pub fn kind(&self) -> &str {
        text(&self.value, "kind")
    }

    pub fn name(&self) -> &str {
        text(&self.value, "metadata.name")
    }

    /// `metadata.namespace`, or `""` when the document leaves it out.
    pub fn namespace(&self) -> &str {
        lookup(&self.value, "metadata.namespace")
            .and_then(Value::as_str)
            .unwrap_or("")
    }
}

/// A path below the repository root.
pub fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The text of a file below the repository root (a README, the Dockerfile).
pub fn repo_text(relative: &str) -> String {
    let path = repo_file(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every non-empty document of one YAML file.
pub fn load_documents(path: &Path) -> Vec<Value> {
    let source =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&source) {
        let value = Value::deserialize(document)
            .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
        // `---` at the start or the end of a file yields an empty document.
        if !value.is_null() {
            documents.push(value);
        }
    }
    documents
}

/// The `*.yaml` / `*.yml` files directly in `relative_dir`, by file name.
pub fn yaml_files(relative_dir: &str) -> Vec<PathBuf> {
    let dir = repo_file(relative_dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no YAML file", dir.display());
    files
}

/// The file names of [`yaml_files`], in the same order.
pub fn yaml_file_names(relative_dir: &str) -> Vec<String> {
    yaml_files(relative_dir)
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Every document of every YAML file in `relative_dir`, in file-name order.
pub fn load_folder(relative_dir: &str) -> Vec<Manifest> {
    let mut manifests = Vec::new();
    for path in yaml_files(relative_dir) {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for value in load_documents(&path) {
            manifests.push(Manifest {
                file: file.clone(),
                value,
            });
        }
    }
    manifests
}

/// The value at a dotted path; a numeric segment indexes a list.
pub fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    let mut current = value;
    for segment in path.split('.') {
        current = match segment.parse::<usize>() {
            Ok(index) => current.as_sequence()?.get(index)?,
            Err(_) => current.as_mapping()?.get(segment)?,
        };
    }
    Some(current)
}

/// Like [`node`], for changing a document in place (a test that breaks a copy).
pub fn at_mut<'a>(value: &'a mut Value, path: &str) -> &'a mut Value {
    let mut current = value;
    for segment in path.split('.') {
        current = match (segment.parse::<usize>(), current) {
            (Ok(index), Value::Sequence(items)) => items.get_mut(index),
            (_, Value::Mapping(map)) => map.get_mut(segment),
            _ => None,
        }
        .unwrap_or_else(|| panic!("nothing at `{path}` (no `{segment}`)"));
    }
    current
}

/// The one document of `kind`; panics if there is none or more than one.
pub fn one_of_kind<'a>(manifests: &'a [Manifest], kind: &str) -> &'a Manifest {
    one_where(manifests, kind, |m| m.kind() == kind)
}

/// The one document of `kind` named `name`; panics if there is none or more than one.
pub fn one_named<'a>(manifests: &'a [Manifest], kind: &str, name: &str) -> &'a Manifest {
    one_where(manifests, &format!("{kind} `{name}`"), |m| {
        m.kind() == kind && m.name() == name
    })
}

/// The one document for which `pick` is true; `what` names it in the panic.
pub fn one_where<'a>(
    manifests: &'a [Manifest],
    what: &str,
    pick: impl Fn(&Manifest) -> bool,
) -> &'a Manifest {
    let found: Vec<&Manifest> = manifests.iter().filter(|m| pick(m)).collect();
    let files: Vec<&str> = found.iter().map(|m| m.file.as_str()).collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {what}, found {} (in {files:?})",
        found.len()
    );
    found[0]
}

/// The one mapping named `name` in deploy/envoy/envoy.yaml (a cluster, a filter),
/// which the Istio and Envoy Gateway manifests must agree with.
pub fn envoy_config_named(name: &str) -> Value {
    let documents = load_documents(&super::deploy_config_path());
    assert_eq!(
        documents.len(),
        1,
        "deploy/envoy/envoy.yaml is one document"
    );
    let found = named(&documents[0], name);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one `name: {name}` in deploy/envoy/envoy.yaml"
    );
    found[0].clone()
}

/// Like [`lookup`], but the path must exist.
pub fn node<'a>(value: &'a Value, path: &str) -> &'a Value {
    lookup(value, path).unwrap_or_else(|| panic!("nothing at `{path}` in {value:?}"))
}

pub fn text<'a>(value: &'a Value, path: &str) -> &'a str {
    let found = node(value, path);
    found
        .as_str()
        .unwrap_or_else(|| panic!("`{path}` should be a string, is {found:?}"))
}

pub fn list<'a>(value: &'a Value, path: &str) -> &'a [Value] {
    let found = node(value, path);
    found
        .as_sequence()
        .unwrap_or_else(|| panic!("`{path}` should be a list, is {found:?}"))
}

/// The list at `path`, or no items when the path is absent (Kubernetes reads a
/// missing list as an empty one); panics if the path holds something else.
pub fn list_or_empty<'a>(value: &'a Value, path: &str) -> &'a [Value] {
    match lookup(value, path) {
        None => &[],
        Some(found) => found
            .as_sequence()
            .unwrap_or_else(|| panic!("`{path}` should be a list, is {found:?}")),
    }
}

/// The item of `items` whose `name` is `name`; panics if there is none or more
/// than one. `what` says what the items are (`container`, `port`).
pub fn item_named<'a>(items: &'a [Value], name: &str, what: &str) -> &'a Value {
    let found: Vec<&Value> = items
        .iter()
        .filter(|item| item.get("name").and_then(Value::as_str) == Some(name))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {what} named `{name}`, found {}",
        found.len()
    );
    found[0]
}

/// A mapping of strings (labels, selectors, annotations, ConfigMap data) as a map;
/// the path must exist.
pub fn string_map(value: &Value, path: &str) -> BTreeMap<String, String> {
    let found = node(value, path);
    found
        .as_mapping()
        .unwrap_or_else(|| panic!("`{path}` should be a mapping, is {found:?}"))
        .iter()
        .map(|(key, item)| {
            let key = key
                .as_str()
                .unwrap_or_else(|| panic!("`{path}` has a non-string key {key:?}"));
            let item = item
                .as_str()
                .unwrap_or_else(|| panic!("`{path}.{key}` should be a string, is {item:?}"));
            (key.to_owned(), item.to_owned())
        })
        .collect()
}

/// Like [`string_map`], but an absent path is an empty map (labels, annotations
/// and selectors that a manifest may leave out).
pub fn string_map_or_empty(value: &Value, path: &str) -> BTreeMap<String, String> {
    match lookup(value, path) {
        None => BTreeMap::new(),
        Some(_) => string_map(value, path),
    }
}

/// A list of strings, in order.
pub fn texts(value: &Value, path: &str) -> Vec<String> {
    list(value, path)
        .iter()
        .map(|item| {
            item.as_str()
                .unwrap_or_else(|| panic!("`{path}` holds {item:?}, not a string"))
                .to_owned()
        })
        .collect()
}

pub fn number(value: &Value, path: &str) -> u64 {
    let found = node(value, path);
    found
        .as_u64()
        .unwrap_or_else(|| panic!("`{path}` should be a whole number, is {found:?}"))
}

/// `Some(bool)` when the path holds a boolean, `None` when it is absent.
pub fn flag(value: &Value, path: &str) -> Option<bool> {
    lookup(value, path).map(|found| {
        found
            .as_bool()
            .unwrap_or_else(|| panic!("`{path}` should be true or false, is {found:?}"))
    })
}

/// The keys of a mapping, in document order.
pub fn field_names(value: &Value) -> Vec<String> {
    value
        .as_mapping()
        .unwrap_or_else(|| panic!("expected a mapping, found {value:?}"))
        .keys()
        .map(|key| {
            key.as_str()
                .unwrap_or_else(|| panic!("non-string key {key:?}"))
                .to_owned()
        })
        .collect()
}

/// Every mapping anywhere below `value` (itself included) whose `name` is `name`.
pub fn named<'a>(value: &'a Value, name: &str) -> Vec<&'a Value> {
    let mut found = Vec::new();
    let mut pending = vec![value];
    while let Some(current) = pending.pop() {
        match current {
            Value::Mapping(map) => {
                if map.get("name").and_then(Value::as_str) == Some(name) {
                    found.push(current);
                }
                let children: Vec<&Value> = map.values().collect();
                pending.extend(children.into_iter().rev());
            }
            Value::Sequence(items) => pending.extend(items.iter().rev()),
            Value::Tagged(tagged) => pending.push(&tagged.value),
            _ => {}
        }
    }
    found
}

/// `items` as a set, for comparing lists whose order means nothing; panics if
/// one is listed twice (a header list that says a name twice is a mistake).
pub fn set_of(items: &[String]) -> BTreeSet<String> {
    let set: BTreeSet<String> = items.iter().cloned().collect();
    assert_eq!(set.len(), items.len(), "{items:?} names something twice");
    set
}

/// How a duration is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationSyntax {
    /// Envoy and Istio (protobuf JSON): seconds with an `s` suffix, `0.25s`.
    Protobuf,
    /// Gateway API and its extensions (GEP-2257): whole numbers with `h`, `m`,
    /// `s` or `ms`, up to four of them, `250ms`, `1h30m`; no fractions.
    GatewayApi,
}

/// Seconds in `text`; panics if `text` is not valid in `syntax`.
pub fn duration_seconds(text: &str, syntax: DurationSyntax) -> f64 {
    parse_duration(text, syntax).unwrap_or_else(|| panic!("{text:?} is not a {syntax:?} duration"))
}

/// Seconds in `text`, or `None` if `text` is not valid in `syntax`.
pub fn parse_duration(text: &str, syntax: DurationSyntax) -> Option<f64> {
    match syntax {
        DurationSyntax::Protobuf => protobuf_seconds(text),
        DurationSyntax::GatewayApi => gateway_api_seconds(text),
    }
}

fn protobuf_seconds(text: &str) -> Option<f64> {
    let number = text.strip_suffix('s')?;
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) if (1..=9).contains(&fraction.len()) => (whole, fraction),
        Some(_) => return None,
        None => (number, "0"),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !(digits(whole) && digits(fraction)) {
        return None;
    }
    number.parse().ok()
}

fn gateway_api_seconds(text: &str) -> Option<f64> {
    let mut rest = text;
    let mut total = 0.0;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=5).contains(&digits) {
            return None;
        }
        let amount: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, seconds) = [("ms", 0.001), ("h", 3600.0), ("m", 60.0), ("s", 1.0)]
            .into_iter()
            .find(|(unit, _)| rest.starts_with(unit))?;
        rest = &rest[unit.len()..];
        total += amount * seconds;
        parts += 1;
    }
    (1..=4).contains(&parts).then_some(total)
}
