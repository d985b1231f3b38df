//! Reads of `llm_results`. Results are written by [`super::lifecycle::complete`].

use sqlx::PgExecutor;

use crate::domain::{LlmResult, TaskId};

/// Results of one task, newest first.
pub async fn for_task(db: impl PgExecutor<'_>, task: &TaskId) -> sqlx::Result<Vec<LlmResult>> {
    sqlx::query_as("SELECT * FROM llm_results WHERE task_id = $1 ORDER BY completed_at DESC")
        .bind(task)
        .fetch_all(db)
        .await
}
