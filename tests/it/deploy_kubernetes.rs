//! deploy/kubernetes/ and the Dockerfile checked without a cluster or Docker: every
//! YAML document is parsed, the ConfigMap's keymeter.toml is loaded by keymeter's own
//! config parser (with the workload's environment overrides), and what must agree
//! across files is compared: ports, probe paths, mount paths, Secret keys, label
//! selectors, the image's user and ports. The probe paths are requested from a real
//! keymeter started in-process, so a renamed admin route fails here, not in a cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;

use crate::support::yaml::{self, Manifest};
use keymeter::config::{Config, LogFormat};
use serde_yaml::Value;

const DIR: &str = "deploy/kubernetes";
/// The container, as named in both workloads.
const CONTAINER: &str = "keymeter";
/// distroless' `nonroot` user, the Dockerfile's USER and the pods' runAsUser.
const NONROOT_UID: u64 = 65532;
/// Example values for the downward API when expanding the workload's environment.
const POD_NAME: &str = "keymeter-0";
const POD_NAMESPACE: &str = "billing";

/// Every document of every YAML file in deploy/kubernetes/.
fn docs() -> Vec<Manifest> {
    yaml::load_folder(DIR)
}

/// The `*.yaml`/`*.yml` files of deploy/kubernetes/, by file name, sorted.
fn yaml_files() -> Vec<String> {
    yaml::yaml_file_names(DIR)
}

/// A Kubernetes quantity in bytes: `2Gi`, `512Mi`, `1G`, `1000`.
fn quantity_bytes(text: &str) -> u64 {
    const SUFFIXES: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let (number, factor) = SUFFIXES
        .iter()
        .find_map(|(s, f)| text.strip_suffix(s).map(|n| (n, *f)))
        .unwrap_or((text, 1));
    number
        .parse::<u64>()
        .unwrap_or_else(|_| panic!("`{text}` is not a whole-number quantity"))
        * factor
}

/// A StatefulSet or Deployment running keymeter.
struct Workload<'a> {
    doc: &'a Manifest,
}

impl<'a> Workload<'a> {
    fn all(docs: &'a [Manifest]) -> Vec<Workload<'a>> {
        docs.iter()
            .filter(|d| matches!(d.kind(), "StatefulSet" | "Deployment"))
            .map(|doc| Workload { doc })
            .collect()
    }

    fn what(&self) -> String {
        format!("{} in {}", self.doc.kind(), self.doc.file)
    }

    fn template(&self) -> &'a Value {
        yaml::node(&self.doc.value, "spec.template")
    }

    fn pod(&self) -> &'a Value {
        yaml::node(&self.doc.value, "spec.template.spec")
    }

    fn pod_labels(&self) -> BTreeMap<String, String> {
        yaml::string_map(self.template(), "metadata.labels")
    }

    fn container(&self) -> &'a Value {
        yaml::item_named(yaml::list(self.pod(), "containers"), CONTAINER, "container")
    }

    fn container_port(&self, name: &str) -> u64 {
        let port = yaml::item_named(
            yaml::list(self.container(), "ports"),
            name,
            "container port",
        );
        yaml::number(port, "containerPort")
    }

    /// A `port` of a probe or Service: a container port name or a number.
    fn resolve_port(&self, port: &Value) -> u64 {
        match port {
            Value::String(name) => self.container_port(name),
            Value::Number(n) => n.as_u64().expect("port number"),
            other => panic!("{}: not a port: {other:?}", self.what()),
        }
    }

    fn args(&self) -> Vec<String> {
        yaml::list(self.container(), "args")
            .iter()
            .map(|a| a.as_str().expect("string arg").to_string())
            .collect()
    }

    /// The value after `--config` in the container's args.
    fn config_arg(&self) -> String {
        let args = self.args();
        let i = args
            .iter()
            .position(|a| a == "--config")
            .unwrap_or_else(|| panic!("{}: no `--config` in args {args:?}", self.what()));
        args.get(i + 1)
            .unwrap_or_else(|| panic!("{}: `--config` without a path", self.what()))
            .clone()
    }

    fn mount_at(&self, path: &str) -> &'a Value {
        yaml::list(self.container(), "volumeMounts")
            .iter()
            .find(|m| yaml::text(m, "mountPath") == path)
            .unwrap_or_else(|| panic!("{}: nothing is mounted at {path}", self.what()))
    }

    /// The mount whose path contains `file` (the deepest one).
    fn mount_containing(&self, file: &Path) -> &'a Value {
        yaml::list(self.container(), "volumeMounts")
            .iter()
            .filter(|m| file.starts_with(yaml::text(m, "mountPath")))
            .max_by_key(|m| yaml::text(m, "mountPath").len())
            .unwrap_or_else(|| {
                panic!(
                    "{}: no volume mount contains {}",
                    self.what(),
                    file.display()
                )
            })
    }

    /// The pod volume named `name`, or the StatefulSet's volumeClaimTemplate of that name.
    fn volume(&self, name: &str) -> &'a Value {
        yaml::list(self.pod(), "volumes")
            .iter()
            .chain(yaml::list_or_empty(
                &self.doc.value,
                "spec.volumeClaimTemplates",
            ))
            .find(|v| {
                v.get("name").or_else(|| yaml::lookup(v, "metadata.name"))
                    == Some(&Value::from(name))
            })
            .unwrap_or_else(|| panic!("{}: no volume `{name}`", self.what()))
    }

    fn probe(&self, kind: &str) -> Option<&'a Value> {
        yaml::lookup(self.container(), kind)
    }

    /// The container's environment as keymeter would see it: literal values with
    /// `$(VAR)` references expanded like the kubelet does, the downward API filled in
    /// with `pod_name`/`namespace`, and Secret references with a placeholder.
    fn env(&self, pod_name: &str, namespace: &str) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for var in yaml::list(self.container(), "env") {
            let name = yaml::text(var, "name").to_string();
            let value = if let Some(literal) = var.get("value") {
                let mut text = literal.as_str().expect("env value is a string").to_string();
                for (k, v) in &env {
                    text = text.replace(&format!("$({k})"), v.as_str());
                }
                text
            } else if let Some(field) = yaml::lookup(var, "valueFrom.fieldRef.fieldPath") {
                match field.as_str() {
                    Some("metadata.name") => pod_name.to_string(),
                    Some("metadata.namespace") => namespace.to_string(),
                    other => panic!("{}: unexpected fieldRef {other:?}", self.what()),
                }
            } else if yaml::lookup(var, "valueFrom.secretKeyRef").is_some() {
                format!("from-secret-{name}")
            } else {
                panic!("{}: env `{name}` has no value I understand", self.what());
            };
            env.insert(name, value);
        }
        env
    }

    /// (Secret name, key) of every `secretKeyRef` in the container's environment.
    fn secret_key_refs(&self) -> Vec<(String, String)> {
        yaml::list(self.container(), "env")
            .iter()
            .filter_map(|var| yaml::lookup(var, "valueFrom.secretKeyRef"))
            .map(|r| {
                (
                    yaml::text(r, "name").to_string(),
                    yaml::text(r, "key").to_string(),
                )
            })
            .collect()
    }
}

