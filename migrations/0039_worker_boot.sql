-- The process a NATS worker's id last started as. A starting worker ends the leases its
-- id held (their executions died with the previous process); it names its process with
-- a time-ordered id (`boot_id`), and the start is acted on only when that id is later
-- than the one recorded here. A start request handled a second time (the worker asked
-- again after no answer came, then the first request was handled after the worker had
-- begun claiming) or one from an earlier process then ends nothing: without this, it
-- ended the leases the worker had just been granted, and their tasks ran twice.
ALTER TABLE workers ADD COLUMN IF NOT EXISTS boot_id text COLLATE "C";
