//! Leases: a worker's time-limited right to execute one attempt of a task.

use serde::{Deserialize, Serialize};

use super::ids::{LeaseId, TaskId, WorkerId};

/// Status of a lease. Only one lease of a task is `active` at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum LeaseStatus {
    Active,
    Expired,
    Released,
    Failed,
    /// Ended by a cancellation of its task (an addition, with `POST .../cancel`).
    Cancelled,
}

impl LeaseStatus {
    /// All statuses.
    pub const ALL: [LeaseStatus; 5] =
        [LeaseStatus::Active, LeaseStatus::Expired, LeaseStatus::Released, LeaseStatus::Failed, LeaseStatus::Cancelled];

    /// The status as stored and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseStatus::Active => "active",
            LeaseStatus::Expired => "expired",
            LeaseStatus::Released => "released",
            LeaseStatus::Failed => "failed",
            LeaseStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored or client-supplied status.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// A row of `leases`, serialized exactly as the seed's `Lease`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Lease {
    pub id: LeaseId,
    pub task_id: TaskId,
    pub worker_id: WorkerId,
    pub started_at: i64,
    pub expires_at: i64,
    pub ttl_seconds: i32,
    pub status: LeaseStatus,
    pub last_heartbeat: i64,
    pub context_id: Option<String>,
}
