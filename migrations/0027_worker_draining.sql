-- A worker being drained takes no new lease and finishes those it holds: claims find it
-- full, HTTP agents are not assigned tasks, REST leases refuse it. Set and cleared with
-- `POST /api/runtime/workers/{id}/drain` and `/resume`; NULL when not draining.
ALTER TABLE workers ADD COLUMN IF NOT EXISTS draining_since bigint;
