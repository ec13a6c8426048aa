#!/usr/bin/env bash
# Runs schemathesis against the served OpenAPI document, bounded: a temporary data dir, a server on
# a loopback port, N examples per operation (default 200), and a fail on any 5xx or any response
# that does not match the schema. Needs python3 with venv and network access to PyPI.
#
#   ci/schemathesis.sh [examples-per-operation]
set -euo pipefail
cd "$(dirname "$0")/.."
EXAMPLES="${1:-200}"
PORT="${HARVEST_ST_PORT:-18479}"
VENV="${HARVEST_ST_VENV:-target/schemathesis-venv}"
if [ ! -x "$VENV/bin/st" ]; then
  python3 -m venv "$VENV"
  # hypothesis 6.170 breaks schemathesis 3.39 ("'many' object has no attribute 'more'").
  "$VENV/bin/pip" install --quiet 'schemathesis>=3.39,<4' 'hypothesis<6.120'
fi
cargo build --quiet
DATA="$(mktemp -d)"
./target/debug/harvest serve --bind "127.0.0.1:$PORT" --data-dir "$DATA/data" >"$DATA/server.log" 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; rm -rf "$DATA"' EXIT
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
# SSE routes never end for a live session; they are excluded from fuzzing (covered by tests).
timeout 1200 "$VENV/bin/st" run "http://127.0.0.1:$PORT/v1/openapi.json" \
  --base-url "http://127.0.0.1:$PORT" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
  --hypothesis-max-examples "$EXAMPLES" \
  --exclude-path-regex 'events$' \
  --request-timeout 10000 \
  --experimental=openapi-3.1
