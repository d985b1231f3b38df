#!/usr/bin/env bash
# How fast the dashboard's calls answer with a large history: fills a fresh database
# with ${TASKS:-1000000} tasks of the last 7 days (with their leases, results and audit
# entries; mostly completed, some failed, dead, cancelled, queued and leased), starts
# bloom-api on it and times every call the dashboard's pages make (median and slowest of
# ${RUNS:-5} runs each, in ms). Not part of CI (filling takes minutes); the figures are in
# docs/benchmarks.md.
#   scripts/dashboard-scale.sh            # 1,000,000 tasks
#   TASKS=100000 scripts/dashboard-scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_S3=0 scripts/services.sh
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --bins
tasks=${TASKS:-1000000}
runs=${RUNS:-5}
pg=${BLOOM_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
db=${pg%/*}/bloom_scale
psql "$pg" -qc "DROP DATABASE IF EXISTS bloom_scale WITH (FORCE)" -c "CREATE DATABASE bloom_scale"
DATABASE_URL=$db "$CARGO_TARGET_DIR/debug/bloomctl" migrate

echo "filling: $tasks tasks" >&2
start=$(date +%s)
psql "$db" -q -v ON_ERROR_STOP=1 -v n="$tasks" <<'SQL'
-- Task i was created (7 days / n) * i ago, newest last; ids sort by creation as v7 do.
CREATE TEMP TABLE g AS
SELECT i,
       (extract(epoch FROM now()) * 1000)::bigint - (7 * 86400000::bigint) * (:n - i) / :n AS at,
       lpad(to_hex(i), 12, '0') AS hex,
       CASE WHEN i % 100 < 90 THEN 'completed' WHEN i % 100 < 95 THEN 'failed' WHEN i % 100 < 97 THEN 'dead'
            WHEN i % 100 < 98 THEN 'cancelled' WHEN i > :n - 2000 AND i % 2 = 0 THEN 'leased'
            WHEN i > :n - 2000 THEN 'queued' ELSE 'completed' END AS status
FROM generate_series(1, :n) AS i;
INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at, lease_id, worker_id,
                       attempts, dispatch_seq, last_error, priority)
SELECT 'task-' || hex, 'ctx-' || (i % 5000), 'agent-' || (i % 7), 'Summarise document ' || i || ' in three sentences.',
       status, at, at + 4000, CASE WHEN status <> 'queued' THEN 'lease-' || hex END,
       CASE WHEN status <> 'queued' THEN 'worker-' || (i % 8) END,
       CASE WHEN status = 'queued' THEN 0 ELSE 1 END, 1,
       CASE WHEN status IN ('failed', 'dead') THEN 'the agent reached its turn limit' END, (i % 5) - 2
FROM g;
INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id)
SELECT 'lease-' || hex, 'task-' || hex, 'worker-' || (i % 8), at + 10, at + 300010, 300,
       CASE WHEN status = 'leased' THEN 'active' WHEN status = 'cancelled' THEN 'cancelled' ELSE 'released' END,
       at + 10, 'ctx-' || (i % 5000)
FROM g WHERE status <> 'queued';
INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message, metrics, completed_at, error_kind)
SELECT 'result-' || hex, 'task-' || hex, 'worker-' || (i % 8), 'artifact-' || hex,
       CASE WHEN status = 'completed' THEN 'success' ELSE 'error' END,
       CASE WHEN status = 'completed' THEN 'Three sentences about document ' || i END,
       CASE WHEN status <> 'completed' THEN 'the agent reached its turn limit' END,
       jsonb_build_object('duration_ms', 3900, 'tokens_used', 1200, 'input_tokens', 1000, 'output_tokens', 200,
                          'total_cost_usd', 0.0125),
       at + 4000, CASE WHEN status <> 'completed' THEN 'max_turns' END
FROM g WHERE status IN ('completed', 'failed', 'dead');
INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
SELECT 'audit-' || hex || '-' || e.k, at + e.dt, e.action, e.kind, e.prefix || hex, 'bench', ''
FROM g CROSS JOIN LATERAL (VALUES
    (1, 0, 'task_created', 'llm_task', 'task-'),
    (2, 10, 'task_leased', 'lease', 'lease-'),
    (3, 4000, CASE WHEN g.status = 'cancelled' THEN 'task_cancelled' ELSE 'task_completed' END, 'llm_task', 'task-'))
    AS e(k, dt, action, kind, prefix)
WHERE e.k = 1 OR g.status <> 'queued';
INSERT INTO workers (id, node_id, status, registered_at, last_heartbeat, source)
SELECT 'worker-' || w, 'worker-' || w, 'online', 0, (extract(epoch FROM now()) * 1000)::bigint, 'nats'
FROM generate_series(0, 7) AS w;
SQL
psql "$db" -qc "VACUUM ANALYZE"
echo "filled in $(($(date +%s) - start)) s: $(psql "$db" -Atc "SELECT pg_size_pretty(pg_database_size(current_database()))")" >&2

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
DATABASE_URL=$db NATS_URL=${NATS_URL:-nats://127.0.0.1:4222} BLOOM_NATS_NAMESPACE=scale$port \
  BLOOM_RUNTIME_HOST=127.0.0.1 BLOOM_RUNTIME_PORT=$port BLOOM_RATE_LIMIT_PER_MIN=0 RUST_LOG=error \
  MEMBRIDGE_SERVER_URL=http://127.0.0.1:9 "$CARGO_TARGET_DIR/debug/bloom-api" &
api=$!
trap 'kill $api 2>/dev/null; wait $api 2>/dev/null; psql "$pg" -qc "DROP DATABASE IF EXISTS bloom_scale WITH (FORCE)"' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done

now=$(($(date +%s) * 1000))
mid=$(printf 'task-%012x' $((tasks / 2)))
failed=$(printf 'task-%012x' $(( (tasks / 2) / 100 * 100 + 91 )))
second=$(curl -fsS -D - -o /dev/null "http://127.0.0.1:$port/api/runtime/llm-tasks?limit=50" | tr -d '\r' | sed -n 's/^x-next-cursor: //Ip')
calls=(
  "overview: stats|/api/runtime/stats?count_limit=10000"
  "stats, exact (seed, metrics)|/api/runtime/stats"
  "overview: activity|/api/runtime/activity?minutes=60"
  "overview: holds|/api/runtime/holds"
  "overview: limits|/api/runtime/concurrency-limits"
  "overview: budgets|/api/runtime/budgets"
  "tasks: first page|/api/runtime/llm-tasks?limit=50"
  "tasks: second page|/api/runtime/llm-tasks?limit=50&cursor=$second"
  "tasks: status failed|/api/runtime/llm-tasks?limit=50&status=failed"
  "tasks: status queued|/api/runtime/llm-tasks?limit=50&status=queued"
  "tasks: agent|/api/runtime/llm-tasks?limit=50&agent_slug=agent-3"
  "tasks: context|/api/runtime/llm-tasks?limit=50&context_id=ctx-42"
  "tasks: priority|/api/runtime/llm-tasks?limit=50&priority=2"
  "tasks: prompt prefix, common|/api/runtime/llm-tasks?limit=50&prompt_prefix=summarise%20document"
  "tasks: prompt prefix, rare|/api/runtime/llm-tasks?limit=50&prompt_prefix=Summarise%20document%20424242%20"
  "tasks: prompt prefix, none|/api/runtime/llm-tasks?limit=50&prompt_prefix=Translate"
  "tasks: created range|/api/runtime/llm-tasks?limit=50&created_from=$((now - 3 * 86400000))&created_to=$((now - 2 * 86400000))"
  "tasks: cancel, hour's cost|/api/runtime/usage?group_by=agent_slug&limit=1000&from=$((now - 3600000))"
  "tasks: cancel, day's cost|/api/runtime/usage?group_by=agent_slug&limit=1000"
  "task: record|/api/runtime/llm-tasks/$mid"
  "task: results|/api/runtime/llm-tasks/$mid/results"
  "task: artifacts|/api/runtime/artifacts?task_id=$mid"
  "task: history|/api/runtime/llm-tasks/$mid/history"
  "failures: last 24 h|/api/runtime/failures?from=$((now - 86400000))&to=$now"
  "failed task: results|/api/runtime/llm-tasks/$failed/results"
  "workers|/api/runtime/workers?limit=200"
  "worker: leases|/api/runtime/workers/worker-3"
  "audit: newest|/api/runtime/audit?limit=100"
  "audit: action (rare)|/api/runtime/audit?limit=100&action=task_cancelled"
  "audit: action (none)|/api/runtime/audit?limit=100&action=worker_offline"
  "audit: entity|/api/runtime/audit?limit=100&entity_id=$mid"
)
printf '%-28s %8s %8s %6s\n' call median_ms max_ms status
for c in "${calls[@]}"; do
  name=${c%%|*} path=${c#*|}
  times=()
  code=
  for _ in $(seq 1 "$runs"); do
    out=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' "http://127.0.0.1:$port$path")
    code=${out% *}
    times+=("${out#* }")
  done
  printf '%s\n' "${times[@]}" | sort -n | awk -v name="$name" -v code="$code" '
    { t[NR] = $1 * 1000 } END { printf "%-28s %8.1f %8.1f %6s\n", name, t[int((NR + 1) / 2)], t[NR], code }'
done
