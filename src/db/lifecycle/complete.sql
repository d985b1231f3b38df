WITH r AS (
   SELECT * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::jsonb[],
                        $9::text[], $10::text[], $11::jsonb[], $12::text[], $13::boolean[], $14::text[],
                        $15::text[], $16::text[], $17::text[], $18::text[], $19::bigint[])
       AS r(task_id, lease_id, final_status, status, output, error_message, metrics, artifact_id,
            artifact_type, tags, url, inline, result_id, audit_id, done, late, error_kind, retry_at)),
-- When each failed run is tried again (NULL: its result is final). Read before the
-- update: a task's policy and attempts do not change while its lease is current.
nxt AS (
   SELECT r.task_id, r.lease_id,
          bloom_next_attempt_at(t.policy, r.error_kind, t.attempts, t.max_attempts, $1, r.retry_at) AS at
   FROM r JOIN llm_tasks t ON t.id = ANY($2) AND t.id = r.task_id
   WHERE r.error_kind IS NOT NULL),
t AS (
   UPDATE llm_tasks t SET status = CASE WHEN n.at IS NULL THEN r.final_status ELSE 'queued' END,
          updated_at = $1, lease_id = r.lease_id,
          worker_id = COALESCE(t.worker_id, (SELECT l.worker_id FROM leases l WHERE l.id = r.lease_id)),
          routed_to = NULL,
          -- Tried again: no current dispatch until the due duty gives it one at `not_before`.
          dispatch_seq = CASE WHEN n.at IS NULL THEN t.dispatch_seq ELSE -abs(t.dispatch_seq) END,
          not_before = COALESCE(n.at, t.not_before),
          attempts = CASE WHEN n.at IS NOT NULL AND r.error_kind = 'rate_limited' THEN GREATEST(t.attempts - 1, 0)
                          ELSE t.attempts END,
          last_error = CASE WHEN n.at IS NULL THEN t.last_error
                            ELSE r.error_kind || ': ' || COALESCE(r.error_message, 'no message') END,
          wait_reason = CASE WHEN n.at IS NULL THEN NULL
                             WHEN r.error_kind = 'rate_limited' THEN 'rate limited by the provider until ' || bloom_iso_time(n.at)
                             ELSE 'retry after a ' || r.error_kind || ' error at ' || bloom_iso_time(n.at) END
   FROM r LEFT JOIN nxt n ON n.task_id = r.task_id AND n.lease_id = r.lease_id
   WHERE t.id = ANY($2) AND t.id = r.task_id AND (
       (t.lease_id = r.lease_id AND (t.status || '') IN ('leased', 'running'))
       -- The lease expired and the task was requeued, but nobody leased it again:
       -- the result of the work done is still the task's only one.
       OR ((t.status || '') = 'queued' AND t.dispatch_seq > 0 AND EXISTS (
           SELECT 1 FROM leases l WHERE l.id = r.lease_id AND l.task_id = t.id AND (l.status || '') = 'expired')))
   RETURNING t.*),
-- A provider rate limit holds the other tasks of the run's agent (or of the key its
-- policy's `retry.hold` names) until the reset, too.
hold AS (
   INSERT INTO provider_holds (scope, key, until, reason, updated_at)
   SELECT DISTINCT ON (k.scope, k.key) k.scope, k.key, t.not_before, t.last_error, $1
   FROM t JOIN r ON r.task_id = t.id AND r.lease_id = t.lease_id
   -- The key of the scope the policy names, else (no such key, or no name) the agent.
   CROSS JOIN LATERAL (
       SELECT v.scope, v.key
       FROM (VALUES ('context_id', t.context_id), ('concurrency_key', t.concurrency_key),
                    ('agent_slug', t.agent_slug)) AS v(scope, key)
       WHERE v.key IS NOT NULL AND v.scope IN (t.policy->'retry'->>'hold', 'agent_slug')
       ORDER BY v.scope = 'agent_slug' LIMIT 1) k
   WHERE r.error_kind = 'rate_limited' AND t.status = 'queued'
       AND COALESCE(t.policy->'retry'->>'hold', 'agent_slug') <> 'task'
   ORDER BY k.scope, k.key, t.not_before DESC
   ON CONFLICT (scope, key) DO UPDATE SET until = GREATEST(provider_holds.until, EXCLUDED.until),
       reason = EXCLUDED.reason, updated_at = EXCLUDED.updated_at),
-- With what the audit entry needs of the task: a join of `t` with itself (estimated one
-- row) would be a nested loop over the batch squared.
w AS (SELECT r.*, COALESCE(t.worker_id, 'unknown') AS worker, t.status AS task_status, t.wait_reason
      FROM r JOIN t ON t.id = r.task_id AND t.lease_id = r.lease_id),
-- What the run used settles the budget reservations of its lease (the lease-end trigger).
l AS (
   UPDATE leases SET status = 'released', used_tokens = bloom_run_tokens(w.metrics),
          used_usd = (w.metrics->>'total_cost_usd')::float8
   FROM w WHERE leases.id = w.lease_id AND (leases.status || '') = 'active'),
art AS (
   INSERT INTO runtime_artifacts (id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags,
                                  content)
   SELECT artifact_id, task_id, NULL, artifact_type, $1, true, url, '[]'::jsonb, tags,
          CASE WHEN inline THEN output END FROM w),
res AS (
   INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message, metrics,
                            completed_at, error_kind)
   SELECT result_id, task_id, worker, artifact_id, status, output, error_message, metrics, $1, error_kind FROM w),
a AS (
   INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
   SELECT w.audit_id, $1, CASE WHEN w.task_status = 'queued' THEN 'task_retry_scheduled' ELSE 'task_completed' END,
          'llm_task', w.task_id, w.worker,
          CASE WHEN w.task_status = 'queued' THEN w.done || ', ' || w.wait_reason ELSE w.done END
   FROM w
   UNION ALL
   SELECT audit_id, $1, 'result_late', 'llm_task', task_id, 'reconciler', late
   FROM r WHERE NOT EXISTS (SELECT 1 FROM w WHERE w.task_id = r.task_id AND w.lease_id = r.lease_id))
SELECT id AS "id!", context_id AS "context_id!", agent_slug AS "agent_slug!", prompt AS "prompt!",
       context_hints AS "context_hints!: Json<Vec<String>>", policy AS "policy!: Json<Policy>",
       desired_format AS "desired_format!: DesiredFormat", status AS "status!: TaskStatus",
       created_at AS "created_at!", updated_at AS "updated_at!", lease_id AS "lease_id?", worker_id AS "worker_id?",
       attempts AS "attempts!",
       max_attempts AS "max_attempts!", priority AS "priority!", not_before AS "not_before?",
       idempotency_key AS "idempotency_key?", concurrency_key AS "concurrency_key?", wait_reason AS "wait_reason?", last_error AS "last_error?",
       dispatch_seq AS "dispatch_seq!", routed_to AS "routed_to?"
FROM t
