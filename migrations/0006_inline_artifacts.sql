-- Artifacts whose content is in Postgres: with S3 configured, those an S3 failure left
-- behind, which the reconciler moves to S3 oldest first (and counts as a backlog).
CREATE INDEX IF NOT EXISTS runtime_artifacts_inline_idx ON runtime_artifacts (created_at)
    WHERE url IS NULL AND content IS NOT NULL;
