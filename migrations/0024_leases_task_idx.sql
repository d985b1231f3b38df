-- no-transaction
-- A task's leases, oldest first (its page in the dashboard, `GET .../history`). Built
-- concurrently: `leases` stays writable meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS leases_task_idx ON leases (task_id, started_at);
