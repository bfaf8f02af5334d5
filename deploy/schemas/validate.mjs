// Validates custom resources against the schemas published as the npm packages
// @kubernetes-models/* (generated from each project's CRDs / OpenAPI). Run by
// tests/it/deploy_schemas.rs, which parses deploy/'s YAML and sends the documents
// here as JSON:
//
//   node deploy/schemas/validate.mjs NODE_MODULES_DIR < documents.json
//
// stdin: [{"where": "...", "object": {...}}, ...]. stdout: one JSON line per
// document, {"where", "apiVersion", "kind", "status", "errors"}, where status is
// "valid", "invalid" (errors: the schema's complaints) or "no-schema" (no package
// here knows that group, version or kind). The test decides what passes.
//
// What these validators check: types, enums, patterns, formats and required
// fields. What they do not: unknown fields (CRD schemas leave
// additionalProperties open; the API server prunes such fields silently), so the
// tests keep their own field lists for that (tests/it/deploy_istio.rs,
// tests/it/deploy_envoy_gateway.rs, tests/it/deploy_prometheus_operator.rs).
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const modules = process.argv[2];
if (!modules) {
  console.error("usage: node validate.mjs NODE_MODULES_DIR < documents.json");
  process.exit(2);
}

// API group -> the package that publishes its schemas.
const PACKAGES = {
  "security.istio.io": "@kubernetes-models/istio",
  "networking.istio.io": "@kubernetes-models/istio",
  "telemetry.istio.io": "@kubernetes-models/istio",
  "install.istio.io": "@kubernetes-models/istio",
  "extensions.istio.io": "@kubernetes-models/istio",
  "gateway.networking.k8s.io": "@kubernetes-models/gateway-api",
  "gateway.envoyproxy.io": "@kubernetes-models/envoy-gateway",
  "monitoring.coreos.com": "@kubernetes-models/prometheus-operator",
};

async function model(apiVersion, kind) {
  const [group, version] = apiVersion.split("/");
  const pkg = PACKAGES[group];
  if (!pkg || !version) return null;
  const file = join(modules, pkg, group, version, "index.js");
  let exports;
  try {
    exports = await import(pathToFileURL(file).href);
  } catch (e) {
    if (e.code === "ERR_MODULE_NOT_FOUND") return null;
    throw e;
  }
  return exports[kind] ?? null;
}

const documents = JSON.parse(readFileSync(0, "utf8"));
for (const { where, object } of documents) {
  const { apiVersion, kind } = object;
  const result = { where, apiVersion, kind, status: "valid", errors: [] };
  const Model = await model(apiVersion, kind);
  if (!Model) {
    result.status = "no-schema";
  } else {
    try {
      new Model(object).validate();
    } catch (e) {
      result.status = "invalid";
      result.errors = String(e.message ?? e).split("\n").filter((l) => l.trim());
    }
  }
  console.log(JSON.stringify(result));
}
