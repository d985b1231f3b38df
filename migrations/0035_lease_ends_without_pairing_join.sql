-- The lease-update trigger of 0030 found the leases a statement ended by joining its
-- transition tables (`before_rows JOIN after_rows ON id`). PL/pgSQL plans that once per
-- connection, with the row counts of its first call: on a connection whose first
-- completion ended one lease the join is a nested loop, and every later statement that
-- updates n leases (a completion batch, a heartbeat batch) reads `after_rows` n times,
-- n² rows. Here the two tables are read once each and grouped by lease id (a hash or a
-- sort whatever the plan): a lease ended when its row was active before the statement
-- and is not after it. What an ended lease gives back is read from its new row, which
-- no ending statement changes (worker, slots, charges) beside the usage it records.

CREATE OR REPLACE FUNCTION bloom_leases_ended() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ended_workers text[];
    freed text[];
    items jsonb;
BEGIN
    WITH rows_ AS (
        SELECT b.id, true AS before_, b.status = 'active' AS active, NULL::text AS worker_id,
               NULL::text[] AS slots, NULL::jsonb AS charges, NULL::bigint AS used_tokens,
               NULL::float8 AS used_usd
        FROM before_rows b
        UNION ALL
        SELECT a.id, false, a.status = 'active', a.worker_id, a.slots, a.charges, a.used_tokens, a.used_usd
        FROM after_rows a),
    ended AS MATERIALIZED (
        SELECT max(r.worker_id) AS worker_id, max(r.slots) AS slots,
               (array_agg(r.charges) FILTER (WHERE NOT r.before_))[1] AS charges,
               max(r.used_tokens) AS used_tokens, max(r.used_usd) AS used_usd
        FROM rows_ r
        GROUP BY r.id
        HAVING bool_or(r.before_ AND r.active) AND bool_or(NOT r.before_ AND NOT r.active))
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
