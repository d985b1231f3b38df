//! Rows as the checked statements decode them: the domain types with their `jsonb`
//! columns as [`Json`], converted to the domain types in one place each.
//!
//! The compile-time checked macros (`query_as!`) decode a column into the type its
//! override names (`policy AS "policy: Json<Policy>"`) and convert it with `Into`; the
//! domain types keep plain fields, so the few rows with JSON columns pass through these.
//! Ids are read as text and become their domain types here.

use sqlx::types::Json;

use crate::domain::{
    Artifact, Capabilities, DesiredFormat, ErrorKind, LlmResult, Metrics, Outcome, Policy, Priority, ResultStatus,
    Task, TaskStatus, Worker, WorkerSource, WorkerStatus, WorkerTransport,
};

/// A row of `llm_tasks`.
pub(crate) struct TaskRow {
    pub id: String,
    pub context_id: String,
    pub agent_slug: String,
    pub prompt: String,
    pub context_hints: Json<Vec<String>>,
    pub policy: Json<Policy>,
    pub desired_format: DesiredFormat,
    pub status: TaskStatus,
    pub created_at: i64,
    pub updated_at: i64,
    pub lease_id: Option<String>,
    pub worker_id: Option<String>,
    pub attempts: i32,
    pub max_attempts: i32,
    pub priority: i16,
    pub not_before: Option<i64>,
    pub idempotency_key: Option<String>,
    pub concurrency_key: Option<String>,
    pub wait_reason: Option<String>,
    pub last_error: Option<String>,
    pub dispatch_seq: i64,
    pub routed_to: Option<String>,
}

impl From<TaskRow> for Task {
    fn from(r: TaskRow) -> Task {
        Task {
            id: r.id.into(),
            context_id: r.context_id,
            agent_slug: r.agent_slug,
            prompt: r.prompt,
            context_hints: r.context_hints.0,
            policy: r.policy.0,
            desired_format: r.desired_format,
            status: r.status,
            created_at: r.created_at,
            updated_at: r.updated_at,
            lease_id: r.lease_id.map(Into::into),
            worker_id: r.worker_id.map(Into::into),
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            priority: Priority(r.priority),
            not_before: r.not_before,
            idempotency_key: r.idempotency_key,
            concurrency_key: r.concurrency_key,
            wait_reason: r.wait_reason,
            last_error: r.last_error,
            dispatch_seq: r.dispatch_seq,
            routed_to: r.routed_to.map(Into::into),
        }
    }
}

/// A row of `workers`.
pub(crate) struct WorkerRow {
    pub id: String,
    pub node_id: String,
    pub url: String,
    pub status: WorkerStatus,
    pub capabilities: Json<Capabilities>,
    pub last_heartbeat: Option<i64>,
    pub ip_addrs: Json<Vec<String>>,
    pub obs_count: i32,
    pub db_sha: String,
    pub registered_at: i64,
    pub active_leases: i32,
    pub agent_version: String,
    pub os_info: String,
    pub install_method: String,
    pub transport: WorkerTransport,
    pub source: WorkerSource,
    pub draining_since: Option<i64>,
}

impl From<WorkerRow> for Worker {
    fn from(r: WorkerRow) -> Worker {
        Worker {
            id: r.id.into(),
            node_id: r.node_id,
            url: r.url,
            status: r.status,
            capabilities: r.capabilities.0,
            last_heartbeat: r.last_heartbeat,
            ip_addrs: r.ip_addrs.0,
            obs_count: r.obs_count,
            db_sha: r.db_sha,
            registered_at: r.registered_at,
            active_leases: r.active_leases,
            agent_version: r.agent_version,
            os_info: r.os_info,
            install_method: r.install_method,
            transport: r.transport,
            source: r.source,
            draining_since: r.draining_since,
        }
    }
}

/// A row of `runtime_artifacts`.
pub(crate) struct ArtifactRow {
    pub id: String,
    pub task_id: String,
    pub job_id: Option<String>,
    pub kind: String,
    pub created_at: i64,
    pub finalized: bool,
    pub url: Option<String>,
    pub entity_refs: Json<Vec<String>>,
    pub tags: Json<Vec<String>>,
    pub content: Option<String>,
}

impl From<ArtifactRow> for Artifact {
    fn from(r: ArtifactRow) -> Artifact {
        Artifact {
            id: r.id.into(),
            task_id: r.task_id.into(),
            job_id: r.job_id,
            kind: r.kind,
            created_at: r.created_at,
            finalized: r.finalized,
            url: r.url,
            entity_refs: r.entity_refs.0,
            tags: r.tags.0,
            content: r.content,
        }
    }
}

/// A row of `llm_results`.
pub(crate) struct ResultRow {
    pub id: String,
    pub task_id: String,
    pub worker_id: String,
    pub artifact_id: String,
    pub status: ResultStatus,
    pub output: Option<String>,
    pub error_message: Option<String>,
    pub metrics: Json<Metrics>,
    pub completed_at: i64,
    pub error_kind: Option<ErrorKind>,
}

impl From<ResultRow> for LlmResult {
    fn from(r: ResultRow) -> LlmResult {
        LlmResult {
            id: r.id.into(),
            task_id: r.task_id.into(),
            worker_id: r.worker_id.into(),
            artifact_id: r.artifact_id.into(),
            outcome: Outcome {
                status: r.status,
                output: r.output,
                error_message: r.error_message,
                metrics: r.metrics.0,
                error_kind: r.error_kind,
                retry_at: None,
            },
            completed_at: r.completed_at,
        }
    }
}
