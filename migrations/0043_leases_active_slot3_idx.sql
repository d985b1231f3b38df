-- no-transaction
-- The active leases by the slot in third place of their `slots`: with the indexes of
-- migrations 0041 and 0042, how admissions count a concurrency slot's running tasks
-- (migration 0044). Plain leases hold no slot and enter none of them. The status is
-- compared as `status || ''` so that only a count of slots matches the predicate, not
-- a statement about active leases in general; the slot compares byte by byte, as the
-- admission compares it whatever the collation of the ids it is given. Built
-- concurrently: `leases` stays writable meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS leases_active_slot3_idx
    ON leases ((slots[3] COLLATE "C")) WHERE (status || '') = 'active' AND slots[3] IS NOT NULL;
