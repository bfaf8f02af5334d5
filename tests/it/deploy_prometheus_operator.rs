//! deploy/prometheus-operator/ checked without a cluster: the PrometheusRule holds
//! exactly the groups of deploy/prometheus/keymeter-rules.yaml (the file promtool and
//! a real Prometheus test in tests/it/prometheus.rs), the ServiceMonitor scrapes the admin
//! port of deploy/kubernetes' keymeter under the job name KeymeterDown selects, and
//! every field used exists in the operator's `monitoring.coreos.com/v1` API.

use crate::support::yaml::{self, Manifest};
use serde_yaml::Value;

const DIR: &str = "deploy/prometheus-operator";
const RULES: &str = "deploy/prometheus/keymeter-rules.yaml";

/// Fields of the objects used here, from the type declarations of the npm package
/// @kubernetes-models/prometheus-operator 6.0.0 (generated from the operator's
/// `monitoring.coreos.com/v1` CRDs: ServiceMonitorSpec.d.ts with the
/// NativeHistogramConfig it extends, Endpoint.d.ts, PrometheusRuleSpec.d.ts,
/// RuleGroup.d.ts, Rule.d.ts). That package's validators, which
/// tests/it/deploy_schemas.rs runs, check types, patterns and required fields but
/// accept unknown fields (so does the API server, which prunes them silently): a
/// misspelt `scrapeTimout` would be dropped without a word. Hence these lists.
const SERVICE_MONITOR_SPEC: &str = "attachMetadata bodySizeLimit endpoints fallbackScrapeProtocol jobLabel keepDroppedTargets labelLimit labelNameLengthLimit labelValueLengthLimit namespaceSelector podTargetLabels sampleLimit scrapeClass scrapeProtocols selector selectorMechanism serviceDiscoveryRole targetLabels targetLimit convertClassicHistogramsToNHCB nativeHistogramBucketLimit nativeHistogramMinBucketFactor scrapeClassicHistograms scrapeNativeHistograms";
const ENDPOINT: &str = "authorization basicAuth bearerTokenFile bearerTokenSecret filterRunning followRedirects honorLabels honorTimestamps interval metricRelabelings noProxy params path port proxyConnectHeader proxyFromEnvironment proxyUrl relabelings scheme scrapeTimeout targetPort tlsConfig trackTimestampsStaleness";
const LABEL_SELECTOR: &str = "matchLabels matchExpressions";
const PROMETHEUS_RULE_SPEC: &str = "groups";
const RULE_GROUP: &str = "interval labels limit name partial_response_strategy query_offset rules";
const RULE: &str = "alert annotations expr for keep_firing_for labels record";
const ROOT: &str = "apiVersion kind metadata spec";
const METADATA: &str = "name namespace labels annotations";

fn manifests() -> Vec<Manifest> {
    yaml::load_folder(DIR)
}

fn rules_file() -> Value {
    let documents = yaml::load_documents(&yaml::repo_file(RULES));
    assert_eq!(documents.len(), 1, "{RULES} is one document");
    documents.into_iter().next().unwrap()
}

/// The fields of `value` that `allowed` (space separated) does not list.
fn unknown_fields(value: &Value, allowed: &str, at: &str) -> Vec<String> {
    let allowed: Vec<&str> = allowed.split(' ').collect();
    yaml::field_names(value)
        .into_iter()
        .filter(|f| !allowed.contains(&f.as_str()))
        .map(|f| format!("{at}.{f}"))
        .collect()
}

