-- Task control: priority, delayed tasks and idempotency keys. Every column is an
-- addition with a default, so existing rows and the seed's clients see no change.

-- Priority of a task: -2 (background) .. 2 (most urgent), 0 by default.
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0;
ALTER TABLE llm_tasks DROP CONSTRAINT IF EXISTS llm_tasks_priority_check;
ALTER TABLE llm_tasks ADD CONSTRAINT llm_tasks_priority_check CHECK (priority BETWEEN -2 AND 2) NOT VALID;
ALTER TABLE llm_tasks VALIDATE CONSTRAINT llm_tasks_priority_check;

-- A delayed task is not dispatched before `not_before` (epoch ms). Until it is due it
-- has no dispatch at all (`dispatch_seq` 0, no outbox row), so nothing can claim it.
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS not_before bigint;
CREATE INDEX IF NOT EXISTS llm_tasks_delayed_idx ON llm_tasks (not_before)
    WHERE status = 'queued' AND dispatch_seq = 0;

-- The idempotency key the task was submitted with, shown with the task.
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS idempotency_key text;

-- Keys seen within the retention window: a submission with a key present here (and not
-- older than the window) returns its task instead of creating another. `request_hash`
-- is the SHA-256 of the request's fields, to refuse the same key with another body.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key          text    PRIMARY KEY,
    task_id      varchar NOT NULL,
    request_hash text    NOT NULL,
    created_at   bigint  NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_idx ON idempotency_keys (created_at);
