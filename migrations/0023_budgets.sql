-- Budgets: "at most this many requests, tokens or USD per minute, hour or day" for a key,
-- where the key is a task's `agent_slug`, `context_id` or `concurrency_key` (a scope and
-- a key, or `*` for every key of the scope without a budget of its own on that measure).
--
-- Windows are fixed and aligned to UTC (a minute, an hour, a day from midnight UTC). A
-- counter (`budget_counters`, one per key, measure and period) holds its current window
-- and what was used in it. Every way of leasing a task admits it through `bloom_admit`,
-- which reserves an estimate on each counter of the task under the counter's lock (a
-- request is 1; USD the task's own `policy.budget` when it has one, that being the most
-- the run may cost; otherwise tokens and USD the budget's `estimate`, else the counter's
-- learned average per run; never more than the budget itself) and records the reservations on the lease
-- (`leases.charges`). A task is admitted while every counter is under its budget and the
-- reservation fits; otherwise it waits, queued without a dispatch, until the window
-- ends (`not_before`), with no attempt used. When the lease ends with a result, the
-- lease-end trigger settles the reservations with what the run reported
-- (`leases.used_tokens`, `leases.used_usd`): the difference is added to the counter
-- (a saving only while its window is the reservation's), and the learned average moves
-- toward the actual. A lease that ends without a result, or with one that reports no
-- usage, keeps its reservation.

CREATE TABLE IF NOT EXISTS budget_limits (
    scope      text             NOT NULL CHECK (scope IN ('context_id', 'agent_slug', 'concurrency_key')),
    key        text             NOT NULL,
    metric     text             NOT NULL CHECK (metric IN ('requests', 'tokens', 'usd')),
    period     text             NOT NULL CHECK (period IN ('minute', 'hour', 'day')),
    max_amount double precision NOT NULL CHECK (max_amount >= 0),
    estimate   double precision CHECK (estimate >= 0),
    updated_at bigint           NOT NULL,
    PRIMARY KEY (scope, key, metric, period)
);

CREATE TABLE IF NOT EXISTS budget_counters (
    counter      text             PRIMARY KEY,
    scope        text             NOT NULL,
    key          text             NOT NULL,
    metric       text             NOT NULL,
    period       text             NOT NULL,
    window_start bigint           NOT NULL DEFAULT 0,
    used         double precision NOT NULL DEFAULT 0 CHECK (used >= 0),
    average      double precision
);
CREATE INDEX IF NOT EXISTS budget_counters_scope_idx ON budget_counters (scope, key);

ALTER TABLE leases ADD COLUMN IF NOT EXISTS charges jsonb NOT NULL DEFAULT '[]';
ALTER TABLE leases ADD COLUMN IF NOT EXISTS used_tokens bigint;
ALTER TABLE leases ADD COLUMN IF NOT EXISTS used_usd double precision;

CREATE OR REPLACE FUNCTION bloom_period_ms(period text) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE period WHEN 'minute' THEN 60000 WHEN 'hour' THEN 3600000 ELSE 86400000 END::bigint
$$;

-- The tokens a run's metrics count against budgets: input, output and cache creation
-- (cache reads are not counted), else the seed's `tokens_used`; NULL when it reported none.
CREATE OR REPLACE FUNCTION bloom_run_tokens(metrics jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN metrics ?| ARRAY['input_tokens', 'output_tokens', 'cache_creation_input_tokens']
                THEN COALESCE((metrics->>'input_tokens')::bigint, 0) + COALESCE((metrics->>'output_tokens')::bigint, 0)
                     + COALESCE((metrics->>'cache_creation_input_tokens')::bigint, 0)
                ELSE (metrics->>'tokens_used')::bigint END
$$;

-- An amount as people read it: USD to 4 decimals, counts whole.
CREATE OR REPLACE FUNCTION bloom_amount(metric text, x double precision) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN metric = 'usd' THEN trim_scale(round(x::numeric, 4))::text ELSE round(x)::bigint::text END
$$;

-- The budget counters of tasks, with the budget that applies (the key's own for that
-- measure and period, else the scope's `*`) and what the task reserves on it.
CREATE OR REPLACE FUNCTION bloom_task_counters(ids text[])
RETURNS TABLE (task_id text, counter text, scope text, key text, metric text, period text,
               max_amount double precision, reserve double precision)
LANGUAGE sql STABLE AS $$
    SELECT x.id, x.counter, x.scope, x.key, x.metric, x.period, x.max_amount,
           LEAST(x.max_amount, CASE x.metric
               WHEN 'requests' THEN 1
               WHEN 'usd' THEN COALESCE(NULLIF((x.policy->>'budget')::float8, 0), x.estimate, c.average, 0)
               ELSE COALESCE(x.estimate, c.average, 0) END)
    FROM (
        SELECT DISTINCT ON (t.id, k.scope, b.metric, b.period)
               t.id, k.scope || ':' || k.key || ':' || b.metric || '/' || b.period AS counter, k.scope, k.key,
               b.metric, b.period, b.max_amount, b.estimate, t.policy
        FROM llm_tasks t
        CROSS JOIN LATERAL (VALUES ('context_id', t.context_id), ('agent_slug', t.agent_slug),
                                   ('concurrency_key', t.concurrency_key)) AS k(scope, key)
        JOIN budget_limits b ON b.scope = k.scope AND b.key IN (k.key, '*')
        WHERE t.id = ANY(ids) AND k.key IS NOT NULL
        ORDER BY t.id, k.scope, b.metric, b.period, b.key = '*') x
    LEFT JOIN budget_counters c ON c.counter = x.counter
$$;

-- The admission of the previous release is dropped, not kept beside: a process still
-- running it fails its claims (and retries them) until it is replaced, and never leases
-- a task past a budget it does not know.
DROP FUNCTION IF EXISTS bloom_admit(text[]);

-- Admission of tasks about to be leased, in the order given, at `now` (the caller holds
-- their rows' locks and leases exactly the admitted ones in the same transaction).
--
-- Concurrency slots first: those involved are created when missing and locked in name
-- order, and a task takes all of its slots when each has room (`admit_slots`) or none
-- (`admit_blocked`: the first full slot). Then budget counters, locked in name order
-- after every slot (windows past rolled over): a task admitted by its slots reserves on
-- each of its counters when each is under its budget and the reservation fits
-- (`admit_charges`, for its lease), or waits until the first full counter's window ends
-- (`admit_blocked` that counter, `admit_until` the window's end). `admit_reason` is the
-- waiting task's `wait_reason`. With no limit or budget anywhere, every task is admitted
-- at the cost of two index probes.
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
    c_task text[];
    c_counter text[];
    c_scope text[];
    c_key text[];
    c_metric text[];
    c_period text[];
    c_max float8[];
    c_reserve float8[];
    used jsonb := '{}';
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
        SELECT array_agg(w.task_id ORDER BY array_position(ids, w.task_id), w.slot),
               array_agg(w.slot ORDER BY array_position(ids, w.task_id), w.slot),
               array_agg(w.scope ORDER BY array_position(ids, w.task_id), w.slot),
               array_agg(w.key ORDER BY array_position(ids, w.task_id), w.slot),
               array_agg(w.max_running ORDER BY array_position(ids, w.task_id), w.slot)
        INTO w_task, w_slot, w_scope, w_key, w_max
        FROM bloom_task_slots(ids) w;
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
        ORDER BY u.slot
        ON CONFLICT (slot) DO NOTHING;
        SELECT COALESCE(jsonb_object_agg(s.slot, s.running), '{}') INTO used
        FROM (SELECT c.slot, c.running FROM concurrency_slots c WHERE c.slot = ANY(w_slot)
              ORDER BY c.slot FOR UPDATE) s;
        IF EXISTS (SELECT 1 FROM unnest(w_slot) AS u(slot) WHERE NOT used ? u.slot) THEN
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
            IF (used->>w_slot[k])::int >= w_max[k] THEN
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
                used := jsonb_set(used, ARRAY[w_slot[k]], to_jsonb((used->>w_slot[k])::int + 1));
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
        UPDATE concurrency_slots c SET running = (used->>c.slot)::int
        WHERE c.slot = ANY(w_slot) AND c.running <> (used->>c.slot)::int;
    END IF;
    IF m > 0 THEN
        UPDATE budget_counters c SET used = (spent->>c.counter)::float8
        WHERE c.counter = ANY(c_counter) AND c.used <> (spent->>c.counter)::float8;
    END IF;
END $$;

-- Settles the reservations of leases ended with a result: `items`, one per reservation,
-- with the amount reserved and the amount used (NULL: unknown, the reservation stays).
-- Counters are locked in name order, after the slots the same trigger gave back.
CREATE OR REPLACE FUNCTION bloom_settle(items jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF items IS NULL OR jsonb_array_length(items) = 0 THEN
        RETURN;
    END IF;
    PERFORM 1 FROM budget_counters c
    WHERE c.counter IN (SELECT x.counter FROM jsonb_to_recordset(items) AS x(counter text))
    ORDER BY c.counter FOR UPDATE;
    UPDATE budget_counters c
    SET used = GREATEST(c.used + s.diff, 0),
        average = CASE WHEN s.actual IS NULL THEN c.average
                       WHEN c.average IS NULL THEN s.actual ELSE c.average * 0.8 + s.actual * 0.2 END
    FROM (SELECT x.counter,
                 sum(CASE WHEN x.used IS NULL THEN 0
                          WHEN b.window_start = x."window" OR x.used > x.amount THEN x.used - x.amount
                          ELSE 0 END) AS diff,
                 avg(x.used) AS actual
          FROM jsonb_to_recordset(items) AS x(counter text, "window" bigint, amount float8, used float8)
          JOIN budget_counters b ON b.counter = x.counter
          GROUP BY x.counter) s
    WHERE c.counter = s.counter;
END $$;

CREATE OR REPLACE FUNCTION bloom_leases_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM workers
    WHERE id IN (SELECT b.worker_id FROM before_rows b JOIN after_rows a ON a.id = b.id
                 WHERE b.status = 'active' AND a.status <> 'active')
    ORDER BY id FOR UPDATE;
    UPDATE workers w SET active_leases = GREATEST(w.active_leases - e.n, 0)
    FROM (SELECT b.worker_id, count(*)::int AS n FROM before_rows b JOIN after_rows a ON a.id = b.id
          WHERE b.status = 'active' AND a.status <> 'active' GROUP BY b.worker_id) e
    WHERE w.id = e.worker_id;
    PERFORM bloom_release_slots(ARRAY(
        SELECT s FROM before_rows b JOIN after_rows a ON a.id = b.id, unnest(b.slots) AS s
        WHERE b.status = 'active' AND a.status <> 'active'));
    PERFORM bloom_settle((
        SELECT jsonb_agg(ch || jsonb_build_object('used', CASE ch->>'metric'
                   WHEN 'tokens' THEN to_jsonb(a.used_tokens)
                   WHEN 'usd' THEN to_jsonb(a.used_usd)
                   ELSE ch->'amount' END))
        FROM before_rows b JOIN after_rows a ON a.id = b.id, jsonb_array_elements(a.charges) AS ch
        WHERE b.status = 'active' AND a.status <> 'active' AND (a.used_tokens IS NOT NULL OR a.used_usd IS NOT NULL)));
    RETURN NULL;
END $$;

