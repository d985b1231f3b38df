-- The schema of the original service (same tables, column names and JSON shapes),
-- with the constraints and indexes it lacked, and the transactional outbox.

CREATE TABLE IF NOT EXISTS users (
    id       varchar PRIMARY KEY DEFAULT gen_random_uuid()::text,
    username text NOT NULL UNIQUE,
    password text NOT NULL
);

CREATE TABLE IF NOT EXISTS llm_tasks (
    id             varchar PRIMARY KEY,
    context_id     text    NOT NULL,
    agent_slug     text    NOT NULL,
    prompt         text    NOT NULL,
    context_hints  jsonb   NOT NULL DEFAULT '[]'::jsonb,
    policy         jsonb   NOT NULL DEFAULT '{"timeout_sec":120,"budget":0}'::jsonb,
    desired_format text    NOT NULL DEFAULT 'text' CHECK (desired_format IN ('json', 'text')),
    status         text    NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'leased', 'running', 'completed', 'failed', 'dead')),
    created_at     bigint  NOT NULL,
    updated_at     bigint  NOT NULL,
    lease_id       varchar,
    worker_id      varchar,
    attempts       integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts   integer NOT NULL DEFAULT 3 CHECK (max_attempts BETWEEN 1 AND 10),
    -- Incremented on every (re)queue: one dispatch of the task on the bus.
    dispatch_seq   bigint  NOT NULL DEFAULT 0,
    -- Worker whose direct subject the current dispatch went to (sticky routing).
    routed_to      varchar,
    CHECK (status NOT IN ('leased', 'running') OR lease_id IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS llm_tasks_created_idx ON llm_tasks (created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS llm_tasks_status_created_idx ON llm_tasks (status, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS llm_tasks_routed_idx ON llm_tasks (routed_to) WHERE status = 'queued' AND routed_to IS NOT NULL;

CREATE TABLE IF NOT EXISTS leases (
    id             varchar PRIMARY KEY,
    task_id        varchar NOT NULL,
    worker_id      varchar NOT NULL,
    started_at     bigint  NOT NULL,
    expires_at     bigint  NOT NULL,
    ttl_seconds    integer NOT NULL CHECK (ttl_seconds > 0),
    status         text    NOT NULL DEFAULT 'active'
                   CHECK (status IN ('active', 'expired', 'released', 'failed')),
    last_heartbeat bigint  NOT NULL,
    context_id     varchar
);
-- At most one active lease per task: the database itself refuses a double lease.
CREATE UNIQUE INDEX IF NOT EXISTS leases_one_active_per_task ON leases (task_id) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS leases_active_worker_idx ON leases (worker_id) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS leases_active_context_idx ON leases (context_id) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS leases_active_expiry_idx ON leases (expires_at) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS leases_started_idx ON leases (started_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS leases_status_started_idx ON leases (status, started_at DESC, id DESC);

CREATE TABLE IF NOT EXISTS workers (
    id             varchar PRIMARY KEY,
    node_id        text    NOT NULL,
    url            text    NOT NULL DEFAULT '',
    status         text    NOT NULL DEFAULT 'unknown'
                   CHECK (status IN ('online', 'offline', 'syncing', 'error', 'unknown')),
    capabilities   jsonb   NOT NULL DEFAULT '{"claude_cli":true,"max_concurrency":1,"labels":[]}'::jsonb,
    last_heartbeat bigint,
    ip_addrs       jsonb   NOT NULL DEFAULT '[]'::jsonb,
    obs_count      integer NOT NULL DEFAULT 0,
    db_sha         text    NOT NULL DEFAULT '',
    registered_at  bigint  NOT NULL,
    active_leases  integer NOT NULL DEFAULT 0,
    -- Who describes this worker: 'api' (REST), 'nats' (bloom-worker), 'membridge' (sync).
    source         text    NOT NULL DEFAULT 'api' CHECK (source IN ('api', 'nats', 'membridge'))
);
CREATE INDEX IF NOT EXISTS workers_status_idx ON workers (status);

CREATE TABLE IF NOT EXISTS runtime_artifacts (
    id          varchar PRIMARY KEY,
    task_id     varchar NOT NULL,
    job_id      varchar,
    type        text    NOT NULL,
    created_at  bigint  NOT NULL,
    finalized   boolean NOT NULL DEFAULT false,
    url         text,
    entity_refs jsonb   NOT NULL DEFAULT '[]'::jsonb,
    tags        jsonb   NOT NULL DEFAULT '[]'::jsonb,
    content     text
);
CREATE INDEX IF NOT EXISTS runtime_artifacts_task_idx ON runtime_artifacts (task_id, created_at DESC);
CREATE INDEX IF NOT EXISTS runtime_artifacts_created_idx ON runtime_artifacts (created_at DESC, id DESC);

CREATE TABLE IF NOT EXISTS llm_results (
    id            varchar PRIMARY KEY,
    task_id       varchar NOT NULL,
    worker_id     varchar NOT NULL,
    artifact_id   varchar NOT NULL,
    status        text    NOT NULL CHECK (status IN ('success', 'error')),
    output        text,
    error_message text,
    metrics       jsonb   NOT NULL,
    completed_at  bigint  NOT NULL
);
CREATE INDEX IF NOT EXISTS llm_results_task_idx ON llm_results (task_id, completed_at DESC);
-- A task has at most one successful result: a duplicate completion cannot be stored.
CREATE UNIQUE INDEX IF NOT EXISTS llm_results_one_success ON llm_results (task_id) WHERE status = 'success';

CREATE TABLE IF NOT EXISTS audit_logs (
    id          varchar PRIMARY KEY,
    timestamp   bigint  NOT NULL,
    action      text    NOT NULL,
    entity_type text    NOT NULL,
    entity_id   varchar NOT NULL,
    actor       text    NOT NULL,
    detail      text    NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_logs_timestamp_idx ON audit_logs (timestamp DESC, id DESC);

CREATE TABLE IF NOT EXISTS runtime_settings (
    key   varchar PRIMARY KEY,
    value text    NOT NULL
);

-- Transactional outbox: one row per dispatch of a task that is committed but not yet
-- acknowledged by JetStream. Written in the same transaction as the task change.
CREATE TABLE IF NOT EXISTS outbox (
    id            bigserial PRIMARY KEY,
    task_id       varchar NOT NULL,
    dispatch_seq  bigint  NOT NULL,
    -- Target worker for a sticky dispatch; NULL means the shared pool.
    worker_id     varchar,
    created_at    bigint  NOT NULL,
    -- A relay that took the row owns it until then (crash-safe claim without a held transaction).
    claimed_until bigint
);
CREATE INDEX IF NOT EXISTS outbox_created_idx ON outbox (created_at);
