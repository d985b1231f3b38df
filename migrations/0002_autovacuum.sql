-- Tasks and leases change status within seconds of being written, and outbox rows are
-- deleted moments after they are inserted. Each of those leaves dead index entries that
-- the hot path's lookups step over until vacuum removes them, so these tables are
-- vacuumed sooner than Postgres's default (once 20 % of the table is dead).
ALTER TABLE llm_tasks SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE leases SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 1000);
