//! deploy/envoy-gateway/ checked without a cluster: every YAML document is parsed
//! and every field is checked against the Envoy Gateway and Gateway API schemas
//! (the allow-lists below), what must match deploy/envoy/envoy.yaml (the config
//! the integration tests run against a real Envoy) is compared with it, the
//! references between the manifests and to deploy/kubernetes resolve, and the
//! EnvoyPatchPolicy is applied to listeners in the shape Envoy Gateway generates
//! and the result loaded by a real Envoy (`--mode validate`).

use std::collections::BTreeSet;

use crate::support::yaml::{self, DurationSyntax, Manifest, set_of as set};
use keymeter::config::{CheckConfig, InvalidKeyLimit, UsageConfig, UsageHeaders};
use serde_yaml::Value;

const DIR: &str = "deploy/envoy-gateway";
/// Where deploy/kubernetes installs keymeter (its kustomization's `namespace:`)
/// and its ClusterIP Service.
const KEYMETER_NAMESPACE: &str = "billing";
const KEYMETER_SERVICE_FILE: &str = "deploy/kubernetes/service.yaml";
const HEADER_TO_METADATA: &str = "envoy.filters.http.header_to_metadata";
const HCM: &str = "envoy.filters.network.http_connection_manager";
const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// Files of the folder that `kustomization.yaml` leaves out, on purpose.
const NOT_IN_KUSTOMIZATION: [&str; 2] =
    ["kustomization.yaml", "backendtrafficpolicy-ratelimit.yaml"];

// ---------------------------------------------------------------------------
// The API: which fields each object may have
// ---------------------------------------------------------------------------
//
// Checked against Envoy Gateway v1.9, in envoyproxy/gateway: the API reference
// site/content/en/latest/api/extension_types.md and
// api/v1alpha1/clienttrafficpolicy_types.go at 00597d42a00f (v1.9 development:
// ListenerSet targets, no `directSourceIP` yet),
// api/v1alpha1/envoyproxy_accesslogging_types.go at 207b78db97c9, the
// EnvoyPatchPolicy CRD charts/gateway-crds-helm/templates/generated/
// gateway.envoyproxy.io_envoypatchpolicies.yaml at 00736c97c63b, and
// release-notes/v1.8.0.yaml, v1.9.0.yaml and v1.9.3.yaml for the fields added
// since (`csrf`, `mergeBackends`, `headers.host`, the `Week` unit). Gateway API
// v1.5/v1.6 (standard channel) for Gateway, HTTPRoute and ReferenceGrant. Only
// the objects these manifests use are listed, each with all of its fields in
// that version, so a field newly used here must be looked up and added.
//
// Why it matters: `kubectl apply` refuses a field the schema does not have, or
// (with validation off, or through some GitOps tools) the API server drops it
// without a word: a misspelt `statusOnError` would leave Envoy Gateway's 403,
// a timeout placed one level off (`grpc.timeout`) its 10 s.
//
// Not used: the npm package @kubernetes-models/envoy-gateway (2.0.0). Its
// validators accept unknown fields and lag behind v1.9 (no
// `clientIPDetection.directSourceIP`), so they would not catch a misspelt field.

/// Fields of an object that may hold anything (labels, Envoy's own config).
const ANY: &str = "*";
const ROOT: &str = "apiVersion kind metadata spec";
const METADATA: &str = "name namespace labels annotations";
/// Gateway API LocalPolicyTargetReferenceWithSectionName.
const TARGET_REF: &str = "group kind name sectionName";
/// Envoy Gateway BackendRef (Gateway API BackendObjectReference + weight, fallback).
const BACKEND_REF: &str = "group kind name namespace port weight fallback";
/// Envoy Gateway ClusterSettings (`backendSettings`).
const CLUSTER_SETTINGS: &str = "loadBalancer retry proxyProtocol tcpKeepalive healthCheck circuitBreaker timeout connection dns http2";

/// One kind, with the fields of each of its objects.
struct ApiKind {
    api_versions: &'static [&'static str],
    kind: &'static str,
    /// `(path of an object, its fields separated by spaces)`; list items are
    /// `[]`, the root is `""`.
    objects: &'static [(&'static str, &'static str)],
    /// `(path of a string, its allowed values separated by spaces)`.
    enums: &'static [(&'static str, &'static str)],
}

const EG: &[&str] = &["gateway.envoyproxy.io/v1alpha1"];
const GATEWAY_API: &[&str] = &["gateway.networking.k8s.io/v1"];

