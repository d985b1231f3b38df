-- Cancellation: a queued, leased or running task can end `cancelled` (terminal, kept with
-- its history, requeueable), and the lease it held ends `cancelled`. The new checks allow
-- every value the old ones did, so validating them cannot fail.
ALTER TABLE llm_tasks DROP CONSTRAINT IF EXISTS llm_tasks_status_check;
ALTER TABLE llm_tasks ADD CONSTRAINT llm_tasks_status_check
    CHECK (status IN ('queued', 'leased', 'running', 'completed', 'failed', 'dead', 'cancelled')) NOT VALID;
ALTER TABLE llm_tasks VALIDATE CONSTRAINT llm_tasks_status_check;
ALTER TABLE leases DROP CONSTRAINT IF EXISTS leases_status_check;
ALTER TABLE leases ADD CONSTRAINT leases_status_check
    CHECK (status IN ('active', 'expired', 'released', 'failed', 'cancelled')) NOT VALID;
ALTER TABLE leases VALIDATE CONSTRAINT leases_status_check;
