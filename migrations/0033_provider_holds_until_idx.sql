-- Provider holds by their end: a claim asks once whether any hold is in force
-- (`until > now`) before looking each of its tasks up in the holds, which is almost
-- never needed. Without an index that names `until`, the only plan for that question is
-- a sequential scan, which the runtime's connections disable (`enable_seqscan = off`).
CREATE INDEX IF NOT EXISTS provider_holds_until_idx ON provider_holds (until);
