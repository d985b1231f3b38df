-- The lease-end trigger reads the statement's ended leases once (one join of the old and
-- new rows instead of one per step) and returns at once when none ended (a heartbeat);
-- the settlement runs only for leases that reserved on a budget. Same effects as 0023's.
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
    -- Workers locked in id order, then slots, then budget counters (as 0023).
    PERFORM 1 FROM workers WHERE id = ANY(ended_workers) ORDER BY id FOR UPDATE;
    UPDATE workers w SET active_leases = GREATEST(w.active_leases - e.n, 0)
    FROM (SELECT u.id, count(*)::int AS n FROM unnest(ended_workers) AS u(id) GROUP BY u.id) e
    WHERE w.id = e.id;
    IF cardinality(freed) > 0 THEN
        PERFORM bloom_release_slots(freed);
    END IF;
    IF items IS NOT NULL THEN
        PERFORM bloom_settle(items);
    END IF;
    RETURN NULL;
END $$;
