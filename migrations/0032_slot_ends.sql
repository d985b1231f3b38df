-- Leases ending no longer lock their concurrency slots' rows. A slot's count of running
-- tasks was kept by admissions (which lock the slot rows to decide, and hold them to the
-- claim's commit) and by the lease-end triggers, which locked the same rows to give the
-- slots back: a completion waited for every claim in flight that had locked one of its
-- slots, as completions once waited for claims on the worker row (migration 0030).
--
-- Ends are now counted apart, as the workers' are: `concurrency_slot_ends.ended`, rows
-- that only grow, one per slot and connection (`shard`, the backend's pid modulo 8),
-- under those rows' locks, which only ending statements take. `concurrency_slots.counted`
-- (formerly `running`) is what the last admission counted, and `ends_folded` how much of
-- the ends it took into account; a slot's running tasks are the count less the ends not
-- folded yet (`concurrency_slot_counts`). Admissions hold the slot rows anyway: they read
-- the ends after the lock and fold them. Read in a snapshot older than a concurrent end,
-- a slot counts that lease as still running, never one too few, so an admission can only
-- leave room unused, never exceed a limit.
--
-- Waking the waiting: a lease's end makes that many of its slot's waiting tasks due, as
-- before. Without the slot row's lock, an admission that saw the slot full (before an end
-- committed) can put a task aside that the end's wake (before the admission committed)
-- does not see. So after an admission that put tasks aside for full slots commits,
-- `bloom_slots_recheck` waits for the ends of those slots in flight (an advisory lock
-- that every ending statement holds shared for its slots until its commit, and the
-- recheck takes exclusive) and then makes due the tasks the slots have room for: every end either
-- committed before the recheck reads, or started its wake after the admission committed.

ALTER TABLE concurrency_slots RENAME COLUMN running TO counted;
ALTER TABLE concurrency_slots RENAME CONSTRAINT concurrency_slots_running_check TO concurrency_slots_counted_check;
ALTER TABLE concurrency_slots ADD COLUMN IF NOT EXISTS ends_folded bigint NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS concurrency_slot_ends (
    slot  text    NOT NULL,
    shard integer NOT NULL,
    ended bigint  NOT NULL DEFAULT 0 CHECK (ended >= 0),
    PRIMARY KEY (slot, shard)
);

-- The running tasks of each slot: what wakes decide on, and what the API and `bloomctl`
-- show (admissions compute the same under the slot rows' locks).
CREATE OR REPLACE VIEW concurrency_slot_counts AS
    SELECT c.slot, c.scope, c.key,
           GREATEST(c.counted - GREATEST(COALESCE(e.ended, 0) - c.ends_folded, 0), 0)::int AS running
    FROM concurrency_slots c
    LEFT JOIN LATERAL (SELECT sum(x.ended)::bigint AS ended FROM concurrency_slot_ends x WHERE x.slot = c.slot) e ON true;

-- The advisory lock of a slot, in the two-key form: 1651273583 (the bytes of "bloo")
-- names the use, this the slot. Held shared by the statements that end its leases,
-- exclusive by a recheck. Two slots of the same hash share a lock: a wait too many.
CREATE OR REPLACE FUNCTION bloom_slot_lock(slot text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$ SELECT hashtext(slot) $$;

-- The admission of migration 0023, with a slot's running tasks its count less the ends
-- not folded yet, and the ends read folded with the new count. In time linear in the
-- batch: the slots' counts are kept in integer arrays indexed by each entry's place
-- among the distinct slots in name order (`dense_rank`), where 0023 copied a JSON object
-- at every change and ordered entries by `array_position` (both quadratic); the slot rows
-- are locked and read in one statement; missing slot rows are looked up before they are
-- inserted.
CREATE OR REPLACE FUNCTION bloom_admit(ids text[], now bigint)
RETURNS TABLE (admit_task text, admit_slots text[], admit_charges jsonb, admit_blocked text, admit_until bigint,
               admit_reason text)
LANGUAGE plpgsql AS $$
DECLARE
    w_task text[];
    w_slot text[];
    w_scope text[];
    w_key text[];
    w_max int[];
    w_at int[];
    s_slot text[];
    s_used int[];
    s_folded bigint[];
    c_task text[];
    c_counter text[];
    c_scope text[];
    c_key text[];
    c_metric text[];
    c_period text[];
    c_max float8[];
    c_reserve float8[];
    spent jsonb := '{}';
    opened jsonb := '{}';
    charges jsonb;
    n int;
    m int;
    i int := 1;
    ci int := 1;
    j int;
    cj int;
    k int;
    cur text;
BEGIN
    ids := ARRAY(SELECT u.id FROM unnest(ids) WITH ORDINALITY AS u(id, pos) GROUP BY u.id ORDER BY min(u.pos));
    IF cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM concurrency_limits) THEN
        -- Read once: the slots created and locked below are exactly those decided on.
        -- Entries in the order of `ids`, then by slot; `w_at`: the entry's slot's place
        -- among the distinct slots in name order (`s_slot`).
        SELECT array_agg(x.task_id ORDER BY x.pos, x.slot), array_agg(x.slot ORDER BY x.pos, x.slot),
               array_agg(x.scope ORDER BY x.pos, x.slot), array_agg(x.key ORDER BY x.pos, x.slot),
               array_agg(x.max_running ORDER BY x.pos, x.slot), array_agg(x.at ORDER BY x.pos, x.slot),
               array_agg(DISTINCT x.slot ORDER BY x.slot)
        INTO w_task, w_slot, w_scope, w_key, w_max, w_at, s_slot
        FROM (SELECT w.*, o.pos, dense_rank() OVER (ORDER BY w.slot)::int AS at
              FROM bloom_task_slots(ids) w JOIN unnest(ids) WITH ORDINALITY AS o(id, pos) ON o.id = w.task_id) x;
    END IF;
    IF EXISTS (SELECT 1 FROM budget_limits) THEN
        SELECT array_agg(c.task_id ORDER BY array_position(ids, c.task_id), c.counter),
               array_agg(c.counter ORDER BY array_position(ids, c.task_id), c.counter),
               array_agg(c.scope ORDER BY array_position(ids, c.task_id), c.counter),
               array_agg(c.key ORDER BY array_position(ids, c.task_id), c.counter),
               array_agg(c.metric ORDER BY array_position(ids, c.task_id), c.counter),
               array_agg(c.period ORDER BY array_position(ids, c.task_id), c.counter),
               array_agg(c.max_amount ORDER BY array_position(ids, c.task_id), c.counter),
               array_agg(c.reserve ORDER BY array_position(ids, c.task_id), c.counter)
        INTO c_task, c_counter, c_scope, c_key, c_metric, c_period, c_max, c_reserve
        FROM bloom_task_counters(ids) c;
    END IF;
    IF w_task IS NULL AND c_task IS NULL THEN
        RETURN QUERY SELECT u.id, '{}'::text[], '[]'::jsonb, NULL::text, NULL::bigint, NULL::text FROM unnest(ids) AS u(id);
        RETURN;
    END IF;
    IF w_task IS NOT NULL THEN
        INSERT INTO concurrency_slots (slot, scope, key)
        SELECT DISTINCT ON (u.slot) u.slot, u.scope, u.key FROM unnest(w_slot, w_scope, w_key) AS u(slot, scope, key)
        WHERE NOT EXISTS (SELECT 1 FROM concurrency_slots c WHERE c.slot = u.slot)
        ORDER BY u.slot
        ON CONFLICT (slot) DO NOTHING;
        -- Locked in name order; each row as it is after the lock, its ends as of this
        -- statement's start (an end committed while this waited for the lock is folded
        -- by a later admission: until then the slot counts its lease as running).
        SELECT array_agg(GREATEST(s.counted - GREATEST(s.ended - s.ends_folded, 0), 0) ORDER BY s.slot),
               array_agg(GREATEST(s.ended, s.ends_folded) ORDER BY s.slot)
        INTO s_used, s_folded
        FROM (SELECT c.slot, c.counted, c.ends_folded,
                     (SELECT COALESCE(sum(e.ended), 0)::bigint FROM concurrency_slot_ends e WHERE e.slot = c.slot) AS ended
              FROM concurrency_slots c WHERE c.slot = ANY(s_slot) ORDER BY c.slot FOR UPDATE) s;
        IF COALESCE(cardinality(s_used), 0) <> cardinality(s_slot) THEN
            RAISE EXCEPTION 'bloom_admit: a concurrency slot row is missing';
        END IF;
    END IF;
    IF c_task IS NOT NULL THEN
        INSERT INTO budget_counters (counter, scope, key, metric, period)
        SELECT DISTINCT ON (u.counter) u.counter, u.scope, u.key, u.metric, u.period
        FROM unnest(c_counter, c_scope, c_key, c_metric, c_period) AS u(counter, scope, key, metric, period)
        ORDER BY u.counter
        ON CONFLICT (counter) DO NOTHING;
        PERFORM 1 FROM budget_counters c WHERE c.counter = ANY(c_counter) ORDER BY c.counter FOR UPDATE;
        -- A window past: the counter starts the current one, empty.
        UPDATE budget_counters c SET window_start = now - now % bloom_period_ms(c.period), used = 0
        WHERE c.counter = ANY(c_counter) AND c.window_start < now - now % bloom_period_ms(c.period);
        SELECT COALESCE(jsonb_object_agg(c.counter, c.used), '{}'), COALESCE(jsonb_object_agg(c.counter, c.window_start), '{}')
        INTO spent, opened
        FROM budget_counters c WHERE c.counter = ANY(c_counter);
        IF EXISTS (SELECT 1 FROM unnest(c_counter) AS u(counter) WHERE NOT spent ? u.counter) THEN
            RAISE EXCEPTION 'bloom_admit: a budget counter row is missing';
        END IF;
    END IF;
    n := COALESCE(cardinality(w_task), 0);
    m := COALESCE(cardinality(c_task), 0);
    -- The entries of each task are consecutive, in the order of `ids`.
    FOREACH cur IN ARRAY ids LOOP
        j := i;
        WHILE j <= n AND w_task[j] = cur LOOP
            j := j + 1;
        END LOOP;
        cj := ci;
        WHILE cj <= m AND c_task[cj] = cur LOOP
            cj := cj + 1;
        END LOOP;
        admit_task := cur;
        admit_slots := '{}';
        admit_charges := '[]';
        admit_blocked := NULL;
        admit_until := NULL;
        admit_reason := NULL;
        FOR k IN i..j - 1 LOOP
            IF s_used[w_at[k]] >= w_max[k] THEN
                admit_slots := NULL;
                admit_charges := NULL;
                admit_blocked := w_slot[k];
                admit_reason := 'concurrency limit of ' || regexp_replace(w_slot[k], ':', ' ') || ' reached ('
                                || w_max[k] || ' running)';
                EXIT;
            END IF;
            admit_slots := admit_slots || w_slot[k];
        END LOOP;
        IF admit_blocked IS NULL THEN
            FOR k IN ci..cj - 1 LOOP
                IF (spent->>c_counter[k])::float8 >= c_max[k]
                   OR (spent->>c_counter[k])::float8 + c_reserve[k] > c_max[k] THEN
                    admit_slots := NULL;
                    admit_charges := NULL;
                    admit_blocked := c_counter[k];
                    admit_until := (opened->>c_counter[k])::bigint + bloom_period_ms(c_period[k]);
                    admit_reason := 'budget of ' || c_scope[k] || ' ' || c_key[k] || ' for ' || c_metric[k]
                                    || ' per ' || c_period[k] || ' used up ('
                                    || bloom_amount(c_metric[k], (spent->>c_counter[k])::float8) || ' of '
                                    || bloom_amount(c_metric[k], c_max[k]) || ') until ' || bloom_iso_time(admit_until);
                    EXIT;
                END IF;
                admit_charges := admit_charges || jsonb_build_object(
                    'counter', c_counter[k], 'metric', c_metric[k],
                    'window', (opened->>c_counter[k])::bigint, 'amount', c_reserve[k]);
            END LOOP;
        END IF;
        IF admit_slots IS NOT NULL THEN
            FOR k IN i..j - 1 LOOP
                s_used[w_at[k]] := s_used[w_at[k]] + 1;
            END LOOP;
            FOR k IN ci..cj - 1 LOOP
                spent := jsonb_set(spent, ARRAY[c_counter[k]], to_jsonb((spent->>c_counter[k])::float8 + c_reserve[k]));
            END LOOP;
        END IF;
        RETURN NEXT;
        i := j;
        ci := cj;
    END LOOP;
    IF n > 0 THEN
        UPDATE concurrency_slots c SET counted = u.used, ends_folded = u.folded
        FROM unnest(s_slot, s_used, s_folded) AS u(slot, used, folded)
        WHERE c.slot = u.slot AND (c.counted <> u.used OR c.ends_folded <> u.folded);
    END IF;
    IF m > 0 THEN
        UPDATE budget_counters c SET used = (spent->>c.counter)::float8
        WHERE c.counter = ANY(c_counter) AND c.used <> (spent->>c.counter)::float8;
    END IF;
END $$;

-- Gives back the slots of ended leases (`slots`, one entry per lease and slot): counts
-- the ends on this connection's rows (in slot order, as other ending statements take
-- them) under the slots' advisory locks, then makes that many of each slot's waiting
-- tasks due, highest priority then oldest first.
CREATE OR REPLACE FUNCTION bloom_release_slots(slots text[]) RETURNS void
LANGUAGE plpgsql AS $$
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
              WHERE b.blocked_on = f.slot AND b.status = 'queued' AND b.dispatch_seq <= 0 AND b.not_before IS NULL
              ORDER BY b.priority DESC, b.created_at, b.id LIMIT f.n FOR UPDATE SKIP LOCKED) w) x
    WHERE t.id = x.id;
