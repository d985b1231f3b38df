-- A concurrency slot's running tasks are counted from the active leases holding it, not
-- kept in a row.
--
-- Since migration 0032 an admission locked each slot's row, read its count and the ends
-- not folded yet, and wrote the new count back; every lease end added to its slot's ends
-- row. A keyed task so wrote two rows of its own (the slot row at its claim, an ends row
-- at its completion) beside the plain ones, and its claim locked the slot row until it
-- committed: about 50 µs of Postgres per slot and task, a quarter of a task's life.
--
-- Now an admission takes a transaction-scoped advisory lock per slot (exclusive, in the
-- two-key form 1651273584 and the slot's hash, taken in hash order) and then counts the
-- slot's active leases, in a statement that starts after the lock, so in a snapshot
-- that sees every admission of the slot that held the lock before (their leases commit
-- before their locks are released). Admissions of one slot are thus serialized as the
-- row lock serialized them, and the count is exact but for ends not yet committed, which
-- count as running: an admission may leave room unused for a moment, never exceed a
-- limit. The count probes the three partial indexes of migrations 0041-0043, the active
-- leases by the slot in first, second or third place of `leases.slots` (a task has at
-- most one key per scope, so at most three slots); a plain lease has none and enters none
-- of them. The slots compare byte by byte (`COLLATE "C"`, as the indexes): PL/pgSQL gives
-- a function's text variables the collation of its arguments, which for a claim's ids is
-- byte order and for other callers the database's, and a comparison under a collation
-- other than the index's cannot probe it (it read the whole index instead). A lease's end
-- changes its status, which other partial indexes already keep from being a HOT update,
-- and writes nothing else for its slots; its release still wakes the slot's waiting
-- tasks and holds the slot's other advisory lock (1651273583) shared for the rechecks.
--
-- `concurrency_slots` stays as the list of slots ever used, for the operator views and
-- the periodic wake (a row is inserted the first time a slot is admitted on, never
-- updated); `concurrency_slot_counts` now counts from the leases; the ends table goes.
--
-- The count needs the fresh snapshot of a statement in a READ COMMITTED transaction: in
-- a REPEATABLE READ or SERIALIZABLE one, a lease committed after the transaction's
-- snapshot would be missed, so admission refuses to run there.

DROP VIEW IF EXISTS concurrency_slot_counts;
DROP TABLE IF EXISTS concurrency_slot_ends;
ALTER TABLE concurrency_slots DROP COLUMN IF EXISTS counted, DROP COLUMN IF EXISTS ends_folded;

-- The indexes of migrations 0041-0043 count at most three slots per lease; a task has at
-- most one key per scope. Rows already there hold at most three too (not checked again).
ALTER TABLE leases DROP CONSTRAINT IF EXISTS leases_slots_at_most_three;
ALTER TABLE leases ADD CONSTRAINT leases_slots_at_most_three CHECK (cardinality(slots) <= 3) NOT VALID;

-- The active leases holding a slot (an end not committed yet still counts).
CREATE OR REPLACE FUNCTION bloom_slot_running(slot text) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT ((SELECT count(*) FROM leases l WHERE l.slots[1] = slot COLLATE "C" AND (l.status || '') = 'active')
            + (SELECT count(*) FROM leases l WHERE l.slots[2] = slot COLLATE "C" AND (l.status || '') = 'active')
            + (SELECT count(*) FROM leases l WHERE l.slots[3] = slot COLLATE "C" AND (l.status || '') = 'active'))::integer
$$;

CREATE VIEW concurrency_slot_counts AS
    SELECT c.slot, c.scope, c.key, bloom_slot_running(c.slot) AS running FROM concurrency_slots c;

-- The admission of migration 0040, with each slot's count read under its advisory lock
-- from the active leases, and nothing written for the slots but their first use.
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
    s_scope text[];
    s_key text[];
    s_used int[];
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
        -- Entries in the order of `ids`, then by slot (the aggregates take their input in
        -- the subquery's order); `w_at`: the entry's slot's place among the distinct
        -- slots (`s_slot`, in byte order).
        SELECT array_agg(x.task_id), array_agg(x.slot), array_agg(x.scope), array_agg(x.key),
               array_agg(x.max_running), array_agg(x.at)
        INTO w_task, w_slot, w_scope, w_key, w_max, w_at
        FROM (SELECT w.*, dense_rank() OVER (ORDER BY w.slot COLLATE "C")::int AS at
              FROM bloom_task_slots(ids) w JOIN unnest(ids) WITH ORDINALITY AS o(id, pos) ON o.id = w.task_id
              ORDER BY o.pos, w.slot COLLATE "C") x;
        IF w_task IS NOT NULL THEN
            SELECT array_agg(d.slot), array_agg(d.scope), array_agg(d.key)
            INTO s_slot, s_scope, s_key
            FROM (SELECT DISTINCT ON (u.slot COLLATE "C") u.slot, u.scope, u.key
                  FROM unnest(w_slot, w_scope, w_key) AS u(slot, scope, key) ORDER BY u.slot COLLATE "C") d;
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM budget_limits) THEN
        SELECT array_agg(x.task_id), array_agg(x.counter), array_agg(x.scope), array_agg(x.key),
               array_agg(x.metric), array_agg(x.period), array_agg(x.max_amount), array_agg(x.reserve)
        INTO c_task, c_counter, c_scope, c_key, c_metric, c_period, c_max, c_reserve
        FROM (SELECT c.* FROM bloom_task_counters(ids) c JOIN unnest(ids) WITH ORDINALITY AS o(id, pos) ON o.id = c.task_id
              ORDER BY o.pos, c.counter) x;
    END IF;
    IF w_task IS NULL AND c_task IS NULL THEN
        RETURN QUERY SELECT u.id, '{}'::text[], '[]'::jsonb, NULL::text, NULL::bigint, NULL::text FROM unnest(ids) AS u(id);
        RETURN;
    END IF;
    IF w_task IS NOT NULL THEN
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'bloom_admit: concurrency slots are counted in READ COMMITTED transactions only, not %',
                current_setting('transaction_isolation');
        END IF;
        INSERT INTO concurrency_slots (slot, scope, key)
        SELECT u.slot, u.scope, u.key FROM unnest(s_slot, s_scope, s_key) AS u(slot, scope, key)
        WHERE NOT EXISTS (SELECT 1 FROM concurrency_slots c WHERE c.slot = u.slot)
        ON CONFLICT (slot) DO NOTHING;
        -- Each lock once, in hash order, whatever other admissions lock.
        PERFORM pg_advisory_xact_lock(1651273584, u.h)
        FROM (SELECT DISTINCT bloom_slot_lock(s) AS h FROM unnest(s_slot) AS s ORDER BY 1) u;
        -- A statement after the locks: its snapshot sees every lease whose admission held
        -- one of them before.
        -- `bloom_slot_running` written out: a SQL function is planned again at every call,
        -- about 20 µs a slot, where this statement's plan is kept for the connection.
        SELECT array_agg(((SELECT count(*) FROM leases l WHERE l.slots[1] = u.slot COLLATE "C" AND (l.status || '') = 'active')
                          + (SELECT count(*) FROM leases l WHERE l.slots[2] = u.slot COLLATE "C" AND (l.status || '') = 'active')
                          + (SELECT count(*) FROM leases l WHERE l.slots[3] = u.slot COLLATE "C" AND (l.status || '') = 'active'))::int
                         ORDER BY u.at)
        INTO s_used
        FROM unnest(s_slot) WITH ORDINALITY AS u(slot, at);
    END IF;
    IF c_task IS NOT NULL THEN
        INSERT INTO budget_counters (counter, scope, key, metric, period)
        SELECT DISTINCT ON (u.counter COLLATE "C") u.counter, u.scope, u.key, u.metric, u.period
        FROM unnest(c_counter, c_scope, c_key, c_metric, c_period) AS u(counter, scope, key, metric, period)
        ORDER BY u.counter COLLATE "C"
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
    IF m > 0 THEN
        UPDATE budget_counters c SET used = (spent->>c.counter)::float8
        WHERE c.counter = ANY(c_counter) AND c.used <> (spent->>c.counter)::float8;
    END IF;
END $$;

-- The release of migration 0036, without counting the ends: under the slots' advisory
-- locks (shared, for the rechecks), makes as many of each slot's waiting tasks due as
-- leases of it ended, highest priority then oldest first.
CREATE OR REPLACE FUNCTION bloom_release_slots(slots text[]) RETURNS void
LANGUAGE plpgsql SET enable_sort = off AS $$
BEGIN
    IF cardinality(slots) IS NULL OR cardinality(slots) = 0 THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1651273583, u.h)
    FROM (SELECT DISTINCT bloom_slot_lock(s) AS h FROM unnest(slots) AS s ORDER BY 1) u;
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
