//! deploy/istio/ checked without Istio: every YAML document is parsed and what
//! matters is asserted, the lists that must match deploy/envoy/envoy.yaml (the
//! plain-Envoy config that the integration tests run) are compared with it, and
//! the EnvoyFilter's HTTP filter is loaded by a real Envoy (`--mode validate`).
//! So the Istio manifests cannot drift from the tested Envoy config or rot.

use std::collections::BTreeSet;

use crate::support::yaml::{self, DurationSyntax, Manifest};
use serde_yaml::Value;

const EXT_AUTHZ_PROVIDER: &str = "keymeter-ext-authz";
const ALS_PROVIDER: &str = "keymeter-als";
/// keymeter's gRPC port (`listen.grpc` default): Check and AccessLogService.
const KEYMETER_GRPC_PORT: u64 = 9191;
/// The Report API's own port in deploy/kubernetes (`listen.report`).
const KEYMETER_REPORT_PORT: u64 = 9193;
/// The backend header contract (README, `usage.headers.*` defaults).
const USAGE_HEADERS: [&str; 5] = [
    "x-billing-module",
    "x-billing-model",
    "x-billing-usage",
    "x-billing-metadata",
    "x-billing-records",
];
/// `usage.metadata_namespace` default.
const METADATA_NAMESPACE: &str = "keymeter";
const HEADER_TO_METADATA: &str = "envoy.filters.http.header_to_metadata";
const HEADER_TO_METADATA_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config";

/// Fields of Istio's `EnvoyExternalAuthorizationGrpcProvider` (istio/api
/// mesh/v1alpha1/config.proto). Istio silently ignores unknown fields in mesh
/// config (pkg/util/protomarshal ApplyYAML), so a misspelt or misplaced field,
/// e.g. the HTTP provider's `includeRequestHeadersInCheck`, would go unnoticed.
const EXT_AUTHZ_GRPC_FIELDS: [&str; 6] = [
    "service",
    "port",
    "timeout",
    "failOpen",
    "statusOnError",
    "includeRequestBodyInCheck",
];
/// Fields of Istio's `EnvoyHttpGrpcV3LogProvider` (same file). No buffer settings.
const HTTP_ALS_FIELDS: [&str; 7] = [
    "service",
    "port",
    "logName",
    "filterStateObjectsToLog",
    "additionalRequestHeadersToLog",
    "additionalResponseHeadersToLog",
    "additionalResponseTrailersToLog",
];

// ---------------------------------------------------------------------------
// Finding the documents
// ---------------------------------------------------------------------------

/// Every document of every YAML file in deploy/istio/, in file-name order.
fn istio_docs() -> Vec<Manifest> {
    yaml::load_folder("deploy/istio")
}

/// The one AuthorizationPolicy with `action`; panics if there is none or more than one.
fn policy_with_action<'a>(docs: &'a [Manifest], action: &str) -> &'a Manifest {
    yaml::one_where(
        docs,
        &format!("AuthorizationPolicy with action {action}"),
        |d| d.kind() == "AuthorizationPolicy" && yaml::text(&d.value, "spec.action") == action,
    )
}

const USAGE_HEADERS_FILTER: &str = "keymeter-usage-headers";
const GATEWAY_EDGE_FILTER: &str = "keymeter-gateway-edge";

/// `meshConfig` from the IstioOperator overlay (`spec.meshConfig`) or, if the
/// file is switched to the `istio` ConfigMap form, from its `data.mesh` text.
fn mesh_config(docs: &[Manifest]) -> Value {
    let operators: Vec<&Manifest> = docs
        .iter()
        .filter(|d| d.kind() == "IstioOperator")
        .collect();
    let config_maps: Vec<&Manifest> = docs
        .iter()
        .filter(|d| d.kind() == "ConfigMap" && yaml::text(&d.value, "metadata.name") == "istio")
        .collect();
    match (operators.as_slice(), config_maps.as_slice()) {
        ([operator], []) => yaml::node(&operator.value, "spec.meshConfig").clone(),
        ([], [config_map]) => serde_yaml::from_str(yaml::text(&config_map.value, "data.mesh"))
            .expect("ConfigMap istio: `data.mesh` is YAML"),
        _ => panic!(
            "expected the mesh config exactly once (an IstioOperator or the `istio` ConfigMap), \
             found {} IstioOperator and {} ConfigMap",
            operators.len(),
            config_maps.len()
        ),
    }
}

/// The extension provider `name` and its one provider-type key.
fn provider(mesh: &Value, name: &str) -> (String, Value) {
    let named = yaml::item_named(
        yaml::list(mesh, "extensionProviders"),
        name,
        "extension provider",
    );
    let types: Vec<String> = yaml::field_names(named)
        .into_iter()
        .filter(|k| k != "name")
        .collect();
    assert_eq!(
        types.len(),
        1,
        "provider {name} must have exactly one type, has {types:?}"
    );
    let kind = types[0].clone();
    (kind.clone(), yaml::node(named, &kind).clone())
}

fn assert_only_fields(value: &Value, allowed: &[&str], what: &str) {
    for key in yaml::field_names(value) {
        assert!(
            allowed.contains(&key.as_str()),
            "{what}: Istio has no field `{key}` and would silently ignore it (fields: {allowed:?})"
        );
    }
}

