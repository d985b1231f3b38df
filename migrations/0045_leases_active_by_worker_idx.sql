-- no-transaction
-- The active leases by worker: how a worker's running tasks are counted from migration
-- 0046 on, by the claims that lock its row and by every read of its free slots. It
-- replaces `leases_active_worker_idx` (dropped by 0046). Its predicate is met only by
-- a statement that names a worker (`worker_id = ...` implies `worker_id IS NOT NULL`)
-- and compares the status as `status || ''`: a statement about active leases in general
-- (`status = 'active'`, or `status || ''` in the statements that look leases up by id)
-- cannot take it for another partial index of the active leases, which on tables
-- without statistics the planner would read whole. Built concurrently: `leases` stays
-- writable meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS leases_active_by_worker_idx
    ON leases (worker_id) WHERE (status || '') = 'active' AND worker_id IS NOT NULL;
