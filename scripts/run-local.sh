#!/usr/bin/env bash
# Runs the whole runtime locally: PostgreSQL, NATS (started if needed), migrations, the
# API on :3002, two reconcilers and one worker. Ctrl-C stops everything it started.
#
# The worker uses the built-in test executor unless BLOOM_EXECUTOR=command (then
# BLOOM_EXECUTOR_COMMAND, by default the Claude CLI, runs each task).
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_S3=${WITH_S3:-0} scripts/services.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --bins
bin=$CARGO_TARGET_DIR/debug

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/bloom}
export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
export BLOOM_EXECUTOR=${BLOOM_EXECUTOR:-builtin}
db=${DATABASE_URL##*/}
psql "${DATABASE_URL%/*}/postgres" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
  psql "${DATABASE_URL%/*}/postgres" -qc "CREATE DATABASE \"$db\""

"$bin/bloomctl" migrate
"$bin/bloomctl" nats apply

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

BLOOM_RECONCILER_HTTP_PORT=9090 "$bin/bloom-reconciler" & pids+=($!)
BLOOM_RECONCILER_HTTP_PORT=9092 "$bin/bloom-reconciler" & pids+=($!)
BLOOM_WORKER_ID=${BLOOM_WORKER_ID:-local-worker} BLOOM_WORKER_MAX_CONCURRENCY=${BLOOM_WORKER_MAX_CONCURRENCY:-4} \
  "$bin/bloom-worker" & pids+=($!)
"$bin/bloom-api" & pids+=($!)

echo "BLOOM runtime: API http://127.0.0.1:${BLOOM_RUNTIME_PORT:-3002}/api/runtime/health (Ctrl-C to stop)"
wait -n "${pids[@]}"