fn usage_headers() -> BTreeSet<String> {
    USAGE_HEADERS.iter().map(|h| h.to_string()).collect()
}

// ---------------------------------------------------------------------------
// The manifests
// ---------------------------------------------------------------------------

#[test]
fn every_document_is_one_of_the_expected_istio_resources() {
    let docs = istio_docs();
    let expected = [
        ("IstioOperator", "install.istio.io/v1alpha1"),
        ("AuthorizationPolicy", "security.istio.io/v1"),
        ("Telemetry", "telemetry.istio.io/v1"),
        ("EnvoyFilter", "networking.istio.io/v1alpha3"),
    ];
    for doc in &docs {
        let kind = doc.kind();
        let api_version = yaml::text(&doc.value, "apiVersion");
        assert!(
            expected.contains(&(kind, api_version)),
            "{}: unexpected {api_version} {kind}",
            doc.file
        );
        assert!(
            !yaml::text(&doc.value, "metadata.name").is_empty(),
            "{}: {kind} without a name",
            doc.file
        );
        yaml::node(&doc.value, "spec");
    }
    for (kind, _) in expected {
        let count = docs.iter().filter(|d| d.kind() == kind).count();
        // The CUSTOM policy on the paid API, and the ALLOW policy on keymeter; the
        // usage-header filter on the paid API's sidecars, and the edge settings of
        // the ingress gateway.
        let want = if matches!(kind, "AuthorizationPolicy" | "EnvoyFilter") {
            2
        } else {
            1
        };
        assert_eq!(count, want, "{kind}s in deploy/istio");
    }
}

#[test]
fn ext_authz_provider_fails_closed_within_the_envoy_timeout() {
    let mesh = mesh_config(&istio_docs());
    let (kind, grpc) = provider(&mesh, EXT_AUTHZ_PROVIDER);
    assert_eq!(kind, "envoyExtAuthzGrpc", "keymeter's Check is gRPC");
    assert_only_fields(&grpc, &EXT_AUTHZ_GRPC_FIELDS, EXT_AUTHZ_PROVIDER);

    assert!(
        yaml::text(&grpc, "service").contains('.'),
        "service must be a fully qualified host name"
    );
    assert_eq!(yaml::node(&grpc, "port").as_u64(), Some(KEYMETER_GRPC_PORT));

    // Istio's default is 600s: the timeout must be explicit and short.
    let timeout = yaml::duration_seconds(yaml::text(&grpc, "timeout"), DurationSyntax::Protobuf);
    assert!(
        timeout > 0.0 && timeout <= 1.0,
        "timeout {timeout}s must be in (0, 1]"
    );
    // Explicit, not just defaulted.
    assert_eq!(
        yaml::node(&grpc, "failOpen").as_bool(),
        Some(false),
        "fail closed"
    );
    assert_eq!(yaml::text(&grpc, "statusOnError"), "503");

    // The same behaviour as the tested plain-Envoy config.
    let envoy = yaml::envoy_config_named("envoy.filters.http.ext_authz");
    let envoy = yaml::node(&envoy, "typed_config");
    assert_eq!(
        yaml::duration_seconds(
            yaml::text(envoy, "grpc_service.timeout"),
            DurationSyntax::Protobuf
        ),
        timeout,
        "same Check timeout as deploy/envoy/envoy.yaml"
    );
    assert_eq!(
        yaml::node(envoy, "failure_mode_allow").as_bool(),
        Some(false)
    );
    assert_eq!(
        yaml::text(envoy, "status_on_error.code"),
        "ServiceUnavailable"
    ); // = 503
}

#[test]
fn als_provider_logs_the_headers_and_trailers_that_the_envoy_config_logs() {
    let mesh = mesh_config(&istio_docs());
    let (kind, als) = provider(&mesh, ALS_PROVIDER);
    assert_eq!(
        kind, "envoyHttpAls",
        "keymeter implements the HTTP gRPC ALS"
    );
    assert_only_fields(&als, &HTTP_ALS_FIELDS, ALS_PROVIDER);

    let (_, ext_authz) = provider(&mesh, EXT_AUTHZ_PROVIDER);
    assert_eq!(
        yaml::text(&als, "service"),
        yaml::text(&ext_authz, "service"),
        "one keymeter serves both"
    );
    assert_eq!(yaml::node(&als, "port").as_u64(), Some(KEYMETER_GRPC_PORT));

    let envoy = yaml::envoy_config_named(crate::support::envoy::GRPC_ACCESS_LOGGER);
    let envoy = yaml::node(&envoy, "typed_config");
    assert_eq!(
        yaml::text(&als, "logName"),
        yaml::text(envoy, "common_config.log_name")
    );
    for (istio, envoy_field) in [
        (
            "additionalRequestHeadersToLog",
            "additional_request_headers_to_log",
        ),
        (
            "additionalResponseHeadersToLog",
            "additional_response_headers_to_log",
        ),
        (
            "additionalResponseTrailersToLog",
            "additional_response_trailers_to_log",
        ),
    ] {
        assert_eq!(
            yaml::set_of(&yaml::texts(&als, istio)),
            yaml::set_of(&yaml::texts(envoy, envoy_field)),
            "{ALS_PROVIDER}.{istio} differs from deploy/envoy/envoy.yaml's {envoy_field}"
        );
    }
    // And those are the contract's names (lowercase, as Envoy matches them).
    assert_eq!(
        yaml::set_of(&yaml::texts(&als, "additionalResponseHeadersToLog")),
        usage_headers()
    );
    assert_eq!(
        yaml::set_of(&yaml::texts(&als, "additionalResponseTrailersToLog")),
        usage_headers()
    );
    let request_headers = yaml::texts(&als, "additionalRequestHeadersToLog");
    for header in ["api-key", "apikey"] {
        assert!(
            request_headers.iter().any(|h| h == header),
            "the raw key header {header} must be logged: {request_headers:?}"
        );
    }
}

