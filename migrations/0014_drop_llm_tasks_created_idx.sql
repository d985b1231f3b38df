-- no-transaction
-- Replaced by `llm_tasks_created_at_idx` (0012).
DROP INDEX CONCURRENTLY IF EXISTS llm_tasks_created_idx;
