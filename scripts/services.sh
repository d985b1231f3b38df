#!/usr/bin/env bash
# Makes sure the services BLOOM runtime needs are installed and running, idempotently:
# PostgreSQL (127.0.0.1:5432), NATS with JetStream (127.0.0.1:4222) and, for tests, an
# S3-compatible server (moto) on 127.0.0.1:${BLOOM_TEST_S3_PORT:-9311}.
# Installs what is missing with apt-get / pip. Safe to run any number of times.
set -euo pipefail

PG_PORT=${PGPORT:-5432}
NATS_PORT=${BLOOM_NATS_PORT:-4222}
S3_PORT=${BLOOM_TEST_S3_PORT:-9311}
WITH_S3=${WITH_S3:-1}
STATE_DIR=${BLOOM_STATE_DIR:-/tmp/bloom-runtime}
mkdir -p "$STATE_DIR"

log() { echo "[services] $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 1 100); do
    port_open "$port" && return 0
    sleep 0.2
  done
  log "$name did not start listening on port $port"; return 1
}

apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- PostgreSQL -------------------------------------------------------------------
if ! port_open "$PG_PORT"; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    log "installing postgresql"
    apt_install postgresql
  fi
  version=$(ls /etc/postgresql | sort -V | tail -n1)
  conf=/etc/postgresql/$version/main
  # Local development and CI use trust authentication on loopback.
  if ! grep -q "bloom-runtime trust" "$conf/pg_hba.conf"; then
    sed -i '1i host all all 127.0.0.1/32 trust # bloom-runtime trust\nlocal all all trust # bloom-runtime trust' "$conf/pg_hba.conf"
  fi
  log "starting postgresql $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port "$PG_PORT" postgresql
fi

# --- NATS with JetStream ----------------------------------------------------------
if ! port_open "$NATS_PORT"; then
  if ! command -v nats-server >/dev/null 2>&1; then
    log "installing nats-server"
    apt_install nats-server
  fi
  log "starting nats-server with JetStream on $NATS_PORT"
  mkdir -p "$STATE_DIR/nats"
  nohup nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$STATE_DIR/nats" >"$STATE_DIR/nats.log" 2>&1 &
  wait_port "$NATS_PORT" nats-server
fi

# --- S3 (moto) --------------------------------------------------------------------
if [ "$WITH_S3" = 1 ] && ! port_open "$S3_PORT"; then
  if ! command -v moto_server >/dev/null 2>&1; then
    log "installing moto[server]"
    python3 -m pip install -q "moto[server]"
  fi
  log "starting moto S3 server on $S3_PORT"
  nohup moto_server -H 127.0.0.1 -p "$S3_PORT" >"$STATE_DIR/moto.log" 2>&1 &
  wait_port "$S3_PORT" moto
fi

log "postgres :$PG_PORT, nats :$NATS_PORT$( [ "$WITH_S3" = 1 ] && echo ", s3 :$S3_PORT") ready"
