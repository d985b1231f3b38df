//! `requeue`: a `failed`, `dead` or `cancelled` task queued again by an administrator.

use sqlx::PgPool;

use super::{task_not_found, TransitionError};
use crate::db::audit;
use crate::db::outbox::{self, Dispatch};
use crate::db::rows::TaskRow;
use crate::db::tasks::TaskFilter;
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
                dispatch_seq = abs(dispatch_seq) + 1, routed_to = NULL, wait_reason = NULL, blocked_on = NULL, updated_at = $2
           WHERE id = $1 AND status IN ('failed', 'dead', 'cancelled')
           RETURNING id, context_id, agent_slug, prompt, context_hints AS "context_hints: Json<Vec<String>>",
                     policy AS "policy: Json<Policy>", desired_format AS "desired_format: DesiredFormat",
                     status AS "status: TaskStatus", created_at, updated_at, lease_id, worker_id, attempts,
                     max_attempts, priority, not_before, idempotency_key, concurrency_key, wait_reason, last_error, dispatch_seq, routed_to"#,
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

/// Requeues up to `limit` finished tasks of `filter` (its statuses must be among
/// `failed`, `dead`, `cancelled`), oldest first, in one transaction, each as
/// [`requeue`] does it (attempts from zero, audit entries, a new dispatch). Tasks
/// requeued meanwhile are not touched (the statuses are checked under the row locks).
pub async fn requeue_many(
    pool: &PgPool,
    filter: &TaskFilter,
    limit: i64,
    actor: &str,
    now: i64,
) -> sqlx::Result<Vec<Dispatch>> {
    let mut tx = pool.begin().await?;
    let prev = sqlx::query!(
        r#"SELECT id, status AS "status: TaskStatus", attempts FROM llm_tasks
           WHERE status = ANY($1) AND status IN ('failed', 'dead', 'cancelled')
             AND ($2::text[] IS NULL OR id = ANY($2))
             AND ($3::text IS NULL OR context_id = $3) AND ($4::text IS NULL OR agent_slug = $4)
             AND ($5::smallint IS NULL OR priority = $5) AND ($6::bigint IS NULL OR created_at >= $6)
             AND ($7::bigint IS NULL OR created_at < $7)
             AND ($9::text IS NULL OR lower(left(prompt, char_length($9))) = lower($9))
           ORDER BY created_at LIMIT $8 FOR UPDATE"#,
        &filter.status_texts().unwrap_or_else(requeueable) as _,
        filter.ids.as_deref() as _,
        filter.context_id.as_deref(),
        filter.agent_slug.as_deref(),
        filter.priority_value(),
        filter.created_from,
        filter.created_to,
        limit,
        filter.prompt_prefix.as_deref(),
    )
    .fetch_all(&mut *tx)
    .await?;
    let ids: Vec<String> = prev.iter().map(|r| r.id.clone()).collect();
    let tasks: Vec<Task> = sqlx::query_as!(
        TaskRow,
        r#"UPDATE llm_tasks SET status = 'queued', lease_id = NULL, worker_id = NULL, attempts = 0,
                dispatch_seq = abs(dispatch_seq) + 1, routed_to = NULL, wait_reason = NULL, blocked_on = NULL, updated_at = $2
           WHERE id = ANY($1) AND status IN ('failed', 'dead', 'cancelled')
           RETURNING id, context_id, agent_slug, prompt, context_hints AS "context_hints: Json<Vec<String>>",
                     policy AS "policy: Json<Policy>", desired_format AS "desired_format: DesiredFormat",
                     status AS "status: TaskStatus", created_at, updated_at, lease_id, worker_id, attempts,
                     max_attempts, priority, not_before, idempotency_key, concurrency_key, wait_reason, last_error, dispatch_seq, routed_to"#,
        &ids,
        now
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(Task::from)
    .collect();
    let mut entries = Vec::with_capacity(prev.len() * 2);
    for p in &prev {
        let reset = format!("Attempts reset to 0 from {}", p.attempts);
        entries.push(NewAudit::new(AuditAction::AttemptsReset, "llm_task", &p.id, actor, reset));
        let detail = format!("Requeued from {} (bulk)", p.status);
        entries.push(NewAudit::new(AuditAction::TaskRequeued, "llm_task", &p.id, actor, detail));
    }
    audit::insert(&mut *tx, &entries, now).await?;
    let dispatches = outbox::insert(&mut tx, tasks, now).await?;
    tx.commit().await?;
    Ok(dispatches)
}

/// The statuses a requeue applies to.
fn requeueable() -> Vec<String> {
    TaskStatus::ALL.iter().filter(|s| s.is_requeueable()).map(|s| s.as_str().to_owned()).collect()
}
