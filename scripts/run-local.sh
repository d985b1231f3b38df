#!/usr/bin/env bash
# Runs the whole runtime locally: PostgreSQL and NATS (started, and installed, if
# needed), then `bloomctl up`: migrations, stream definitions, the API on :3002 and two
# reconcilers. Ctrl-C stops everything it started; so does any of them exiting (then the
# exit status is 1). bloomctl replaces this shell (exec), so signals reach it directly
# and it stops its children; they also get SIGTERM if it is killed.
#
# Tasks wait for the workers that lease them over REST and for HTTP agents. With
# BLOOM_EXECUTOR=command a NATS worker runs too (BLOOM_EXECUTOR_COMMAND, by default the
# Claude CLI, runs each task); `--workers N` starts N workers with the built-in test
# executor, which answers every prompt at once. Arguments go to `bloomctl up` (also
# BLOOM_UP_WORKERS, BLOOM_UP_RECONCILERS).
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_S3=${WITH_S3:-0} scripts/services.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --bins

export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/bloom}
export NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
export BLOOM_EXECUTOR=${BLOOM_EXECUTOR:-builtin}
export BLOOM_WORKER_MAX_CONCURRENCY=${BLOOM_WORKER_MAX_CONCURRENCY:-4}
db=${DATABASE_URL##*/}
psql "${DATABASE_URL%/*}/postgres" -Atqc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 ||
  psql "${DATABASE_URL%/*}/postgres" -qc "CREATE DATABASE \"$db\""

exec "$CARGO_TARGET_DIR/debug/bloomctl" up "$@"
