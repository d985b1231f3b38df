#!/usr/bin/env bash
# Runs schemathesis against the API's published OpenAPI document: a fresh database, the
# API on a loopback port, a bounded number of examples per operation. Fails on any 5xx
# and on responses that do not match the document. The membridge proxy routes and
# test-connection need a membridge server and are left out (the integration tests cover
# them against a fake membridge).
# Usage: scripts/schemathesis.sh [MAX_EXAMPLES]
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${1:-25}
WITH_S3=0 scripts/services.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
command -v schemathesis >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check "schemathesis>=4,<5"
cargo build --bins

pg=${BLOOM_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
psql "$pg" -qc "DROP DATABASE IF EXISTS bloom_fuzz WITH (FORCE)" -c "CREATE DATABASE bloom_fuzz"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export DATABASE_URL=${pg%/*}/bloom_fuzz NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
export BLOOM_NATS_NAMESPACE=fuzz$port BLOOM_RUNTIME_HOST=127.0.0.1 BLOOM_RUNTIME_PORT=$port
export BLOOM_RATE_LIMIT_PER_MIN=0 BLOOM_TEST_CONNECTION_RATE_LIMIT_PER_MIN=0 BLOOM_MIGRATE_ON_START=true
# Nothing listens on port 9: membridge calls fail fast with 502.
export MEMBRIDGE_SERVER_URL=http://127.0.0.1:9 MEMBRIDGE_TIMEOUT_MS=1000 RUST_LOG=warn
"$CARGO_TARGET_DIR/debug/bloom-api" &
api=$!
cleanup() {
  kill $api 2>/dev/null || true
  psql "$pg" -qc "DROP DATABASE IF EXISTS bloom_fuzz WITH (FORCE)" >/dev/null 2>&1 || true
  "$CARGO_TARGET_DIR/debug/bloomctl" nats delete --yes >/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done

conformance=status_code_conformance,content_type_conformance,response_schema_conformance
schemathesis run "http://127.0.0.1:$port/openapi.json" \
  --checks "not_a_server_error,$conformance" \
  --max-examples "$examples" --generation-deterministic --workers 2 \
  --exclude-path-regex '^/api/membridge/|^/api/runtime/test-connection$|/lease$|/dispatch$|/agent-(update|restart|uninstall)$|/projects/[^/]+/(clone|sync-memory)$' \
  --request-timeout 20
# Leasing and dispatch answer the documented 503 when no worker has capacity; dispatch,
# the agent operations, clone and sync-memory the documented 502 when no agent or
# membridge answers (the original services' behaviour): conformance checks only.
schemathesis run "http://127.0.0.1:$port/openapi.json" \
  --checks "$conformance" --max-examples "$examples" --generation-deterministic \
  --include-path-regex '/lease$|/dispatch$|/agent-(update|restart|uninstall)$|/projects/[^/]+/(clone|sync-memory)$' \
  --request-timeout 20
