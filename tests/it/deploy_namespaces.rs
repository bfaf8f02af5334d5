//! One namespace for keymeter across deploy/, and one set of labels on its objects.
//!
//! deploy/kubernetes installs keymeter into the namespace its kustomization names
//! (`billing`); Istio's extension providers, Envoy Gateway's backend references and
//! ReferenceGrant, the Prometheus Operator objects and every `keymeter.<ns>.svc` host
//! or `kubectl -n <ns> … keymeter` command in the docs must say the same. When they
//! disagree, Istio denies every request of the paid API (a provider naming a host
//! that does not exist) and Envoy Gateway answers 503: the folders are checked
//! together here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::support::yaml::{self, Manifest};
use serde_yaml::Value;

/// The namespace the READMEs document.
const DOCUMENTED: &str = "billing";
/// keymeter's ClusterIP Service (deploy/kubernetes/service.yaml).
const SERVICE: &str = "keymeter";
/// The labels every keymeter object carries (app.kubernetes.io/component varies).
const COMMON_LABELS: [(&str, &str); 3] = [
    ("app.kubernetes.io/name", "keymeter"),
    ("app.kubernetes.io/instance", "keymeter"),
    ("app.kubernetes.io/part-of", "billing"),
];
const COMPONENT: &str = "app.kubernetes.io/component";
const VERSION: &str = "app.kubernetes.io/version";

fn keymeter_namespace() -> String {
    let kustomization =
        &yaml::load_documents(&yaml::repo_file("deploy/kubernetes/kustomization.yaml"))[0];
    yaml::text(kustomization, "namespace").to_owned()
}

/// Every Markdown and YAML file under deploy/ (recursively) and the README.
fn text_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for path in entries {
            let name = path.file_name().unwrap().to_string_lossy();
            if path.is_dir() {
                if name != "node_modules" {
                    walk(&path, out);
                }
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("md" | "yaml" | "yml" | "toml" | "json")
            ) {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&yaml::repo_file("deploy"), &mut files);
    files.push(yaml::repo_file("README.md"));
    files
}

/// `(namespace, the whole host)` of every `keymeter.<ns>.svc` or
/// `keymeter-headless.<ns>.svc` in `line`.
fn keymeter_hosts(line: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for prefix in ["keymeter.", "keymeter-headless."] {
        let mut rest = line;
        while let Some(at) = rest.find(prefix) {
            let before = &rest[..at];
            let after = &rest[at + prefix.len()..];
            rest = after;
            // Not the tail of a longer name (`billing-keymeter.`).
            if before
                .chars()
                .last()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                continue;
            }
            let namespace: String = after
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')
                .collect();
            if !namespace.is_empty() && after[namespace.len()..].starts_with(".svc") {
                found.push((namespace.clone(), format!("{prefix}{namespace}.svc")));
            }
        }
    }
    found
}

/// The namespace of a `kubectl` command line that names a keymeter object or pod.
fn kubectl_namespace_for_keymeter(line: &str) -> Option<String> {
    let command = &line[line.find("kubectl ")?..];
    let names_keymeter = [
        "statefulset/keymeter",
        "deployment/keymeter",
        "deploy/keymeter",
        "pod/keymeter-",
        "statefulset keymeter",
        "keymeter-0",
        "name=keymeter",
        "servicemonitor",
        "prometheusrule",
    ]
    .iter()
    .any(|n| command.contains(n));
    if !names_keymeter {
        return None;
    }
    let words: Vec<&str> = command.split_whitespace().collect();
    words.iter().enumerate().find_map(|(i, w)| {
        if *w == "-n" || *w == "--namespace" {
            words.get(i + 1).map(|ns| ns.to_string())
        } else {
            w.strip_prefix("--namespace=").map(str::to_owned)
        }
    })
}

#[test]
fn the_line_scanners_find_what_they_should() {
    assert_eq!(
        keymeter_hosts("service: keymeter.billing.svc.cluster.local, keymeter-headless.x1.svc"),
        [
            ("billing".to_string(), "keymeter.billing.svc".to_string()),
            ("x1".to_string(), "keymeter-headless.x1.svc".to_string())
        ]
    );
    assert_eq!(
        keymeter_hosts("outbound|9191||keymeter.keymeter.svc.cluster.local"),
        [("keymeter".to_string(), "keymeter.keymeter.svc".to_string())]
    );
    assert!(keymeter_hosts("keymeter.<namespace>.svc.cluster.local").is_empty());
    assert!(keymeter_hosts("my-keymeter.other.svc").is_empty());
    assert_eq!(
        kubectl_namespace_for_keymeter("  kubectl logs -n keymeter deploy/keymeter"),
        Some("keymeter".into())
    );
    assert_eq!(
        kubectl_namespace_for_keymeter("kubectl --namespace=x rollout status statefulset/keymeter"),
        Some("x".into())
    );
    assert_eq!(
        kubectl_namespace_for_keymeter("kubectl logs -n paid-api deploy/paid-api"),
        None
    );
}

