-- no-transaction
-- Replaced by `leases_active_context_started_idx` (0003). Dropped concurrently: `leases`
-- stays writable meanwhile.
DROP INDEX CONCURRENTLY IF EXISTS leases_active_context_idx;
