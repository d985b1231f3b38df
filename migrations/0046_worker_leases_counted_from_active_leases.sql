-- A worker's running tasks are counted from its active leases, not kept in its row.
--
-- Since migration 0030 a statement that started leases ran a trigger that locked the
-- workers' rows and added the new leases to `workers.active_leases`, folding in the ends
-- that the lease-end trigger had counted apart in `worker_lease_ends` (a row per worker
-- and connection). Every task so paid two trigger runs of several statements each: about
-- 0.15 ms of Postgres for the start and 0.1 ms for the end, a claim and a completion
-- timed alone (`pgbench`), which at batches of one is a seventh of Postgres's time per
-- task.
--
-- Now a worker's active leases are counted where its free slots are read, from
-- `leases_active_by_worker_idx` (migration 0045): a worker holds at most its
-- `max_concurrency` of them. The statements that start leases lock the worker's row
-- first, as before, and count after the lock in a statement of its own
-- (`bloom_worker_room`; a REST lease and an agent assignment lock the row in one
-- statement and read it in the next), so the count's snapshot sees the leases of every
-- statement that held the lock before (they commit before releasing it). An end that has
-- not committed yet still counts, the safe side: a claim may leave a slot unused for a
-- moment, never fill one twice. Ends write nothing for their worker; the lease-end
-- trigger is left with the concurrency slots and budgets, and returns at once for leases
-- that hold neither.

-- A worker's active leases.
CREATE OR REPLACE FUNCTION bloom_worker_leases(worker text) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT count(*) FROM leases l WHERE l.worker_id = worker COLLATE "C" AND (l.status || '') = 'active');
END $$;

-- The room of the workers `ids`, for a claim: their rows locked in id order, then their
-- free slots counted in a statement that starts after the locks (only the rows locked: a
-- worker inserted meanwhile has none). Volatile, so that its statements take snapshots
-- of their own; refused in a transaction whose snapshot is its first statement's.
CREATE OR REPLACE FUNCTION bloom_worker_room(ids text[])
RETURNS TABLE (id text, free integer, draining boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    locked text[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'bloom_worker_room needs READ COMMITTED (a snapshot per statement), not %',
            current_setting('transaction_isolation');
    END IF;
    locked := ARRAY(SELECT w.id FROM workers w WHERE w.id = ANY(ids) ORDER BY w.id FOR UPDATE);
    RETURN QUERY
        SELECT w.id::text,
               CASE WHEN w.draining_since IS NULL
                    THEN COALESCE((w.capabilities->>'max_concurrency')::int, 1) - bloom_worker_leases(w.id)
                    ELSE 0 END,
               w.draining_since IS NOT NULL
        FROM workers w WHERE w.id = ANY(locked);
END $$;

-- The lease-end trigger without the worker's ends: slots released, budgets settled. A
-- statement whose ended leases hold no slot and no reservation returns after one pass
-- over the rows it changed.
CREATE OR REPLACE FUNCTION bloom_leases_ended() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    freed text[];
    items jsonb;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM before_rows b
                   WHERE b.status = 'active' AND (cardinality(b.slots) > 0 OR b.charges <> '[]')) THEN
        RETURN NULL;
    END IF;
    WITH rows_ AS (
        SELECT b.id, true AS before_, b.status = 'active' AS active,
               NULL::text[] AS slots, NULL::jsonb AS charges, NULL::bigint AS used_tokens,
               NULL::float8 AS used_usd
        FROM before_rows b
        UNION ALL
        SELECT a.id, false, a.status = 'active', a.slots, a.charges, a.used_tokens, a.used_usd
        FROM after_rows a),
    ended AS MATERIALIZED (
        SELECT max(r.slots) AS slots,
               (array_agg(r.charges) FILTER (WHERE NOT r.before_))[1] AS charges,
               max(r.used_tokens) AS used_tokens, max(r.used_usd) AS used_usd
        FROM rows_ r
        GROUP BY r.id
        HAVING bool_or(r.before_ AND r.active) AND bool_or(NOT r.before_ AND NOT r.active))
    SELECT ARRAY(SELECT s FROM ended e, unnest(e.slots) AS s),
           (SELECT jsonb_agg(ch || jsonb_build_object('used', CASE ch->>'metric'
                       WHEN 'tokens' THEN to_jsonb(e.used_tokens)
                       WHEN 'usd' THEN to_jsonb(e.used_usd)
                       ELSE ch->'amount' END))
            FROM ended e, jsonb_array_elements(e.charges) AS ch
            WHERE e.charges <> '[]' AND (e.used_tokens IS NOT NULL OR e.used_usd IS NOT NULL))
    INTO freed, items;
    -- Slots, then budget counters.
    IF cardinality(freed) > 0 THEN
        PERFORM bloom_release_slots(freed);
    END IF;
    IF items IS NOT NULL THEN
        PERFORM bloom_settle(items);
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION bloom_leases_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bloom_release_slots(ARRAY(SELECT s FROM gone, unnest(gone.slots) AS s WHERE gone.status = 'active'));
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS leases_started ON leases;
DROP FUNCTION IF EXISTS bloom_leases_started();
DROP TRIGGER IF EXISTS workers_inserted ON workers;
DROP FUNCTION IF EXISTS bloom_worker_inserted();
DROP FUNCTION IF EXISTS bloom_count_ends(text[]);

-- For the processes of the previous release until they are replaced, whose statements
-- read a worker's free slots as `bloom_active_leases(id, active_leases, ends_folded)`,
-- in a claim or a REST lease on the worker's row as that row is locked: the worker's row
-- is locked here first, and its leases counted after the lock, so such a claim cannot
-- overfill the worker either. Their other reads of it (worker lists, a submission's
-- routing, the choice of a REST lease's worker, agent assignment, redispatch) then lock
-- the rows they read too, in scan order: until those processes are replaced they can
-- wait for claims, and Postgres may abort one of two such transactions as a deadlock
-- (the request fails and is retried; nothing is lost or overfilled). The two columns
-- stay, no longer kept, for those statements to parse. A later migration drops all three.
DROP FUNCTION IF EXISTS bloom_active_leases(text, integer, bigint);
DROP FUNCTION IF EXISTS bloom_lease_ends(text);
CREATE FUNCTION bloom_active_leases(worker text, counted integer, folded bigint) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM workers w WHERE w.id = worker COLLATE "C" FOR UPDATE;
    RETURN bloom_worker_leases(worker);
END $$;
COMMENT ON COLUMN workers.active_leases IS 'Unused since migration 0046 (see bloom_worker_leases).';
COMMENT ON COLUMN workers.ends_folded IS 'Unused since migration 0046 (see bloom_worker_leases).';

DROP TABLE IF EXISTS worker_lease_ends;
DROP INDEX IF EXISTS leases_active_worker_idx;
