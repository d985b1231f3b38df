-- Ends counted on one row per worker and connection (`shard`, the backend's pid modulo 8)
-- instead of one per worker: the completions of two reconcilers for the same worker no
-- longer wait for each other's commit on that row. A worker's ends are the sum of its rows.
ALTER TABLE worker_lease_ends ADD COLUMN IF NOT EXISTS shard integer NOT NULL DEFAULT 0;
ALTER TABLE worker_lease_ends DROP CONSTRAINT IF EXISTS worker_lease_ends_pkey;
ALTER TABLE worker_lease_ends ADD CONSTRAINT worker_lease_ends_pkey PRIMARY KEY (worker_id, shard);

CREATE OR REPLACE FUNCTION bloom_lease_ends(worker text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT COALESCE(sum(e.ended), 0)::bigint FROM worker_lease_ends e WHERE e.worker_id = worker
$$;

CREATE OR REPLACE FUNCTION bloom_active_leases(worker text, counted integer, folded bigint) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT GREATEST(counted - GREATEST(bloom_lease_ends(worker) - folded, 0), 0)::int
$$;

CREATE OR REPLACE FUNCTION bloom_count_ends(workers text[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO worker_lease_ends AS e (worker_id, shard, ended)
    SELECT u.id, pg_backend_pid() % 8, count(*) FROM unnest(workers) AS u(id) GROUP BY u.id ORDER BY u.id
    ON CONFLICT (worker_id, shard) DO UPDATE SET ended = e.ended + EXCLUDED.ended
$$;

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

CREATE OR REPLACE FUNCTION bloom_worker_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.active_leases := (SELECT count(*) FROM leases WHERE worker_id = NEW.id AND status = 'active');
    NEW.ends_folded := bloom_lease_ends(NEW.id);
    RETURN NEW;
END $$;
