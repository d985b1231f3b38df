-- no-transaction
-- The listing indexes of `llm_tasks` without `id` among their keys (0012 to 0015). With
-- `id` in them, a plan made while statistics said the table was empty (a fresh
-- database, whose row count an index build had set to 0) could look a task up by `id`
-- through one of them, a pass over the whole index per row, instead of the primary key:
-- the claim statement did, and ran four times slower for the connection's life. Ties on
-- `created_at` are sorted on the few rows that share it. Built concurrently: `llm_tasks`
-- stays writable meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_tasks_created_at_idx ON llm_tasks (created_at DESC);
