WITH r AS (
   SELECT * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::jsonb[],
                        $9::text[], $10::text[], $11::jsonb[], $12::text[], $13::boolean[], $14::text[],
                        $15::text[], $16::text[], $17::text[])
       AS r(task_id, lease_id, final_status, status, output, error_message, metrics, artifact_id,
            artifact_type, tags, url, inline, result_id, audit_id, done, late)),
t AS (
   UPDATE llm_tasks t SET status = r.final_status, updated_at = $1, lease_id = r.lease_id,
          worker_id = COALESCE(t.worker_id, (SELECT l.worker_id FROM leases l WHERE l.id = r.lease_id)),
          routed_to = NULL
   FROM r WHERE t.id = ANY($2) AND t.id = r.task_id AND (
       (t.lease_id = r.lease_id AND (t.status || '') IN ('leased', 'running'))
       -- The lease expired and the task was requeued, but nobody leased it again:
       -- the result of the work done is still the task's only one.
       OR ((t.status || '') = 'queued' AND EXISTS (
           SELECT 1 FROM leases l WHERE l.id = r.lease_id AND l.task_id = t.id AND (l.status || '') = 'expired')))
   RETURNING t.*),
w AS (SELECT r.*, COALESCE(t.worker_id, 'unknown') AS worker
      FROM r JOIN t ON t.id = r.task_id AND t.lease_id = r.lease_id),
l AS (
   UPDATE leases SET status = 'released'
   FROM w WHERE leases.id = w.lease_id AND (leases.status || '') = 'active'),
art AS (
   INSERT INTO runtime_artifacts (id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags,
                                  content)
   SELECT artifact_id, task_id, NULL, artifact_type, $1, true, url, '[]'::jsonb, tags,
          CASE WHEN inline THEN output END FROM w),
res AS (
   INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message, metrics,
                            completed_at)
   SELECT result_id, task_id, worker, artifact_id, status, output, error_message, metrics, $1 FROM w),
a AS (
   INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
   SELECT audit_id, $1, 'task_completed', 'llm_task', task_id, worker, done FROM w
   UNION ALL
   SELECT audit_id, $1, 'result_late', 'llm_task', task_id, 'reconciler', late
   FROM r WHERE NOT EXISTS (SELECT 1 FROM w WHERE w.task_id = r.task_id AND w.lease_id = r.lease_id))
SELECT id AS "id!", context_id AS "context_id!", agent_slug AS "agent_slug!", prompt AS "prompt!",
       context_hints AS "context_hints!: Json<Vec<String>>", policy AS "policy!: Json<Policy>",
       desired_format AS "desired_format!: DesiredFormat", status AS "status!: TaskStatus",
       created_at AS "created_at!", updated_at AS "updated_at!", lease_id AS "lease_id?", worker_id AS "worker_id?",
       attempts AS "attempts!",
       max_attempts AS "max_attempts!", priority AS "priority!", not_before AS "not_before?",
       idempotency_key AS "idempotency_key?", dispatch_seq AS "dispatch_seq!", routed_to AS "routed_to?"
FROM t
