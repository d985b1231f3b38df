-- Concurrency keys: "at most N tasks of a key running at once", where the key is a task's
-- `context_id`, `agent_slug`, or the free `concurrency_key` given at submit.
--
-- A limit names a scope and a key, or `*` for every key of the scope without a limit of
-- its own. A slot is one (scope, key) with a limit: `concurrency_slots.running` counts its
-- active leases, and is changed only by the statements that start a lease (through
-- `bloom_admit`, under the slot row's lock, so concurrent claims, REST leases and agent
-- assignments never take one slot beyond its limit) and by the triggers of the lease's
-- end (from `leases.slots`, the slots the lease took). A task over a limit is put aside:
-- queued with no dispatch (`dispatch_seq` negated, `not_before` NULL) and `blocked_on` its
-- full slot; when a lease of that slot ends, its oldest waiting tasks (by priority, then
-- age) are made due (`not_before` 0) and the due duty dispatches them.

ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS concurrency_key text;
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS blocked_on text;
ALTER TABLE leases ADD COLUMN IF NOT EXISTS slots text[] NOT NULL DEFAULT '{}';

CREATE TABLE IF NOT EXISTS concurrency_limits (
    scope       text    NOT NULL CHECK (scope IN ('context_id', 'agent_slug', 'concurrency_key')),
    key         text    NOT NULL,
    max_running integer NOT NULL CHECK (max_running >= 0),
    updated_at  bigint  NOT NULL,
    PRIMARY KEY (scope, key)
);

CREATE TABLE IF NOT EXISTS concurrency_slots (
    slot    text    PRIMARY KEY,
    scope   text    NOT NULL,
    key     text    NOT NULL,
    running integer NOT NULL DEFAULT 0 CHECK (running >= 0)
);
-- The slots of one scope, for a limit being set on it (`*`) or counted.
CREATE INDEX IF NOT EXISTS concurrency_slots_scope_idx ON concurrency_slots (scope, key);

-- The slots of tasks that a limit applies to, with the limit: the key's own, else the
-- scope's `*`. The name of a slot is `scope:key`.
CREATE OR REPLACE FUNCTION bloom_task_slots(ids text[])
RETURNS TABLE (task_id text, slot text, scope text, key text, max_running int)
LANGUAGE sql STABLE AS $$
    SELECT t.id, k.scope || ':' || k.key, k.scope, k.key, COALESCE(own.max_running, any_.max_running)
    FROM llm_tasks t
    CROSS JOIN LATERAL (VALUES ('context_id', t.context_id), ('agent_slug', t.agent_slug),
                               ('concurrency_key', t.concurrency_key)) AS k(scope, key)
    LEFT JOIN concurrency_limits own ON own.scope = k.scope AND own.key = k.key
    LEFT JOIN concurrency_limits any_ ON any_.scope = k.scope AND any_.key = '*'
    WHERE t.id = ANY(ids) AND k.key IS NOT NULL AND COALESCE(own.max_running, any_.max_running) IS NOT NULL
$$;

