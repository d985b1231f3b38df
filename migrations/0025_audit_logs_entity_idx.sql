-- no-transaction
-- The audit trail of one task and of its leases (`GET .../history`). Built concurrently:
-- `audit_logs` stays writable meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS audit_logs_entity_idx ON audit_logs (entity_id, timestamp);
