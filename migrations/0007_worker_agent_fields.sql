-- What an HTTP agent (the membridge agent) reports of itself, as the upstream runtime
-- stores it, and how each worker is reached: `nats` (a bloom-worker), `http` (an agent
-- with a URL, which the runtime calls) or `rest` (a worker without a URL that leases
-- its tasks itself). The transport is derived, so it can never disagree with the row.
ALTER TABLE workers
    ADD COLUMN IF NOT EXISTS agent_version  text NOT NULL DEFAULT 'unknown',
    ADD COLUMN IF NOT EXISTS os_info        text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS install_method text NOT NULL DEFAULT 'manual',
    ADD COLUMN IF NOT EXISTS transport      text GENERATED ALWAYS AS (
        CASE WHEN source = 'nats' THEN 'nats' WHEN url <> '' THEN 'http' ELSE 'rest' END) STORED;