-- Admission of tasks about to be leased, in the order given (the caller holds their rows'
-- locks and leases exactly the admitted ones in the same transaction). The slots involved
-- are created when missing and locked in name order, their counts read after the lock,
-- and each task admitted when every one of its slots has room: it takes them all
-- (`admit_slots`, for its lease) or none (`admit_blocked`: the first full slot, and
-- `admit_reason`, the waiting task's `wait_reason`). With no limit anywhere, every task is admitted at the cost of one index probe.
CREATE OR REPLACE FUNCTION bloom_admit(ids text[])
RETURNS TABLE (admit_task text, admit_slots text[], admit_blocked text, admit_reason text)
LANGUAGE plpgsql AS $$
DECLARE
    w_task text[];
    w_slot text[];
    w_scope text[];
    w_key text[];
    w_max int[];
    used jsonb;
    n int;
    i int := 1;
    j int;
    k int;
    cur text;
BEGIN
    ids := ARRAY(SELECT u.id FROM unnest(ids) WITH ORDINALITY AS u(id, pos) GROUP BY u.id ORDER BY min(u.pos));
    IF cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM concurrency_limits) THEN
        RETURN QUERY SELECT u.id, '{}'::text[], NULL::text, NULL::text FROM unnest(ids) AS u(id);
        RETURN;
    END IF;
    -- Read once: the slots created and locked below are exactly those decided on.
    SELECT array_agg(w.task_id ORDER BY array_position(ids, w.task_id), w.slot),
           array_agg(w.slot ORDER BY array_position(ids, w.task_id), w.slot),
           array_agg(w.scope ORDER BY array_position(ids, w.task_id), w.slot),
           array_agg(w.key ORDER BY array_position(ids, w.task_id), w.slot),
           array_agg(w.max_running ORDER BY array_position(ids, w.task_id), w.slot)
    INTO w_task, w_slot, w_scope, w_key, w_max
    FROM bloom_task_slots(ids) w;
    IF w_task IS NULL THEN
        RETURN QUERY SELECT u.id, '{}'::text[], NULL::text, NULL::text FROM unnest(ids) AS u(id);
        RETURN;
    END IF;
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
    n := cardinality(w_task);
    -- The entries of each task are consecutive, in the order of `ids`.
    FOREACH cur IN ARRAY ids LOOP
        j := i;
        WHILE j <= n AND w_task[j] = cur LOOP
            j := j + 1;
        END LOOP;
        admit_task := cur;
        admit_slots := '{}';
        admit_blocked := NULL;
        admit_reason := NULL;
        FOR k IN i..j - 1 LOOP
            IF (used->>w_slot[k])::int >= w_max[k] THEN
                admit_slots := NULL;
                admit_blocked := w_slot[k];
                admit_reason := 'concurrency limit of ' || regexp_replace(w_slot[k], ':', ' ') || ' reached ('
                                || w_max[k] || ' running)';
                EXIT;
            END IF;
            admit_slots := admit_slots || w_slot[k];
        END LOOP;
        IF admit_blocked IS NULL THEN
            FOR k IN i..j - 1 LOOP
                used := jsonb_set(used, ARRAY[w_slot[k]], to_jsonb((used->>w_slot[k])::int + 1));
            END LOOP;
        END IF;
        RETURN NEXT;
        i := j;
    END LOOP;
    UPDATE concurrency_slots c SET running = (used->>c.slot)::int
    WHERE c.slot = ANY(w_slot) AND c.running <> (used->>c.slot)::int;
END $$;

-- Gives back the slots of ended leases (`slots`, one entry per lease and slot) and makes
-- that many of each slot's waiting tasks due, highest priority then oldest first. The
-- slot rows are locked in name order, as admissions lock them; the waiting tasks are
-- read by a statement after the lock, so a task put aside by an admission that saw the
-- slot full before this release is seen here.
CREATE OR REPLACE FUNCTION bloom_release_slots(slots text[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(slots) IS NULL OR cardinality(slots) = 0 THEN
        RETURN;
    END IF;
    PERFORM 1 FROM concurrency_slots c WHERE c.slot = ANY(slots) ORDER BY c.slot FOR UPDATE;
    UPDATE concurrency_slots c SET running = GREATEST(c.running - f.n, 0)
    FROM (SELECT u.slot, count(*)::int AS n FROM unnest(slots) AS u(slot) GROUP BY u.slot) f
    WHERE c.slot = f.slot;
    UPDATE llm_tasks t SET not_before = 0
    FROM (SELECT w.id
          FROM (SELECT u.slot, count(*)::int AS n FROM unnest(slots) AS u(slot) GROUP BY u.slot) f
          CROSS JOIN LATERAL (
              SELECT b.id FROM llm_tasks b
              WHERE b.blocked_on = f.slot AND b.status = 'queued' AND b.dispatch_seq <= 0 AND b.not_before IS NULL
              ORDER BY b.priority DESC, b.created_at, b.id LIMIT f.n FOR UPDATE SKIP LOCKED) w) x
    WHERE t.id = x.id;
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
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION bloom_leases_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM workers
    WHERE id IN (SELECT worker_id FROM gone WHERE status = 'active') ORDER BY id FOR UPDATE;
    UPDATE workers w SET active_leases = GREATEST(w.active_leases - g.n, 0)
    FROM (SELECT worker_id, count(*)::int AS n FROM gone WHERE status = 'active' GROUP BY worker_id) g
    WHERE w.id = g.worker_id;
    PERFORM bloom_release_slots(ARRAY(SELECT s FROM gone, unnest(gone.slots) AS s WHERE gone.status = 'active'));
    RETURN NULL;
END $$;
