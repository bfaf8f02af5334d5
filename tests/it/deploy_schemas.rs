//! Every Kubernetes object under deploy/ validated against published schemas, and
//! every kustomization rendered, with real tools and no cluster:
//!
//! - built-in kinds (ConfigMap, StatefulSet, Service, NetworkPolicy, ...) with the
//!   PyPI package kubernetes-validate against the Kubernetes 1.30 API (the oldest
//!   deploy/kubernetes supports), strictly: an unknown field is an error;
//! - custom resources (Istio, Gateway API, Envoy Gateway, Prometheus Operator)
//!   with the schemas of the npm packages @kubernetes-models/* pinned in
//!   deploy/schemas/ (types, enums, patterns, required fields; those schemas
//!   accept unknown fields, which the per-folder tests check instead);
//! - `kubectl kustomize` on each kustomization: it renders, applies exactly the
//!   files it lists, and puts keymeter's objects into keymeter's namespace.
//!
//! scripts/test.sh installs the three (scripts/lib.sh); a missing one fails here.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::support::yaml::{self, Manifest};
use serde::Deserialize;
use serde_json::Value as Json;
use serde_yaml::Value;

/// The folders of Kubernetes manifests.
const FOLDERS: [&str; 4] = [
    "deploy/kubernetes",
    "deploy/envoy-gateway",
    "deploy/istio",
    "deploy/prometheus-operator",
];
/// The oldest Kubernetes deploy/kubernetes supports (README: `preStop.sleep`).
const KUBERNETES_VERSION: &str = "1.30";
/// API groups served by CRDs, and the npm package with their schemas.
const CRD_GROUPS: [&str; 8] = [
    "security.istio.io",
    "networking.istio.io",
    "telemetry.istio.io",
    "install.istio.io",
    "extensions.istio.io",
    "gateway.networking.k8s.io",
    "gateway.envoyproxy.io",
    "monitoring.coreos.com",
];

fn group(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(group, _)| group)
}

fn is_kustomization(m: &Manifest) -> bool {
    m.kind() == "Kustomization"
}

fn is_custom(m: &Manifest) -> bool {
    CRD_GROUPS.contains(&group(yaml::text(&m.value, "apiVersion")))
}

/// Every document of every folder, with its folder in `file`.
fn all_manifests() -> Vec<Manifest> {
    let mut all = Vec::new();
    for folder in FOLDERS {
        for mut manifest in yaml::load_folder(folder) {
            manifest.file = format!("{folder}/{}", manifest.file);
            all.push(manifest);
        }
    }
    all
}

// ---------------------------------------------------------------------------
// Built-in kinds: kubernetes-validate
// ---------------------------------------------------------------------------

/// `python3 -m kubernetes_validate --strict` on `documents`, each written to a file
/// of its own: whether every one passed, and the tool's output.
fn kubernetes_validate(dir: &Path, documents: &[(String, Value)]) -> (bool, String) {
    let version = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output();
    assert!(
        version.as_ref().is_ok_and(|o| o.status.success()),
        "kubernetes-validate is missing: run scripts/test.sh (scripts/lib.sh \
         ensure_kubernetes_validate installs the PyPI package)"
    );
    let mut files = Vec::new();
    for (i, (name, value)) in documents.iter().enumerate() {
        let path = dir.join(format!("{i:02}-{}", name.replace('/', "_")));
        std::fs::write(&path, serde_yaml::to_string(value).unwrap()).unwrap();
        files.push(path);
    }
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "-k",
            KUBERNETES_VERSION,
        ])
        .args(&files)
        .output()
        .expect("run kubernetes-validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A kind it has no schema for is only a warning to it: an error here.
    let passed = text.matches(" passed for resource ").count();
    (
        out.status.success() && passed == documents.len() && !text.contains("WARN"),
        text,
    )
}

#[test]
fn built_in_kinds_are_valid_against_the_kubernetes_api() {
    let documents: Vec<(String, Value)> = all_manifests()
        .into_iter()
        .filter(|m| !is_kustomization(m) && !is_custom(m))
        .map(|m| (format!("{} {}", m.file, m.kind()), m.value))
        .collect();
    let kinds: BTreeSet<String> = documents
        .iter()
        .map(|(_, v)| yaml::text(v, "kind").to_owned())
        .collect();
    for kind in [
        "ConfigMap",
        "StatefulSet",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Secret",
    ] {
        assert!(kinds.contains(kind), "no {kind} validated: {kinds:?}");
    }
    let dir = crate::support::TestDir::new("k8s-validate");
    let (ok, out) = kubernetes_validate(dir.path(), &documents);
    assert!(
        ok,
        "kubernetes-validate --strict -k {KUBERNETES_VERSION} refused:\n{out}"
    );

    // The check has teeth: a misspelt field and a wrong type are refused.
    let pdb = documents
        .iter()
        .find(|(_, v)| yaml::text(v, "kind") == "PodDisruptionBudget")
        .unwrap()
        .1
        .clone();
    let mut misspelt = pdb.clone();
    misspelt["spec"]
        .as_mapping_mut()
        .unwrap()
        .insert("minAvailible".into(), 1.into());
    let mut mistyped = pdb;
    mistyped["spec"]["selector"] = Value::from("app=keymeter");
    for (what, broken) in [("misspelt", misspelt), ("mistyped", mistyped)] {
        let (ok, out) = kubernetes_validate(dir.path(), &[(format!("{what}.yaml"), broken)]);
        assert!(!ok, "a {what} PodDisruptionBudget passed:\n{out}");
        assert!(out.contains("ERROR"), "{out}");
    }
}