const API: &[ApiKind] = &[
    ApiKind {
        api_versions: EG,
        kind: "SecurityPolicy",
        objects: &[
            (
                "spec",
                "targetRef targetRefs targetSelectors mergeType apiKeyAuth cors basicAuth jwt oidc extAuth authorization csrf",
            ),
            ("spec.targetRefs[]", TARGET_REF),
            (
                "spec.extAuth",
                "grpc http headersToExtAuth bodyToExtAuth timeout failOpen recomputeRoute includeRouteMetadata contextExtensions statusOnError",
            ),
            (
                "spec.extAuth.grpc",
                "backendRef backendRefs backendSettings",
            ),
            ("spec.extAuth.grpc.backendRefs[]", BACKEND_REF),
            ("spec.extAuth.grpc.backendSettings", CLUSTER_SETTINGS),
            (
                "spec.extAuth.grpc.backendSettings.healthCheck",
                "active passive panicThreshold",
            ),
            (
                "spec.extAuth.grpc.backendSettings.healthCheck.active",
                "timeout interval initialJitter unhealthyThreshold healthyThreshold type http tcp grpc overrides",
            ),
            (
                "spec.extAuth.grpc.backendSettings.healthCheck.active.grpc",
                "service",
            ),
        ],
        enums: &[(
            "spec.extAuth.grpc.backendSettings.healthCheck.active.type",
            "HTTP TCP GRPC",
        )],
    },
    ApiKind {
        api_versions: EG,
        kind: "EnvoyProxy",
        objects: &[
            (
                "spec",
                "provider logging telemetry bootstrap concurrency routingType extraArgs mergeGateways mergeBackends shutdown filterOrder backendTLS ipFamily preserveRouteOrder luaValidation dynamicModules geoIP mergeType",
            ),
            ("spec.telemetry", "accessLog tracing metrics requestID"),
            ("spec.telemetry.accessLog", "disable settings"),
            (
                "spec.telemetry.accessLog.settings[]",
                "format matches sinks type",
            ),
            (
                "spec.telemetry.accessLog.settings[].sinks[]",
                "type als file openTelemetry",
            ),
            (
                "spec.telemetry.accessLog.settings[].sinks[].als",
                "backendRef backendRefs backendSettings logName type http",
            ),
            (
                "spec.telemetry.accessLog.settings[].sinks[].als.backendRefs[]",
                BACKEND_REF,
            ),
            (
                "spec.telemetry.accessLog.settings[].sinks[].als.http",
                "requestHeaders responseHeaders responseTrailers",
            ),
        ],
        enums: &[
            (
                "spec.telemetry.accessLog.settings[].type",
                "Listener Route Upstream",
            ),
            (
                "spec.telemetry.accessLog.settings[].sinks[].type",
                "ALS File OpenTelemetry",
            ),
            (
                "spec.telemetry.accessLog.settings[].sinks[].als.type",
                "HTTP TCP",
            ),
        ],
    },
    ApiKind {
        api_versions: EG,
        kind: "EnvoyPatchPolicy",
        objects: &[
            ("spec", "type jsonPatches targetRef targetRefs priority"),
            ("spec.targetRef", "group kind name"),
            ("spec.targetRefs[]", "group kind name"),
            ("spec.jsonPatches[]", "type name operation"),
            (
                "spec.jsonPatches[].operation",
                "op path jsonPath from value",
            ),
            // Envoy's own config: checked by a real Envoy below.
            ("spec.jsonPatches[].operation.value", ANY),
        ],
        enums: &[
            ("spec.type", "JSONPatch"),
            (
                "spec.jsonPatches[].type",
                "type.googleapis.com/envoy.config.listener.v3.Listener type.googleapis.com/envoy.config.route.v3.RouteConfiguration type.googleapis.com/envoy.config.cluster.v3.Cluster type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            ),
            (
                "spec.jsonPatches[].operation.op",
                "add remove replace move copy test",
            ),
        ],
    },
    ApiKind {
        api_versions: EG,
        kind: "ClientTrafficPolicy",
        objects: &[
            (
                "spec",
                "targetRef targetRefs targetSelectors tcpKeepalive enableProxyProtocol proxyProtocol clientIPDetection tls path headers timeout connection http1 http2 http3 grpc healthCheck scheme",
            ),
            ("spec.targetRefs[]", TARGET_REF),
            (
                "spec.headers",
                "enableEnvoyHeaders disableRateLimitHeaders xForwardedClientCert withUnderscoresAction preserveXRequestID requestID earlyRequestHeaders lateResponseHeaders host",
            ),
            (
                "spec.headers.earlyRequestHeaders",
                "set add addIfAbsent remove removeOnMatch",
            ),
            (
                "spec.headers.earlyRequestHeaders.removeOnMatch[]",
                "type value",
            ),
            (
                "spec.http1",
                "enableTrailers preserveHeaderCase http10 disableSafeMaxConnectionDuration ignoredUpgradeTypes",
            ),
        ],
        enums: &[
            (
                "spec.headers.withUnderscoresAction",
                "Allow RejectRequest DropHeader",
            ),
            (
                "spec.headers.requestID",
                "PreserveOrGenerate Preserve Generate Disable",
            ),
            (
                "spec.headers.earlyRequestHeaders.removeOnMatch[].type",
                "Exact Prefix Suffix RegularExpression",
            ),
        ],
    },
    ApiKind {
        api_versions: EG,
        kind: "BackendTrafficPolicy",
        objects: &[
            (
                "spec",
                "targetRef targetRefs targetSelectors loadBalancer retry proxyProtocol tcpKeepalive healthCheck circuitBreaker timeout connection dns http2 mergeType rateLimit bandwidthLimit faultInjection admissionControl useClientProtocol compression compressor responseOverride httpUpgrade requestBuffer telemetry routingType",
            ),
            ("spec.targetRefs[]", TARGET_REF),
            ("spec.rateLimit", "type global local"),
            ("spec.rateLimit.global", "rules"),
            (
                "spec.rateLimit.global.rules[]",
                "clientSelectors limit cost shared shadowMode xRateLimitHeaders",
            ),
            (
                "spec.rateLimit.global.rules[].clientSelectors[]",
                "headers methods path sourceCIDR queryParams",
            ),
            (
                "spec.rateLimit.global.rules[].clientSelectors[].headers[]",
                "type name value invert",
            ),
            (
                "spec.rateLimit.global.rules[].limit",
                "requests unit fromMetadata",
            ),
        ],
        enums: &[
            ("spec.rateLimit.type", "Global Local"),
            (
                "spec.rateLimit.global.rules[].clientSelectors[].headers[].type",
                "Exact RegularExpression Distinct",
            ),
            (
                "spec.rateLimit.global.rules[].limit.unit",
                "Second Minute Hour Day Week Month Year",
            ),
        ],
    },
    ApiKind {
        api_versions: GATEWAY_API,
        kind: "Gateway",
        objects: &[
            (
                "spec",
                "gatewayClassName listeners addresses infrastructure allowedListeners tls",
            ),
            ("spec.infrastructure", "labels annotations parametersRef"),
            ("spec.infrastructure.parametersRef", "group kind name"),
            (
                "spec.listeners[]",
                "name hostname port protocol tls allowedRoutes",
            ),
            ("spec.listeners[].tls", "mode certificateRefs options"),
            (
                "spec.listeners[].tls.certificateRefs[]",
                "group kind name namespace",
            ),
            ("spec.listeners[].allowedRoutes", "namespaces kinds"),
            ("spec.listeners[].allowedRoutes.namespaces", "from selector"),
        ],
        enums: &[
            ("spec.listeners[].protocol", "HTTP HTTPS TLS TCP UDP"),
            ("spec.listeners[].tls.mode", "Terminate Passthrough"),
            (
                "spec.listeners[].allowedRoutes.namespaces.from",
                "All Same Selector",
            ),
        ],
    },
    ApiKind {
        api_versions: GATEWAY_API,
        kind: "HTTPRoute",
        objects: &[
            ("spec", "parentRefs hostnames rules"),
            (
                "spec.parentRefs[]",
                "group kind namespace name sectionName port",
            ),
            (
                "spec.rules[]",
                "name matches filters backendRefs timeouts retry sessionPersistence",
            ),
            ("spec.rules[].matches[]", "path headers queryParams method"),
            ("spec.rules[].matches[].path", "type value"),
            (
                "spec.rules[].filters[]",
                "type requestHeaderModifier responseHeaderModifier requestMirror requestRedirect urlRewrite extensionRef",
            ),
            (
                "spec.rules[].filters[].requestHeaderModifier",
                "set add remove",
            ),
            (
                "spec.rules[].filters[].requestHeaderModifier.set[]",
                "name value",
            ),
            (
                "spec.rules[].backendRefs[]",
                "group kind name namespace port weight filters",
            ),
        ],
        enums: &[
            (
                "spec.rules[].matches[].path.type",
                "Exact PathPrefix RegularExpression",
            ),
            (
                "spec.rules[].filters[].type",
                "RequestHeaderModifier ResponseHeaderModifier RequestMirror RequestRedirect URLRewrite ExtensionRef",
            ),
        ],
    },
    ApiKind {
        // v1beta1 is served by every Gateway API release since v0.6; v1 by the
        // newer CRDs that Envoy Gateway v1.9 requires.
        api_versions: &[
            "gateway.networking.k8s.io/v1beta1",
            "gateway.networking.k8s.io/v1",
        ],
        kind: "ReferenceGrant",
        objects: &[
            ("spec", "from to"),
            ("spec.from[]", "group kind namespace"),
            ("spec.to[]", "group kind name"),
        ],
        enums: &[],
    },
];

impl ApiKind {
    fn of(manifest: &Manifest) -> &'static ApiKind {
        let api_version = yaml::text(&manifest.value, "apiVersion");
        API.iter()
            .find(|k| k.kind == manifest.kind() && k.api_versions.contains(&api_version))
            .unwrap_or_else(|| {
                panic!(
                    "{}: {api_version} {} is not one of the kinds this folder uses",
                    manifest.file,
                    manifest.kind()
                )
            })
    }

    /// The fields of the object at `path`, or `None` if the API has no object there.
    fn fields_at(&self, path: &str) -> Option<Vec<&'static str>> {
        let fields = match path {
            "" => ROOT,
            "metadata" => METADATA,
            "metadata.labels" | "metadata.annotations" => ANY,
            _ => self.objects.iter().find(|(object, _)| *object == path)?.1,
        };
        Some(fields.split_whitespace().collect())
    }

    /// Every field of `document` that this kind does not have, every object the
    /// schema has none at, and every enumerated value it does not allow.
    fn problems(&self, document: &Value) -> Vec<String> {
        let mut problems = Vec::new();
        self.walk("", document, &mut problems);
        problems
    }

    fn walk(&self, path: &str, value: &Value, problems: &mut Vec<String>) {
        match value {
            Value::Mapping(map) => {
                let Some(fields) = self.fields_at(path) else {
                    problems.push(format!(
                        "{}: `{path}` is not an object in the API (a field one level off?)",
                        self.kind
                    ));
                    return;
                };
                if fields == [ANY] {
                    return;
                }
                for (key, child) in map {
                    let key = key.as_str().unwrap_or("<non-string key>");
                    if !fields.contains(&key) {
                        problems.push(format!(
                            "{}: `{}` has no field `{key}` (it has {fields:?})",
                            self.kind,
                            if path.is_empty() { "<root>" } else { path }
                        ));
                        continue;
                    }
                    let child_path = if path.is_empty() {
                        key.to_owned()
                    } else {
                        format!("{path}.{key}")
                    };
                    self.walk(&child_path, child, problems);
                }
            }
            Value::Sequence(items) => {
                let item_path = format!("{path}[]");
                for item in items {
                    self.walk(&item_path, item, problems);
                }
            }
            Value::String(text) => {
                if let Some((_, allowed)) = self.enums.iter().find(|(p, _)| *p == path)
                    && !allowed.split_whitespace().any(|value| value == text)
                {
                    problems.push(format!(
                        "{}: `{path}` is {text:?}, the API allows {allowed:?}",
                        self.kind
                    ));
                }
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

/// The Kubernetes objects of the folder (kustomization.yaml aside).
fn manifests() -> Vec<Manifest> {
    yaml::load_folder(DIR)
        .into_iter()
        .filter(|m| m.kind() != "Kustomization")
        .collect()
}

/// The backend header contract: keymeter's `usage.headers.*` defaults, each
/// with the `header_to_metadata` key keymeter reads it from.
fn usage_header_keys() -> Vec<(String, &'static str)> {
    let h = UsageHeaders::default();
    vec![
        (h.module, "module"),
        (h.model, "model"),
        (h.usage, "usage"),
        (h.metadata, "metadata"),
        (h.records, "records"),
    ]
}

fn usage_headers() -> BTreeSet<String> {
    usage_header_keys()
        .into_iter()
        .map(|(header, _)| header)
        .collect()
}

// ---------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------

#[test]
fn every_field_exists_in_the_envoy_gateway_api() {
    let manifests = manifests();
    for kind in [
        "Gateway",
        "HTTPRoute",
        "EnvoyProxy",
        "SecurityPolicy",
        "ReferenceGrant",
        "EnvoyPatchPolicy",
        "ClientTrafficPolicy",
        "BackendTrafficPolicy",
    ] {
        yaml::one_of_kind(&manifests, kind);
    }
    let mut problems = Vec::new();
    for manifest in &manifests {
        assert!(!manifest.name().is_empty(), "{}: no name", manifest.file);
        assert!(
            !manifest.namespace().is_empty(),
            "{}: {} without a namespace would land wherever kubectl points",
            manifest.file,
            manifest.kind()
        );
        for problem in ApiKind::of(manifest).problems(&manifest.value) {
            problems.push(format!("{}: {problem}", manifest.file));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

fn ext_auth_of(policy: &mut Value) -> &mut serde_yaml::Mapping {
    policy
        .get_mut("spec")
        .and_then(|s| s.get_mut("extAuth"))
        .and_then(Value::as_mapping_mut)
        .expect("spec.extAuth")
}

#[test]
fn the_field_check_has_teeth() {
    let manifests = manifests();
    let policy = yaml::one_of_kind(&manifests, "SecurityPolicy");
    let kind = ApiKind::of(policy);

    // A misspelt field, which the API server would drop: the 403 default
    // would stay in force.
    let mut misspelt = policy.value.clone();
    ext_auth_of(&mut misspelt).insert("statusOnErorr".into(), 503.into());
    let problems = kind.problems(&misspelt);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].contains("statusOnErorr"), "{problems:?}");

    // The right field one level off: a timeout on the gRPC service object.
    let mut misplaced = policy.value.clone();
    ext_auth_of(&mut misplaced)
        .get_mut("grpc")
        .and_then(Value::as_mapping_mut)
        .unwrap()
        .insert("timeout".into(), "250ms".into());
    let problems = kind.problems(&misplaced);
    assert_eq!(problems.len(), 1, "{problems:?}");

    // An object where the API has a plain value.
    let mut not_an_object = policy.value.clone();
    ext_auth_of(&mut not_an_object).insert(
        "failOpen".into(),
        serde_yaml::from_str("{ enabled: false }").unwrap(),
    );
    let problems = kind.problems(&not_an_object);
    assert_eq!(problems.len(), 1, "{problems:?}");

    // An enumerated value the API does not have.
    let ctp = yaml::one_of_kind(&manifests, "ClientTrafficPolicy");
    let mut wrong_value = ctp.value.clone();
    *wrong_value
        .get_mut("spec")
        .and_then(|s| s.get_mut("headers"))
        .and_then(|h| h.get_mut("withUnderscoresAction"))
        .unwrap() = "RejectRequests".into();
    let problems = ApiKind::of(ctp).problems(&wrong_value);
    assert_eq!(problems.len(), 1, "{problems:?}");
}

#[test]
fn kustomization_applies_every_manifest_but_the_optional_ones() {
    let kustomization =
        yaml::load_documents(&yaml::repo_file(&format!("{DIR}/kustomization.yaml")));
    assert_eq!(kustomization.len(), 1);
    let listed = set(&yaml::texts(&kustomization[0], "resources"));
    assert!(
        yaml::lookup(&kustomization[0], "namespace").is_none(),
        "a kustomize `namespace:` would move the ReferenceGrant out of keymeter's namespace"
    );
    let files: BTreeSet<String> = yaml::yaml_files(DIR)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .filter(|f| !NOT_IN_KUSTOMIZATION.contains(&f.as_str()))
        .collect();
    assert_eq!(listed, files, "kustomization.yaml resources");
}

// ---------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------

/// `(namespace, name)` of the Gateway that every policy must target.
fn gateway(manifests: &[Manifest]) -> (String, String) {
    let gateway = yaml::one_of_kind(manifests, "Gateway");
    (gateway.namespace().to_owned(), gateway.name().to_owned())
}

fn assert_targets_gateway(manifests: &[Manifest], policy: &Manifest, target: &Value) {
    let (namespace, name) = gateway(manifests);
    assert_eq!(
        yaml::text(target, "group"),
        "gateway.networking.k8s.io",
        "{}",
        policy.file
    );
    assert_eq!(yaml::text(target, "kind"), "Gateway", "{}", policy.file);
    assert_eq!(yaml::text(target, "name"), name, "{}", policy.file);
    // A policy attaches only to targets of its own namespace.
    assert_eq!(policy.namespace(), namespace, "{}", policy.file);
}

#[test]
fn every_policy_targets_the_gateway_and_the_gateway_its_envoy_proxy() {
    let manifests = manifests();
    for kind in [
        "SecurityPolicy",
        "ClientTrafficPolicy",
        "BackendTrafficPolicy",
    ] {
        let policy = yaml::one_of_kind(&manifests, kind);
        let targets = yaml::list(&policy.value, "spec.targetRefs");
        assert_eq!(targets.len(), 1, "{kind}: one target");
        assert_targets_gateway(&manifests, policy, &targets[0]);
    }
    let patch = yaml::one_of_kind(&manifests, "EnvoyPatchPolicy");
    assert_targets_gateway(
        &manifests,
        patch,
        yaml::node(&patch.value, "spec.targetRef"),
    );

    let gateway = yaml::one_of_kind(&manifests, "Gateway");
    let proxy = yaml::one_of_kind(&manifests, "EnvoyProxy");
    let parameters = yaml::node(&gateway.value, "spec.infrastructure.parametersRef");
    assert_eq!(yaml::text(parameters, "group"), "gateway.envoyproxy.io");
    assert_eq!(yaml::text(parameters, "kind"), "EnvoyProxy");
    assert_eq!(yaml::text(parameters, "name"), proxy.name());
    assert_eq!(
        proxy.namespace(),
        gateway.namespace(),
        "a Gateway's parametersRef is local"
    );

    let route = yaml::one_of_kind(&manifests, "HTTPRoute");
    assert_eq!(route.namespace(), gateway.namespace());
    let parent = &yaml::list(&route.value, "spec.parentRefs")[0];
    assert_eq!(yaml::text(parent, "name"), gateway.name());
    let listener = yaml::text(parent, "sectionName");
    assert!(
        yaml::list(&gateway.value, "spec.listeners")
            .iter()
            .any(|l| yaml::text(l, "name") == listener),
        "the route's sectionName {listener} is a listener of the Gateway"
    );
}

/// keymeter's Service as deploy/kubernetes defines it: its name and gRPC port.
fn keymeter_service() -> (String, u64) {
    let service = &yaml::load_documents(&yaml::repo_file(KEYMETER_SERVICE_FILE))[0];
    let grpc = yaml::list(service, "spec.ports")
        .iter()
        .find(|p| yaml::text(p, "name") == "grpc")
        .expect("service.yaml has a port named grpc");
    assert_eq!(
        yaml::text(grpc, "appProtocol"),
        "grpc",
        "Envoy Gateway must speak HTTP/2 to keymeter"
    );
    (
        yaml::text(service, "metadata.name").to_owned(),
        yaml::number(grpc, "port"),
    )
}

#[test]
fn references_to_keymeter_resolve_to_its_service_and_are_granted() {
    let manifests = manifests();
    let (service, port) = keymeter_service();
    // The namespace deploy/kubernetes installs keymeter in (its kustomization's
    // `namespace:`; tests/it/deploy_namespaces.rs holds every folder to it).
    let kustomization =
        &yaml::load_documents(&yaml::repo_file("deploy/kubernetes/kustomization.yaml"))[0];
    assert_eq!(
        yaml::text(kustomization, "namespace"),
        KEYMETER_NAMESPACE,
        "deploy/kubernetes installs keymeter in another namespace: update KEYMETER_NAMESPACE and {DIR}"
    );

    let policy = yaml::one_of_kind(&manifests, "SecurityPolicy");
    let proxy = yaml::one_of_kind(&manifests, "EnvoyProxy");
    let references = [
        (
            policy,
            yaml::list(&policy.value, "spec.extAuth.grpc.backendRefs"),
        ),
        (
            proxy,
            yaml::list(
                &proxy.value,
                "spec.telemetry.accessLog.settings.0.sinks.0.als.backendRefs",
            ),
        ),
    ];
    let grant = yaml::one_of_kind(&manifests, "ReferenceGrant");
    assert_eq!(grant.namespace(), KEYMETER_NAMESPACE);
    for (from, refs) in references {
        assert_eq!(refs.len(), 1, "{}: one keymeter Service", from.file);
        let reference = &refs[0];
        assert_eq!(yaml::text(reference, "group"), "");
        assert_eq!(yaml::text(reference, "kind"), "Service");
        assert_eq!(yaml::text(reference, "name"), service);
        assert_eq!(yaml::number(reference, "port"), port);
        assert_eq!(yaml::text(reference, "namespace"), KEYMETER_NAMESPACE);
        // Cross-namespace: keymeter's namespace must grant it.
        let from_granted = yaml::list(&grant.value, "spec.from").iter().any(|f| {
            yaml::text(f, "group") == "gateway.envoyproxy.io"
                && yaml::text(f, "kind") == from.kind()
                && yaml::text(f, "namespace") == from.namespace()
        });
        assert!(from_granted, "ReferenceGrant lacks `from` {}", from.kind());
    }
    let to = yaml::list(&grant.value, "spec.to");
    assert_eq!(to.len(), 1);
    assert_eq!(yaml::text(&to[0], "group"), "");
    assert_eq!(yaml::text(&to[0], "kind"), "Service");
    assert_eq!(yaml::text(&to[0], "name"), service, "grant keymeter only");
}

// ---------------------------------------------------------------------------
// Behaviour compared with deploy/envoy/envoy.yaml
// ---------------------------------------------------------------------------

#[test]
fn ext_auth_fails_closed_with_the_timeout_of_the_envoy_config() {
    let manifests = manifests();
    let ext_auth = yaml::node(
        &yaml::one_of_kind(&manifests, "SecurityPolicy").value,
        "spec.extAuth",
    )
    .clone();
    let envoy = yaml::envoy_config_named("envoy.filters.http.ext_authz");
    let envoy = yaml::node(&envoy, "typed_config");

    // Envoy Gateway's default is 10s: explicit, short, and the same as envoy.yaml.
    let timeout =
        yaml::duration_seconds(yaml::text(&ext_auth, "timeout"), DurationSyntax::GatewayApi);
    assert!(timeout > 0.0 && timeout <= 1.0, "timeout {timeout}s");
    assert_eq!(
        timeout,
        yaml::duration_seconds(
            yaml::text(envoy, "grpc_service.timeout"),
            DurationSyntax::Protobuf
        )
    );
    // Fail closed, written out (the security boundary), like envoy.yaml.
    assert_eq!(yaml::flag(&ext_auth, "failOpen"), Some(false));
    assert_eq!(yaml::flag(envoy, "failure_mode_allow"), Some(false));
    // 503, not Envoy Gateway's default 403 (a blocked key's status).
    assert_eq!(yaml::number(&ext_auth, "statusOnError"), 503);
    assert_eq!(
        yaml::text(envoy, "status_on_error.code"),
        "ServiceUnavailable"
    );
    assert!(ext_auth.get("http").is_none(), "keymeter's Check is gRPC");

    // The Check carries the headers keymeter reads, and only those.
    let check = CheckConfig::default();
    let mut needed: BTreeSet<String> = check.key_headers.iter().cloned().collect();
    needed.insert(InvalidKeyLimit::default().client_address_header);
    assert_eq!(set(&yaml::texts(&ext_auth, "headersToExtAuth")), needed);

    // gRPC health checks like envoy.yaml's keymeter cluster.
    let active = yaml::node(&ext_auth, "grpc.backendSettings.healthCheck.active");
    let keymeter_cluster = yaml::envoy_config_named("keymeter");
    let envoy_check = &yaml::list(&keymeter_cluster, "health_checks")[0];
    assert_eq!(yaml::text(active, "type"), "GRPC");
    assert_eq!(
        yaml::text(active, "grpc.service"),
        yaml::text(envoy_check, "grpc_health_check.service_name")
    );
    for (eg, envoy_field) in [
        ("timeout", "timeout"),
        ("interval", "interval"),
        ("initialJitter", "initial_jitter"),
    ] {
        assert_eq!(
            yaml::duration_seconds(yaml::text(active, eg), DurationSyntax::GatewayApi),
            yaml::duration_seconds(
                yaml::text(envoy_check, envoy_field),
                DurationSyntax::Protobuf
            ),
            "health check {eg}"
        );
    }
    for (eg, envoy_field) in [
        ("unhealthyThreshold", "unhealthy_threshold"),
        ("healthyThreshold", "healthy_threshold"),
    ] {
        assert_eq!(
            yaml::number(active, eg),
            yaml::number(envoy_check, envoy_field),
            "health check {eg}"
        );
    }
}

#[test]
fn the_als_sink_logs_exactly_what_the_envoy_config_logs() {
    let manifests = manifests();
    let proxy = &yaml::one_of_kind(&manifests, "EnvoyProxy").value;
    let settings = yaml::list(proxy, "spec.telemetry.accessLog.settings");
    assert_eq!(settings.len(), 1, "one access-log setting: keymeter's");
    assert_ne!(
        yaml::flag(proxy, "spec.telemetry.accessLog.disable"),
        Some(true)
    );
    let setting = &settings[0];
    assert_eq!(
        yaml::text(setting, "type"),
        "Route",
        "the connection manager's log, one entry per request, as in envoy.yaml"
    );
    assert!(
        setting.get("matches").is_none(),
        "keymeter needs every entry"
    );
    let sinks = yaml::list(setting, "sinks");
    assert_eq!(sinks.len(), 1);
    assert_eq!(yaml::text(&sinks[0], "type"), "ALS");
    let als = yaml::node(&sinks[0], "als");
    assert_eq!(
        yaml::text(als, "type"),
        "HTTP",
        "keymeter implements the HTTP access-log stream"
    );

    let envoy = yaml::envoy_config_named(crate::support::envoy::GRPC_ACCESS_LOGGER);
    let envoy = yaml::node(&envoy, "typed_config");
    assert_eq!(
        yaml::text(als, "logName"),
        yaml::text(envoy, "common_config.log_name")
    );
    for (eg, envoy_field) in [
        ("http.requestHeaders", "additional_request_headers_to_log"),
        ("http.responseHeaders", "additional_response_headers_to_log"),
        (
            "http.responseTrailers",
            "additional_response_trailers_to_log",
        ),
    ] {
        assert_eq!(
            set(&yaml::texts(als, eg)),
            set(&yaml::texts(envoy, envoy_field)),
            "als.{eg} differs from deploy/envoy/envoy.yaml's {envoy_field}"
        );
    }
    // And those are the contract's names and keymeter's key headers.
    assert_eq!(
        set(&yaml::texts(als, "http.responseHeaders")),
        usage_headers()
    );
    assert_eq!(
        set(&yaml::texts(als, "http.responseTrailers")),
        usage_headers()
    );
    let logged = set(&yaml::texts(als, "http.requestHeaders"));
    for header in CheckConfig::default().key_headers {
        assert!(
            logged.contains(&header),
            "the raw key header {header} must be logged"
        );
    }
}

#[test]
fn client_traffic_policy_mirrors_the_edge_settings_of_the_envoy_config() {
    let manifests = manifests();
    let spec = yaml::node(
        &yaml::one_of_kind(&manifests, "ClientTrafficPolicy").value,
        "spec",
    )
    .clone();
    let hcm = yaml::envoy_config_named(HCM);
    let hcm = yaml::node(&hcm, "typed_config");

    // Underscores in header names refused.
    assert_eq!(
        yaml::text(&spec, "headers.withUnderscoresAction"),
        "RejectRequest"
    );
    assert_eq!(
        yaml::text(
            hcm,
            "common_http_protocol_options.headers_with_underscores_action"
        ),
        "REJECT_REQUEST"
    );

    // The client address is the TCP peer: envoy.yaml says so with
    // use_remote_address and no trusted hops; Envoy Gateway does it when
    // clientIPDetection is absent (numTrustedHops: 0 would trust the client's
    // X-Forwarded-For up to v1.9).
    assert_eq!(yaml::flag(hcm, "use_remote_address"), Some(true));
    assert_eq!(yaml::number(hcm, "xff_num_trusted_hops"), 0);
    assert!(
        spec.get("clientIPDetection").is_none(),
        "see the comment in clienttrafficpolicy.yaml"
    );

    // Envoy's own request id, whatever the client sent.
    assert_eq!(yaml::text(&spec, "headers.requestID"), "Generate");
    let early = yaml::node(&spec, "headers.earlyRequestHeaders");
    assert!(yaml::texts(early, "remove").contains(&"x-request-id".to_owned()));

    // No client-sent x-envoy-* header reaches a filter, as envoy.yaml's
    // header_mutation filter ensures.
    let mutation = yaml::envoy_config_named("envoy.filters.http.header_mutation");
    let envoy_prefixes: Vec<&str> =
        yaml::list(&mutation, "typed_config.mutations.request_mutations")
            .iter()
            .map(|m| yaml::text(m, "remove_on_match.key_matcher.prefix"))
            .collect();
    let eg_prefixes: Vec<&str> = yaml::list(early, "removeOnMatch")
        .iter()
        .filter(|m| yaml::text(m, "type") == "Prefix")
        .map(|m| yaml::text(m, "value"))
        .collect();
    assert_eq!(eg_prefixes, envoy_prefixes);

    // Trailers reach HTTP/1.1 clients.
    assert_eq!(yaml::flag(&spec, "http1.enableTrailers"), Some(true));
    assert_eq!(
        yaml::flag(hcm, "http_protocol_options.enable_trailers"),
        Some(true)
    );
}

#[test]
fn the_rate_limit_counts_per_app_id_that_the_check_set() {
    let manifests = manifests();
    let policy = &yaml::one_of_kind(&manifests, "BackendTrafficPolicy").value;
    assert!(
        yaml::lookup(policy, "spec.rateLimit.local").is_none(),
        "a per-app quota holds across Envoy replicas only as a global limit"
    );
    let rules = yaml::list(policy, "spec.rateLimit.global.rules");
    assert_eq!(rules.len(), 1);
    let rule = &rules[0];
    let selectors = yaml::list(rule, "clientSelectors");
    assert_eq!(selectors.len(), 1);
    let headers = yaml::list(&selectors[0], "headers");
    assert_eq!(headers.len(), 1);
    // The header keymeter's Check sets (and overwrites when a client sent it),
    // one bucket per value.
    assert_eq!(
        yaml::text(&headers[0], "name"),
        CheckConfig::default().app_id_header
    );
    assert_eq!(yaml::text(&headers[0], "type"), "Distinct");
    assert!(headers[0].get("value").is_none() && headers[0].get("invert").is_none());
    assert!(yaml::number(rule, "limit.requests") > 0);
    assert_eq!(yaml::flag(rule, "shared"), Some(true));
}

// ---------------------------------------------------------------------------
// The EnvoyPatchPolicy, applied as Envoy Gateway applies it, in a real Envoy
// ---------------------------------------------------------------------------

/// The one JSON patch and the Envoy listener name it patches.
fn usage_header_patch(manifests: &[Manifest]) -> Value {
    let policy = &yaml::one_of_kind(manifests, "EnvoyPatchPolicy").value;
    assert_eq!(yaml::text(policy, "spec.type"), "JSONPatch");
    let patches = yaml::list(policy, "spec.jsonPatches");
    assert_eq!(patches.len(), 1, "one patch: the header_to_metadata filter");
    patches[0].clone()
}

#[test]
fn the_patch_inserts_the_header_to_metadata_filter_of_the_envoy_config() {
    let manifests = manifests();
    let patch = usage_header_patch(&manifests);
    assert_eq!(yaml::text(&patch, "type"), LISTENER_TYPE);
    // Envoy Gateway names the Envoy listener of a Gateway listener
    // <namespace>/<gateway>/<listener>.
    let (namespace, name) = gateway(&manifests);
    let gateway = yaml::one_of_kind(&manifests, "Gateway");
    let listeners: Vec<String> = yaml::list(&gateway.value, "spec.listeners")
        .iter()
        .map(|l| format!("{namespace}/{name}/{}", yaml::text(l, "name")))
        .collect();
    assert!(
        listeners.contains(&yaml::text(&patch, "name").to_owned()),
        "patch target {} is none of the Gateway's listeners {listeners:?}",
        yaml::text(&patch, "name")
    );
    assert_eq!(yaml::text(&patch, "operation.op"), "add");

    // Exactly the filter that deploy/envoy/envoy.yaml runs (and the
    // integration tests exercise): no drift between the two.
    let value = yaml::node(&patch, "operation.value");
    assert_eq!(
        *value,
        yaml::envoy_config_named(HEADER_TO_METADATA),
        "operation.value must equal the header_to_metadata filter of deploy/envoy/envoy.yaml"
    );
    // ...which moves every usage header into keymeter's namespace and hides it.
    let rules = yaml::list(value, "typed_config.response_rules");
    let headers: Vec<String> = rules
        .iter()
        .map(|r| yaml::text(r, "header").to_owned())
        .collect();
    assert_eq!(set(&headers), usage_headers());
    let namespace = UsageConfig::default().metadata_namespace;
    for rule in rules {
        let header = yaml::text(rule, "header");
        let (_, key) = usage_header_keys()
            .into_iter()
            .find(|(name, _)| name == header)
            .unwrap();
        assert_eq!(yaml::flag(rule, "remove"), Some(true), "{header} hidden");
        assert_eq!(
            yaml::text(rule, "on_header_present.metadata_namespace"),
            namespace
        );
        assert_eq!(yaml::text(rule, "on_header_present.key"), key);
    }
}

/// A listener in the shape Envoy Gateway v1.9 generates for a Gateway listener,
/// as an EnvoyPatchPolicy sees it (protobuf field names, `@type` for Any):
/// HTTPS gets one filter chain per host name, HTTP the default filter chain;
/// each holds an HTTP connection manager whose filters Envoy Gateway ordered
/// (its per-route ext_authz filter, disabled until a route enables it, then
/// the router). Routes are inline here instead of RDS so that Envoy can load it
/// on its own.
fn listener_like_envoy_gateway(name: &str, https_hosts: &[&str]) -> Value {
    let hcm = format!(
        r#"
name: {HCM}
typed_config:
  "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
  stat_prefix: http
  use_remote_address: true
  route_config:
    name: {name}
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{ prefix: "/" }}
            direct_response: {{ status: 200 }}
  http_filters:
    - name: envoy.filters.http.ext_authz/securitypolicy/paid-api/keymeter-ext-auth
      disabled: true
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
        transport_api_version: V3
        grpc_service:
          envoy_grpc: {{ cluster_name: extauth }}
          timeout: 0.25s
        status_on_error: {{ code: ServiceUnavailable }}
    - name: envoy.filters.http.router
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
    );
    let hcm: Value = serde_yaml::from_str(&hcm).expect("connection manager YAML");
    let mut listener: Value = serde_yaml::from_str(&format!(
        "name: {name}\naddress: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}"
    ))
    .expect("listener YAML");
    let map = listener.as_mapping_mut().unwrap();
    if https_hosts.is_empty() {
        let mut chain = serde_yaml::Mapping::new();
        chain.insert("filters".into(), Value::Sequence(vec![hcm]));
        map.insert("default_filter_chain".into(), Value::Mapping(chain));
    } else {
        let inspector: Value = serde_yaml::from_str(
            r#"
- name: envoy.filters.listener.tls_inspector
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
"#,
        )
        .unwrap();
        map.insert("listener_filters".into(), inspector);
        let chains = https_hosts
            .iter()
            .map(|host| {
                let mut chain: Value = serde_yaml::from_str(&format!(
                    "filter_chain_match: {{ server_names: [\"{host}\"] }}"
                ))
                .unwrap();
                chain
                    .as_mapping_mut()
                    .unwrap()
                    .insert("filters".into(), Value::Sequence(vec![hcm.clone()]));
                chain
            })
            .collect();
        map.insert("filter_chains".into(), Value::Sequence(chains));
    }
    listener
}

/// JSON-pointer tokens of every member named `key` below `value` (RFC 9535's
/// descendant segment `..key`), in document order.
fn descendants_named(value: &Value, key: &str, at: &mut Vec<String>, found: &mut Vec<Vec<String>>) {
    match value {
        Value::Mapping(map) => {
            for (name, child) in map {
                let name = name.as_str().unwrap_or_default().to_owned();
                at.push(name.clone());
                if name == key {
                    found.push(at.clone());
                }
                descendants_named(child, key, at, found);
                at.pop();
            }
        }
        Value::Sequence(items) => {
            for (index, child) in items.iter().enumerate() {
                at.push(index.to_string());
                descendants_named(child, key, at, found);
                at.pop();
            }
        }
        _ => {}
    }
}

/// Applies an EnvoyPatchPolicy `add` operation with a `jsonPath` of the form
/// `..key` and a relative `path`, as Envoy Gateway does: every node the
/// JSONPath finds, with `path` appended, is one RFC 6902 `add` target. Errors
/// when the JSONPath finds nothing (Envoy Gateway then marks the policy
/// invalid). Returns how many places were patched.
fn apply_patch(resource: &mut Value, operation: &Value) -> Result<usize, String> {
    assert_eq!(yaml::text(operation, "op"), "add");
    let json_path = yaml::text(operation, "jsonPath");
    let key = json_path
        .strip_prefix("..")
        .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .unwrap_or_else(|| panic!("this test applies only `..name` JSONPaths, not {json_path:?}"));
    let suffix: Vec<String> = yaml::text(operation, "path")
        .trim_start_matches('/')
        .split('/')
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    let mut targets = Vec::new();
    descendants_named(resource, key, &mut Vec::new(), &mut targets);
    if targets.is_empty() {
        return Err(format!("JSONPath {json_path} finds nothing"));
    }
    let value = yaml::node(operation, "value");
    for mut pointer in targets.clone() {
        pointer.extend(suffix.iter().cloned());
        let last = pointer.pop().expect("a non-empty pointer");
        let mut parent = &mut *resource;
        for token in &pointer {
            parent = match parent {
                Value::Sequence(items) => &mut items[token.parse::<usize>().unwrap()],
                Value::Mapping(map) => map.get_mut(token.as_str()).unwrap(),
                other => return Err(format!("cannot descend into {other:?}")),
            };
        }
        match parent {
            Value::Sequence(items) if last == "-" => items.push(value.clone()),
            Value::Sequence(items) => match last.parse::<usize>() {
                Ok(index) if index <= items.len() => items.insert(index, value.clone()),
                _ => return Err(format!("bad array index {last:?}")),
            },
            Value::Mapping(map) => {
                map.insert(last.into(), value.clone());
            }
            other => return Err(format!("cannot add into {other:?}")),
        }
    }
    Ok(targets.len())
}

/// A bootstrap with `listeners` and the ext_authz cluster they name.
fn bootstrap(listeners: Vec<Value>) -> String {
    let mut bootstrap: Value = serde_yaml::from_str(
        r#"
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
static_resources:
  clusters:
    - name: extauth
      type: STATIC
      connect_timeout: 0.25s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: { http2_protocol_options: {} }
      load_assignment:
        cluster_name: extauth
        endpoints:
          - lb_endpoints:
              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 9191 } } }
"#,
    )
    .expect("bootstrap YAML");
    bootstrap
        .get_mut("static_resources")
        .and_then(Value::as_mapping_mut)
        .unwrap()
        .insert("listeners".into(), Value::Sequence(listeners));
    serde_yaml::to_string(&bootstrap).expect("serialize bootstrap")
}

