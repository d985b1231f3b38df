//! Results of task executions.

use serde::{Deserialize, Serialize};

use super::ids::{ArtifactId, ResultId, TaskId, WorkerId};
use super::task::TaskStatus;

/// Outcome of one execution as reported by a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum ResultStatus {
    Success,
    Error,
}

impl ResultStatus {
    /// The status as stored and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Success => "success",
            ResultStatus::Error => "error",
        }
    }

    /// The task status a current-lease result moves the task to.
    pub fn final_task_status(self) -> TaskStatus {
        match self {
            ResultStatus::Success => TaskStatus::Completed,
            ResultStatus::Error => TaskStatus::Failed,
        }
    }
}

/// Execution metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Metrics {
    pub duration_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_used: Option<i64>,
}

/// A row of `llm_results`, serialized exactly as the seed's `LLMResult`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct LlmResult {
    pub id: ResultId,
    pub task_id: TaskId,
    pub worker_id: WorkerId,
    pub artifact_id: ArtifactId,
    pub status: ResultStatus,
    pub output: Option<String>,
    pub error_message: Option<String>,
    #[sqlx(json)]
    pub metrics: Metrics,
    pub completed_at: i64,
}
