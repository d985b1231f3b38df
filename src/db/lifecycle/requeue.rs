//! `requeue`: a `failed` or `dead` task queued again by an administrator.

use sqlx::PgPool;

use super::{task_not_found, TransitionError};
use crate::db::audit;
use crate::db::outbox::{self, Dispatch};
use crate::domain::{AuditAction, NewAudit, Task, TaskId, TaskStatus};

/// Requeues a `failed` or `dead` task (administrator action): attempts start again from
/// zero, the previous count is kept in an `attempts_reset` audit entry beside the
/// original's `task_requeued` one, and the leases remain as history.
pub async fn requeue(pool: &PgPool, task_id: &TaskId, actor: &str, now: i64) -> Result<Dispatch, TransitionError> {
    let mut tx = pool.begin().await?;
    let prev: Option<(TaskStatus, i32)> =
        sqlx::query_as("SELECT status, attempts FROM llm_tasks WHERE id = $1 FOR UPDATE")
            .bind(task_id)
            .fetch_optional(&mut *tx)
            .await?;
    let (prev_status, prev_attempts) = prev.ok_or_else(task_not_found)?;
    if !prev_status.is_requeueable() {
        return Err(TransitionError::Conflict(format!("Cannot requeue task with status '{prev_status}'")));
    }
    let task: Task = sqlx::query_as(
        "UPDATE llm_tasks SET status = 'queued', lease_id = NULL, worker_id = NULL, attempts = 0,
                dispatch_seq = dispatch_seq + 1, routed_to = NULL, updated_at = $2
         WHERE id = $1 AND status IN ('failed', 'dead') RETURNING *",
    )
    .bind(task_id)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    // The original's entry keeps its exact text; the count it reset is an entry of its own.
    let reset = format!("Attempts reset to 0 from {prev_attempts}");
    let detail = format!("Requeued from {prev_status}");
    audit::insert(
        &mut *tx,
        &[
            NewAudit::new(AuditAction::AttemptsReset, "llm_task", task_id.as_str(), actor, reset),
            NewAudit::new(AuditAction::TaskRequeued, "llm_task", task_id.as_str(), actor, detail),
        ],
        now,
    )
    .await?;
    let mut dispatches = outbox::insert(&mut tx, vec![task], now).await?;
    tx.commit().await?;
    dispatches.pop().ok_or(TransitionError::Db(sqlx::Error::RowNotFound))
}
