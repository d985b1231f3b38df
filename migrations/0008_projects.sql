-- Git projects managed across the nodes (the upstream runtime's tables), and the state
-- of each project on each node: one row per (project, node).
CREATE TABLE IF NOT EXISTS managed_projects (
    id              varchar PRIMARY KEY DEFAULT gen_random_uuid()::text,
    name            text    NOT NULL,
    repo_url        text    NOT NULL,
    canonical_id    text    NOT NULL,
    target_path     text,
    clone_status    text    NOT NULL DEFAULT 'pending'
                    CHECK (clone_status IN ('pending', 'cloning', 'cloned', 'failed', 'propagating', 'synced')),
    primary_node_id text,
    created_at      bigint  NOT NULL,
    updated_at      bigint  NOT NULL,
    error_message   text
);
CREATE INDEX IF NOT EXISTS managed_projects_created_idx ON managed_projects (created_at DESC);

CREATE TABLE IF NOT EXISTS project_node_status (
    id            varchar PRIMARY KEY DEFAULT gen_random_uuid()::text,
    project_id    varchar NOT NULL,
    node_id       text    NOT NULL,
    clone_status  text    NOT NULL DEFAULT 'pending'
                  CHECK (clone_status IN ('pending', 'cloning', 'cloned', 'failed', 'propagating', 'synced')),
    last_sync_at  bigint,
    error_message text,
    repo_path     text
);
CREATE UNIQUE INDEX IF NOT EXISTS project_node_status_project_node ON project_node_status (project_id, node_id);