/// The ConfigMap's keymeter.toml, parsed by keymeter with the workload's environment.
/// A `mqtt.tls.ca_file` (which exists only in a pod) is checked to be mounted from a
/// Secret and then pointed at an empty file here, as `Config::parse` only checks
/// that it is a file.
fn workload_config(docs: &[Manifest], workload: &Workload, pod_name: &str, ns: &str) -> Config {
    let config_path = workload.config_arg();
    let text = config_text(docs, workload, &config_path);
    let raw: toml::Table = toml::from_str(&text).expect("keymeter.toml is TOML");
    let ca_file = raw
        .get("mqtt")
        .and_then(|m| m.get("tls"))
        .and_then(|t| t.get("ca_file"))
        .and_then(|c| c.as_str())
        .map(str::to_string);
    let scratch = tempfile::tempdir().unwrap();
    let text = match &ca_file {
        Some(ca) => {
            let mount = workload.mount_containing(Path::new(ca));
            let volume = workload.volume(yaml::text(mount, "name"));
            let secret = yaml::lookup(volume, "secret.secretName").unwrap_or_else(|| {
                panic!(
                    "{}: mqtt.tls.ca_file {ca} must come from a Secret volume",
                    workload.what()
                )
            });
            // A Secret volume with `items` only has the listed files.
            let file_name = Path::new(ca)
                .strip_prefix(yaml::text(mount, "mountPath"))
                .unwrap();
            let items = yaml::list_or_empty(volume, "secret.items");
            assert!(
                items.is_empty()
                    || items
                        .iter()
                        .any(|i| Path::new(yaml::text(i, "path")) == file_name),
                "{}: Secret {secret:?} volume does not project {}",
                workload.what(),
                file_name.display()
            );
            let local = scratch.path().join("ca.crt");
            std::fs::write(&local, "").unwrap();
            text.replace(ca.as_str(), &local.to_string_lossy())
        }
        None => text,
    };
    let env = workload.env(pod_name, ns);
    Config::parse(&text, Path::new(&config_path), |var| env.get(var).cloned()).unwrap_or_else(|e| {
        panic!(
            "the ConfigMap's keymeter.toml with the environment of the {} is rejected: {e}",
            workload.what()
        )
    })
}

/// The configuration text that the workload mounts at `config_path`.
fn config_text(docs: &[Manifest], workload: &Workload, config_path: &str) -> String {
    let mount = workload.mount_at(config_path);
    let volume = workload.volume(yaml::text(mount, "name"));
    let config_map = yaml::text(volume, "configMap.name");
    let key = yaml::lookup(mount, "subPath")
        .and_then(Value::as_str)
        .unwrap_or_else(|| {
            panic!(
                "{}: mount the config file with `subPath` (a directory mount would hide {})",
                workload.what(),
                Path::new(config_path).parent().unwrap().display()
            )
        });
    let data = yaml::string_map(
        &yaml::one_named(docs, "ConfigMap", config_map).value,
        "data",
    );
    data.get(key)
        .unwrap_or_else(|| panic!("ConfigMap {config_map} has no key {key}"))
        .clone()
}

/// The workload file that kustomization.yaml applies.
fn default_workload<'a>(docs: &'a [Manifest]) -> Workload<'a> {
    let resources = kustomization_resources(docs);
    let mut listed: Vec<Workload> = Workload::all(docs)
        .into_iter()
        .filter(|w| resources.contains(&w.doc.file))
        .collect();
    assert_eq!(
        listed.len(),
        1,
        "kustomization.yaml must apply exactly one keymeter workload"
    );
    listed.remove(0)
}

fn kustomization_resources(docs: &[Manifest]) -> Vec<String> {
    let k = docs
        .iter()
        .find(|d| d.kind() == "Kustomization")
        .expect("a kustomization.yaml");
    yaml::list(&k.value, "resources")
        .iter()
        .map(|r| r.as_str().expect("resource path").to_string())
        .collect()
}

fn is_subset(small: &BTreeMap<String, String>, big: &BTreeMap<String, String>) -> bool {
    !small.is_empty() && small.iter().all(|(k, v)| big.get(k) == Some(v))
}

#[test]
fn every_file_parses_into_the_expected_kinds() {
    let docs = docs();
    let kinds: BTreeSet<&str> = docs.iter().map(Manifest::kind).collect();
    for kind in [
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "Kustomization",
    ] {
        assert!(kinds.contains(kind), "no {kind} in {DIR} (found {kinds:?})");
    }
    assert!(
        kinds.contains("StatefulSet") || kinds.contains("Deployment"),
        "no StatefulSet or Deployment in {DIR}"
    );
    for doc in &docs {
        assert!(
            yaml::lookup(&doc.value, "apiVersion").is_some(),
            "{}: {} without apiVersion",
            doc.file,
            doc.kind()
        );
        if doc.kind() != "Kustomization" {
            assert!(
                !doc.name().is_empty(),
                "{}: a {} without a name",
                doc.file,
                doc.kind()
            );
            assert!(
                yaml::lookup(&doc.value, "metadata.namespace").is_none(),
                "{}: {} sets a namespace; the manifests are namespace-agnostic",
                doc.file,
                doc.kind()
            );
        }
    }
}

#[test]
fn kustomization_applies_existing_files_and_leaves_out_only_the_secret_and_the_alternative() {
    let docs = docs();
    let resources = kustomization_resources(&docs);
    let files = yaml_files();
    for r in &resources {
        assert!(
            files.contains(r),
            "kustomization.yaml lists {r}, which is not in {DIR}"
        );
    }
    let default = default_workload(&docs);
    for file in files
        .iter()
        .filter(|f| *f != "kustomization.yaml" && !resources.contains(f))
    {
        for doc in docs.iter().filter(|d| &d.file == file) {
            // The placeholder Secret must not overwrite the real one on every apply; the
            // other workload is the documented alternative.
            let alternative = matches!(doc.kind(), "StatefulSet" | "Deployment")
                && doc.kind() != default.doc.kind();
            assert!(
                doc.kind() == "Secret" || alternative,
                "{file} ({}) is not applied by kustomization.yaml",
                doc.kind()
            );
        }
    }
    // kustomize rewrites the image by name: the name must be the container's.
    let k = docs.iter().find(|d| d.kind() == "Kustomization").unwrap();
    let image = yaml::text(default.container(), "image");
    let image_name = image.split(':').next().unwrap();
    assert!(
        yaml::list(&k.value, "images")
            .iter()
            .all(|i| yaml::text(i, "name") == image_name),
        "kustomization.yaml `images` must name the container image `{image_name}`"
    );
}

