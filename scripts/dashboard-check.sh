#!/usr/bin/env bash
# Drives the operator dashboard (/ui) in real headless Chromium against a running
# runtime with real tasks: a fresh database, bloom-api with an API key, one reconciler
# and one worker (built-in executor) on loopback ports. Installs Debian's chromium and
# Playwright for Python when missing (idempotent). Screenshots go to
# ${BLOOM_UI_SCREENSHOTS:-target/ui-screenshots}.
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_S3=0 scripts/services.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
if ! command -v chromium >/dev/null 2>&1; then
  sudo_=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $sudo_ apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q chromium
fi
python3 -c 'import playwright' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check "playwright>=1.40,<2"
cargo build --bins

pg=${BLOOM_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
psql "$pg" -qc "DROP DATABASE IF EXISTS bloom_ui WITH (FORCE)" -c "CREATE DATABASE bloom_ui"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
export DATABASE_URL=${pg%/*}/bloom_ui NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
export BLOOM_NATS_NAMESPACE=ui$port BLOOM_RUNTIME_HOST=127.0.0.1 BLOOM_RUNTIME_PORT=$port
# The test's own calls and the page's share one client address: a limit above both.
export RUNTIME_API_KEY=ui-check-key BLOOM_MIGRATE_ON_START=true RUST_LOG=error BLOOM_RATE_LIMIT_PER_MIN=1000
export BLOOM_RECONCILER_HTTP_PORT=0 BLOOM_WORKER_HTTP_PORT=0 BLOOM_EXECUTOR=builtin BLOOM_WORKER_MAX_CONCURRENCY=4
export MEMBRIDGE_SERVER_URL=http://127.0.0.1:9 MEMBRIDGE_TIMEOUT_MS=1000
pids=()
cleanup() {
  # Worker first, then reconciler, then API: each hands its work to the next.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
  psql "$pg" -qc "DROP DATABASE IF EXISTS bloom_ui WITH (FORCE)" >/dev/null 2>&1 || true
  "$CARGO_TARGET_DIR/debug/bloomctl" nats delete --yes >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$CARGO_TARGET_DIR/debug/bloom-api" & pids+=($!)
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
"$CARGO_TARGET_DIR/debug/bloom-reconciler" & pids+=($!)
BLOOM_WORKER_ID=ui-worker "$CARGO_TARGET_DIR/debug/bloom-worker" & pids+=($!)

python3 tests/ui/dashboard.py --base "http://127.0.0.1:$port" --api-key ui-check-key \
  --database-url "$DATABASE_URL" --screenshots "${BLOOM_UI_SCREENSHOTS:-$CARGO_TARGET_DIR/ui-screenshots}"
