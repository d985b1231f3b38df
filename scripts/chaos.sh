#!/usr/bin/env bash
# The fault-injection suite: builds the binaries and runs bloom-chaos (own nats-server,
# PostgreSQL and S3 server on random ports; SIGKILLs, restarts and outages at seeded
# random times; invariants checked at the end). Arguments go to bloom-chaos, e.g.
#   scripts/chaos.sh --tasks 5000 --seed 42
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_S3=1 scripts/services.sh   # installs nats-server, postgresql and moto when missing
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --bins
exec "$CARGO_TARGET_DIR/debug/bloom-chaos" "$@"
