-- Whether a concurrency limit governs a task with these keys: a limit of its own key or
-- its scope's `*`, in any of the three scopes (what `bloom_task_slots` finds for a stored
-- task). Inlined where it is called.
--
-- A new task is routed to the worker running its context (sticky routing) only when no
-- limit governs it. Under a limit, the context's running task holds a slot the new
-- one needs (with a limit of 1 on the context, always): routed, it went straight to that
-- worker's own subject, was claimed at once ahead of the pool's backlog, found its slot
-- full and was put aside to be dispatched a second time; and running ahead of its key's
-- earlier tasks in the pool, it made them find the slot full in turn. With 1,000 keys of
-- limit 1 at saturation, routed tasks were a quarter of the dispatches and the cause of
-- nearly every task put aside (1,400–1,600 per 20,000 tasks, 50 without routing).
CREATE OR REPLACE FUNCTION bloom_limited(context_id text, agent_slug text, concurrency_key text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM concurrency_limits l
                   WHERE (l.scope = 'context_id' AND l.key IN (context_id, '*'))
                      OR (l.scope = 'agent_slug' AND l.key IN (agent_slug, '*'))
                      OR (l.scope = 'concurrency_key' AND concurrency_key IS NOT NULL
                          AND l.key IN (concurrency_key, '*')))
$$;
