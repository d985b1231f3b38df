//! Audit log entries. Every state transition writes one in its own transaction.

use serde::{Deserialize, Serialize};

/// The actions the runtime records. Stored as the seed's snake_case strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    TaskCreated,
    TaskLeased,
    TaskCompleted,
    TaskRequeued,
    AttemptsReset,
    TaskRerouted,
    TaskRedispatched,
    TaskDue,
    TaskRetryScheduled,
    TaskCancelled,
    LeaseExpired,
    TaskDead,
    ResultLate,
    WorkerRegistered,
    WorkerUpdated,
    WorkerRemoved,
    WorkerOffline,
    WorkerDraining,
    WorkerResumed,
    ConfigUpdated,
    ConnectionTest,
    LeadershipPromote,
    ArtifactMoved,
    TaskDispatched,
    DispatchFailed,
    AgentUpdated,
    AgentRestarted,
    AgentUninstalled,
    ProjectCreated,
    ProjectDeleted,
    ProjectCloned,
    ProjectPropagated,
    MemorySyncPush,
    MemorySyncPull,
}

impl AuditAction {
    /// The action as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::TaskCreated => "task_created",
            AuditAction::TaskLeased => "task_leased",
            AuditAction::TaskCompleted => "task_completed",
            AuditAction::TaskRequeued => "task_requeued",
            AuditAction::AttemptsReset => "attempts_reset",
            AuditAction::TaskRerouted => "task_rerouted",
            AuditAction::TaskRedispatched => "task_redispatched",
            AuditAction::TaskDue => "task_due",
            AuditAction::TaskRetryScheduled => "task_retry_scheduled",
            AuditAction::TaskCancelled => "task_cancelled",
            AuditAction::LeaseExpired => "lease_expired",
            AuditAction::TaskDead => "task_dead",
            AuditAction::ResultLate => "result_late",
            AuditAction::WorkerRegistered => "worker_registered",
            AuditAction::WorkerUpdated => "worker_updated",
            AuditAction::WorkerRemoved => "worker_removed",
            AuditAction::WorkerOffline => "worker_offline",
            AuditAction::WorkerDraining => "worker_draining",
            AuditAction::WorkerResumed => "worker_resumed",
            AuditAction::ConfigUpdated => "config_updated",
            AuditAction::ConnectionTest => "connection_test",
            AuditAction::LeadershipPromote => "leadership_promote",
            AuditAction::ArtifactMoved => "artifact_moved",
            AuditAction::TaskDispatched => "task_dispatched",
            AuditAction::DispatchFailed => "dispatch_failed",
            AuditAction::AgentUpdated => "agent_updated",
            AuditAction::AgentRestarted => "agent_restarted",
            AuditAction::AgentUninstalled => "agent_uninstalled",
            AuditAction::ProjectCreated => "project_created",
            AuditAction::ProjectDeleted => "project_deleted",
            AuditAction::ProjectCloned => "project_cloned",
            AuditAction::ProjectPropagated => "project_propagated",
            AuditAction::MemorySyncPush => "memory_sync_push",
            AuditAction::MemorySyncPull => "memory_sync_pull",
        }
    }
}

/// A row of `audit_logs`, serialized exactly as the seed's `AuditLogEntry`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: String,
    pub timestamp: i64,
    pub action: String,
    pub entity_type: String,
    pub entity_id: String,
    pub actor: String,
    pub detail: String,
}

/// An audit entry to be written; id and timestamp are assigned on insert.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NewAudit {
    pub action: &'static str,
    pub entity_type: &'static str,
    pub entity_id: String,
    pub actor: String,
    pub detail: String,
}

impl NewAudit {
    /// An entry for `action` on the entity `entity_type`/`entity_id`.
    pub fn new(
        action: AuditAction,
        entity_type: &'static str,
        entity_id: impl Into<String>,
        actor: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        // Free text from clients and upstreams: Postgres text cannot hold NUL.
        let clean = |s: String| if s.contains('\0') { s.replace('\0', "\u{FFFD}") } else { s };
        NewAudit {
            action: action.as_str(),
            entity_type,
            entity_id: clean(entity_id.into()),
            actor: clean(actor.into()),
            detail: clean(detail.into()),
        }
    }
}
