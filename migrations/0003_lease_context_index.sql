-- no-transaction
-- Sticky routing looks up the most recent active lease of each submitted task's context
-- (`ORDER BY started_at DESC LIMIT 1`): one probe of this index, in order. Leases leave
-- `active` within seconds, so the index is mostly dead entries between vacuums; the
-- plain index scan this shape gets marks them dead as it passes, where a bitmap scan
-- would visit their heap rows on every submission. Built concurrently: `leases` stays
-- writable meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS leases_active_context_started_idx ON leases (context_id, started_at DESC)
    WHERE status = 'active';
