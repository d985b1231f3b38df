-- The admission's slots ordered byte by byte, and its bookkeeping cheaper per task.
--
-- * A fix: on a database whose collation is not byte order (`en-US`, ICU or libc), the
--   admission of 0032 counted the slots of a batch against the wrong slots. It put the
--   distinct slots in order, and each entry's place among them, under the database's
--   collation (an array's elements have it, and so can a function's `text` result),
--   but locked and read the slot rows, whose names are `COLLATE "C"` since migration
--   0034, in byte order, and matched the two lists by position: with agents `Zed` and
--   `alpha` in one batch, `Zed`'s tasks were counted on `alpha`'s slot and the other
--   way round, so a later admission could go over a limit. Both orders are now byte
--   order, and missing slot and budget counter rows are created in the byte order they
--   are locked in. Databases whose collation is `C` or `C.UTF-8` (byte order, or code
--   points, which agree) were not affected.
--
-- * A task's slots are looked up only in the scopes that have a limit: `bloom_task_slots`
--   probed `concurrency_limits` twice (the key's own limit, the scope's `*`) in each of
--   the three scopes, six probes per task where a deployment limiting one scope needs two.
-- * The entries are sorted once: each `array_agg(... ORDER BY ...)` sorts its own input
--   (Postgres 15 does not share one sort between aggregates), which made eight sorts of
--   the batch's entries; the aggregates now take them from one ordered subquery, and the
--   slot rows to create come from the distinct slots already in name order.
-- * The budget counters of the batch's tasks are put in the order of `ids` by joining
--   their positions, not by `array_position` (a search of `ids` for every entry, in each
--   of eight aggregates: quadratic in the batch).

CREATE OR REPLACE FUNCTION bloom_task_slots(ids text[])
RETURNS TABLE (task_id text, slot text, scope text, key text, max_running int)
LANGUAGE sql STABLE AS $$
    SELECT t.id, k.scope || ':' || k.key, k.scope, k.key, COALESCE(own.max_running, any_.max_running)
    FROM llm_tasks t
    CROSS JOIN LATERAL (VALUES ('context_id', t.context_id), ('agent_slug', t.agent_slug),
                               ('concurrency_key', t.concurrency_key)) AS k(scope, key)
    LEFT JOIN concurrency_limits own ON own.scope = k.scope AND own.key = k.key
    LEFT JOIN concurrency_limits any_ ON any_.scope = k.scope AND any_.key = '*'
    WHERE t.id = ANY(ids) AND k.key IS NOT NULL
        AND k.scope = ANY (ARRAY(SELECT s.scope FROM (VALUES ('context_id'), ('agent_slug'), ('concurrency_key')) AS s(scope)
                                 WHERE (SELECT true FROM concurrency_limits c WHERE c.scope = s.scope ORDER BY c.key LIMIT 1)))
        AND COALESCE(own.max_running, any_.max_running) IS NOT NULL
$$;

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
        -- Entries in the order of `ids`, then by slot (the aggregates take their input in
        -- the subquery's order); `w_at`: the entry's slot's place among the distinct
        -- slots in name order (`s_slot`), byte order as the slot rows are locked and
        -- read (an array's elements have the database's collation, not the column's).
        SELECT array_agg(x.task_id), array_agg(x.slot), array_agg(x.scope), array_agg(x.key),
               array_agg(x.max_running), array_agg(x.at)
        INTO w_task, w_slot, w_scope, w_key, w_max, w_at
        FROM (SELECT w.*, dense_rank() OVER (ORDER BY w.slot COLLATE "C")::int AS at
              FROM bloom_task_slots(ids) w JOIN unnest(ids) WITH ORDINALITY AS o(id, pos) ON o.id = w.task_id
              ORDER BY o.pos, w.slot) x;
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
        INSERT INTO concurrency_slots (slot, scope, key)
        SELECT u.slot, u.scope, u.key FROM unnest(s_slot, s_scope, s_key) AS u(slot, scope, key)
        WHERE NOT EXISTS (SELECT 1 FROM concurrency_slots c WHERE c.slot = u.slot)
        ON CONFLICT (slot) DO NOTHING;
        -- Locked in name order; each row as it is after the lock, its ends as of this
        -- statement's start (an end committed while this waited for the lock is folded
        -- by a later admission: until then the slot counts its lease as running).
        SELECT array_agg(GREATEST(s.counted - GREATEST(s.ended - s.ends_folded, 0), 0)),
               array_agg(GREATEST(s.ended, s.ends_folded))
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
