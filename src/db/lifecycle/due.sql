-- Tasks due (delayed, retried later, or woken by a freed concurrency slot) get a
-- dispatch. The due ones are found through the index of waiting tasks by `not_before`
-- (`bloom_due_tasks`, migration 0037, which locks them); their rows are then updated by
-- key: the update compares the status as `status || ''`, so that index cannot answer it
-- (a generic plan made while few tasks waited read every waiting task at each pass,
-- thousands behind a busy concurrency key).
UPDATE llm_tasks t SET dispatch_seq = 1 - t.dispatch_seq, updated_at = $1, wait_reason = NULL,
                       blocked_on = NULL
WHERE t.id = ANY(ARRAY(SELECT d.id FROM bloom_due_tasks($1, $2) d)) AND (t.status || '') = 'queued'
    AND t.dispatch_seq <= 0
RETURNING t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints AS "context_hints: Json<Vec<String>>",
          t.policy AS "policy: Json<Policy>", t.desired_format AS "desired_format: DesiredFormat",
          t.status AS "status: TaskStatus", t.created_at, t.updated_at, t.lease_id, t.worker_id,
          t.attempts, t.max_attempts, t.priority, t.not_before, t.idempotency_key, t.concurrency_key, t.wait_reason, t.last_error, t.dispatch_seq,
          t.routed_to
