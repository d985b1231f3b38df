-- Leases ending no longer lock their worker's row. `workers.active_leases` was kept by
-- the statements that start leases (claims, REST leases, agent assignments) and by those
-- that end them (completions, expiry, cancels), both under the worker row's lock: a
-- completion waited for the claim in flight on the same worker to commit and the claim
-- for the completion, about 1.5 ms each at 1,000 tasks/s.
--
-- Ends are now counted apart: `worker_lease_ends.ended`, rows that only grow, one per
-- worker and connection (`shard`, the backend's pid modulo 8, so that the completions of
-- two reconcilers for the same worker do not wait for each other either), under those
-- rows' locks, which only ending statements take. A worker's ends are the sum of its rows
-- (`bloom_lease_ends`). `workers.ends_folded` is how much of that `active_leases` already
-- accounts for; the statements that start leases hold the worker row anyway and fold the
-- ends counted since into it. A worker's
-- active leases are `bloom_active_leases(id, active_leases, ends_folded)`: the row's count
-- less the ends not folded yet. Read in a snapshot older than a concurrent end, it counts
-- that lease as still active, never a lease too few, so a claim checking room against it
-- can only leave room unused, never exceed a worker's capacity.

CREATE TABLE IF NOT EXISTS worker_lease_ends (
    worker_id text    NOT NULL,
    shard     integer NOT NULL,
    ended     bigint  NOT NULL DEFAULT 0 CHECK (ended >= 0),
    PRIMARY KEY (worker_id, shard)
);
ALTER TABLE workers ADD COLUMN IF NOT EXISTS ends_folded bigint NOT NULL DEFAULT 0;

-- The leases of a worker counted as ended.
CREATE OR REPLACE FUNCTION bloom_lease_ends(worker text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(sum(e.ended), 0)::bigint FROM worker_lease_ends e WHERE e.worker_id = worker
$$;

-- The active leases of a worker row.
CREATE OR REPLACE FUNCTION bloom_active_leases(worker text, counted integer, folded bigint) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT GREATEST(counted - GREATEST(bloom_lease_ends(worker) - folded, 0), 0)::int
$$;

-- Counts ended leases by worker on this connection's rows (locked in worker order, as the
-- ending statements of other transactions lock them).
CREATE OR REPLACE FUNCTION bloom_count_ends(workers text[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO worker_lease_ends AS e (worker_id, shard, ended)
    SELECT u.id, pg_backend_pid() % 8, count(*) FROM unnest(workers) AS u(id) GROUP BY u.id ORDER BY u.id
    ON CONFLICT (worker_id, shard) DO UPDATE SET ended = e.ended + EXCLUDED.ended
$$;

-- Leases started: the workers' rows are locked (claims hold them already) and take the
-- new leases and the ends counted since the last fold.
CREATE OR REPLACE FUNCTION bloom_leases_started() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM workers
    WHERE id IN (SELECT worker_id FROM started WHERE status = 'active') ORDER BY id FOR UPDATE;
    UPDATE workers w
    SET active_leases = GREATEST(w.active_leases - GREATEST(s.ended - w.ends_folded, 0), 0) + s.n,
        ends_folded = GREATEST(s.ended, w.ends_folded)
    FROM (SELECT worker_id, count(*)::int AS n, bloom_lease_ends(worker_id) AS ended
          FROM started WHERE status = 'active' GROUP BY worker_id) s
    WHERE w.id = s.worker_id;
    RETURN NULL;
END $$;

-- The lease-end trigger of 0026, counting the ends instead of locking the workers.
CREATE OR REPLACE FUNCTION bloom_leases_ended() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ended_workers text[];
    freed text[];
    items jsonb;
BEGIN
    WITH ended AS MATERIALIZED (
        SELECT b.worker_id, b.slots, a.charges, a.used_tokens, a.used_usd
        FROM before_rows b JOIN after_rows a ON a.id = b.id
        WHERE b.status = 'active' AND a.status <> 'active')
    SELECT ARRAY(SELECT e.worker_id FROM ended e),
           ARRAY(SELECT s FROM ended e, unnest(e.slots) AS s),
           (SELECT jsonb_agg(ch || jsonb_build_object('used', CASE ch->>'metric'
                       WHEN 'tokens' THEN to_jsonb(e.used_tokens)
                       WHEN 'usd' THEN to_jsonb(e.used_usd)
                       ELSE ch->'amount' END))
            FROM ended e, jsonb_array_elements(e.charges) AS ch
            WHERE e.charges <> '[]' AND (e.used_tokens IS NOT NULL OR e.used_usd IS NOT NULL))
    INTO ended_workers, freed, items;
    IF cardinality(ended_workers) = 0 THEN
        RETURN NULL;
    END IF;
    -- Ends counted in worker order, then slots, then budget counters.
    PERFORM bloom_count_ends(ended_workers);
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
    PERFORM bloom_count_ends(ARRAY(SELECT worker_id FROM gone WHERE status = 'active'));
    PERFORM bloom_release_slots(ARRAY(SELECT s FROM gone, unnest(gone.slots) AS s WHERE gone.status = 'active'));
    RETURN NULL;
END $$;

-- A worker row created while its id holds leases (re-registered after a removal) starts
-- from their count, with every end counted so far folded.
CREATE OR REPLACE FUNCTION bloom_worker_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.active_leases := (SELECT count(*) FROM leases WHERE worker_id = NEW.id AND status = 'active');
    NEW.ends_folded := bloom_lease_ends(NEW.id);
    RETURN NEW;
END $$;