#[test]
fn both_workloads_have_the_same_pod_apart_from_the_data_volume() {
    let docs = docs();
    let workloads = Workload::all(&docs);
    assert_eq!(
        workloads.len(),
        2,
        "{DIR} holds the default workload and its alternative (StatefulSet and Deployment)"
    );
    let without_data = |w: &Workload| {
        let mut template = w.template().clone();
        if let Some(Value::Sequence(volumes)) =
            template.get_mut("spec").and_then(|s| s.get_mut("volumes"))
        {
            volumes.retain(|v| v.get("name") != Some(&Value::from("data")));
        }
        template
    };
    assert!(
        without_data(&workloads[0]) == without_data(&workloads[1]),
        "the pod templates of {} and {} differ (apart from the `data` volume): keep them in step",
        workloads[0].what(),
        workloads[1].what()
    );
}

#[test]
fn the_configmap_is_a_valid_keymeter_config_matching_ports_and_volumes() {
    let docs = docs();
    for workload in Workload::all(&docs) {
        let what = workload.what();
        let config = workload_config(&docs, &workload, POD_NAME, POD_NAMESPACE);

        // Listen on every interface: kubelet probes and Services reach the pod IP.
        for (name, addr) in [("grpc", config.listen.grpc), ("admin", config.listen.admin)] {
            assert!(
                addr.ip().is_unspecified(),
                "listen.{name} = {addr}: must listen on 0.0.0.0 in a pod"
            );
            assert_eq!(
                u64::from(addr.port()),
                workload.container_port(name),
                "{what}: container port `{name}` differs from listen.{name}"
            );
        }
        assert_eq!(config.listen.grpc.port(), 9191);
        assert_eq!(config.listen.admin.port(), 9192);
        // The Report API on a port of its own, so that the NetworkPolicy can admit
        // jobs to it without admitting them to the Check and the access log.
        let report = config.listen.report.unwrap_or_else(|| {
            panic!("{what}: listen.report is set (the Report API apart from Envoy's port)")
        });
        assert!(
            report.ip().is_unspecified(),
            "listen.report = {report}: must listen on 0.0.0.0 in a pod"
        );
        assert_eq!(
            u64::from(report.port()),
            workload.container_port("report"),
            "{what}: container port `report` differs from listen.report"
        );
        assert_eq!(report.port(), 9193);

        assert!(config.mqtt.tls.enabled, "TLS to the broker is on");
        assert!(!config.mqtt.tls.insecure_skip_verify);
        assert_eq!(config.log.format, LogFormat::Json, "log.format = json");
        assert!(
            config.mqtt.password.expose().starts_with("from-secret-"),
            "the MQTT password comes from the Secret"
        );

        // Where keymeter writes must be a volume (the root filesystem is read-only).
        let snapshot = config
            .keys
            .snapshot
            .as_ref()
            .unwrap_or_else(|| panic!("keys.snapshot is set (fail-static restarts)"));
        let data_mount = workload.mount_containing(&config.outbox.dir);
        assert_eq!(
            yaml::text(data_mount, "mountPath"),
            "/var/lib/keymeter",
            "{what}: outbox.dir {} is on the /var/lib/keymeter volume",
            config.outbox.dir.display()
        );
        assert!(
            snapshot.starts_with(yaml::text(data_mount, "mountPath")),
            "{what}: keys.snapshot {} is on the same volume as the outbox",
            snapshot.display()
        );
        assert!(
            !yaml::flag(data_mount, "readOnly").unwrap_or(false),
            "{what}: the data volume is writable"
        );
        // And large enough for the outbox budget.
        let volume = workload.volume(yaml::text(data_mount, "name"));
        let size = yaml::lookup(volume, "spec.resources.requests.storage")
            .or_else(|| yaml::lookup(volume, "emptyDir.sizeLimit"))
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{what}: the data volume has no size"));
        assert!(
            quantity_bytes(size) > config.outbox.max_bytes,
            "{what}: the data volume ({size}) must exceed outbox.max_bytes ({})",
            config.outbox.max_bytes
        );

        // A key update is parsed in memory: measured, resident memory levels off near
        // 150 MB with repeated 8 MiB updates and near 250 MB with 16 MiB ones. An update
        // that does not fit would OOM-kill every replica at once.
        let limit = quantity_bytes(yaml::text(workload.container(), "resources.limits.memory"));
        let needed = 20 * config.keys.max_update_bytes as u64 + (64 << 20);
        assert!(
            limit >= needed,
            "{what}: memory limit {limit} B is too small for keys.max_update_bytes {}: \
             needs at least 20 x max_update_bytes + 64Mi = {needed} B",
            config.keys.max_update_bytes
        );
    }
}

#[test]
fn the_client_id_is_unique_per_pod_and_fits_keymeters_limit() {
    let docs = docs();
    for workload in Workload::all(&docs) {
        let env = workload.env(POD_NAME, POD_NAMESPACE);
        for name in env.keys().filter(|n| n.starts_with("KEYMETER_")) {
            assert!(
                keymeter::config::env_override_names().any(|known| known == name),
                "{}: {name} is not one of keymeter's environment overrides",
                workload.what()
            );
        }
        let config = workload_config(&docs, &workload, POD_NAME, POD_NAMESPACE);
        assert!(
            config.mqtt.client_id.contains(POD_NAME),
            "{}: KEYMETER_MQTT_CLIENT_ID must contain the pod name, got {:?}",
            workload.what(),
            config.mqtt.client_id
        );
        // The longest names Kubernetes allows (DNS labels) still make a valid id.
        let long = workload_config(&docs, &workload, &"p".repeat(63), &"n".repeat(63));
        assert!(long.mqtt.client_id.len() <= 128);
    }
}

