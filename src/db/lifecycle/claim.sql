WITH r AS (
   SELECT * FROM UNNEST($3::text[], $4::bigint[], $5::text[], $6::text[], $7::int[], $8::text[])
       AS r(task_id, seq, worker_id, lease_id, ttl, audit_id)),
-- The workers' rows locked, then their free slots counted from their active leases.
room AS MATERIALIZED (SELECT id, free, draining FROM bloom_worker_room($2)),
-- Whether any provider hold is in force: almost never, and then no task is looked up
-- in the holds.
holding AS MATERIALIZED (
   SELECT EXISTS (SELECT 1 FROM provider_holds h WHERE h.until > $1) AS on_),
fresh AS (
   SELECT r.*, row_number() OVER (PARTITION BY r.worker_id ORDER BY r.task_id COLLATE "C") AS pos
   FROM r JOIN llm_tasks t ON t.id = ANY($3) AND t.id = r.task_id AND (t.status || '') = 'queued'
       AND t.dispatch_seq = r.seq
   WHERE NOT (SELECT on_ FROM holding)
       OR NOT EXISTS (SELECT 1 FROM bloom_hold(t.agent_slug, t.context_id, t.concurrency_key, $1))),
-- A task whose agent (or key) the provider rate-limited waits for the reset without a
-- dispatch (the due duty gives it one then); the claim of it is refused.
deferred AS (
   UPDATE llm_tasks t SET dispatch_seq = -t.dispatch_seq, not_before = h.until, updated_at = $1, routed_to = NULL,
          wait_reason = h.reason
   FROM r JOIN llm_tasks x ON x.id = ANY($3) AND x.id = r.task_id,
        LATERAL bloom_hold(x.agent_slug, x.context_id, x.concurrency_key, $1) h
   WHERE (SELECT on_ FROM holding) AND t.id = x.id AND (t.status || '') = 'queued'
       AND t.dispatch_seq = r.seq
   RETURNING t.id, t.wait_reason),
fit AS (
   SELECT r.* FROM fresh r JOIN room ON room.id = r.worker_id AND r.pos <= room.free),
-- Concurrency limits and budgets (when any is set): the tasks that fit are locked, then
-- admitted (`bloom_admit`, which takes the slots of those it admits and reserves on
-- their budgets); those over a limit are put aside until a slot of theirs frees, those
-- over a budget until its window ends, and their claims refused.
limited AS MATERIALIZED (
   SELECT EXISTS (SELECT 1 FROM concurrency_limits) OR EXISTS (SELECT 1 FROM budget_limits) AS on_),
locked AS MATERIALIZED (
   SELECT t.id FROM llm_tasks t JOIN fit r ON t.id = r.task_id
   WHERE (SELECT on_ FROM limited) AND (t.status || '') = 'queued' AND t.dispatch_seq = r.seq
   ORDER BY t.id FOR UPDATE OF t),
admitted AS MATERIALIZED (
   SELECT * FROM bloom_admit(ARRAY(SELECT DISTINCT id FROM locked ORDER BY id), $1) WHERE (SELECT on_ FROM limited)),
t AS (
   UPDATE llm_tasks t SET status = 'leased', lease_id = r.lease_id, worker_id = r.worker_id,
          attempts = t.attempts + 1, updated_at = $1, routed_to = NULL
   FROM fit r LEFT JOIN admitted adm ON adm.admit_task = r.task_id
   WHERE t.id = r.task_id AND (t.status || '') = 'queued' AND t.dispatch_seq = r.seq
       AND (NOT (SELECT on_ FROM limited) OR adm.admit_slots IS NOT NULL)
   RETURNING t.id, t.context_id, r.lease_id, r.worker_id, r.ttl, r.audit_id, COALESCE(adm.admit_slots, '{}') AS slots,
             COALESCE(adm.admit_charges, '[]') AS charges),
aside AS (
   UPDATE llm_tasks t SET dispatch_seq = -t.dispatch_seq, not_before = adm.admit_until, updated_at = $1,
          routed_to = NULL, blocked_on = adm.admit_blocked, wait_reason = adm.admit_reason
   FROM admitted adm
   WHERE t.id = ANY($3) AND t.id = adm.admit_task AND adm.admit_slots IS NULL
   RETURNING t.id, t.wait_reason, t.blocked_on, t.not_before),
-- Tasks put back to wait, held by their agent or over a concurrency limit.
deferred_audit AS (
   INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
   SELECT DISTINCT ON (d.id) r.audit_id, $1, 'task_deferred', 'llm_task', d.id, 'router', 'Claim deferred: ' || d.wait_reason
   FROM (SELECT id, wait_reason FROM deferred UNION ALL SELECT id, wait_reason FROM aside) d
   JOIN r ON r.task_id = d.id ORDER BY d.id, r.audit_id),
l AS (
   INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
                       context_id, slots, charges)
   SELECT lease_id, id, worker_id, $1, $1 + ttl::bigint * 1000, ttl, 'active', $1, context_id, slots, charges FROM t),
a AS (
   INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
   SELECT audit_id, $1, 'task_leased', 'lease', lease_id, 'router',
          'Task ' || id || ' leased to worker ' || worker_id || ', TTL ' || ttl || 's' FROM t),
held AS (
   SELECT DISTINCT ON (r.task_id, r.worker_id) r.task_id, r.worker_id, l.id AS lease_id, l.started_at,
          l.expires_at, l.ttl_seconds, l.last_heartbeat, l.context_id
   FROM r JOIN llm_tasks t ON t.id = ANY($3) AND t.id = r.task_id
       AND (t.status || '') IN ('leased', 'running') AND t.dispatch_seq = r.seq AND t.worker_id = r.worker_id
   JOIN leases l ON l.id = t.lease_id AND (l.status || '') = 'active'),
full_ AS (
   SELECT r.task_id, r.worker_id, COALESCE(room.draining, false) AS draining
   FROM fresh r LEFT JOIN room ON room.id = r.worker_id
   WHERE room.id IS NULL OR r.pos > room.free)
SELECT 'granted' AS "decision!", id AS "task_id!", worker_id AS "worker_id!", lease_id AS "id?",
       $1 AS "started_at?", $1 + ttl::bigint * 1000 AS "expires_at?", ttl AS "ttl_seconds?",
       $1 AS "last_heartbeat?", context_id AS "context_id?", NULL::text AS "slot?"
FROM t
UNION ALL
SELECT 'held', task_id, worker_id, lease_id, started_at, expires_at, ttl_seconds, last_heartbeat, context_id, NULL
FROM held
UNION ALL
SELECT CASE WHEN draining THEN 'draining' ELSE 'full' END, task_id, worker_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL
FROM full_
UNION ALL
-- Put aside for a full concurrency slot (not for a budget window): the caller rechecks the
-- slot once this statement has committed (`bloom_slots_recheck`).
SELECT 'aside', a.id, r.worker_id, NULL, NULL, NULL, NULL, NULL, NULL, a.blocked_on
FROM aside a JOIN r ON r.task_id = a.id
WHERE a.not_before IS NULL