#[test]
fn authorization_policy_sends_matching_requests_to_keymeter() {
    let docs = istio_docs();
    let mesh = mesh_config(&docs);
    let policy = &policy_with_action(&docs, "CUSTOM").value;
    assert_eq!(yaml::text(policy, "spec.action"), "CUSTOM");
    let name = yaml::text(policy, "spec.provider.name");
    assert_eq!(name, EXT_AUTHZ_PROVIDER);
    let (kind, _) = provider(&mesh, name);
    assert_eq!(kind, "envoyExtAuthzGrpc");
    // A policy without rules never matches: keymeter would never be asked.
    assert!(
        !yaml::list(policy, "spec.rules").is_empty(),
        "a CUSTOM policy needs at least one rule"
    );
    assert!(
        !yaml::field_names(yaml::node(policy, "spec.selector.matchLabels")).is_empty(),
        "select the paid workloads, not the whole namespace"
    );
}

#[test]
fn telemetry_streams_the_server_side_access_log_to_keymeter() {
    let docs = istio_docs();
    let mesh = mesh_config(&docs);
    let telemetry = &yaml::one_of_kind(&docs, "Telemetry").value;
    let logging: Vec<&Value> = yaml::list(telemetry, "spec.accessLogging")
        .iter()
        .filter(|entry| {
            entry
                .get("providers")
                .and_then(Value::as_sequence)
                .is_some_and(|ps| {
                    ps.iter()
                        .any(|p| p.get("name").and_then(Value::as_str) == Some(ALS_PROVIDER))
                })
        })
        .collect();
    assert_eq!(logging.len(), 1, "exactly one entry names {ALS_PROVIDER}");
    let (kind, _) = provider(&mesh, ALS_PROVIDER);
    assert_eq!(kind, "envoyHttpAls");
    assert_ne!(
        logging[0].get("disabled").and_then(Value::as_bool),
        Some(true)
    );
    assert_eq!(
        yaml::text(logging[0], "match.mode"),
        "SERVER",
        "log only the inbound traffic that the Check guards"
    );
    assert!(
        !yaml::field_names(yaml::node(telemetry, "spec.selector.matchLabels")).is_empty(),
        "select the paid workloads, not the whole namespace"
    );
}

#[test]
fn policy_telemetry_and_envoyfilter_select_the_same_workloads() {
    let docs = istio_docs();
    let scopes: Vec<(&str, &str, &Value)> = [
        ("AuthorizationPolicy", "spec.selector.matchLabels"),
        ("Telemetry", "spec.selector.matchLabels"),
        ("EnvoyFilter", "spec.workloadSelector.labels"),
    ]
    .into_iter()
    .map(|(kind, labels)| {
        let doc = match kind {
            "AuthorizationPolicy" => &policy_with_action(&docs, "CUSTOM").value,
            "EnvoyFilter" => &yaml::one_named(&docs, "EnvoyFilter", USAGE_HEADERS_FILTER).value,
            _ => &yaml::one_of_kind(&docs, kind).value,
        };
        (
            kind,
            yaml::text(doc, "metadata.namespace"),
            yaml::node(doc, labels),
        )
    })
    .collect();
    for (kind, namespace, labels) in &scopes[1..] {
        assert_eq!(
            (*namespace, *labels),
            (scopes[0].1, scopes[0].2),
            "{kind} must select the workloads that the AuthorizationPolicy selects"
        );
    }
}

/// The EnvoyFilter's configPatch and the HTTP filter it inserts.
fn envoyfilter_patch(docs: &[Manifest]) -> Value {
    let filter = &yaml::one_named(docs, "EnvoyFilter", USAGE_HEADERS_FILTER).value;
    let patches = yaml::list(filter, "spec.configPatches");
    assert_eq!(patches.len(), 1, "one patch: the header_to_metadata filter");
    patches[0].clone()
}

