-- What a run reported beyond the seed's result, and retries that understand it. Every
-- column is an addition with a default: the seed's clients see no change.

-- The class of a failed run (`rate_limited`, `provider`, `timeout`, `max_turns`,
-- `max_budget`, `invalid_output`, `execution`), when the worker could tell. What the run
-- used and cost (tokens, cache tokens, `total_cost_usd`, turns, session) is kept in the
-- result's `metrics` object beside the seed's `duration_ms` and `tokens_used`.
ALTER TABLE llm_results ADD COLUMN IF NOT EXISTS error_kind text;

-- Why a queued task is not dispatched now (a retry waiting for its time, a provider rate
-- limit, a concurrency limit), and the last error that made it wait.
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS wait_reason text;
ALTER TABLE llm_tasks ADD COLUMN IF NOT EXISTS last_error text;

-- A queued task without a current dispatch has `dispatch_seq <= 0`: 0 when it never had
-- one (a delayed task), minus its last dispatch's number when it was put back to wait (a
-- retry with backoff): its next dispatch gets `1 - dispatch_seq`, a number no message on
-- the bus can carry.

-- When a failed run is tried again: NULL when it is not (the result is final). A provider
-- rate limit waits for its reset (`hint`, or a minute when the run did not say) and gives
-- the attempt back; a class the task's `policy.retry.on` lists (by default `provider` and
-- `timeout`) is tried again while attempts remain, after an exponential backoff with
-- jitter (`policy.retry.backoff_ms` doubled per attempt used, at most
-- `policy.retry.max_backoff_ms`, by default 1 s and 5 min; half of it fixed, half random),
-- never before `hint` (a provider's Retry-After).
CREATE OR REPLACE FUNCTION bloom_next_attempt_at(policy jsonb, kind text, attempts int, max_attempts int,
                                                 now bigint, hint bigint) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT CASE
        WHEN kind = 'rate_limited' THEN GREATEST(COALESCE(hint, now + 60000), now)
        WHEN kind IS NULL OR attempts >= max_attempts
             OR NOT (COALESCE(policy->'retry'->'on', '["provider", "timeout"]'::jsonb) ? kind) THEN NULL
        ELSE GREATEST(COALESCE(hint, now), now + (
            LEAST(COALESCE((policy->'retry'->>'max_backoff_ms')::float8, 300000),
                  COALESCE((policy->'retry'->>'backoff_ms')::float8, 1000) * power(2, GREATEST(attempts - 1, 0)))
            * (0.5 + random() / 2))::bigint)
    END
$$;

-- Epoch milliseconds as an ISO 8601 UTC time, for messages.
CREATE OR REPLACE FUNCTION bloom_iso_time(ms bigint) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(to_timestamp(ms / 1000.0) AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;
