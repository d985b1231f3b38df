-- no-transaction
-- Tasks put aside by a concurrency limit, by slot in the order they are admitted when a
-- slot frees (highest priority, then oldest). Built concurrently: `llm_tasks` stays
-- writable meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_tasks_blocked_idx ON llm_tasks (blocked_on, priority DESC, created_at, id)
    WHERE blocked_on IS NOT NULL;