#[test]
fn envoyfilter_moves_the_usage_headers_into_keymeter_metadata_on_the_inbound_sidecar() {
    let patch = envoyfilter_patch(&istio_docs());
    assert_eq!(yaml::text(&patch, "applyTo"), "HTTP_FILTER");
    assert_eq!(yaml::text(&patch, "match.context"), "SIDECAR_INBOUND");
    assert_eq!(
        yaml::text(&patch, "match.listener.filterChain.filter.name"),
        "envoy.filters.network.http_connection_manager"
    );
    // Before the router: the first encoder filter, so the headers are gone
    // before any other filter sees the response or it reaches the client.
    assert_eq!(
        yaml::text(&patch, "match.listener.filterChain.filter.subFilter.name"),
        "envoy.filters.http.router"
    );
    assert_eq!(yaml::text(&patch, "patch.operation"), "INSERT_BEFORE");

    let value = yaml::node(&patch, "patch.value");
    assert_eq!(yaml::text(value, "name"), HEADER_TO_METADATA);
    assert_eq!(
        yaml::text(value, "typed_config.@type"),
        HEADER_TO_METADATA_TYPE
    );
    assert!(
        value
            .get("typed_config")
            .unwrap()
            .get("request_rules")
            .is_none(),
        "request headers are not touched"
    );
    let rules = yaml::list(value, "typed_config.response_rules");
    let mut headers = Vec::new();
    for rule in rules {
        let header = yaml::text(rule, "header");
        headers.push(header.to_owned());
        assert_eq!(
            yaml::node(rule, "remove").as_bool(),
            Some(true),
            "{header}: hidden from clients"
        );
        assert_eq!(
            yaml::text(rule, "on_header_present.metadata_namespace"),
            METADATA_NAMESPACE
        );
        let key = header
            .strip_prefix("x-billing-")
            .expect("x-billing-* header");
        assert_eq!(yaml::text(rule, "on_header_present.key"), key);
        assert_eq!(yaml::text(rule, "on_header_present.type"), "STRING");
    }
    assert_eq!(yaml::set_of(&headers), usage_headers());

    // Exactly the filter that deploy/envoy/envoy.yaml runs (and the
    // integration tests exercise): no drift between the two.
    assert_eq!(
        *value,
        yaml::envoy_config_named(HEADER_TO_METADATA),
        "patch.value must equal the header_to_metadata filter of deploy/envoy/envoy.yaml"
    );
}

// ---------------------------------------------------------------------------
// The EnvoyFilter payload in a real Envoy
// ---------------------------------------------------------------------------

/// A minimal bootstrap whose HTTP filters are `filter` and the router.
fn bootstrap_with_http_filter(filter: &Value) -> String {
    let mut bootstrap: Value = serde_yaml::from_str(
        r#"
admin:
  address:
    socket_address: { address: 127.0.0.1, port_value: 0 }
static_resources:
  listeners:
    - name: validate
      address:
        socket_address: { address: 127.0.0.1, port_value: 0 }
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: validate
                route_config:
                  name: local
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: { prefix: "/" }
                          direct_response: { status: 200 }
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
    )
    .expect("bootstrap template");
    yaml::at_mut(
        &mut bootstrap,
        "static_resources.listeners.0.filter_chains.0.filters.0.typed_config.http_filters",
    )
    .as_sequence_mut()
    .expect("http_filters is a list")
    .insert(0, filter.clone());
    serde_yaml::to_string(&bootstrap).expect("serialize bootstrap")
}

/// `yaml` written to `dir/name` and put to `envoy --mode validate`: whether Envoy
/// accepted it, the file, and what Envoy said when it refused.
fn envoy_validate(
    dir: &crate::support::TestDir,
    name: &str,
    yaml: &str,
) -> (bool, std::path::PathBuf, String) {
    let path = dir.path().join(name);
    std::fs::write(&path, yaml).expect("write bootstrap");
    let verdict = crate::support::envoy::envoy_accepts(&path);
    (verdict.is_ok(), path, verdict.err().unwrap_or_default())
}

#[test]
fn envoyfilter_http_filter_is_accepted_by_real_envoy() {
    let patch = envoyfilter_patch(&istio_docs());
    let filter = yaml::node(&patch, "patch.value");
    let yaml = bootstrap_with_http_filter(filter);
    let dir = crate::support::TestDir::new("istio-envoyfilter");
    let path = dir.path().join("envoyfilter-bootstrap.yaml");
    std::fs::write(&path, &yaml).expect("write bootstrap");
    crate::support::validate_envoy_config(&path);

    // The check has teeth: Envoy validates the filter's typed_config, so a
    // misspelt field in the payload would fail it.
    let mut broken = filter.clone();
    yaml::at_mut(&mut broken, "typed_config")
        .as_mapping_mut()
        .expect("typed_config is a mapping")
        .insert("response_rulez".into(), Value::Sequence(vec![]));
    let (accepted, path, log) = envoy_validate(
        &dir,
        "broken-bootstrap.yaml",
        &bootstrap_with_http_filter(&broken),
    );
    assert!(
        !accepted,
        "envoy accepted an unknown field in {}:\n{log}",
        path.display()
    );
}

// ---------------------------------------------------------------------------
// The policy on keymeter itself
// ---------------------------------------------------------------------------

/// Fields of Istio's `security.istio.io/v1` AuthorizationPolicy (istio/api
/// security/v1beta1/authorization.proto), by message.
const AUTHZ_FIELDS: [(&str, &[&str]); 5] = [
    (
        "spec",
        &[
            "selector",
            "targetRef",
            "targetRefs",
            "rules",
            "action",
            "provider",
        ],
    ),
    ("rule", &["from", "to", "when"]),
    (
        "source",
        &[
            "principals",
            "notPrincipals",
            "requestPrincipals",
            "notRequestPrincipals",
            "namespaces",
            "notNamespaces",
            "ipBlocks",
            "notIpBlocks",
            "remoteIpBlocks",
            "notRemoteIpBlocks",
            "serviceAccounts",
            "notServiceAccounts",
        ],
    ),
    (
        "operation",
        &[
            "hosts",
            "notHosts",
            "ports",
            "notPorts",
            "methods",
            "notMethods",
            "paths",
            "notPaths",
        ],
    ),
    ("from/to", &["source", "operation"]),
];

