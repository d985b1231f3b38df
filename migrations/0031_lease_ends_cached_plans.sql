-- The two functions of 0030 that read and count lease ends, in PL/pgSQL. As SQL functions
-- that cannot be inlined (an aggregate, an INSERT), Postgres parsed and planned their
-- bodies again at every statement that called them: a claim, a submission's routing, a
-- completion's lease-end trigger. At 1,000 tasks/s that was about 0.2 ms of planning per
-- completion statement. PL/pgSQL keeps a body's plan for the connection. Same results.

CREATE OR REPLACE FUNCTION bloom_lease_ends(worker text) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT COALESCE(sum(e.ended), 0)::bigint FROM worker_lease_ends e WHERE e.worker_id = worker);
END $$;

CREATE OR REPLACE FUNCTION bloom_count_ends(workers text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO worker_lease_ends AS e (worker_id, shard, ended)
    SELECT u.id, pg_backend_pid() % 8, count(*) FROM unnest(workers) AS u(id) GROUP BY u.id ORDER BY u.id
    ON CONFLICT (worker_id, shard) DO UPDATE SET ended = e.ended + EXCLUDED.ended;
END $$;
