-- Tasks waiting for a budget's window become due together when it ends. Rather than
-- dispatch them all (each then claimed, refused by admission and put aside again), the
-- due pass dispatches only as many as the counter can still admit and moves the others
-- to the end of the next window (`bloom_budget_room`, `bloom_reserve`).

-- What a task reserves on a budget counter at admission: a request is 1; USD the task's
-- own `policy.budget` when it has one, that being the most the run may cost; otherwise
-- tokens and USD the budget's `estimate`, else the counter's learned average per run;
-- never more than the budget itself.
CREATE OR REPLACE FUNCTION bloom_reserve(metric text, max_amount double precision, policy jsonb,
                                         estimate double precision, average double precision)
RETURNS double precision
LANGUAGE sql IMMUTABLE AS $$
    SELECT LEAST(max_amount, CASE metric
        WHEN 'requests' THEN 1
        WHEN 'usd' THEN COALESCE(NULLIF((policy->>'budget')::float8, 0), estimate, average, 0)
        ELSE COALESCE(estimate, average, 0) END)
$$;

CREATE OR REPLACE FUNCTION bloom_task_counters(ids text[])
RETURNS TABLE (task_id text, counter text, scope text, key text, metric text, period text,
               max_amount double precision, reserve double precision)
LANGUAGE sql STABLE AS $$
    SELECT x.id, x.counter, x.scope, x.key, x.metric, x.period, x.max_amount,
           bloom_reserve(x.metric, x.max_amount, x.policy, x.estimate, c.average)
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

-- Budget counters with what they can still admit at `now`: the budget that applies (the
-- key's own, else the scope's `*`), `room` (the budget less what the current window
-- used; the whole budget once the counter's window is past) and the end of the current
-- window. Counters whose budget was removed are left out.
CREATE OR REPLACE FUNCTION bloom_budget_room(counters text[], now bigint)
RETURNS TABLE (counter text, scope text, key text, metric text, period text, max_amount double precision,
               estimate double precision, average double precision, room double precision, window_end bigint)
LANGUAGE sql STABLE AS $$
    SELECT c.counter, c.scope, c.key, c.metric, c.period, l.max_amount, l.estimate, c.average,
           l.max_amount - CASE WHEN c.window_start = now - now % bloom_period_ms(c.period) THEN c.used ELSE 0 END,
           now - now % bloom_period_ms(c.period) + bloom_period_ms(c.period)
    FROM budget_counters c
    CROSS JOIN LATERAL (
        SELECT b.max_amount, b.estimate FROM budget_limits b
        WHERE b.scope = c.scope AND b.key IN (c.key, '*') AND b.metric = c.metric AND b.period = c.period
        ORDER BY b.key = '*' LIMIT 1) l
    WHERE c.counter = ANY(counters)
$$;