fn assert_authz_fields(value: &Value, message: &str) {
    let allowed = AUTHZ_FIELDS
        .iter()
        .find(|(m, _)| *m == message)
        .map(|(_, f)| *f)
        .unwrap();
    assert_only_fields(value, allowed, &format!("AuthorizationPolicy {message}"));
}

/// The keymeter pods' labels and container ports in deploy/kubernetes (both
/// workloads have the same pod template; tests/it/deploy_kubernetes.rs checks that).
fn keymeter_pod() -> (Value, Vec<(String, u64)>) {
    let docs = yaml::load_documents(&yaml::repo_file("deploy/kubernetes/statefulset.yaml"));
    let template = yaml::node(&docs[0], "spec.template");
    let labels = yaml::node(template, "metadata.labels").clone();
    let container = yaml::item_named(
        yaml::list(template, "spec.containers"),
        "keymeter",
        "container",
    );
    let ports = yaml::list(container, "ports")
        .iter()
        .map(|p| {
            (
                yaml::text(p, "name").to_owned(),
                yaml::node(p, "containerPort").as_u64().unwrap(),
            )
        })
        .collect();
    (labels, ports)
}

/// What one ALLOW rule lets through: principals, ports, methods, paths.
#[derive(Debug, Default)]
struct Allowed {
    principals: BTreeSet<String>,
    ports: BTreeSet<u64>,
    methods: BTreeSet<String>,
    paths: BTreeSet<String>,
}

/// Whether Istio's path match (exact, `prefix*` or `*suffix`) takes `path`.
fn path_matches(pattern: &str, path: &str) -> bool {
    match (pattern.strip_suffix('*'), pattern.strip_prefix('*')) {
        (Some(prefix), _) => path.starts_with(prefix),
        (_, Some(suffix)) => path.ends_with(suffix),
        _ => pattern == path,
    }
}

