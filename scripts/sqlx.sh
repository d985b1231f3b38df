#!/usr/bin/env bash
# The offline data of the compile-time checked SQL statements (`.sqlx/`).
#   scripts/sqlx.sh prepare   rewrites `.sqlx/` after a statement or a migration changed
#   scripts/sqlx.sh check     fails when `.sqlx/` is stale (CI)
# Both check every statement against a scratch database migrated with `migrations/`.
# Installs the pinned sqlx-cli when it is missing; safe to run any number of times.
set -euo pipefail
cd "$(dirname "$0")/.."

SQLX_CLI_VERSION=0.8.6
mode=${1:-check}
case $mode in prepare | check) ;; *) echo "usage: $0 prepare|check" >&2; exit 2 ;; esac

if ! sqlx --version 2>/dev/null | grep -q " $SQLX_CLI_VERSION\$"; then
  cargo install sqlx-cli --version "$SQLX_CLI_VERSION" --locked --no-default-features --features postgres,rustls
fi

WITH_S3=0 scripts/services.sh
base=${BLOOM_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
export DATABASE_URL="${base%/*}/bloom_sqlx"
sqlx database drop -y >/dev/null
sqlx database create
sqlx migrate run --source migrations >/dev/null

if [ "$mode" = prepare ]; then
  cargo sqlx prepare
else
  cargo sqlx prepare --check
fi
sqlx database drop -y >/dev/null
