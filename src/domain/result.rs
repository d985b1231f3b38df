//! Results of task executions.

use serde::{Deserialize, Serialize};

use super::ids::{ArtifactId, ResultId, TaskId, WorkerId};
use super::task::TaskStatus;

/// Whether an execution succeeded, as reported by a worker.
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

/// What one execution of a task produced. Defined once: the executor returns it, the
/// results stream and the REST `complete` body carry it, the lifecycle stores it and the
/// result row (and its JSON) holds it, with the same fields everywhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Outcome {
    pub status: ResultStatus,
    pub output: Option<String>,
    pub error_message: Option<String>,
    pub metrics: Metrics,
}

impl Outcome {
    /// A successful execution and its output.
    pub fn success(output: String, metrics: Metrics) -> Outcome {
        Outcome { status: ResultStatus::Success, output: Some(output), error_message: None, metrics }
    }

    /// A failed execution: why, and what it printed when that is worth keeping.
    pub fn error(message: impl Into<String>, output: Option<String>, metrics: Metrics) -> Outcome {
        Outcome { status: ResultStatus::Error, output, error_message: Some(message.into()), metrics }
    }
}

/// Execution metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Metrics {
    #[schema(minimum = 0)]
    pub duration_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub tokens_used: Option<i64>,
}

/// A row of `llm_results`, serialized exactly as the seed's `LLMResult`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LlmResult {
    pub id: ResultId,
    pub task_id: TaskId,
    pub worker_id: WorkerId,
    pub artifact_id: ArtifactId,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub completed_at: i64,
}