/// keymeter's own AuthorizationPolicy (action ALLOW) lets only the paid API's
/// sidecars (and the gateway) call the Check and the access-log stream on the gRPC
/// port, only the billing jobs call the Report API on its own port (`listen.report`),
/// and nobody else anything on either; the admin port serves GETs of its routes. It selects keymeter's pods as labelled in
/// deploy/kubernetes, in the namespace of the providers' host, on keymeter's ports,
/// with the gRPC paths of the services keymeter implements.
#[test]
fn keymeter_lets_in_only_the_paid_apis_sidecars_and_report_jobs() {
    use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server;
    use envoy_types::pb::envoy::service::auth::v3::authorization_server;
    use keymeter::proto::v1::usage_server;

    let docs = istio_docs();
    let doc = policy_with_action(&docs, "ALLOW");
    let policy = &doc.value;
    assert_eq!(yaml::text(policy, "apiVersion"), "security.istio.io/v1");
    let spec = yaml::node(policy, "spec");
    assert_authz_fields(spec, "spec");

    // Where: keymeter's namespace (the providers' host) and pods (deploy/kubernetes).
    let mesh = mesh_config(&docs);
    let (_, grpc_provider) = provider(&mesh, EXT_AUTHZ_PROVIDER);
    let host = yaml::text(&grpc_provider, "service");
    let namespace = host
        .split('.')
        .nth(1)
        .expect("<service>.<namespace>.svc...");
    assert_eq!(yaml::text(policy, "metadata.namespace"), namespace);
    let (pod_labels, container_ports) = keymeter_pod();
    let selector = yaml::node(spec, "selector.matchLabels")
        .as_mapping()
        .unwrap();
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(
            pod_labels.get(key),
            Some(value),
            "the selector {key:?} matches deploy/kubernetes' keymeter pods"
        );
    }
    let port = |name: &str| {
        container_ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .unwrap()
    };
    let (grpc, admin, report_port) = (port("grpc"), port("admin"), port("report"));
    assert_eq!(grpc, KEYMETER_GRPC_PORT);
    assert_eq!(report_port, KEYMETER_REPORT_PORT);
    assert_eq!(yaml::node(&grpc_provider, "port").as_u64(), Some(grpc));

    // What: each rule, flattened.
    let mut rules = Vec::new();
    for rule in yaml::list(spec, "rules") {
        assert_authz_fields(rule, "rule");
        assert!(rule.get("when").is_none(), "no conditions");
        let mut allowed = Allowed::default();
        if let Some(from) = rule.get("from") {
            for f in from.as_sequence().unwrap() {
                assert_authz_fields(f, "from/to");
                let source = yaml::node(f, "source");
                assert_authz_fields(source, "source");
                assert_eq!(
                    yaml::field_names(source),
                    ["principals"],
                    "callers are named by mTLS identity"
                );
                allowed.principals.extend(yaml::texts(source, "principals"));
            }
        }
        for t in yaml::list(rule, "to") {
            assert_authz_fields(t, "from/to");
            let operation = yaml::node(t, "operation");
            assert_authz_fields(operation, "operation");
            let ports = yaml::texts(operation, "ports");
            allowed
                .ports
                .extend(ports.iter().map(|p| p.parse::<u64>().unwrap()));
            allowed.methods.extend(yaml::texts(operation, "methods"));
            allowed.paths.extend(yaml::texts(operation, "paths"));
        }
        assert!(!allowed.ports.is_empty(), "every rule names its port");
        rules.push(allowed);
    }

    let check = format!("/{}/Check", authorization_server::SERVICE_NAME);
    let access_log = format!(
        "/{}/StreamAccessLogs",
        access_log_service_server::SERVICE_NAME
    );
    let report = format!("/{}/Report", usage_server::SERVICE_NAME);
    let takes = |rule: &Allowed, path: &str| rule.paths.iter().any(|p| path_matches(p, path));
    let custom = &policy_with_action(&docs, "CUSTOM").value;
    let paid_api_namespace = yaml::text(custom, "metadata.namespace");
    for rule in &rules {
        if rule.ports.contains(&grpc) || rule.ports.contains(&report_port) {
            assert!(
                !rule.principals.is_empty(),
                "the gRPC ports only for named identities: {rule:?}"
            );
            assert_eq!(rule.methods, ["POST".to_string()].into(), "gRPC is POST");
            assert!(!rule.paths.is_empty(), "gRPC rules name their methods");
            assert!(
                !(takes(rule, &report) && (takes(rule, &check) || takes(rule, &access_log))),
                "one rule for Envoy, another for the Report API: {rule:?}"
            );
            assert_eq!(rule.ports.len(), 1, "one gRPC port per rule: {rule:?}");
        } else {
            assert_eq!(
                rule.ports,
                [admin].into(),
                "only the gRPC, Report API and admin ports"
            );
            assert_eq!(rule.methods, ["GET".to_string()].into());
        }
    }
    let envoy: Vec<&Allowed> = rules.iter().filter(|r| takes(r, &check)).collect();
    assert_eq!(envoy.len(), 1, "one rule admits the Check");
    assert!(
        takes(envoy[0], &access_log),
        "the same callers stream the access log"
    );
    assert_eq!(envoy[0].paths, [check.clone(), access_log.clone()].into());
    assert_eq!(
        envoy[0].ports,
        [grpc].into(),
        "Envoy's services on the gRPC port (listen.grpc)"
    );
    assert!(
        envoy[0]
            .principals
            .iter()
            .any(|p| p.starts_with(&format!("cluster.local/ns/{paid_api_namespace}/sa/"))),
        "the paid API's sidecars ({paid_api_namespace}, authorization-policy.yaml) may Check: {:?}",
        envoy[0].principals
    );
    let jobs: Vec<&Allowed> = rules.iter().filter(|r| takes(r, &report)).collect();
    assert_eq!(jobs.len(), 1, "one rule admits the Report API");
    assert_eq!(
        jobs[0].paths,
        [format!("/{}/*", usage_server::SERVICE_NAME)].into(),
        "the Report API's service and nothing else"
    );
    assert_eq!(
        jobs[0].ports,
        [report_port].into(),
        "the Report API on its own port (listen.report), where nothing of Envoy's is served"
    );
    assert!(
        jobs[0].principals.is_disjoint(&envoy[0].principals),
        "Envoy's identities do not get the Report API"
    );

    // The admin routes are the probes' and the scrape's paths.
    let admin_rules: Vec<&Allowed> = rules.iter().filter(|r| r.ports.contains(&admin)).collect();
    assert_eq!(admin_rules.len(), 1);
    let statefulset = yaml::load_documents(&yaml::repo_file("deploy/kubernetes/statefulset.yaml"));
    let template = yaml::node(&statefulset[0], "spec.template");
    let container = &yaml::list(template, "spec.containers")[0];
    let mut routes: BTreeSet<String> = ["livenessProbe", "readinessProbe", "startupProbe"]
        .iter()
        .filter_map(|p| container.get(*p))
        .map(|p| yaml::text(p, "httpGet.path").to_owned())
        .collect();
    let scrape = yaml::node(template, "metadata.annotations")
        .get("prometheus.io/path")
        .and_then(Value::as_str)
        .expect("the prometheus.io/path annotation");
    routes.insert(scrape.to_owned());
    assert_eq!(admin_rules[0].paths, routes);
    let readme = yaml::repo_text("deploy/istio/README.md");
    assert!(readme.contains(&doc.file), "README.md lists {}", doc.file);
}

// ---------------------------------------------------------------------------
// The ingress gateway as the edge
// ---------------------------------------------------------------------------

/// Fields of Istio's `networking.istio.io/v1alpha3` EnvoyFilter (istio/api
/// networking/v1alpha3/envoy_filter.proto), by message. An EnvoyFilter with a
/// misplaced field is accepted and the field ignored.
const ENVOY_FILTER_FIELDS: [(&str, &[&str]); 9] = [
    (
        "spec",
        &[
            "workloadSelector",
            "targetRefs",
            "configPatches",
            "priority",
        ],
    ),
    ("workloadSelector", &["labels"]),
    ("configPatch", &["applyTo", "match", "patch"]),
    (
        "match",
        &[
            "context",
            "proxy",
            "listener",
            "routeConfiguration",
            "cluster",
        ],
    ),
    (
        "listener",
        &[
            "portNumber",
            "portName",
            "filterChain",
            "listenerFilter",
            "name",
        ],
    ),
    (
        "filterChain",
        &[
            "name",
            "sni",
            "transportProtocol",
            "applicationProtocols",
            "filter",
            "destinationPort",
        ],
    ),
    ("filter", &["name", "subFilter"]),
    ("subFilter", &["name"]),
    ("patch", &["operation", "value", "filterClass"]),
];