/// Every connection manager's filter names, chain by chain.
fn filter_names(listener: &Value) -> Vec<Vec<String>> {
    yaml::named(listener, HCM)
        .into_iter()
        .map(|hcm| {
            yaml::list(hcm, "typed_config.http_filters")
                .iter()
                .map(|f| yaml::text(f, "name").to_owned())
                .collect()
        })
        .collect()
}

#[test]
fn the_patched_listeners_are_accepted_by_real_envoy() {
    let manifests = manifests();
    let patch = usage_header_patch(&manifests);
    let operation = yaml::node(&patch, "operation");
    let name = yaml::text(&patch, "name");

    // The listener the patch names (HTTPS, two host names, one chain each),
    // and the same patch on an HTTP listener (the default filter chain).
    let mut https = listener_like_envoy_gateway(name, &["api.example.com", "api2.example.com"]);
    let mut http = listener_like_envoy_gateway("paid-api/api-gateway/http", &[]);
    let before = filter_names(&https);
    assert_eq!(
        apply_patch(&mut https, operation),
        Ok(2),
        "one per filter chain"
    );
    assert_eq!(apply_patch(&mut http, operation), Ok(1));
    for (listener, chains) in [(&https, 2), (&http, 1)] {
        let names = filter_names(listener);
        assert_eq!(names.len(), chains);
        for (chain, filters) in names.iter().enumerate() {
            // First in the chain (last on the response path), the rest untouched.
            assert_eq!(filters[0], HEADER_TO_METADATA);
            assert_eq!(&filters[1..], &before[0][..], "chain {chain}");
        }
    }

    let dir = crate::support::TestDir::new("envoy-gateway-patch");
    let path = dir.path().join("patched.yaml");
    std::fs::write(&path, bootstrap(vec![https.clone(), http])).expect("write bootstrap");
    crate::support::validate_envoy_config(&path);

    // The check has teeth: Envoy validates the inserted filter's typed_config,
    // so a misspelt field in the patch fails it...
    let mut broken_operation = operation.clone();
    broken_operation
        .get_mut("value")
        .and_then(|v| v.get_mut("typed_config"))
        .and_then(Value::as_mapping_mut)
        .unwrap()
        .insert("response_rulez".into(), Value::Sequence(vec![]));
    let mut broken = listener_like_envoy_gateway(name, &["api.example.com"]);
    apply_patch(&mut broken, &broken_operation).expect("patch applies");
    let broken_path = dir.path().join("broken.yaml");
    std::fs::write(&broken_path, bootstrap(vec![broken])).expect("write bootstrap");
    assert!(
        crate::support::envoy::envoy_accepts(&broken_path).is_err(),
        "envoy accepted an unknown field in {}",
        broken_path.display()
    );
    // ...and a JSONPath that finds nothing is an error, as in Envoy Gateway.
    let mut nowhere = operation.clone();
    nowhere
        .as_mapping_mut()
        .unwrap()
        .insert("jsonPath".into(), "..http_filterz".into());
    assert!(apply_patch(&mut https, &nowhere).is_err());
}

#[test]
fn duration_syntaxes_are_told_apart() {
    let eg = |text| yaml::parse_duration(text, DurationSyntax::GatewayApi);
    let pb = |text| yaml::parse_duration(text, DurationSyntax::Protobuf);
    assert_eq!(eg("250ms"), Some(0.25));
    assert_eq!(eg("1m30s"), Some(90.0));
    assert_eq!(eg("0.25s"), None, "Gateway API durations have no fractions");
    assert_eq!(eg(""), None);
    assert_eq!(pb("0.25s"), Some(0.25));
    assert_eq!(pb("250ms"), None, "protobuf durations are seconds");
}
