#!/usr/bin/env bash
# keymeter's local demo: keymeter in dev mode (embedded MQTT broker + billing stand-in
# serving examples/keys.json), a sample backend, and a real Envoy in front
# (deploy/envoy/envoy.yaml). Sends requests with a missing, an invalid, a blocked and a
# valid key to an LLM, a speech synthesizer and a streaming transcriber, prints what
# the client got and the billing/report messages published, then stops everything.
#   scripts/demo.sh                      run the tour and stop
#   scripts/demo.sh --keep               keep everything running to try curl yourself (Ctrl-C stops)
#   scripts/demo.sh --backend HOST:PORT  your own HTTP service behind the demo's Envoy
#                                        (instead of the sample backend); implies --keep
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

KEEP=0
BACKEND=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1 ;;
    --backend)
      BACKEND=${2:-}
      [[ "$BACKEND" =~ ^[0-9.]+:[0-9]+$ ]] || { echo "--backend takes IP:PORT, e.g. 127.0.0.1:8000" >&2; exit 64; }
      KEEP=1
      shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (try --help)" >&2; exit 64 ;;
  esac
  shift
done

# The demo's fixed ports: refuse to start next to another demo (or anything else)
# rather than talk to its processes.
PORTS="9191 9192 9901 10000"
[ -n "$BACKEND" ] || PORTS="$PORTS 8080"
for port in $PORTS; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port on 127.0.0.1 is already in use (another demo still running?); stop it and try again" >&2
    exit 1
  fi
done

ensure_envoy
echo "== building keymeter and the sample backend (the first build takes a few minutes)"
cargo build --quiet --bin keymeter --example sample_backend

LOGS=$(mktemp -d /tmp/keymeter-demo.XXXXXX)
PIDS=()
FAILED=1
cleanup() {
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ "$FAILED" = 0 ]; then
    rm -rf "$LOGS"
    echo "== stopped"
  else
    echo "== stopped (logs kept in $LOGS)"
  fi
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
target/debug/keymeter dev >"$LOGS/keymeter.out" 2>"$LOGS/keymeter.log" &
PIDS+=($!)
wait_http http://127.0.0.1:9192/readyz "keymeter"

if [ -z "$BACKEND" ]; then
  echo "== starting the sample backend (127.0.0.1:8080)"
  target/debug/examples/sample_backend 127.0.0.1:8080 2>"$LOGS/backend.log" &
  PIDS+=($!)
  wait_http http://127.0.0.1:8080/ "sample backend"
  BACKEND_HOST=127.0.0.1 BACKEND_PORT=8080
else
  echo "== your backend at $BACKEND"
  BACKEND_HOST=${BACKEND%:*} BACKEND_PORT=${BACKEND##*:}
fi

echo "== starting Envoy (listener 127.0.0.1:10000, admin 127.0.0.1:9901)"
# The shipped config, on loopback, with the backend's address.
sed -e 's/address: 0.0.0.0/address: 127.0.0.1/' \
    -e "/cluster_name: backend/,/port_value/{s/address: 127.0.0.1/address: $BACKEND_HOST/;s/port_value: 8080/port_value: $BACKEND_PORT/}" \
    deploy/envoy/envoy.yaml >"$LOGS/envoy.yaml"
"$ENVOY_BIN" -c "$LOGS/envoy.yaml" --disable-hot-restart -l warning --log-path "$LOGS/envoy.log" &
PIDS+=($!)
wait_http http://127.0.0.1:9901/ready "Envoy"

API=http://127.0.0.1:10000
if [ -n "$BACKEND" ]; then
  FAILED=0
  cat <<TXT

== Envoy at $API checks keys with keymeter and forwards to your backend at $BACKEND.
   Your backend bills a call by answering with x-billing-module, x-billing-model and
   x-billing-usage (README: "For backend authors"); keymeter prints each record.
   curl -i $API/ -H 'api-key: sk-test-0001'      # a valid key from examples/keys.json
   curl -i $API/ -H 'api-key: sk-blocked'        # 403
   tail -f $LOGS/keymeter.out                     # billing/report messages as they arrive
   Ctrl-C stops everything.
TXT
  wait "${PIDS[0]}"
  exit 0
fi
try() { # description, path, curl args...
  local what=$1 path=$2; shift 2
  echo
  echo "-- $what"
  printf '   $ curl -s %s' "$API$path"
  for arg in "$@"; do
    case "$arg" in *[[:space:]\"{}]*) printf " '%s'" "$arg" ;; *) printf ' %s' "$arg" ;; esac
  done
  echo
  curl -s -w '\n   -> HTTP %{http_code}\n' "$API$path" "$@" | sed 's/^/   /'
}
CHAT='{"messages": [{"role": "user", "content": "Tell me about keymeter please"}]}'
try "no key"                     /v1/chat/completions -H 'content-type: application/json' -d "$CHAT"
try "unknown key"                /v1/chat/completions -H 'api-key: sk-does-not-exist' -H 'content-type: application/json' -d "$CHAT"
try "blocked key"                /v1/chat/completions -H 'api-key: sk-blocked' -H 'content-type: application/json' -d "$CHAT"
try "valid key: LLM (tokens)"    /v1/chat/completions -H 'api-key: sk-test-0001' -H 'content-type: application/json' -d "$CHAT"
try "valid key: speech synthesis (characters)" /v1/audio/speech -H 'apikey: sk-test-0002' -H 'content-type: application/json' -d '{"input": "Hello from keymeter"}' -o /dev/null
head -c 64000 /dev/zero >"$LOGS/audio.raw"
try "valid key: streaming transcription (seconds, in trailers)" /v1/audio/transcriptions -H 'api-key: sk-test-0001' --data-binary "@$LOGS/audio.raw"
try "valid key: LLM + speech in one call (two records)" /v1/chat/speech -H 'api-key: sk-test-0001' -H 'content-type: application/json' -d "$CHAT" -o /dev/null

echo
echo "== what the billing system received on billing/report (printed by the stand-in)"
want=5
for _ in $(seq 1 100); do
  [ "$(grep -c '^billing/report ' "$LOGS/keymeter.out" || true)" -ge "$want" ] && break
  sleep 0.1
done
grep '^billing/report ' "$LOGS/keymeter.out" | sed 's/^/   /'
got=$(grep -c '^billing/report ' "$LOGS/keymeter.out" || true)
if [ "$got" -ge "$want" ]; then FAILED=0; else echo "   (expected $want reports, got $got; see $LOGS)"; fi

echo
echo "== keymeter's counters (http://127.0.0.1:9192/metrics)"
curl -s http://127.0.0.1:9192/metrics | grep -E '^keymeter_(check_requests_total|usage_records_(accepted|published)_total|outbox_pending_records)' | sed 's/^/   /'

if [ "$KEEP" = 1 ]; then
  cat <<TXT

== everything keeps running; try it yourself:
   curl -s -D - -o /dev/null http://127.0.0.1:10000/v1/audio/speech -H 'api-key: sk-test-0001' -H 'content-type: application/json' -d '{"input": "hi"}'
   curl -i http://127.0.0.1:10000/v1/chat/completions -H 'api-key: sk-blocked' -d '{}'
   tail -f $LOGS/keymeter.out      # billing/report messages as they arrive
   curl -s http://127.0.0.1:9192/readyz
   curl -s http://127.0.0.1:9192/metrics | grep keymeter_
   Keys served by the billing stand-in: examples/keys.json. Ctrl-C stops everything.
TXT
  wait "${PIDS[0]}"
fi
