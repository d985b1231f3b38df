-- no-transaction
-- Replaced by `llm_tasks_waiting_idx` (0017).
DROP INDEX CONCURRENTLY IF EXISTS llm_tasks_delayed_idx;