/// Every field of an EnvoyFilter's spec down to the patch value that Istio's API
/// does not have.
fn envoy_filter_problems(filter: &Value) -> Vec<String> {
    fn check(value: &Value, message: &str, at: &str, problems: &mut Vec<String>) {
        let allowed = ENVOY_FILTER_FIELDS
            .iter()
            .find(|(m, _)| *m == message)
            .map(|(_, f)| *f)
            .unwrap();
        for key in yaml::field_names(value) {
            if !allowed.contains(&key.as_str()) {
                problems.push(format!("{at}.{key}"));
            }
        }
    }
    let mut problems = Vec::new();
    let spec = yaml::node(filter, "spec");
    check(spec, "spec", "spec", &mut problems);
    if let Some(selector) = spec.get("workloadSelector") {
        check(
            selector,
            "workloadSelector",
            "spec.workloadSelector",
            &mut problems,
        );
    }
    for (i, patch) in yaml::list(spec, "configPatches").iter().enumerate() {
        let base = format!("spec.configPatches.{i}");
        check(patch, "configPatch", &base, &mut problems);
        if let Some(m) = patch.get("match") {
            check(m, "match", &format!("{base}.match"), &mut problems);
            if let Some(listener) = m.get("listener") {
                let here = format!("{base}.match.listener");
                check(listener, "listener", &here, &mut problems);
                if let Some(chain) = listener.get("filterChain") {
                    check(
                        chain,
                        "filterChain",
                        &format!("{here}.filterChain"),
                        &mut problems,
                    );
                    if let Some(f) = chain.get("filter") {
                        let here = format!("{here}.filterChain.filter");
                        check(f, "filter", &here, &mut problems);
                        if let Some(sub) = f.get("subFilter") {
                            check(
                                sub,
                                "subFilter",
                                &format!("{here}.subFilter"),
                                &mut problems,
                            );
                        }
                    }
                }
            }
        }
        check(
            yaml::node(patch, "patch"),
            "patch",
            &format!("{base}.patch"),
            &mut problems,
        );
    }
    problems
}

#[test]
fn every_envoy_filter_field_exists_in_istios_api() {
    let docs = istio_docs();
    for doc in docs.iter().filter(|d| d.kind() == "EnvoyFilter") {
        let problems = envoy_filter_problems(&doc.value);
        assert!(
            problems.is_empty(),
            "{}: Istio has no field {problems:?}",
            doc.file
        );
    }
    // The check has teeth.
    let mut broken = yaml::one_named(&docs, "EnvoyFilter", GATEWAY_EDGE_FILTER)
        .value
        .clone();
    yaml::at_mut(&mut broken, "spec.configPatches.0.match")
        .as_mapping_mut()
        .unwrap()
        .insert("gateway".into(), Value::Bool(true));
    assert_eq!(
        envoy_filter_problems(&broken),
        ["spec.configPatches.0.match.gateway".to_string()]
    );
}

/// The HTTP connection manager of deploy/envoy/envoy.yaml.
fn envoy_deploy_hcm() -> Value {
    yaml::node(
        &yaml::envoy_config_named("envoy.filters.network.http_connection_manager"),
        "typed_config",
    )
    .clone()
}

/// The gateway EnvoyFilter's one patch.
fn gateway_edge_patch(docs: &[Manifest]) -> Value {
    let filter = &yaml::one_named(docs, "EnvoyFilter", GATEWAY_EDGE_FILTER).value;
    let patches = yaml::list(filter, "spec.configPatches");
    assert_eq!(patches.len(), 1, "one patch: the gateway's HCM");
    patches[0].clone()
}