END $$;

-- Makes due the waiting tasks that their slot has room for now (or that no limit holds
-- back any more), of the slots named (NULL: every slot with waiting tasks), highest
-- priority then oldest first; tasks already made due and not dispatched yet count as
-- taking the room. Returns how many.
CREATE OR REPLACE FUNCTION bloom_wake(slots text[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    WITH waiting AS (
        SELECT DISTINCT b.blocked_on AS slot FROM llm_tasks b
        WHERE b.blocked_on IS NOT NULL AND (slots IS NULL OR b.blocked_on = ANY(slots))
            AND b.status = 'queued' AND b.dispatch_seq <= 0 AND b.not_before IS NULL),
    s AS (
        SELECT c.slot, COALESCE(own.max_running, any_.max_running) - c.running AS room
        FROM waiting JOIN concurrency_slot_counts c ON c.slot = waiting.slot
        LEFT JOIN concurrency_limits own ON own.scope = c.scope AND own.key = c.key
        LEFT JOIN concurrency_limits any_ ON any_.scope = c.scope AND any_.key = '*'
        WHERE COALESCE(COALESCE(own.max_running, any_.max_running) - c.running, 1) > 0),
    x AS (
        SELECT w.id FROM s CROSS JOIN LATERAL (
            SELECT b.id FROM llm_tasks b
            WHERE b.blocked_on = s.slot AND b.status = 'queued' AND b.dispatch_seq <= 0 AND b.not_before IS NULL
            ORDER BY b.priority DESC, b.created_at, b.id
            -- No limit any more (NULL room): all of them.
            LIMIT CASE WHEN s.room IS NOT NULL THEN
                GREATEST(s.room - (SELECT count(*) FROM llm_tasks d
                                   WHERE d.blocked_on = s.slot AND d.status = 'queued'
                                     AND d.dispatch_seq <= 0 AND d.not_before = 0), 0) END
            FOR UPDATE SKIP LOCKED) w)
    UPDATE llm_tasks t SET not_before = 0 FROM x
    WHERE t.id = x.id AND t.status = 'queued' AND t.dispatch_seq <= 0 AND t.not_before IS NULL;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END $$;

-- After an admission that put tasks aside for these full slots committed: waits for the
-- ends of those slots in flight (their statements hold the slots' advisory locks shared
-- until they commit), then wakes what the slots have room for. At most `patience_ms` of
-- waiting (a transaction that ends leases in several statements could take the locks out
-- of order): past that the statement fails, and the reconcilers' periodic wake catches up.
CREATE OR REPLACE FUNCTION bloom_slots_recheck(slots text[], patience_ms integer) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(slots) IS NULL OR cardinality(slots) = 0 THEN
        RETURN 0;
    END IF;
    PERFORM set_config('lock_timeout', patience_ms || 'ms', true);
    PERFORM pg_advisory_xact_lock(1651273583, u.h)
    FROM (SELECT DISTINCT bloom_slot_lock(s) AS h FROM unnest(slots) AS s ORDER BY 1) u;
    RETURN bloom_wake(slots);
END $$;
