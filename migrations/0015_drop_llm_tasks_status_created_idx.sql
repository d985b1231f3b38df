-- no-transaction
-- Replaced by `llm_tasks_status_created_at_idx` (0013).
DROP INDEX CONCURRENTLY IF EXISTS llm_tasks_status_created_idx;