#[test]
fn the_config_file_is_mounted_where_the_args_point() {
    let docs = docs();
    let image_cmd = dockerfile_json_instruction("CMD");
    for workload in Workload::all(&docs) {
        let path = workload.config_arg();
        let mount = workload.mount_at(&path);
        assert_eq!(
            yaml::flag(mount, "readOnly"),
            Some(true),
            "config is mounted read-only"
        );
        assert!(!config_text(&docs, &workload, &path).is_empty());
        assert_eq!(
            workload.args(),
            image_cmd,
            "{}: args equal the image's CMD, so running the image bare behaves the same",
            workload.what()
        );
    }
}

#[test]
fn pods_run_non_root_read_only_without_privileges() {
    let docs = docs();
    for workload in Workload::all(&docs) {
        let what = workload.what();
        let pod = workload.pod();
        let c = workload.container();
        for (scope, sc) in [
            ("pod", yaml::node(pod, "securityContext")),
            ("container", yaml::node(c, "securityContext")),
        ] {
            assert_eq!(
                yaml::flag(sc, "runAsNonRoot"),
                Some(true),
                "{what}: {scope} runAsNonRoot"
            );
            assert_eq!(
                yaml::number(sc, "runAsUser"),
                NONROOT_UID,
                "{what}: {scope} runAsUser"
            );
            assert_eq!(
                yaml::text(sc, "seccompProfile.type"),
                "RuntimeDefault",
                "{what}: {scope} seccompProfile"
            );
        }
        let sc = yaml::node(c, "securityContext");
        assert_eq!(
            yaml::flag(sc, "readOnlyRootFilesystem"),
            Some(true),
            "{what}: readOnlyRootFilesystem"
        );
        assert_eq!(
            yaml::flag(sc, "allowPrivilegeEscalation"),
            Some(false),
            "{what}: allowPrivilegeEscalation"
        );
        assert!(
            yaml::list(sc, "capabilities.drop").contains(&Value::from("ALL")),
            "{what}: capabilities drop ALL"
        );
        assert_eq!(
            yaml::flag(pod, "automountServiceAccountToken"),
            Some(false),
            "{what}: no API token"
        );
        // Service links would inject KEYMETER_* variables for Services named keymeter-*.
        assert_eq!(
            yaml::flag(pod, "enableServiceLinks"),
            Some(false),
            "{what}: enableServiceLinks"
        );
        for resource in [
            "requests.cpu",
            "requests.memory",
            "limits.cpu",
            "limits.memory",
        ] {
            assert!(
                yaml::lookup(c, &format!("resources.{resource}")).is_some(),
                "{what}: resources.{resource} is set"
            );
        }
    }
}

#[test]
fn replicas_spread_across_nodes_and_survive_rollouts_and_drains() {
    let docs = docs();
    let pdb = docs
        .iter()
        .find(|d| d.kind() == "PodDisruptionBudget")
        .expect("a PodDisruptionBudget");
    for workload in Workload::all(&docs) {
        let what = workload.what();
        let spec = yaml::node(&workload.doc.value, "spec");
        let replicas = yaml::number(spec, "replicas");
        assert!(
            replicas >= 2,
            "{what}: replicas {replicas}: at least 2 (Envoy fails closed without keymeter)"
        );
        let labels = workload.pod_labels();
        assert!(
            is_subset(&yaml::string_map(spec, "selector.matchLabels"), &labels),
            "{what}: selector matches the pod labels"
        );

        match workload.doc.kind() {
            "Deployment" => {
                assert_eq!(yaml::text(spec, "strategy.type"), "RollingUpdate");
                assert_eq!(
                    yaml::number(spec, "strategy.rollingUpdate.maxUnavailable"),
                    0,
                    "{what}: a rollout never takes a ready replica away first"
                );
            }
            "StatefulSet" => {
                assert_eq!(yaml::text(spec, "updateStrategy.type"), "RollingUpdate");
                let service = yaml::one_named(&docs, "Service", yaml::text(spec, "serviceName"));
                assert_eq!(
                    yaml::text(&service.value, "spec.clusterIP"),
                    "None",
                    "{what}: serviceName is a headless Service"
                );
            }
            other => unreachable!("{other}"),
        }

        let pod = workload.pod();
        let spreads_nodes = yaml::list(pod, "topologySpreadConstraints")
            .iter()
            .any(|t| {
                yaml::text(t, "topologyKey") == "kubernetes.io/hostname"
                    && yaml::text(t, "whenUnsatisfiable") == "DoNotSchedule"
                    && is_subset(&yaml::string_map(t, "labelSelector.matchLabels"), &labels)
            });
        assert!(
            spreads_nodes,
            "{what}: replicas are spread across nodes (kubernetes.io/hostname)"
        );

        // Long enough for the preStop pause plus a graceful stop.
        let grace = yaml::number(pod, "terminationGracePeriodSeconds");
        let pre_stop = yaml::lookup(workload.container(), "lifecycle.preStop.sleep.seconds")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        assert!(
            grace >= pre_stop + 10,
            "{what}: terminationGracePeriodSeconds {grace} leaves under 10 s after the {pre_stop} s preStop"
        );

        assert!(
            is_subset(
                &yaml::string_map(&pdb.value, "spec.selector.matchLabels"),
                &labels
            ),
            "the PodDisruptionBudget selects the {what} pods"
        );
        let min_available = yaml::number(&pdb.value, "spec.minAvailable");
        assert!(
            min_available >= 1 && min_available < replicas,
            "{what}: PDB minAvailable {min_available} keeps one up yet allows a drain"
        );
    }
}

#[test]
fn services_select_the_pods_and_speak_grpc() {
    let docs = docs();
    let workload = default_workload(&docs);
    let labels = workload.pod_labels();
    let config = workload_config(&docs, &workload, POD_NAME, POD_NAMESPACE);
    let services: Vec<&Manifest> = docs.iter().filter(|d| d.kind() == "Service").collect();
    assert!(
        services.iter().any(|s| s.name() == "keymeter"),
        "a Service `keymeter`"
    );
    for service in services {
        let name = service.name();
        let spec = yaml::node(&service.value, "spec");
        assert!(
            is_subset(&yaml::string_map(spec, "selector"), &labels),
            "Service {name} selects the keymeter pods"
        );
        let ports = yaml::list(spec, "ports");
        let grpc = yaml::item_named(ports, "grpc", "Service port");
        assert_eq!(
            yaml::text(grpc, "appProtocol"),
            "grpc",
            "Service {name}: grpc port appProtocol"
        );
        assert_eq!(
            yaml::number(grpc, "port"),
            9191,
            "Service {name}: gRPC on 9191"
        );
        for port in ports {
            let port_name = yaml::text(port, "name");
            let target = workload.resolve_port(yaml::node(port, "targetPort"));
            let listen: SocketAddr = match port_name {
                "grpc" => config.listen.grpc,
                "admin" => config.listen.admin,
                "report" => config
                    .listen
                    .report
                    .unwrap_or_else(|| panic!("Service {name}: port report without listen.report")),
                other => panic!("Service {name}: unexpected port {other}"),
            };
            assert_eq!(
                target,
                u64::from(listen.port()),
                "Service {name}: port {port_name} targets keymeter's listen.{port_name}"
            );
        }
        if name == "keymeter" {
            let admin = yaml::item_named(ports, "admin", "Service port");
            assert_eq!(yaml::text(admin, "appProtocol"), "http");
            // The jobs' way in: gRPC too (HTTP/2 through a mesh), on its own port.
            let report = yaml::item_named(ports, "report", "Service port");
            assert_eq!(
                yaml::text(report, "appProtocol"),
                "grpc",
                "Service {name}: report port appProtocol"
            );
            assert_eq!(
                yaml::number(report, "port"),
                9193,
                "Service {name}: the Report API on 9193"
            );
        }
    }
}

