-- An HTTP agent that could not be reached, or refused a task with 401/403/503, takes no
-- tasks until `dispatch_paused_until` (ms): 10 s after its first failure, doubling with
-- each consecutive one up to 5 min. Membridge's sync may say the agent is online again
-- meanwhile (it reports what membridge last heard, not whether the agent takes tasks);
-- the pause keeps it from burning the attempts of the tasks behind. The agent's own
-- registration, a healthy `agent-health` or a task it accepts clears both.
ALTER TABLE workers
    ADD COLUMN IF NOT EXISTS dispatch_failures     int    NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS dispatch_paused_until bigint NOT NULL DEFAULT 0;
