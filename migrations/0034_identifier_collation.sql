-- Identifiers and states compare byte by byte (collation "C"), whatever the database's
-- default collation.
--
-- Every B-tree insert and lookup, and every sort of a batch's ids (`= ANY($n)` sorts the
-- array before probing the index), compared these columns under the database's
-- collation: with any collation but "C" (`C.UTF-8`, `en_US.UTF-8`, ...) each comparison
-- copies both strings, looks the locale up and calls `strcoll`. On the benchmark machine
-- string comparison was about a sixth of Postgres's CPU per task at saturation under
-- `C.UTF-8` (byte order saves a fifth of that) and Postgres spent a quarter less per task
-- in byte order than under a language's collation (ICU `en-US`); more with concurrency
-- keys, whose slot names are sorted and compared at every admission. These columns hold generated ids, worker and agent names, keys and
-- states: no one reads them in a language's alphabetical order. Under `C.UTF-8` the
-- order is the same as before (code points); under a language's collation listings
-- ordered by these columns now order them byte by byte.
--
-- Changing a column's collation keeps its rows and rebuilds the indexes that include it,
-- each table locked meanwhile: on a large database this migration takes a while (about
-- 1.5 s per 100,000 tasks with their leases, results and audit entries on the benchmark
-- machine; see the README, "Upgrading").

-- The rebuilds may outlast the migrating connection's statement timeout
-- (`BLOOM_DB_STATEMENT_TIMEOUT_MS`).
SET LOCAL statement_timeout = 0;

DROP VIEW IF EXISTS concurrency_slot_counts;

ALTER TABLE llm_tasks
    ALTER COLUMN id TYPE varchar COLLATE "C",
    ALTER COLUMN context_id TYPE text COLLATE "C",
    ALTER COLUMN agent_slug TYPE text COLLATE "C",
    ALTER COLUMN status TYPE text COLLATE "C",
    ALTER COLUMN lease_id TYPE varchar COLLATE "C",
    ALTER COLUMN worker_id TYPE varchar COLLATE "C",
    ALTER COLUMN routed_to TYPE varchar COLLATE "C",
    ALTER COLUMN concurrency_key TYPE text COLLATE "C",
    ALTER COLUMN blocked_on TYPE text COLLATE "C";

ALTER TABLE leases
    ALTER COLUMN id TYPE varchar COLLATE "C",
    ALTER COLUMN task_id TYPE varchar COLLATE "C",
    ALTER COLUMN worker_id TYPE varchar COLLATE "C",
    ALTER COLUMN context_id TYPE varchar COLLATE "C",
    ALTER COLUMN status TYPE text COLLATE "C";

ALTER TABLE audit_logs
    ALTER COLUMN id TYPE varchar COLLATE "C",
    ALTER COLUMN entity_id TYPE varchar COLLATE "C";

ALTER TABLE llm_results
    ALTER COLUMN id TYPE varchar COLLATE "C",
    ALTER COLUMN task_id TYPE varchar COLLATE "C",
    ALTER COLUMN worker_id TYPE varchar COLLATE "C",
    ALTER COLUMN status TYPE text COLLATE "C";

ALTER TABLE runtime_artifacts
    ALTER COLUMN id TYPE varchar COLLATE "C",
    ALTER COLUMN task_id TYPE varchar COLLATE "C";

ALTER TABLE outbox
    ALTER COLUMN task_id TYPE varchar COLLATE "C",
    ALTER COLUMN worker_id TYPE varchar COLLATE "C";

ALTER TABLE workers
    ALTER COLUMN id TYPE varchar COLLATE "C",
    ALTER COLUMN status TYPE text COLLATE "C";

ALTER TABLE worker_lease_ends ALTER COLUMN worker_id TYPE text COLLATE "C";

ALTER TABLE idempotency_keys
    ALTER COLUMN key TYPE text COLLATE "C",
    ALTER COLUMN task_id TYPE varchar COLLATE "C";

ALTER TABLE concurrency_limits
    ALTER COLUMN scope TYPE text COLLATE "C",
    ALTER COLUMN key TYPE text COLLATE "C";

ALTER TABLE concurrency_slots
    ALTER COLUMN slot TYPE text COLLATE "C",
    ALTER COLUMN scope TYPE text COLLATE "C",
    ALTER COLUMN key TYPE text COLLATE "C";

ALTER TABLE concurrency_slot_ends ALTER COLUMN slot TYPE text COLLATE "C";

ALTER TABLE budget_limits
    ALTER COLUMN scope TYPE text COLLATE "C",
    ALTER COLUMN key TYPE text COLLATE "C",
    ALTER COLUMN metric TYPE text COLLATE "C",
    ALTER COLUMN period TYPE text COLLATE "C";

ALTER TABLE budget_counters
    ALTER COLUMN counter TYPE text COLLATE "C",
    ALTER COLUMN scope TYPE text COLLATE "C",
    ALTER COLUMN key TYPE text COLLATE "C",
    ALTER COLUMN metric TYPE text COLLATE "C",
    ALTER COLUMN period TYPE text COLLATE "C";

ALTER TABLE provider_holds
    ALTER COLUMN scope TYPE text COLLATE "C",
    ALTER COLUMN key TYPE text COLLATE "C";

-- As in migration 0032.
CREATE VIEW concurrency_slot_counts AS
    SELECT c.slot, c.scope, c.key,
           GREATEST(c.counted - GREATEST(COALESCE(e.ended, 0) - c.ends_folded, 0), 0)::int AS running
    FROM concurrency_slots c
    LEFT JOIN LATERAL (SELECT sum(x.ended)::bigint AS ended FROM concurrency_slot_ends x WHERE x.slot = c.slot) e ON true;