/// The ingress gateway is configured as the edge that deploy/envoy/envoy.yaml is:
/// the same use_remote_address, internal_address_config and
/// headers_with_underscores_action, merged into the gateway's HTTP connection
/// manager; the trusted X-Forwarded-For hops come from the mesh config's
/// gatewayTopology (Istio writes xff_num_trusted_hops from it, so the patch must
/// not); and the gateway keeps x-envoy-external-address, which keymeter's guard
/// counts one hop later.
#[test]
fn the_ingress_gateway_is_the_edge_that_the_envoy_config_is() {
    let docs = istio_docs();
    let filter = yaml::one_named(&docs, "EnvoyFilter", GATEWAY_EDGE_FILTER);
    let patch = gateway_edge_patch(&docs);
    assert_eq!(yaml::text(&patch, "applyTo"), "NETWORK_FILTER");
    assert_eq!(yaml::text(&patch, "match.context"), "GATEWAY");
    assert_eq!(
        yaml::text(&patch, "match.listener.filterChain.filter.name"),
        "envoy.filters.network.http_connection_manager"
    );
    assert_eq!(yaml::text(&patch, "patch.operation"), "MERGE");
    let typed = yaml::node(&patch, "patch.value.typed_config");
    let hcm = envoy_deploy_hcm();
    assert_eq!(yaml::text(typed, "@type"), yaml::text(&hcm, "@type"));
    for field in [
        "use_remote_address",
        "internal_address_config",
        "common_http_protocol_options",
    ] {
        let ours = yaml::node(typed, field);
        let theirs = yaml::node(&hcm, field);
        if field == "common_http_protocol_options" {
            assert_eq!(
                yaml::node(ours, "headers_with_underscores_action"),
                yaml::node(theirs, "headers_with_underscores_action"),
                "headers_with_underscores_action as in envoy.yaml"
            );
        } else {
            assert_eq!(ours, theirs, "{field} as in envoy.yaml");
        }
    }
    assert_eq!(
        yaml::text(
            typed,
            "common_http_protocol_options.headers_with_underscores_action"
        ),
        "REJECT_REQUEST"
    );
    assert_eq!(
        yaml::node(typed, "use_remote_address").as_bool(),
        Some(true)
    );
    assert!(
        typed.get("xff_num_trusted_hops").is_none(),
        "Istio sets xff_num_trusted_hops from gatewayTopology.numTrustedProxies"
    );
    assert!(
        typed.get("http_filters").is_none() && typed.get("route_config").is_none(),
        "the patch touches the connection manager's edge settings only"
    );
    let mesh = mesh_config(&docs);
    assert_eq!(
        yaml::node(&mesh, "defaultConfig.gatewayTopology.numTrustedProxies").as_u64(),
        yaml::node(&hcm, "xff_num_trusted_hops").as_u64(),
        "numTrustedProxies is envoy.yaml's xff_num_trusted_hops"
    );
    // Nothing in deploy/istio removes x-envoy-* headers at the gateway.
    for doc in docs.iter().filter(|d| d.kind() == "EnvoyFilter") {
        let text = serde_yaml::to_string(&doc.value).unwrap();
        assert!(
            !text.contains("header_mutation") && !text.contains("x-envoy-"),
            "{}: x-envoy-external-address must reach the sidecar's Check",
            doc.file
        );
    }
    // The gateway the filter selects is the one keymeter's own policy admits.
    let keymeter_policy = &policy_with_action(&docs, "ALLOW").value;
    let namespace = yaml::text(&filter.value, "metadata.namespace");
    assert!(
        yaml::texts(keymeter_policy, "spec.rules.0.from.0.source.principals")
            .iter()
            .any(|p| p.starts_with(&format!("cluster.local/ns/{namespace}/sa/"))),
        "keymeter-authorization-policy.yaml admits the gateway in {namespace}"
    );
    let readme = yaml::repo_text("deploy/istio/README.md");
    assert!(
        readme.contains(&filter.file),
        "README.md lists {}",
        filter.file
    );
}

/// Recursively merges `patch` into `base` as Istio's MERGE does for maps
/// (lists and scalars are replaced).
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Mapping(base), Value::Mapping(patch)) => {
            for (key, value) in patch {
                match base.get_mut(key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (base, patch) => *base = patch.clone(),
    }
}

/// A bootstrap whose connection manager is the minimal one of
/// `bootstrap_with_http_filter` with `typed_config` merged in.
fn bootstrap_with_hcm_patch(typed_config: &Value) -> String {
    let router = serde_yaml::from_str::<Value>(
        r#"
name: envoy.filters.http.router
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
    )
    .unwrap();
    // A bootstrap with the router only: remove the filter under test again.
    let mut bootstrap: Value =
        serde_yaml::from_str(&bootstrap_with_http_filter(&router)).expect("bootstrap");
    let filters = yaml::at_mut(
        &mut bootstrap,
        "static_resources.listeners.0.filter_chains.0.filters.0.typed_config.http_filters",
    );
    *filters = Value::Sequence(vec![router]);
    let hcm = yaml::at_mut(
        &mut bootstrap,
        "static_resources.listeners.0.filter_chains.0.filters.0.typed_config",
    );
    merge(hcm, typed_config);
    serde_yaml::to_string(&bootstrap).expect("serialize bootstrap")
}

#[test]
fn the_gateway_edge_patch_is_accepted_by_real_envoy() {
    let patch = gateway_edge_patch(&istio_docs());
    let typed = yaml::node(&patch, "patch.value.typed_config");
    let dir = crate::support::TestDir::new("istio-gateway-edge");
    let (accepted, path, log) = envoy_validate(
        &dir,
        "gateway-edge-bootstrap.yaml",
        &bootstrap_with_hcm_patch(typed),
    );
    assert!(accepted, "envoy rejected {}:\n{log}", path.display());
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("REJECT_REQUEST") && text.contains("internal_address_config"));

    // The check has teeth: a misspelt field, or a value Envoy's enum does not
    // have, is refused.
    for (field, value) in [
        ("headers_with_underscore_action", "REJECT_REQUEST"),
        ("headers_with_underscores_action", "REFUSE"),
    ] {
        let mut broken = typed.clone();
        yaml::at_mut(&mut broken, "common_http_protocol_options")
            .as_mapping_mut()
            .unwrap()
            .insert(field.into(), value.into());
        let (accepted, path, log) = envoy_validate(
            &dir,
            "broken-gateway-bootstrap.yaml",
            &bootstrap_with_hcm_patch(&broken),
        );
        assert!(
            !accepted,
            "envoy accepted {field}: {value} in {}:\n{log}",
            path.display()
        );
    }
}
