-- Provider rate-limit holds by key: a run that reports a rate limit holds, until the
-- limit's reset, the work of its agent (`agent_slug`, the default), of its
-- `concurrency_key` (e.g. one of several API keys) or of its conversation (`context_id`),
-- as the task's `policy.retry.hold` says (`task`: only the task itself waits). A task is
-- held while a hold of any of its three keys lasts. Replaces `agent_holds` (0020), whose
-- holds become holds of scope `agent_slug`: a process of the previous release fails its
-- claims (and retries them) until it is replaced, and never leases a held task.
CREATE TABLE IF NOT EXISTS provider_holds (
    scope      text   NOT NULL CHECK (scope IN ('context_id', 'agent_slug', 'concurrency_key')),
    key        text   NOT NULL,
    until      bigint NOT NULL,
    reason     text   NOT NULL,
    updated_at bigint NOT NULL,
    PRIMARY KEY (scope, key)
);

DO $$
BEGIN
    IF to_regclass('agent_holds') IS NOT NULL THEN
        INSERT INTO provider_holds (scope, key, until, reason, updated_at)
        SELECT 'agent_slug', agent_slug, until, reason, updated_at FROM agent_holds
        ON CONFLICT (scope, key) DO NOTHING;
        DROP TABLE agent_holds;
    END IF;
END $$;

-- The hold in force at `now` on a task with these keys that lasts longest, with the
-- task's `wait_reason` while it waits for it; no row when none holds it.
CREATE OR REPLACE FUNCTION bloom_hold(agent_slug text, context_id text, concurrency_key text, now bigint)
RETURNS TABLE (scope text, key text, until bigint, reason text)
LANGUAGE sql STABLE AS $$
    SELECT h.scope, h.key, h.until,
           CASE h.scope WHEN 'agent_slug' THEN 'agent' ELSE h.scope END || ' ' || h.key
           || ' rate limited by the provider until ' || bloom_iso_time(h.until)
    FROM provider_holds h
    WHERE (h.scope, h.key) IN (('agent_slug', agent_slug), ('context_id', context_id),
                               ('concurrency_key', concurrency_key))
      AND h.until > now
    ORDER BY h.until DESC LIMIT 1
$$;
