//! Reads of `llm_results`. Results are written by [`super::lifecycle::complete`].

use sqlx::types::Json;
use sqlx::PgExecutor;

use super::rows::ResultRow;
use crate::domain::{ErrorKind, LlmResult, Metrics, ResultStatus, TaskId};

/// Results of one task, newest first.
pub async fn for_task(db: impl PgExecutor<'_>, task: &TaskId) -> sqlx::Result<Vec<LlmResult>> {
    let rows = sqlx::query_as!(
        ResultRow,
        r#"SELECT id, task_id, worker_id, artifact_id, status AS "status: ResultStatus", output, error_message,
                  metrics AS "metrics: Json<Metrics>", completed_at,
                  error_kind AS "error_kind: ErrorKind"
           FROM llm_results WHERE task_id = $1 ORDER BY completed_at DESC"#,
        task.as_str()
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(LlmResult::from).collect())
}
