#!/usr/bin/env bash
# A three-node NATS JetStream cluster on loopback, for trying the runtime (and its
# benchmark) against replicated streams on one machine:
#
#   scripts/nats-cluster.sh start     # servers n0 n1 n2: clients on 4231-4233,
#                                     # routes on 6231-6233, monitoring on 8231-8233
#   scripts/nats-cluster.sh status    # /healthz of each server
#   scripts/nats-cluster.sh url       # the NATS_URL listing the three servers
#   scripts/nats-cluster.sh stop      # stops them (their stores stay)
#   scripts/nats-cluster.sh clean     # stops them and deletes the stores
#
# Then run the runtime with NATS_URL=$(scripts/nats-cluster.sh url) and
# BLOOM_NATS_REPLICAS=3 (`bloomctl nats apply` first, when streams exist with 1 replica).
# BLOOM_NATS_CLUSTER_DIR (default /tmp/bloom-nats-cluster) holds the configurations,
# stores, logs and pid files; BLOOM_NATS_CLUSTER_PORT (default 4231) is the first client
# port, routes and monitoring ports follow at +2000 and +4000. Starting is idempotent: a
# server already running is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${BLOOM_NATS_CLUSTER_DIR:-/tmp/bloom-nats-cluster}
base=${BLOOM_NATS_CLUSTER_PORT:-4231}
nodes=(0 1 2)

client_port() { echo $((base + $1)); }
route_port() { echo $((base + 2000 + $1)); }
monitor_port() { echo $((base + 4000 + $1)); }

running() {
  local pid
  [ -f "$dir/n$1.pid" ] && pid=$(cat "$dir/n$1.pid") && kill -0 "$pid" 2>/dev/null
}

healthy() {
  curl -fs -o /dev/null --max-time 2 "http://127.0.0.1:$(monitor_port "$1")/healthz"
}

start() {
  command -v nats-server >/dev/null || WITH_S3=0 scripts/services.sh  # installs nats-server
  mkdir -p "$dir"
  local routes="" i
  for i in "${nodes[@]}"; do
    routes+="${routes:+, }nats-route://127.0.0.1:$(route_port "$i")"
  done
  for i in "${nodes[@]}"; do
    if running "$i"; then
      continue
    fi
    cat >"$dir/n$i.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:$(client_port "$i")
http: 127.0.0.1:$(monitor_port "$i")
jetstream { store_dir: "$dir/n$i" }
cluster { name: bloom, listen: 127.0.0.1:$(route_port "$i"), routes: [$routes] }
EOF
    nats-server -c "$dir/n$i.conf" >>"$dir/n$i.log" 2>&1 &
    echo $! >"$dir/n$i.pid"
  done
  for _ in $(seq 1 300); do
    local all=1
    for i in "${nodes[@]}"; do healthy "$i" || all=0; done
    if [ "$all" = 1 ]; then
      echo "[nats-cluster] n0 n1 n2 healthy: $(url)"
      return 0
    fi
    sleep 0.1
  done
  echo "[nats-cluster] not healthy after 30 s; logs in $dir" >&2
  return 1
}

stop() {
  local i
  for i in "${nodes[@]}"; do
    if running "$i"; then
      kill "$(cat "$dir/n$i.pid")"
      while running "$i"; do sleep 0.1; done
    fi
    rm -f "$dir/n$i.pid"
  done
}

url() {
  local out="" i
  for i in "${nodes[@]}"; do out+="${out:+,}nats://127.0.0.1:$(client_port "$i")"; done
  echo "$out"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  clean) stop; rm -rf "$dir" ;;
  url) url ;;
  status)
    for i in "${nodes[@]}"; do
      if healthy "$i"; then echo "n$i healthy"; else echo "n$i not healthy"; fi
    done
    ;;
  *) echo "usage: $0 start|stop|clean|status|url" >&2; exit 2 ;;
esac