#[test]
fn secret_references_resolve_and_the_secret_is_a_placeholder() {
    let docs = docs();
    let readme = yaml::repo_text(&format!("{DIR}/README.md"));
    for workload in Workload::all(&docs) {
        let refs = workload.secret_key_refs();
        let env = workload.env(POD_NAME, POD_NAMESPACE);
        assert!(
            env.contains_key("KEYMETER_MQTT_PASSWORD"),
            "the password comes from the Secret"
        );
        for (secret, key) in refs {
            let doc = yaml::one_named(&docs, "Secret", &secret);
            let mut keys = yaml::string_map_or_empty(&doc.value, "stringData");
            keys.extend(yaml::string_map_or_empty(&doc.value, "data"));
            assert!(
                keys.contains_key(&key),
                "{}: Secret {secret} has no key {key}",
                workload.what()
            );
        }
        // Secrets mounted as volumes but not shipped (e.g. the broker CA) are explained.
        for volume in yaml::list(workload.pod(), "volumes") {
            if let Some(secret) = yaml::lookup(volume, "secret.secretName").and_then(Value::as_str)
                && !docs
                    .iter()
                    .any(|d| d.kind() == "Secret" && d.name() == secret)
            {
                assert!(
                    readme.contains(secret),
                    "Secret {secret} is mounted but neither shipped nor explained in README.md"
                );
            }
        }
    }
    for secret in docs.iter().filter(|d| d.kind() == "Secret") {
        for (key, value) in yaml::string_map_or_empty(&secret.value, "stringData") {
            assert!(
                value.contains("REPLACE"),
                "Secret {}: `{key}` must be an obvious placeholder",
                secret.name()
            );
        }
        assert!(
            yaml::string_map_or_empty(&secret.value, "data").is_empty(),
            "Secret {}: placeholders go in stringData",
            secret.name()
        );
    }
}

#[test]
fn readme_explains_every_file() {
    let readme = yaml::repo_text(&format!("{DIR}/README.md"));
    for file in yaml_files() {
        assert!(
            readme.contains(&file),
            "{DIR}/README.md does not mention {file}"
        );
    }
    for link in ["../istio", "../envoy", "docker build -t keymeter ."] {
        assert!(readme.contains(link), "{DIR}/README.md mentions {link}");
    }
}

/// The probes' paths are keymeter's real admin routes: with no broker and no keys,
/// liveness and startup answer 200 (they must not depend on the broker) and readiness
/// 503 (no key list yet). The Prometheus annotation's path serves metrics.
#[tokio::test(flavor = "multi_thread")]
async fn probe_paths_are_served_by_keymeter_on_the_admin_port() {
    let docs = docs();
    let workload = default_workload(&docs);
    let config = workload_config(&docs, &workload, POD_NAME, POD_NAMESPACE);
    let admin_port = u64::from(config.listen.admin.port());

    let mut expect: Vec<(&str, String, u16)> = Vec::new();
    for (probe, status) in [
        ("livenessProbe", 200),
        ("startupProbe", 200),
        ("readinessProbe", 503),
    ] {
        let Some(p) = workload.probe(probe) else {
            assert_ne!(probe, "livenessProbe", "a liveness probe is set");
            assert_ne!(probe, "readinessProbe", "a readiness probe is set");
            continue;
        };
        assert_eq!(
            workload.resolve_port(yaml::node(p, "httpGet.port")),
            admin_port,
            "{probe} is on the admin port"
        );
        expect.push((probe, yaml::text(p, "httpGet.path").to_string(), status));
    }
    let paths: BTreeMap<&str, &str> = expect
        .iter()
        .map(|(p, path, _)| (*p, path.as_str()))
        .collect();
    assert_eq!(
        paths["livenessProbe"], "/healthz",
        "liveness: process up, whatever the broker does"
    );
    assert_eq!(
        paths["readinessProbe"], "/readyz",
        "readiness: a key list is loaded"
    );

    let annotations = yaml::string_map_or_empty(workload.template(), "metadata.annotations");
    if annotations.get("prometheus.io/scrape").map(String::as_str) == Some("true") {
        assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
        expect.push((
            "prometheus.io/path",
            annotations["prometheus.io/path"].clone(),
            200,
        ));
    }

    // A broker port nothing listens on: keymeter runs, but gets no key list.
    let keymeter = crate::support::keymeter::Keymeter::start(Config::for_local_broker(
        "127.0.0.1",
        crate::support::free_port(),
    ))
    .await;
    crate::support::wait_until(
        "keymeter's admin server answers",
        crate::support::STARTUP_TIMEOUT,
        || async { keymeter.admin_get("/healthz").await.0 != 0 },
    )
    .await;
    for (what, path, status) in expect {
        let (got, body) = keymeter.admin_get(&path).await;
        assert_eq!(got, status, "{what} GET {path}: {body}");
    }
    keymeter.stop().await;
}

