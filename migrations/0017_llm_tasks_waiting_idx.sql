-- no-transaction
-- Queued tasks without a current dispatch (delayed, or waiting to be tried again) by the
-- time they are due: replaces `llm_tasks_delayed_idx` (0011), which knew only delayed
-- tasks (`dispatch_seq = 0`). Built concurrently: `llm_tasks` stays writable meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS llm_tasks_waiting_idx ON llm_tasks (not_before)
    WHERE status = 'queued' AND dispatch_seq <= 0;
