-- A lease's end wakes waiting tasks of its own slots by probing `llm_tasks_blocked_idx`
-- (`blocked_on`, then priority and age) for each slot. The lookups of 0032 named the
-- waiting state as `status = 'queued' AND dispatch_seq <= 0 AND not_before IS NULL`,
-- which `llm_tasks_waiting_idx` (key `not_before`, `WHERE status = 'queued' AND
-- dispatch_seq <= 0`) also answers: a plan made while statistics said no task waits
-- (a new database, or any quiet moment; PL/pgSQL keeps it for the connection's life)
-- read every waiting task of every slot for each slot ended, filtering by slot: with
-- 1,500 tasks waiting, 20 ms for a 60-lease completion batch instead of 0.3. The status
-- is compared as `status || ''`, as the hot statements do, so that partial index no
-- longer matches and the only index left to answer is the slot's (the woken tasks are
-- then updated by key); `bloom_wake` probes each slot it is given instead of filtering
-- all waiting tasks by the list.
--
-- And a slot's waiting tasks are read in that index's order, up to the first that can be
-- woken. Planned on a new database (or from statistics saying almost no task is
-- blocked), the lookup read all of a slot's waiting tasks through a bitmap and sorted
-- them: 1 ms per slot with 140 waiting, against 7 µs for the ordered scan. The two
-- functions plan without sorts where they can (`enable_sort = off`, which makes a sort
-- the plan of last resort as `enable_seqscan = off` does a sequential scan), and the
-- index's order is the order asked for.

CREATE OR REPLACE FUNCTION bloom_release_slots(slots text[]) RETURNS void
LANGUAGE plpgsql SET enable_sort = off AS $$
BEGIN
    IF cardinality(slots) IS NULL OR cardinality(slots) = 0 THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1651273583, u.h)
    FROM (SELECT DISTINCT bloom_slot_lock(s) AS h FROM unnest(slots) AS s ORDER BY 1) u;
    INSERT INTO concurrency_slot_ends AS e (slot, shard, ended)
    SELECT u.slot, pg_backend_pid() % 8, count(*) FROM unnest(slots) AS u(slot) GROUP BY u.slot ORDER BY u.slot
    ON CONFLICT (slot, shard) DO UPDATE SET ended = e.ended + EXCLUDED.ended;
    UPDATE llm_tasks t SET not_before = 0
    FROM (SELECT w.id
          FROM (SELECT u.slot, count(*)::int AS n FROM unnest(slots) AS u(slot) GROUP BY u.slot) f
          CROSS JOIN LATERAL (
              SELECT b.id FROM llm_tasks b
              WHERE b.blocked_on = f.slot AND (b.status || '') = 'queued' AND b.dispatch_seq <= 0
                  AND b.not_before IS NULL
              ORDER BY b.priority DESC, b.created_at, b.id LIMIT f.n FOR UPDATE SKIP LOCKED) w) x
    WHERE t.id = x.id;
END $$;

CREATE OR REPLACE FUNCTION bloom_wake(slots text[]) RETURNS bigint
LANGUAGE plpgsql SET enable_sort = off AS $$
DECLARE
    n bigint;
BEGIN
    -- The slots named that have waiting tasks, each probed; or every slot with waiting
    -- tasks (the periodic wake: a pass over the slots' index).
    WITH waiting AS (
        SELECT DISTINCT b.blocked_on AS slot FROM llm_tasks b
        WHERE slots IS NULL AND b.blocked_on IS NOT NULL
            AND (b.status || '') = 'queued' AND b.dispatch_seq <= 0 AND b.not_before IS NULL
        UNION
        SELECT u.slot FROM unnest(slots) AS u(slot)
        CROSS JOIN LATERAL (SELECT 1 FROM llm_tasks b
                            WHERE b.blocked_on = u.slot AND (b.status || '') = 'queued' AND b.dispatch_seq <= 0
                                AND b.not_before IS NULL
                            LIMIT 1) e),
    s AS (
        SELECT c.slot, COALESCE(own.max_running, any_.max_running) - c.running AS room
        FROM waiting JOIN concurrency_slot_counts c ON c.slot = waiting.slot
        LEFT JOIN concurrency_limits own ON own.scope = c.scope AND own.key = c.key
        LEFT JOIN concurrency_limits any_ ON any_.scope = c.scope AND any_.key = '*'
        WHERE COALESCE(COALESCE(own.max_running, any_.max_running) - c.running, 1) > 0),
    x AS (
        SELECT w.id FROM s CROSS JOIN LATERAL (
            SELECT b.id FROM llm_tasks b
            WHERE b.blocked_on = s.slot AND (b.status || '') = 'queued' AND b.dispatch_seq <= 0
                AND b.not_before IS NULL
            ORDER BY b.priority DESC, b.created_at, b.id
            -- No limit any more (NULL room): all of them.
            LIMIT CASE WHEN s.room IS NOT NULL THEN
                GREATEST(s.room - (SELECT count(*) FROM llm_tasks d
                                   WHERE d.blocked_on = s.slot AND (d.status || '') = 'queued'
                                     AND d.dispatch_seq <= 0 AND d.not_before = 0), 0) END
            FOR UPDATE SKIP LOCKED) w)
    UPDATE llm_tasks t SET not_before = 0 FROM x
    WHERE t.id = x.id AND (t.status || '') = 'queued' AND t.dispatch_seq <= 0 AND t.not_before IS NULL;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;