// ---------------------------------------------------------------------------
// Custom resources: @kubernetes-models/* schemas
// ---------------------------------------------------------------------------

/// Where scripts/lib.sh (ensure_schema_models) installed deploy/schemas/.
fn schema_modules() -> PathBuf {
    let dir = std::env::var_os("KEYMETER_SCHEMA_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| yaml::repo_file("target/deploy-schemas/node_modules"));
    assert!(
        dir.join("@kubernetes-models").is_dir(),
        "the schema packages of deploy/schemas/ are not installed in {}: run scripts/test.sh \
         (scripts/lib.sh ensure_schema_models)",
        dir.display()
    );
    dir
}

#[derive(Debug, Deserialize)]
struct Verdict {
    #[serde(rename = "where")]
    at: String,
    kind: String,
    status: String,
    errors: Vec<String>,
}

/// deploy/schemas/validate.mjs on `documents`.
fn validate_custom(documents: &[(String, Value)]) -> Vec<Verdict> {
    let input: Vec<Json> = documents
        .iter()
        .map(|(at, value)| {
            serde_json::json!({
                "where": at,
                "object": serde_json::to_value(value).expect("YAML as JSON"),
            })
        })
        .collect();
    let mut child = Command::new("node")
        .arg(yaml::repo_file("deploy/schemas/validate.mjs"))
        .arg(schema_modules())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run node (scripts/lib.sh ensure_schema_models installs it)");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(serde_json::to_string(&input).unwrap().as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "validate.mjs failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdicts: Vec<Verdict> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect();
    assert_eq!(verdicts.len(), documents.len());
    verdicts
}

#[test]
fn the_schema_packages_are_the_pinned_versions() {
    let modules = schema_modules();
    let manifest: Json = serde_json::from_str(
        &std::fs::read_to_string(yaml::repo_file("deploy/schemas/package.json")).unwrap(),
    )
    .unwrap();
    let dependencies = manifest["dependencies"].as_object().unwrap();
    assert_eq!(dependencies.len(), 4);
    for (name, version) in dependencies {
        let installed: Json = serde_json::from_str(
            &std::fs::read_to_string(modules.join(name).join("package.json"))
                .unwrap_or_else(|e| panic!("{name} not installed: {e}")),
        )
        .unwrap();
        assert_eq!(
            &installed["version"], version,
            "{name}: installed {} but deploy/schemas/package.json pins {version} (run scripts/test.sh)",
            installed["version"]
        );
    }
}

#[test]
fn custom_resources_are_valid_against_their_published_schemas() {
    let documents: Vec<(String, Value)> = all_manifests()
        .into_iter()
        .filter(is_custom)
        .map(|m| (m.file.clone(), m.value))
        .collect();
    let verdicts = validate_custom(&documents);
    let kinds: BTreeSet<&str> = verdicts.iter().map(|v| v.kind.as_str()).collect();
    for kind in [
        "AuthorizationPolicy",
        "EnvoyFilter",
        "Telemetry",
        "IstioOperator",
        "Gateway",
        "HTTPRoute",
        "ReferenceGrant",
        "SecurityPolicy",
        "EnvoyProxy",
        "ServiceMonitor",
        "PrometheusRule",
    ] {
        assert!(kinds.contains(kind), "no {kind} validated: {kinds:?}");
    }
    let failed: Vec<&Verdict> = verdicts.iter().filter(|v| v.status != "valid").collect();
    assert!(
        failed.is_empty(),
        "custom resources refused (or without a schema): {failed:#?}"
    );

    // The check has teeth: an enum value Istio does not have, a port of the wrong
    // type, a rule without an expression, a Gateway API duration in the wrong
    // syntax; and a kind no package knows is reported, not passed.
    let find = |kind: &str| {
        documents
            .iter()
            .find(|(_, v)| yaml::text(v, "kind") == kind)
            .unwrap()
            .1
            .clone()
    };
    let mut policy = find("AuthorizationPolicy");
    policy["spec"]["action"] = "PERMIT".into();
    let mut monitor = find("ServiceMonitor");
    monitor["spec"]["endpoints"][0]["port"] = 9192.into();
    let mut rule = find("PrometheusRule");
    rule["spec"]["groups"][0]["rules"][0]
        .as_mapping_mut()
        .unwrap()
        .remove("expr");
    let mut unknown = find("ServiceMonitor");
    unknown["apiVersion"] = "monitoring.coreos.com/v9".into();
    let broken = [
        ("bad enum".to_string(), policy),
        ("bad type".to_string(), monitor),
        ("missing expr".to_string(), rule),
        ("unknown version".to_string(), unknown),
    ];
    let verdicts = validate_custom(&broken);
    let statuses: Vec<(&str, &str)> = verdicts
        .iter()
        .map(|v| (v.at.as_str(), v.status.as_str()))
        .collect();
    assert_eq!(
        statuses,
        [
            ("bad enum", "invalid"),
            ("bad type", "invalid"),
            ("missing expr", "invalid"),
            ("unknown version", "no-schema")
        ],
        "{verdicts:#?}"
    );
    assert!(
        verdicts[0].errors.iter().any(|e| e.contains("action")),
        "{verdicts:#?}"
    );
}

// ---------------------------------------------------------------------------
// kubectl kustomize
// ---------------------------------------------------------------------------

fn kubectl() -> PathBuf {
    let bin =
        std::env::var_os("KUBECTL_BIN").map_or_else(|| PathBuf::from("kubectl"), PathBuf::from);
    let works = Command::new(&bin)
        .args(["kustomize", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        works,
        "{} with `kustomize` is missing: run scripts/test.sh (scripts/lib.sh ensure_kubectl)",
        bin.display()
    );
    bin
}

/// `kubectl kustomize DIR`: the rendered documents.
fn kustomize(folder: &str) -> Vec<Value> {
    let out = Command::new(kubectl())
        .arg("kustomize")
        .arg(yaml::repo_file(folder))
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {folder}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn keymeter_namespace() -> String {
    let k = &yaml::load_documents(&yaml::repo_file("deploy/kubernetes/kustomization.yaml"))[0];
    yaml::text(k, "namespace").to_owned()
}

#[test]
fn every_kustomization_renders_what_it_lists_into_the_right_namespace() {
    let namespace = keymeter_namespace();
    let mut rendered_total = 0;
    for folder in FOLDERS {
        let manifests = yaml::load_folder(folder);
        let Some(kustomization) = manifests.iter().find(|m| is_kustomization(m)) else {
            continue;
        };
        let listed = yaml::texts(&kustomization.value, "resources");
        let set_namespace = yaml::lookup(&kustomization.value, "namespace")
            .and_then(Value::as_str)
            .map(str::to_owned);
        // What the listed files hold, as (kind, name, namespace after kustomize).
        let expected: BTreeSet<(String, String, String)> = manifests
            .iter()
            .filter(|m| listed.contains(&m.file))
            .map(|m| {
                let ns = set_namespace
                    .clone()
                    .unwrap_or_else(|| m.namespace().to_owned());
                (m.kind().to_owned(), m.name().to_owned(), ns)
            })
            .collect();
        let rendered = kustomize(folder);
        rendered_total += rendered.len();
        let got: BTreeSet<(String, String, String)> = rendered
            .iter()
            .map(|v| {
                (
                    yaml::text(v, "kind").to_owned(),
                    yaml::text(v, "metadata.name").to_owned(),
                    yaml::lookup(v, "metadata.namespace")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned(),
                )
            })
            .collect();
        assert_eq!(got, expected, "kubectl kustomize {folder}");
        assert_eq!(rendered.len(), expected.len(), "{folder}: duplicates");
        // keymeter's own objects land in keymeter's namespace.
        for value in &rendered {
            let is_keymeters = yaml::lookup(value, "metadata.labels")
                .and_then(|l| l.get("app.kubernetes.io/name"))
                .and_then(Value::as_str)
                == Some("keymeter");
            if is_keymeters || yaml::text(value, "kind") == "ReferenceGrant" {
                assert_eq!(
                    yaml::lookup(value, "metadata.namespace").and_then(Value::as_str),
                    Some(namespace.as_str()),
                    "{folder}: {} {}",
                    yaml::text(value, "kind"),
                    yaml::text(value, "metadata.name")
                );
            }
        }
        if folder == "deploy/kubernetes" {
            // The image is rewritten to the one kustomization.yaml names.
            let image = yaml::node(&kustomization.value, "images.0");
            let want = format!(
                "{}:{}",
                yaml::text(image, "newName"),
                yaml::text(image, "newTag")
            );
            let workload = rendered
                .iter()
                .find(|v| yaml::text(v, "kind") == "StatefulSet")
                .expect("the StatefulSet is rendered");
            assert_eq!(
                yaml::text(workload, "spec.template.spec.containers.0.image"),
                want
            );
        }
    }
    assert!(rendered_total >= 15, "{rendered_total} objects rendered");
}

/// The rendered kustomization of deploy/kubernetes (namespace and image applied)
/// passes the same strict validation as its files.
#[test]
fn the_rendered_kubernetes_objects_are_valid() {
    let documents: Vec<(String, Value)> = kustomize("deploy/kubernetes")
        .into_iter()
        .map(|v| (format!("rendered-{}.yaml", yaml::text(&v, "kind")), v))
        .collect();
    let dir = crate::support::TestDir::new("k8s-validate-rendered");
    let (ok, out) = kubernetes_validate(dir.path(), &documents);
    assert!(ok, "{out}");
}