/// Every field of a ServiceMonitor or PrometheusRule that the API does not have.
fn api_problems(manifest: &Manifest) -> Vec<String> {
    let doc = &manifest.value;
    let mut problems = unknown_fields(doc, ROOT, "");
    problems.extend(unknown_fields(
        yaml::node(doc, "metadata"),
        METADATA,
        "metadata",
    ));
    assert_eq!(yaml::text(doc, "apiVersion"), "monitoring.coreos.com/v1");
    let spec = yaml::node(doc, "spec");
    match manifest.kind() {
        "ServiceMonitor" => {
            problems.extend(unknown_fields(spec, SERVICE_MONITOR_SPEC, "spec"));
            problems.extend(unknown_fields(
                yaml::node(spec, "selector"),
                LABEL_SELECTOR,
                "spec.selector",
            ));
            for (i, endpoint) in yaml::list(spec, "endpoints").iter().enumerate() {
                problems.extend(unknown_fields(
                    endpoint,
                    ENDPOINT,
                    &format!("spec.endpoints.{i}"),
                ));
            }
        }
        "PrometheusRule" => {
            problems.extend(unknown_fields(spec, PROMETHEUS_RULE_SPEC, "spec"));
            for (g, group) in yaml::list(spec, "groups").iter().enumerate() {
                problems.extend(unknown_fields(
                    group,
                    RULE_GROUP,
                    &format!("spec.groups.{g}"),
                ));
                for (r, rule) in yaml::list(group, "rules").iter().enumerate() {
                    problems.extend(unknown_fields(
                        rule,
                        RULE,
                        &format!("spec.groups.{g}.rules.{r}"),
                    ));
                }
            }
        }
        other => panic!("{}: unexpected kind {other}", manifest.file),
    }
    problems
}

