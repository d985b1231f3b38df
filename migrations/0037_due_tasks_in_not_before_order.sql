-- The due pass took its tasks with
--   SELECT id FROM llm_tasks WHERE status = 'queued' AND dispatch_seq <= 0 AND not_before <= $1
--   ORDER BY not_before LIMIT $2 FOR UPDATE SKIP LOCKED
-- meant for the partial index of waiting tasks by `not_before`. Planned once from
-- statistics that say no task is queued (a busy installation's, most of the time), the
-- index of all tasks by status answered `status = 'queued'` as well, then the rows were
-- sorted: every queued task read at each pass (the pool's backlog and every task waiting
-- for a concurrency slot). Here the lookup plans without sorts, so only the waiting
-- index read in its order answers it, up to the batch.
CREATE OR REPLACE FUNCTION bloom_due_tasks(at_ms bigint, n bigint) RETURNS TABLE (id text)
LANGUAGE plpgsql SET enable_sort = off AS $$
BEGIN
    RETURN QUERY
    SELECT t.id::text FROM llm_tasks t
    WHERE t.status = 'queued' AND t.dispatch_seq <= 0 AND t.not_before <= at_ms
    ORDER BY t.not_before LIMIT n FOR UPDATE SKIP LOCKED;
END $$;
