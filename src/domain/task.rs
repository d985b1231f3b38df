//! LLM tasks and the rules of their state machine.
//!
//! ```text
//!            lease/claim            heartbeat
//!   queued ───────────────► leased ───────────► running
//!     ▲  ▲                    │  │                │  │
//!     │  └── expire (attempts │  └── complete ────┴──┼──► completed | failed
//!     │      remain) ─────────┴─────────────────────┘  │
//!     │                       expire (no attempts left) └──► dead
//!     └──────────── requeue (admin) ◄── failed | dead
//! ```

use serde::{Deserialize, Serialize};

use super::ids::{LeaseId, TaskId, WorkerId};

/// Status of a task. Stored as text with a CHECK constraint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum TaskStatus {
    Queued,
    Leased,
    Running,
    Completed,
    Failed,
    Dead,
    /// Stopped by a cancel request (an addition to the seed's statuses).
    Cancelled,
}

impl TaskStatus {
    /// All statuses, in lifecycle order.
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Queued,
        TaskStatus::Leased,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Dead,
        TaskStatus::Cancelled,
    ];

    /// The status as stored and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Leased => "leased",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Dead => "dead",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored or client-supplied status.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// A task in this status holds a lease (and a worker is working on it).
    pub fn is_leased(self) -> bool {
        matches!(self, TaskStatus::Leased | TaskStatus::Running)
    }

    /// The administrator may requeue a task in this status.
    pub fn is_requeueable(self) -> bool {
        matches!(self, TaskStatus::Failed | TaskStatus::Dead | TaskStatus::Cancelled)
    }

    /// No transition leaves this status except an explicit requeue.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Dead | TaskStatus::Cancelled)
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Output format the caller wants from the executor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum DesiredFormat {
    Json,
    #[default]
    Text,
}

impl DesiredFormat {
    /// The format as stored and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredFormat::Json => "json",
            DesiredFormat::Text => "text",
        }
    }
}

/// Execution policy of a task; each field defaults when absent (`{timeout_sec: 120, budget: 0}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct Policy {
    /// Wall-clock limit of one execution, 1..=3600 seconds.
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_sec: i64,
    /// Spending budget handed to the executor; 0 means none. Whole numbers are written
    /// as integers (`0`, not `0.0`), as JavaScript writes them.
    #[serde(serialize_with = "crate::domain::json_number::serialize")]
    #[schema(minimum = 0)]
    pub budget: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { timeout_sec: 120, budget: 0.0 }
    }
}

/// A request to create a task: the body of `POST /api/runtime/llm-tasks` as the seed's
/// `insertLLMTaskSchema` reads it (absent fields take their defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = CreateTask)]
pub struct NewTask {
    #[schema(min_length = 1)]
    pub context_id: String,
    #[schema(min_length = 1)]
    pub agent_slug: String,
    /// At most 512 KiB.
    #[schema(min_length = 1)]
    pub prompt: String,
    #[serde(default)]
    pub context_hints: Vec<String>,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub desired_format: DesiredFormat,
    #[serde(default = "NewTask::default_max_attempts")]
    #[schema(minimum = 1, maximum = 10)]
    pub max_attempts: i32,
}

impl NewTask {
    /// Attempts of a task that names none.
    pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;

    fn default_max_attempts() -> i32 {
        Self::DEFAULT_MAX_ATTEMPTS
    }
}

/// A row of `llm_tasks`, serialized exactly as the seed's `LLMTask`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Task {
    pub id: TaskId,
    pub context_id: String,
    pub agent_slug: String,
    pub prompt: String,
    pub context_hints: Vec<String>,
    pub policy: Policy,
    pub desired_format: DesiredFormat,
    pub status: TaskStatus,
    pub created_at: i64,
    pub updated_at: i64,
    pub lease_id: Option<LeaseId>,
    pub worker_id: Option<WorkerId>,
    pub attempts: i32,
    pub max_attempts: i32,
    /// Incremented every time the task is (re)queued; identifies one dispatch of the
    /// task on the bus so a stale message can never claim a newer dispatch.
    #[serde(skip)]
    pub dispatch_seq: i64,
    /// The worker whose direct subject the current dispatch was routed to, if sticky.
    #[serde(skip)]
    pub routed_to: Option<WorkerId>,
}

impl Task {
    /// Attempts remain: an expired lease requeues the task instead of killing it.
    pub fn has_attempts_left(&self) -> bool {
        self.attempts < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_its_text() {
        for st in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(st.as_str()), Some(st));
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
        assert_eq!(TaskStatus::parse("QUEUED"), None);
    }

    #[test]
    fn only_finished_tasks_that_did_not_complete_are_requeueable() {
        let re: Vec<_> = TaskStatus::ALL.into_iter().filter(|s| s.is_requeueable()).collect();
        assert_eq!(re, vec![TaskStatus::Failed, TaskStatus::Dead, TaskStatus::Cancelled]);
        let terminal: Vec<_> = TaskStatus::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, vec![TaskStatus::Completed, TaskStatus::Failed, TaskStatus::Dead, TaskStatus::Cancelled]);
    }
}
