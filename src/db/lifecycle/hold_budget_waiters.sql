-- Due waiters of budget counters beyond what the counters can admit now wait for the
-- next window (see `due.rs`). The due tasks are those `due.sql` takes next (locked here
-- already), a counter's due waiters are read through the index of blocked tasks by
-- counter, and the rows held are updated by key: `status || ''` keeps the indexes of
-- all waiting (or all queued) tasks from answering these lookups.
WITH due AS (
  SELECT t.blocked_on FROM llm_tasks t
  WHERE t.id = ANY(ARRAY(SELECT d.id FROM bloom_due_tasks($1, $2) d WHERE EXISTS (SELECT 1 FROM budget_limits)))),
-- The counters passed as a column, not a subquery: a SQL function's body is
-- inlined into this statement's plan only then, else planned at every call.
b AS (SELECT r.* FROM (SELECT ARRAY(SELECT DISTINCT blocked_on FROM due WHERE blocked_on IS NOT NULL) AS counters) x
      CROSS JOIN LATERAL bloom_budget_room(x.counters, $1) r),
w AS (
  SELECT t.id, t.blocked_on, t.priority, t.created_at, t.policy FROM llm_tasks t
  WHERE t.blocked_on = ANY(ARRAY(SELECT counter FROM b)) AND (t.status || '') = 'queued' AND t.dispatch_seq <= 0
    AND t.not_before <= $1
  FOR UPDATE SKIP LOCKED),
ranked AS (
  SELECT w.id, b.*, r.reserve,
         sum(r.reserve) OVER (PARTITION BY b.counter ORDER BY w.priority DESC, w.created_at, w.id) AS upto
  FROM w JOIN b ON b.counter = w.blocked_on
  CROSS JOIN LATERAL (SELECT bloom_reserve(b.metric, b.max_amount, w.policy, b.estimate, b.average) AS reserve) r),
held AS (
  UPDATE llm_tasks t SET not_before = h.window_end, updated_at = $1,
         wait_reason = 'budget of ' || h.scope || ' ' || h.key || ' for ' || h.metric || ' per ' || h.period
                       || ' taken by tasks ahead (' || bloom_amount(h.metric, GREATEST(h.room, 0)) || ' of '
                       || bloom_amount(h.metric, h.max_amount) || ' left) until ' || bloom_iso_time(h.window_end)
  FROM ranked h
  WHERE t.id = h.id AND (t.status || '') = 'queued' AND t.dispatch_seq <= 0
    AND NOT (h.upto <= h.room AND h.upto - h.reserve < h.room)
  RETURNING t.id, t.wait_reason)
INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
SELECT gen_random_uuid()::text, $1, 'task_deferred', 'llm_task', id, 'reconciler', 'Still waiting: ' || wait_reason
FROM held
