-- no-transaction
-- Results by completion time: usage and cost over a time range (`GET /api/runtime/usage`).
CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_results_completed_at_idx ON llm_results (completed_at);
