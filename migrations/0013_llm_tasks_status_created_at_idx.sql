-- no-transaction
-- See 0012.
CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_tasks_status_created_at_idx ON llm_tasks (status, created_at DESC);
