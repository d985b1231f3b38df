-- A provider's rate limit holds an agent's work: once a run of an agent reports a rate
-- limit (class `rate_limited`), no task of that agent is claimed or leased before the
-- limit's reset. Claims of its tasks meanwhile put them back to wait until `until`.
CREATE TABLE IF NOT EXISTS agent_holds (
    agent_slug text   PRIMARY KEY,
    until      bigint NOT NULL,
    reason     text   NOT NULL,
    updated_at bigint NOT NULL
);