#[test]
fn keymeter_lives_in_the_same_namespace_in_every_folder() {
    let namespace = keymeter_namespace();
    assert_eq!(
        namespace, DOCUMENTED,
        "deploy/kubernetes/kustomization.yaml installs keymeter into `{namespace}`, the docs say `{DOCUMENTED}`"
    );
    let host = format!("{SERVICE}.{namespace}.svc.cluster.local");
    let kubernetes = yaml::load_folder("deploy/kubernetes");
    assert!(
        kubernetes
            .iter()
            .any(|m| m.kind() == "Service" && m.name() == SERVICE),
        "deploy/kubernetes has the Service {SERVICE}"
    );

    // Istio: both providers' host, and the policy on keymeter's own pods.
    let istio = yaml::load_folder("deploy/istio");
    let mesh = istio
        .iter()
        .find(|m| m.kind() == "IstioOperator")
        .expect("the mesh config");
    let providers = yaml::list(&mesh.value, "spec.meshConfig.extensionProviders");
    assert_eq!(providers.len(), 2);
    for provider in providers {
        let name = yaml::text(provider, "name");
        let config = provider
            .as_mapping()
            .unwrap()
            .iter()
            .find(|(k, _)| k.as_str() != Some("name"))
            .map(|(_, v)| v)
            .unwrap();
        assert_eq!(
            yaml::text(config, "service"),
            host,
            "deploy/istio provider {name}: Istio denies every request when its host does not exist"
        );
    }
    let on_keymeter: Vec<&Manifest> = istio
        .iter()
        .filter(|m| {
            m.kind() == "AuthorizationPolicy"
                && yaml::lookup(&m.value, "spec.selector.matchLabels")
                    .and_then(|l| l.get("app.kubernetes.io/name"))
                    .and_then(Value::as_str)
                    == Some("keymeter")
        })
        .collect();
    assert_eq!(on_keymeter.len(), 1, "one Istio policy on keymeter's pods");
    assert_eq!(
        on_keymeter[0].namespace(),
        namespace,
        "{}",
        on_keymeter[0].file
    );

    // Envoy Gateway: every reference to keymeter's Service, and the grant.
    let gateway = yaml::load_folder("deploy/envoy-gateway");
    let mut references = 0;
    for manifest in &gateway {
        // A ReferenceGrant's `to` names objects of its own namespace.
        if manifest.kind() == "ReferenceGrant" {
            assert_eq!(manifest.namespace(), namespace, "{}", manifest.file);
            continue;
        }
        for reference in yaml::named(&manifest.value, SERVICE) {
            if reference.get("kind").and_then(Value::as_str) == Some("Service") {
                references += 1;
                assert_eq!(
                    reference.get("namespace").and_then(Value::as_str),
                    Some(namespace.as_str()),
                    "deploy/envoy-gateway/{}: {} refers to keymeter in another namespace",
                    manifest.file,
                    manifest.kind()
                );
            }
        }
    }
    assert!(references >= 2, "ext_authz and the ALS sink name keymeter");

    // Prometheus Operator: applied next to keymeter's Services.
    let operator = &yaml::load_documents(&yaml::repo_file(
        "deploy/prometheus-operator/kustomization.yaml",
    ))[0];
    assert_eq!(yaml::text(operator, "namespace"), namespace);

    // Every host and every kubectl command about keymeter in the docs and manifests.
    let mut wrong = Vec::new();
    for path in text_files() {
        let text = std::fs::read_to_string(&path).unwrap();
        let shown = path
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap()
            .display()
            .to_string();
        for (number, line) in text.lines().enumerate() {
            for (found, whole) in keymeter_hosts(line) {
                if found != namespace {
                    wrong.push(format!("{shown}:{}: {whole}", number + 1));
                }
            }
            if let Some(found) = kubectl_namespace_for_keymeter(line)
                && found != namespace
            {
                wrong.push(format!("{shown}:{}: kubectl -n {found}", number + 1));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "keymeter is installed into `{namespace}`, but these say otherwise:\n{}",
        wrong.join("\n")
    );
}

/// The image tag that deploy/kubernetes' kustomization sets.
fn image_tag() -> String {
    let kustomization =
        &yaml::load_documents(&yaml::repo_file("deploy/kubernetes/kustomization.yaml"))[0];
    let images = yaml::list(kustomization, "images");
    assert_eq!(images.len(), 1);
    yaml::text(&images[0], "newTag").to_owned()
}

#[test]
fn keymeters_objects_carry_the_recommended_labels_and_select_alike() {
    let tag = image_tag();
    let mut manifests = yaml::load_folder("deploy/kubernetes");
    manifests.extend(yaml::load_folder("deploy/prometheus-operator"));
    let mut selectors: Vec<(String, BTreeMap<String, String>)> = Vec::new();
    let mut pod_labels = Vec::new();
    for manifest in manifests.iter().filter(|m| m.kind() != "Kustomization") {
        let what = format!(
            "{} {} ({})",
            manifest.kind(),
            manifest.name(),
            manifest.file
        );
        let object = yaml::string_map_or_empty(&manifest.value, "metadata.labels");
        for (key, value) in COMMON_LABELS {
            assert_eq!(
                object.get(key).map(String::as_str),
                Some(value),
                "{what}: label {key}"
            );
        }
        assert!(
            object.get(COMPONENT).is_some_and(|c| !c.is_empty()),
            "{what}: label {COMPONENT}"
        );
        let spec = yaml::lookup(&manifest.value, "spec");
        match manifest.kind() {
            "StatefulSet" | "Deployment" => {
                // The version is the image's, on the workload and its pods.
                let pods =
                    yaml::string_map_or_empty(&manifest.value, "spec.template.metadata.labels");
                for (where_, set) in [("metadata", &object), ("pod template", &pods)] {
                    assert_eq!(
                        set.get(VERSION),
                        Some(&tag),
                        "{what}: {where_} label {VERSION} is the image tag"
                    );
                }
                for (key, value) in COMMON_LABELS {
                    assert_eq!(pods.get(key).map(String::as_str), Some(value), "{what}");
                }
                assert_eq!(pods.get(COMPONENT), object.get(COMPONENT), "{what}");
                pod_labels.push((what.clone(), pods));
                selectors.push((
                    format!("{what} selector"),
                    yaml::string_map_or_empty(&manifest.value, "spec.selector.matchLabels"),
                ));
                let spreads = yaml::lookup(
                    &manifest.value,
                    "spec.template.spec.topologySpreadConstraints",
                )
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default();
                for (i, spread) in spreads.iter().enumerate() {
                    selectors.push((
                        format!("{what} topologySpreadConstraints.{i}"),
                        yaml::string_map_or_empty(spread, "labelSelector.matchLabels"),
                    ));
                }
            }
            "Service" => {
                selectors.push((
                    what.clone(),
                    yaml::string_map_or_empty(spec.unwrap(), "selector"),
                ));
            }
            "PodDisruptionBudget" => {
                selectors.push((
                    what.clone(),
                    yaml::string_map_or_empty(spec.unwrap(), "selector.matchLabels"),
                ));
            }
            "NetworkPolicy" => {
                selectors.push((
                    what.clone(),
                    yaml::string_map_or_empty(spec.unwrap(), "podSelector.matchLabels"),
                ));
            }
            "ServiceMonitor" => {
                selectors.push((
                    what.clone(),
                    yaml::string_map_or_empty(spec.unwrap(), "selector.matchLabels"),
                ));
            }
            _ => {}
        }
    }
    // Istio's policy on keymeter selects its pods too.
    for manifest in yaml::load_folder("deploy/istio") {
        let selector = yaml::string_map_or_empty(&manifest.value, "spec.selector.matchLabels");
        if selector.contains_key("app.kubernetes.io/name") {
            selectors.push((format!("deploy/istio/{}", manifest.file), selector));
        }
    }

    assert_eq!(pod_labels.len(), 2, "the StatefulSet and its alternative");
    assert!(selectors.len() >= 10, "{selectors:?}");
    let first = selectors[0].1.clone();
    assert!(!first.is_empty());
    for (what, selector) in &selectors {
        assert_eq!(
            selector, &first,
            "{what} selects differently from {}",
            selectors[0].0
        );
        for (pods_of, pods) in &pod_labels {
            assert!(
                selector.iter().all(|(k, v)| pods.get(k) == Some(v)),
                "{what} does not select the pods of {pods_of}"
            );
        }
    }
    // Selecting by the version would orphan the pods at the next release.
    assert!(!first.contains_key(VERSION));
}
