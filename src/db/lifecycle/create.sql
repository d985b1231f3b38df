WITH r AS (
   SELECT * FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::jsonb[], $8::jsonb[],
                        $9::text[], $10::int[], $11::text[], $12::text[], $13::smallint[], $14::bigint[], $15::text[], $16::text[])
       AS r(id, context_id, agent_slug, prompt, context_hints, policy, desired_format, max_attempts, audit_id,
            audit, priority, not_before, idempotency_key, concurrency_key)),
recent AS (
   SELECT c.context_id, l.worker_id
   FROM (SELECT DISTINCT unnest($4::text[]) AS context_id) c
   CROSS JOIN LATERAL (
       SELECT worker_id FROM leases
       WHERE status = 'active' AND context_id = c.context_id
       ORDER BY started_at DESC LIMIT 1) l),
-- Whether any concurrency limit is set. A task that one governs (its own key's limit or
-- its scope's `*`, in any scope: what `bloom_task_slots` finds for a stored task) is not
-- routed to its context's worker: the context's running task holds a slot the new one
-- needs (with a limit of 1 on the context, always), so routed it would be claimed at
-- once, ahead of the pool's backlog, and put aside; and running ahead of its key's
-- earlier tasks in the pool, it would make them find the slot full in turn.
limits AS MATERIALIZED (
   SELECT EXISTS (SELECT 1 FROM concurrency_limits) AS on_),
sticky AS (
   SELECT recent.context_id, recent.worker_id
   FROM recent CROSS JOIN LATERAL (
       -- LIMIT keeps this a lookup by key per context (no join order that walks
       -- every worker), whatever the statistics of `workers` say.
       SELECT 1 FROM workers w
       WHERE w.id = recent.worker_id AND (w.status || '') = 'online' AND w.source = 'nats' AND w.draining_since IS NULL
         AND COALESCE((w.capabilities->>'claude_cli')::boolean, true)
         AND bloom_worker_leases(w.id) < COALESCE((w.capabilities->>'max_concurrency')::int, 1)
       LIMIT 1) w),
t AS (
   -- A delayed task (`not_before` set: it is in the future) gets no dispatch yet.
   INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
                          created_at, updated_at, attempts, max_attempts, priority, not_before, idempotency_key,
                          concurrency_key, dispatch_seq, routed_to)
   SELECT r.id, r.context_id, r.agent_slug, r.prompt, r.context_hints, r.policy, r.desired_format, 'queued',
          $1, $1, 0, r.max_attempts, r.priority, r.not_before, r.idempotency_key, r.concurrency_key,
          CASE WHEN r.not_before IS NULL THEN 1 ELSE 0 END,
          CASE WHEN r.not_before IS NULL THEN s.worker_id END
   FROM r LEFT JOIN sticky s ON s.context_id = r.context_id
       AND NOT ((SELECT on_ FROM limits) AND EXISTS (
           SELECT 1 FROM (VALUES ('context_id', r.context_id), ('context_id', '*'),
                                 ('agent_slug', r.agent_slug), ('agent_slug', '*'),
                                 ('concurrency_key', r.concurrency_key),
                                 ('concurrency_key', CASE WHEN r.concurrency_key IS NOT NULL THEN '*' END))
                   AS k(scope, key)
           JOIN concurrency_limits l ON l.scope = k.scope AND l.key = k.key))
   RETURNING id, routed_to, dispatch_seq),
o AS (
   INSERT INTO outbox (task_id, dispatch_seq, worker_id, created_at)
   SELECT id, 1, routed_to, $1 FROM t WHERE dispatch_seq = 1 RETURNING id, task_id, worker_id),
a AS (
   INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
   SELECT r.audit_id, $1, 'task_created', 'llm_task', r.id, $2, r.audit FROM r)
SELECT task_id AS "task_id!", id AS "outbox_id?", worker_id AS "routed_to?" FROM o
UNION ALL
SELECT id, NULL, NULL FROM t WHERE dispatch_seq = 0
