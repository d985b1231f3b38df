-- A recheck (`bloom_slots_recheck`, migration 0032) took each slot's advisory lock
-- exclusively and waited for the ends in flight, which hold it shared until they commit.
-- While it waited, every later end of those slots queued behind it (a lock request that
-- conflicts with a waiting one waits too): completions stalled behind the rechecks of
-- claims that put tasks aside, for as long as the slowest end in flight took to commit.
--
-- This recheck only tries the locks: the slots it gets have no end in flight (those
-- that ran before have committed, and the wake below sees them; later ones wait for this
-- short transaction), and are woken at once; the others are returned, for the caller to
-- try again shortly (then, past its patience, to wait as before).
CREATE OR REPLACE FUNCTION bloom_slots_try_recheck(slots text[]) RETURNS TABLE (woken bigint, busy text[])
LANGUAGE plpgsql AS $$
DECLARE
    got text[] := '{}';
    h integer;
    named text[];
BEGIN
    busy := '{}';
    woken := 0;
    -- Each lock once, in lock order (as the ends and the waiting recheck take them).
    FOR h, named IN
        SELECT bloom_slot_lock(s), array_agg(s) FROM unnest(slots) AS s GROUP BY 1 ORDER BY 1
    LOOP
        IF pg_try_advisory_xact_lock(1651273583, h) THEN
            got := got || named;
        ELSE
            busy := busy || named;
        END IF;
    END LOOP;
    IF cardinality(got) > 0 THEN
        woken := bloom_wake(got);
    END IF;
    RETURN NEXT;
END $$;
