#!/usr/bin/env bash
# keymeter's local demo: keymeter in dev mode (embedded MQTT broker + billing stand-in
# serving examples/keys.json), a sample backend, and a real Envoy in front
# (deploy/envoy/envoy.yaml). Sends requests with a missing, an invalid, a blocked and a
# valid key to an LLM, a speech synthesizer and a streaming transcriber, prints what
# the client got and the billing/report messages published, then stops everything.
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

API=http://127.0.0.1:10000
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
[ "$got" -ge "$want" ] || echo "   (expected $want reports, got $got; see $LOGS)"

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
