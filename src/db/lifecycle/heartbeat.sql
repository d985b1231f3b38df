WITH r AS (SELECT * FROM UNNEST($1::text[], $2::text[]) AS r(task_id, lease_id)),
t AS (
   UPDATE llm_tasks t SET status = 'running', updated_at = $3
   FROM r WHERE t.id = r.task_id AND t.lease_id = r.lease_id AND (t.status || '') IN ('leased', 'running')
   RETURNING t.lease_id)
UPDATE leases l SET last_heartbeat = $3, expires_at = $3 + l.ttl_seconds::bigint * 1000
FROM t WHERE l.id = t.lease_id AND (l.status || '') = 'active'
RETURNING l.id, l.task_id, l.worker_id, l.started_at, l.expires_at, l.ttl_seconds,
          l.status AS "status: LeaseStatus", l.last_heartbeat, l.context_id