#[test]
fn the_prometheus_rule_holds_exactly_the_groups_of_the_rules_file() {
    let manifests = manifests();
    let rule = yaml::one_of_kind(&manifests, "PrometheusRule");
    let rules = rules_file();
    assert_eq!(
        yaml::field_names(&rules),
        ["groups"],
        "{RULES} holds only `groups`"
    );
    let ours = yaml::node(&rule.value, "spec.groups");
    let theirs = yaml::node(&rules, "groups");
    if ours != theirs {
        // Name the first rule that differs, so the fix is obvious.
        let describe = |groups: &Value| -> Vec<(String, Value)> {
            groups
                .as_sequence()
                .unwrap()
                .iter()
                .flat_map(|g| {
                    let group = yaml::text(g, "name").to_owned();
                    yaml::list(g, "rules")
                        .iter()
                        .map(move |r| (group.clone(), r.clone()))
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let (a, b) = (describe(ours), describe(theirs));
        let first = a
            .iter()
            .zip(&b)
            .find(|(x, y)| x != y)
            .map(|(x, y)| format!("{}:\n{x:?}\nvs {RULES}:\n{y:?}", rule.file));
        panic!(
            "{}/{} has drifted from {RULES} ({} vs {} rules); first difference: {}",
            DIR,
            rule.file,
            a.len(),
            b.len(),
            first.unwrap_or_else(|| "in the group names or the rule count".into())
        );
    }
}

#[test]
fn the_drift_check_has_teeth() {
    let manifests = manifests();
    let rule = yaml::one_of_kind(&manifests, "PrometheusRule");
    let mut groups = yaml::node(&rule.value, "spec.groups").clone();
    // Change one threshold, as an edit to only one of the files would.
    let expr = groups[1]["rules"][2]["expr"].as_str().unwrap().to_owned();
    groups[1]["rules"][2]["expr"] = Value::from(format!("{expr} + 1"));
    assert_ne!(&groups, yaml::node(&rules_file(), "groups"));
}

#[test]
fn every_field_exists_in_the_operator_api() {
    let manifests = manifests();
    let mut problems = Vec::new();
    for manifest in manifests.iter().filter(|m| m.kind() != "Kustomization") {
        problems.extend(
            api_problems(manifest)
                .into_iter()
                .map(|p| format!("{}: {} {p}", manifest.file, manifest.kind())),
        );
    }
    assert!(
        problems.is_empty(),
        "fields the API does not have: {problems:#?}"
    );

    // The check has teeth: a misspelt endpoint field is caught.
    let mut broken = yaml::one_of_kind(&manifests, "ServiceMonitor").clone();
    broken.value["spec"]["endpoints"][0]
        .as_mapping_mut()
        .unwrap()
        .insert("scrapeTimout".into(), "10s".into());
    assert_eq!(
        api_problems(&broken),
        ["spec.endpoints.0.scrapeTimout".to_string()]
    );
}

#[test]
fn the_service_monitor_scrapes_keymeters_admin_port_as_job_keymeter() {
    let manifests = manifests();
    let monitor = &yaml::one_of_kind(&manifests, "ServiceMonitor").value;
    let selector = yaml::string_map(monitor, "spec.selector.matchLabels");
    assert!(!selector.is_empty());
    assert!(
        yaml::lookup(monitor, "spec.namespaceSelector").is_none(),
        "keymeter's Services are in the ServiceMonitor's own namespace"
    );
    assert!(
        yaml::lookup(monitor, "spec.jobLabel").is_none(),
        "the job is the Service's name, which the rules select"
    );
    let endpoints = yaml::list(monitor, "spec.endpoints");
    assert_eq!(endpoints.len(), 1, "one endpoint: the admin port");
    let endpoint = &endpoints[0];
    let port = yaml::text(endpoint, "port");

    // deploy/kubernetes: the Services the selector picks, and those with that port.
    let kubernetes = yaml::load_folder("deploy/kubernetes");
    let selected: Vec<&Manifest> = kubernetes
        .iter()
        .filter(|m| m.kind() == "Service")
        .filter(|m| {
            let labels = yaml::string_map_or_empty(&m.value, "metadata.labels");
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .collect();
    let scraped: Vec<&&Manifest> = selected
        .iter()
        .filter(|m| {
            yaml::list(&m.value, "spec.ports")
                .iter()
                .any(|p| p.get("name").and_then(Value::as_str) == Some(port))
        })
        .collect();
    assert_eq!(
        scraped.len(),
        1,
        "exactly one selected Service has a port `{port}` (else every replica is scraped twice)"
    );
    let service = &scraped[0].value;
    let job = yaml::text(service, "metadata.name");

    // The port leads to the container's admin port, on the path the pods announce.
    let service_port = yaml::list(service, "spec.ports")
        .iter()
        .find(|p| yaml::text(p, "name") == port)
        .unwrap();
    let statefulset = kubernetes
        .iter()
        .find(|m| m.kind() == "StatefulSet")
        .expect("the StatefulSet");
    let template = yaml::node(&statefulset.value, "spec.template");
    let container = &yaml::list(template, "spec.containers")[0];
    let target = yaml::text(service_port, "targetPort");
    let container_port = yaml::list(container, "ports")
        .iter()
        .find(|p| yaml::text(p, "name") == target)
        .unwrap_or_else(|| panic!("no container port {target}"));
    assert_eq!(yaml::number(container_port, "containerPort"), 9192);
    assert_eq!(target, "admin");
    let annotations = yaml::node(template, "metadata.annotations");
    let path = annotations
        .get("prometheus.io/path")
        .and_then(Value::as_str)
        .expect("prometheus.io/path");
    assert_eq!(yaml::text(endpoint, "path"), path);
    assert_eq!(yaml::text(endpoint, "scheme"), "http");

    // ...and the selector picks keymeter's pods' Services, by the label every
    // selector in deploy/ uses.
    let pod_labels = yaml::string_map_or_empty(template, "metadata.labels");
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)));

    // The job name is the one KeymeterDown selects.
    let rules = std::fs::read_to_string(yaml::repo_file(RULES)).unwrap();
    assert!(
        rules.contains(&format!("up{{job=\"{job}\"}}")),
        "KeymeterDown selects up{{job=\"{job}\"}}"
    );
}

#[test]
fn the_kustomization_applies_both_into_keymeters_namespace() {
    let manifests = manifests();
    let kustomization = &yaml::one_of_kind(&manifests, "Kustomization").value;
    let keymeter_namespace = yaml::text(
        &yaml::load_documents(&yaml::repo_file("deploy/kubernetes/kustomization.yaml"))[0],
        "namespace",
    )
    .to_owned();
    assert_eq!(yaml::text(kustomization, "namespace"), keymeter_namespace);
    let mut resources = yaml::texts(kustomization, "resources");
    resources.sort();
    let mut files: Vec<String> = yaml::yaml_files(DIR)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|f| f != "kustomization.yaml")
        .collect();
    files.sort();
    assert_eq!(resources, files, "kustomization.yaml applies every file");
    for manifest in manifests.iter().filter(|m| m.kind() != "Kustomization") {
        assert_eq!(
            manifest.namespace(),
            "",
            "{}: the namespace comes from kustomization.yaml",
            manifest.file
        );
    }
    let readme = std::fs::read_to_string(yaml::repo_file(&format!("{DIR}/README.md"))).unwrap();
    for file in files
        .iter()
        .chain(["kustomization.yaml".to_string()].iter())
    {
        assert!(readme.contains(file.as_str()), "README.md explains {file}");
    }
}