/// The Dockerfile's instruction lines, continuation lines joined, comments dropped.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let text = yaml::repo_text("Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (word, rest) = current
                    .split_once(char::is_whitespace)
                    .unwrap_or((current.as_str(), ""));
                out.push((word.to_ascii_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// The instructions of the final (runtime) stage.
fn runtime_stage() -> Vec<(String, String)> {
    let all = dockerfile_instructions();
    let last_from = all.iter().rposition(|(i, _)| i == "FROM").expect("a FROM");
    all[last_from..].to_vec()
}

fn dockerfile_json_instruction(instruction: &str) -> Vec<String> {
    let (_, args) = runtime_stage()
        .into_iter()
        .rfind(|(i, _)| i == instruction)
        .unwrap_or_else(|| panic!("the Dockerfile's runtime stage has no {instruction}"));
    serde_json::from_str(&args)
        .unwrap_or_else(|e| panic!("Dockerfile {instruction} is not an exec-form JSON array: {e}"))
}

#[test]
fn the_image_runs_as_the_pods_user_and_exposes_their_ports() {
    let docs = docs();
    let workload = default_workload(&docs);
    let stage = runtime_stage();

    let exposed: BTreeSet<u64> = stage
        .iter()
        .filter(|(i, _)| i == "EXPOSE")
        .flat_map(|(_, ports)| {
            ports
                .split_whitespace()
                .map(|p| {
                    p.trim_end_matches("/tcp")
                        .parse::<u64>()
                        .expect("EXPOSE port")
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let container_ports: BTreeSet<u64> = ["grpc", "admin", "report"]
        .iter()
        .map(|n| workload.container_port(n))
        .collect();
    assert_eq!(
        exposed, container_ports,
        "Dockerfile EXPOSE equals the container ports"
    );

    let (_, user) = stage
        .iter()
        .rfind(|(i, _)| i == "USER")
        .expect("the runtime stage sets USER");
    let uid = user.split(':').next().unwrap();
    assert_eq!(
        uid.parse::<u64>().ok(),
        Some(NONROOT_UID),
        "USER {user}: numeric and non-root, so runAsNonRoot can verify it"
    );

    let entrypoint = dockerfile_json_instruction("ENTRYPOINT");
    assert_eq!(entrypoint, ["/usr/local/bin/keymeter"]);
    assert!(
        stage
            .iter()
            .any(|(i, s)| i == "STOPSIGNAL" && s == "SIGTERM"),
        "STOPSIGNAL SIGTERM (graceful stop)"
    );
    let (_, base) = &stage[0];
    assert!(
        base.contains("distroless") && base.contains("nonroot"),
        "runtime base {base}"
    );

    // The builder's toolchain is at least the crate's rust-version.
    let manifest: toml::Table = toml::from_str(&yaml::repo_text("Cargo.toml")).unwrap();
    let msrv = manifest["package"]["rust-version"].as_str().unwrap();
    let (_, arg) = dockerfile_instructions()
        .into_iter()
        .find(|(i, a)| i == "ARG" && a.starts_with("RUST_VERSION="))
        .expect("ARG RUST_VERSION=…");
    let version = |v: &str| -> Vec<u64> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    let builder = arg.trim_start_matches("RUST_VERSION=");
    assert!(
        version(builder) >= version(msrv),
        "builder Rust {builder} is older than the crate's rust-version {msrv}"
    );
    assert!(
        dockerfile_instructions()
            .iter()
            .any(|(i, a)| i == "RUN" && a.contains("cargo build --release --locked --bin keymeter")),
        "the image is built with `cargo build --release --locked --bin keymeter`"
    );

    let ignore = yaml::repo_text(".dockerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    assert!(
        lines.contains(&"*") || (lines.contains(&"target/") && lines.contains(&".git/")),
        ".dockerignore keeps target/ and .git out of the build context"
    );
}

/// The fields of `networking.k8s.io/v1` NetworkPolicy objects (the Kubernetes API
/// reference), by object: an unknown field is rejected by a strict apply, or ignored by
/// a lenient one, which for a policy can mean open where it was meant to be shut.
const NETWORK_POLICY_FIELDS: [(&str, &[&str]); 7] = [
    ("spec", &["podSelector", "policyTypes", "ingress", "egress"]),
    ("ingress rule", &["from", "ports"]),
    ("egress rule", &["to", "ports"]),
    ("peer", &["podSelector", "namespaceSelector", "ipBlock"]),
    ("port", &["port", "protocol", "endPort"]),
    ("selector", &["matchLabels", "matchExpressions"]),
    ("requirement", &["key", "operator", "values"]),
];

fn assert_fields(value: &Value, object: &str) {
    let allowed = NETWORK_POLICY_FIELDS
        .iter()
        .find(|(o, _)| *o == object)
        .map(|(_, f)| *f)
        .unwrap();
    let map = value
        .as_mapping()
        .unwrap_or_else(|| panic!("NetworkPolicy {object} is not a mapping: {value:?}"));
    for key in map.keys() {
        let key = key.as_str().unwrap();
        assert!(
            allowed.contains(&key),
            "NetworkPolicy {object} has no field `{key}` (fields: {allowed:?})"
        );
    }
}

fn assert_selector_fields(selector: &Value) {
    assert_fields(selector, "selector");
    for requirement in yaml::list_or_empty(selector, "matchExpressions") {
        assert_fields(requirement, "requirement");
        let operator = yaml::text(requirement, "operator");
        assert!(
            ["In", "NotIn", "Exists", "DoesNotExist"].contains(&operator),
            "selector operator {operator}"
        );
    }
}

/// A label selector as text: empty when it selects everything.
fn selector_text(selector: Option<&Value>) -> String {
    let Some(selector) = selector else {
        return String::new();
    };
    let labels = yaml::string_map_or_empty(selector, "matchLabels");
    let expressions: Vec<String> = yaml::list_or_empty(selector, "matchExpressions")
        .iter()
        .map(|e| {
            let values: Vec<&str> = yaml::list_or_empty(e, "values")
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            format!(
                "{} {} ({})",
                yaml::text(e, "key"),
                yaml::text(e, "operator"),
                values.join(",")
            )
        })
        .collect();
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .chain(expressions)
        .collect::<Vec<_>>()
        .join("; ")
}

/// `(namespace, pods)` a peer admits, as text for comparison (an empty `pods`: every
/// pod); checks its fields.
fn peer(p: &Value) -> (String, String) {
    assert_fields(p, "peer");
    assert!(
        yaml::lookup(p, "ipBlock").is_none(),
        "no ipBlock: peers are named by selectors"
    );
    for selector in ["podSelector", "namespaceSelector"] {
        if let Some(s) = yaml::lookup(p, selector) {
            assert_selector_fields(s);
        }
    }
    let namespace = match yaml::lookup(p, "namespaceSelector") {
        None => "<own namespace>".to_string(),
        Some(ns) => {
            let labels = yaml::string_map_or_empty(ns, "matchLabels");
            match labels.get("kubernetes.io/metadata.name") {
                Some(name) if labels.len() == 1 => name.clone(),
                _ => match selector_text(Some(ns)) {
                    any if any.is_empty() => "<any>".to_string(),
                    text => text,
                },
            }
        }
    };
    (namespace, selector_text(yaml::lookup(p, "podSelector")))
}

/// The ports of a rule, resolved against the container ports; checks their fields.
fn rule_ports(workload: &Workload, rule: &Value) -> BTreeSet<(u64, String)> {
    let ports = yaml::list_or_empty(rule, "ports");
    assert!(!ports.is_empty(), "a rule without ports allows every port");
    ports
        .iter()
        .map(|p| {
            assert_fields(p, "port");
            assert!(yaml::lookup(p, "endPort").is_none(), "single ports only");
            (
                workload.resolve_port(yaml::node(p, "port")),
                yaml::text(p, "protocol").to_string(),
            )
        })
        .collect()
}

/// The one NetworkPolicy of deploy/kubernetes.
fn network_policy(docs: &[Manifest]) -> &Manifest {
    let policies: Vec<&Manifest> = docs
        .iter()
        .filter(|d| d.kind() == "NetworkPolicy")
        .collect();
    assert_eq!(policies.len(), 1, "one NetworkPolicy in {DIR}");
    policies[0]
}

/// Whether a label selector selects an object with `labels` (an absent selector
/// selects nothing, an empty one everything), as the API server evaluates it.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let by_label = yaml::string_map_or_empty(selector, "matchLabels")
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = yaml::list_or_empty(selector, "matchExpressions")
        .iter()
        .all(|e| {
            let value = labels.get(yaml::text(e, "key"));
            let values: Vec<&str> = yaml::list_or_empty(e, "values")
                .iter()
                .map(|v| v.as_str().expect("a string value"))
                .collect();
            match yaml::text(e, "operator") {
                "In" => value.is_some_and(|v| values.contains(&v.as_str())),
                "NotIn" => value.is_none_or(|v| !values.contains(&v.as_str())),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                other => panic!("selector operator {other}"),
            }
        });
    by_label && by_expression
}

/// Labels of a namespace or pod, for [`admitted_ports`].
type Labels<'a> = &'a [(&'a str, &'a str)];

/// The ports (resolved against the container ports) that the NetworkPolicy lets a
/// pod with `pod_labels` reach, in a namespace named `namespace` with `ns_labels`
/// (besides `kubernetes.io/metadata.name`, which Kubernetes sets). A peer without a
/// namespaceSelector means keymeter's own namespace, POD_NAMESPACE.
fn admitted_ports(
    spec: &Value,
    workload: &Workload,
    namespace: &str,
    ns_labels: Labels,
    pod_labels: Labels,
) -> BTreeSet<u64> {
    let mut ns: BTreeMap<String, String> = ns_labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ns.insert("kubernetes.io/metadata.name".into(), namespace.into());
    let pod: BTreeMap<String, String> = pod_labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let admits = |peer: &Value| {
        let namespace_ok = match yaml::lookup(peer, "namespaceSelector") {
            Some(selector) => selects(selector, &ns),
            None => namespace == POD_NAMESPACE,
        };
        let pod_ok = yaml::lookup(peer, "podSelector").is_none_or(|s| selects(s, &pod));
        namespace_ok && pod_ok
    };
    yaml::list(spec, "ingress")
        .iter()
        .filter(|rule| yaml::list_or_empty(rule, "from").iter().any(admits))
        .flat_map(|rule| rule_ports(workload, rule))
        .map(|(port, _)| port)
        .collect()
}

/// The NetworkPolicy admits the gRPC port only from Envoy (Istio gateways and
/// sidecars, pods labelled `keymeter.io/client: envoy`), the Report API's port only
/// from pods labelled `keymeter.io/client: report`, the admin port only from the
/// `monitoring` namespace, and lets keymeter reach only DNS, the broker that the
/// ConfigMap names (its namespace and port) and istiod. Every field exists in
/// `networking.k8s.io/v1`, and it selects the keymeter pods of both workloads.
#[test]
fn network_policy_admits_envoy_and_monitoring_and_reaches_only_dns_and_the_broker() {
    let docs = docs();
    let policy_doc = network_policy(&docs);
    let policy = &policy_doc.value;
    assert_eq!(yaml::text(policy, "apiVersion"), "networking.k8s.io/v1");
    assert!(
        kustomization_resources(&docs).contains(&policy_doc.file),
        "kustomization.yaml applies the NetworkPolicy"
    );
    let spec = yaml::node(policy, "spec");
    assert_fields(spec, "spec");
    assert_selector_fields(yaml::node(spec, "podSelector"));
    let types: Vec<&str> = yaml::list(spec, "policyTypes")
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["Ingress", "Egress"],
        "both directions are restricted"
    );
    for workload in Workload::all(&docs) {
        assert!(
            is_subset(
                &yaml::string_map(spec, "podSelector.matchLabels"),
                &workload.pod_labels()
            ),
            "the NetworkPolicy selects the pods of the {}",
            workload.what()
        );
    }

    let workload = default_workload(&docs);
    let config = workload_config(&docs, &workload, POD_NAME, POD_NAMESPACE);
    let grpc = (u64::from(config.listen.grpc.port()), "TCP".to_string());
    let admin = (u64::from(config.listen.admin.port()), "TCP".to_string());
    let report = (
        u64::from(config.listen.report.expect("listen.report").port()),
        "TCP".to_string(),
    );
    let mut ingress: BTreeMap<(u64, String), Vec<(String, String)>> = BTreeMap::new();
    for rule in yaml::list(spec, "ingress") {
        assert_fields(rule, "ingress rule");
        let from = yaml::list_or_empty(rule, "from");
        assert!(
            !from.is_empty(),
            "an ingress rule without `from` admits everyone"
        );
        for port in rule_ports(&workload, rule) {
            ingress
                .entry(port)
                .or_default()
                .extend(from.iter().map(peer));
        }
    }
    let mut open: Vec<(u64, String)> = vec![grpc.clone(), admin.clone(), report.clone()];
    open.sort();
    assert_eq!(
        ingress.keys().cloned().collect::<Vec<_>>(),
        open,
        "only keymeter's gRPC, admin and Report API ports are open"
    );
    let envoy_label = "keymeter.io/client";
    let grpc_peers = &ingress[&grpc];
    for (port, peers) in [(&grpc, grpc_peers), (&report, &ingress[&report])] {
        for (namespace, pods) in peers {
            assert_ne!(
                (namespace.as_str(), pods.is_empty()),
                ("<any>", true),
                "port {port:?} open to every pod"
            );
        }
    }
    assert!(
        grpc_peers.iter().any(|(ns, _)| ns == "istio-system"),
        "Istio gateways"
    );
    assert!(
        grpc_peers
            .iter()
            .any(|(ns, _)| ns == "istio-injection=enabled"),
        "namespaces with sidecars"
    );
    assert!(
        grpc_peers
            .iter()
            .any(|(ns, pods)| ns == "<any>" && *pods == format!("{envoy_label}=envoy")),
        "pods labelled {envoy_label}: envoy, in any namespace: {grpc_peers:?}"
    );
    assert!(
        !grpc_peers.iter().any(|(_, pods)| pods.contains("report")),
        "Report API jobs are not admitted to the gRPC port: {grpc_peers:?}"
    );
    assert_eq!(
        ingress[&report],
        [("<any>".to_string(), format!("{envoy_label}=report"))],
        "the Report API's port only from pods labelled {envoy_label}: report"
    );
    assert_eq!(
        ingress[&admin],
        [("monitoring".to_string(), String::new())],
        "the admin port only from the monitoring namespace"
    );
    let readme = yaml::repo_text(&format!("{DIR}/README.md"));
    assert!(readme.contains(envoy_label), "README.md names the label");

    // Egress: DNS, the broker of the ConfigMap, istiod.
    let broker_namespace = config
        .mqtt
        .host
        .strip_suffix(".svc.cluster.local")
        .and_then(|h| h.split('.').nth(1))
        .unwrap_or_else(|| panic!("mqtt.host {} is no in-cluster Service", config.mqtt.host))
        .to_string();
    let mut egress: BTreeMap<String, BTreeSet<(u64, String)>> = BTreeMap::new();
    for rule in yaml::list(spec, "egress") {
        assert_fields(rule, "egress rule");
        let to = yaml::list_or_empty(rule, "to");
        assert!(
            !to.is_empty(),
            "an egress rule without `to` reaches everything"
        );
        for p in to {
            let (namespace, pods) = peer(p);
            assert!(!pods.is_empty(), "egress to {namespace}: name the pods");
            egress
                .entry(namespace)
                .or_default()
                .extend(rule_ports(&workload, rule));
        }
    }
    let tcp = |port: u64| (port, "TCP".to_string());
    let expected: BTreeMap<String, BTreeSet<(u64, String)>> = [
        (
            "kube-system".to_string(),
            [tcp(53), (53, "UDP".to_string())].into(),
        ),
        (broker_namespace, [tcp(u64::from(config.mqtt.port))].into()),
        ("istio-system".to_string(), [tcp(15012)].into()),
    ]
    .into();
    assert_eq!(
        egress, expected,
        "egress: DNS, the broker, istiod, nothing else"
    );
}

/// What the NetworkPolicy admits, evaluated for example callers as the API server
/// would match them: a job labelled `keymeter.io/client: report` reaches the Report
/// API's port and not the gRPC one (where it could stream access-log entries, which
/// are billing records, or call the Check); Envoy (a standalone one, an Istio gateway,
/// a sidecar) reaches the gRPC port and not the Report API's; a sidecar-injected
/// namespace is not admitted to the Report API wholesale. The ports are the
/// ConfigMap's `listen.*`, which equal the container ports (checked above).
#[test]
fn network_policy_admits_report_jobs_to_the_report_port_alone_and_envoy_to_grpc() {
    let docs = docs();
    let spec = yaml::node(&network_policy(&docs).value, "spec");
    let workload = default_workload(&docs);
    let config = workload_config(&docs, &workload, POD_NAME, POD_NAMESPACE);
    let grpc = u64::from(config.listen.grpc.port());
    let admin = u64::from(config.listen.admin.port());
    let report = u64::from(config.listen.report.expect("listen.report").port());
    let label = "keymeter.io/client";
    let injected = [("istio-injection", "enabled")];
    let revision = [("istio.io/rev", "1-24")];
    // (who, namespace, namespace labels, pod labels, the ports it reaches)
    let cases: [(&str, &str, Labels, Labels, &[u64]); 10] = [
        (
            "a Report API job",
            "billing-jobs",
            &[],
            &[(label, "report")],
            &[report],
        ),
        (
            "a Report API job in keymeter's namespace",
            POD_NAMESPACE,
            &[],
            &[(label, "report")],
            &[report],
        ),
        (
            "a standalone Envoy",
            "edge",
            &[],
            &[(label, "envoy")],
            &[grpc],
        ),
        (
            "the Istio ingress gateway",
            "istio-system",
            &[],
            &[("istio", "ingressgateway")],
            &[grpc],
        ),
        (
            "a sidecar in an injected namespace",
            "paid-api",
            &injected,
            &[("app", "paid-api")],
            &[grpc],
        ),
        (
            "a sidecar in a revision-labelled namespace",
            "paid-api",
            &revision,
            &[("app", "paid-api")],
            &[grpc],
        ),
        (
            "Prometheus",
            "monitoring",
            &[],
            &[("app.kubernetes.io/name", "prometheus")],
            &[admin],
        ),
        (
            "an unlabelled pod",
            "default",
            &[],
            &[("app", "anything")],
            &[],
        ),
        (
            "an unlabelled pod in keymeter's namespace",
            POD_NAMESPACE,
            &[],
            &[("app", "anything")],
            &[],
        ),
        (
            "a pod with another value of the label",
            "default",
            &[],
            &[(label, "admin")],
            &[],
        ),
    ];
    for (who, namespace, ns_labels, pod_labels, expected) in cases {
        let got = admitted_ports(spec, &workload, namespace, ns_labels, pod_labels);
        assert_eq!(
            got,
            expected.iter().copied().collect::<BTreeSet<u64>>(),
            "{who} ({namespace}, {pod_labels:?}) reaches ports {got:?}"
        );
    }
    // A job does not reach the gRPC port whatever else its pod is labelled with
    // (outside sidecar-injected namespaces, which are admitted to it for their
    // sidecars; there Istio's AuthorizationPolicy decides by identity, as the README
    // says).
    let job = admitted_ports(
        spec,
        &workload,
        "billing-jobs",
        &[],
        &[(label, "report"), ("app", "nightly")],
    );
    assert!(
        !job.contains(&grpc),
        "a job must not reach the gRPC port: {job:?}"
    );
    let readme = yaml::repo_text(&format!("{DIR}/README.md"));
    assert!(
        readme.contains(&format!("`{label}: report`")) && readme.contains("`report` (9193"),
        "{DIR}/README.md documents the jobs' label and port"
    );
}
