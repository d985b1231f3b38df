//! `requeue`: a `failed`, `dead` or `cancelled` task queued again by an administrator.

use sqlx::PgPool;

use super::{task_not_found, TransitionError};
use crate::db::audit;
use crate::db::outbox::{self, Dispatch};
use crate::db::rows::TaskRow;
use crate::domain::{AuditAction, DesiredFormat, NewAudit, Policy, Task, TaskId, TaskStatus};
use sqlx::types::Json;

/// Requeues a `failed` or `dead` task (administrator action): attempts start again from
/// zero, the previous count is kept in an `attempts_reset` audit entry beside the
/// original's `task_requeued` one, and the leases remain as history.
pub async fn requeue(pool: &PgPool, task_id: &TaskId, actor: &str, now: i64) -> Result<Dispatch, TransitionError> {
    let mut tx = pool.begin().await?;
    let prev = sqlx::query!(
        r#"SELECT status AS "status: TaskStatus", attempts FROM llm_tasks WHERE id = $1 FOR UPDATE"#,
        task_id.as_str()
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(task_not_found)?;
    let (prev_status, prev_attempts) = (prev.status, prev.attempts);
    if !prev_status.is_requeueable() {
        return Err(TransitionError::Conflict(format!("Cannot requeue task with status '{prev_status}'")));
    }
    let task: Task = sqlx::query_as!(
        TaskRow,
        r#"UPDATE llm_tasks SET status = 'queued', lease_id = NULL, worker_id = NULL, attempts = 0,
                dispatch_seq = dispatch_seq + 1, routed_to = NULL, updated_at = $2
           WHERE id = $1 AND status IN ('failed', 'dead', 'cancelled')
           RETURNING id, context_id, agent_slug, prompt, context_hints AS "context_hints: Json<Vec<String>>",
                     policy AS "policy: Json<Policy>", desired_format AS "desired_format: DesiredFormat",
                     status AS "status: TaskStatus", created_at, updated_at, lease_id, worker_id, attempts,
                     max_attempts, dispatch_seq, routed_to"#,
        task_id.as_str(),
        now
    )
    .fetch_one(&mut *tx)
    .await?
    .into();
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
