#!/usr/bin/env bash
# keymeter's local demo: keymeter in dev mode (embedded MQTT broker + billing stand-in
# serving examples/keys.json), a sample backend, and a real Envoy in front
# (deploy/envoy/envoy.yaml). Sends requests with a missing, an invalid, a blocked and a
# valid key, prints what the client got, then stops everything.
#   scripts/demo.sh          run the tour and stop
#   scripts/demo.sh --keep   keep everything running to try curl yourself (Ctrl-C stops)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

ensure_envoy
echo "== building keymeter and the sample backend"
cargo build --quiet --bin keymeter --example sample_backend

LOGS=$(mktemp -d /tmp/keymeter-demo.XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "== stopped (logs in $LOGS)"
}
trap cleanup EXIT INT TERM

wait_http() { # url what
  for _ in $(seq 1 200); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$2 did not come up; see $LOGS" >&2; exit 1
}

echo "== starting keymeter dev (gRPC 127.0.0.1:9191, admin 127.0.0.1:9192)"
target/debug/keymeter dev --keys examples/keys.json >"$LOGS/keymeter.out" 2>"$LOGS/keymeter.log" &
PIDS+=($!)
wait_http http://127.0.0.1:9192/readyz "keymeter"

echo "== starting the sample backend (127.0.0.1:8080)"
target/debug/examples/sample_backend 127.0.0.1:8080 2>"$LOGS/backend.log" &
PIDS+=($!)
wait_http http://127.0.0.1:8080/ "sample backend"

echo "== starting Envoy (listener 127.0.0.1:10000, admin 127.0.0.1:9901)"
sed 's/address: 0.0.0.0/address: 127.0.0.1/' deploy/envoy/envoy.yaml >"$LOGS/envoy.yaml"
"$ENVOY_BIN" -c "$LOGS/envoy.yaml" --disable-hot-restart -l warning --log-path "$LOGS/envoy.log" &
PIDS+=($!)
wait_http http://127.0.0.1:9901/ready "Envoy"

try() { # description, curl args...
  local what=$1; shift
  echo
  echo "-- $what"
  echo "   \$ curl -s http://127.0.0.1:10000/v1/chat/completions $*"
  curl -s -w '\n   HTTP %{http_code}\n' http://127.0.0.1:10000/v1/chat/completions "$@" | sed 's/^/   /'
}
try "no key"            
try "unknown key"       -H 'api-key: sk-does-not-exist'
try "blocked key"       -H 'api-key: sk-blocked'
try "valid key"         -H 'api-key: sk-test-0001'
try "valid key (apikey)" -H 'apikey: sk-test-0002'

echo
echo "== keymeter's Check counters (http://127.0.0.1:9192/metrics)"
curl -s http://127.0.0.1:9192/metrics | grep '^keymeter_check_requests_total' | sed 's/^/   /'

if [ "$KEEP" = 1 ]; then
  cat <<'TXT'

== everything keeps running; try it yourself:
   curl -i http://127.0.0.1:10000/hello -H 'api-key: sk-test-0001'
   curl -i http://127.0.0.1:10000/hello -H 'api-key: sk-blocked'
   curl -s http://127.0.0.1:9192/readyz
   curl -s http://127.0.0.1:9192/metrics | grep keymeter_
   Keys served by the billing stand-in: examples/keys.json. Ctrl-C stops everything.
TXT
  wait "${PIDS[0]}"
fi
