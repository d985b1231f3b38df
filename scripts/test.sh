#!/usr/bin/env bash
# Runs every test of BLOOM runtime against real PostgreSQL, NATS JetStream and an S3
# server (moto), starting (and if needed installing) them first.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_S3=1 scripts/services.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
export BLOOM_TEST_DATABASE_URL=${BLOOM_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export BLOOM_TEST_NATS_URL=${BLOOM_TEST_NATS_URL:-nats://127.0.0.1:4222}
export BLOOM_TEST_S3_ENDPOINT=${BLOOM_TEST_S3_ENDPOINT:-http://127.0.0.1:${BLOOM_TEST_S3_PORT:-9311}}

drop_test_databases() {
  psql "$BLOOM_TEST_DATABASE_URL" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 'bloom\_test\_%'" 2>/dev/null |
    while read -r db; do psql "$BLOOM_TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 || true; done
}
drop_test_databases
trap drop_test_databases EXIT

cargo test --all-targets "$@"
