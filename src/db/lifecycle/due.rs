//! `due`: waiting tasks whose `not_before` has come get a dispatch (batch).
//!
//! A delayed task is created `queued` with no dispatch (`dispatch_seq` 0, no outbox
//! row), and a failed run tried again later leaves its task `queued` with minus its
//! last dispatch's number: nothing can claim, lease or send either. This transition
//! gives it dispatch `1 - dispatch_seq` (1 for a delayed task, a number no earlier
//! message carries for a retry) and its outbox row, as `create` gives a new task. A task
//! put aside by a concurrency limit waits with no `not_before` until a slot of its frees
//! (`not_before` 0 then).

use sqlx::PgPool;

use crate::db::audit;
use crate::db::outbox::{self, Dispatch};
use crate::db::rows::TaskRow;
use crate::domain::{AuditAction, DesiredFormat, NewAudit, Policy, Task, TaskStatus};
use sqlx::types::Json;

/// Dispatches up to `limit` delayed tasks due at `now`, most overdue first.
pub async fn due(pool: &PgPool, limit: i64, now: i64) -> sqlx::Result<Vec<Dispatch>> {
    let mut tx = pool.begin().await?;
    let tasks: Vec<Task> = sqlx::query_as!(
        TaskRow,
        r#"WITH c AS (
             SELECT id FROM llm_tasks
             WHERE status = 'queued' AND dispatch_seq <= 0 AND not_before <= $1
             ORDER BY not_before LIMIT $2 FOR UPDATE SKIP LOCKED)
           UPDATE llm_tasks t SET dispatch_seq = 1 - t.dispatch_seq, updated_at = $1, wait_reason = NULL,
                                  blocked_on = NULL
           FROM c WHERE t.id = c.id AND t.status = 'queued' AND t.dispatch_seq <= 0
           RETURNING t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints AS "context_hints: Json<Vec<String>>",
                     t.policy AS "policy: Json<Policy>", t.desired_format AS "desired_format: DesiredFormat",
                     t.status AS "status: TaskStatus", t.created_at, t.updated_at, t.lease_id, t.worker_id,
                     t.attempts, t.max_attempts, t.priority, t.not_before, t.idempotency_key, t.concurrency_key, t.wait_reason, t.last_error, t.dispatch_seq,
                     t.routed_to"#,
        now,
        limit
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(Task::from)
    .collect();
    let entries: Vec<NewAudit> = tasks
        .iter()
        .map(|t| {
            let detail = match t.not_before {
                // Made due by a concurrency slot that freed (or a limit that changed).
                Some(0) => format!("Task due: its concurrency slot has room: dispatch {}", t.dispatch_seq),
                at => format!(
                    "Task due ({} ms after its not_before): dispatch {}",
                    now - at.unwrap_or(now),
                    t.dispatch_seq
                ),
            };
            NewAudit::new(AuditAction::TaskDue, "llm_task", t.id.as_str(), "reconciler", detail)
        })
        .collect();
    audit::insert(&mut *tx, &entries, now).await?;
    let dispatches = outbox::insert(&mut tx, tasks, now).await?;
    tx.commit().await?;
    Ok(dispatches)
}

/// Tasks waiting to be due (delayed, or to be tried again).
pub async fn count_waiting(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM llm_tasks WHERE status = 'queued' AND dispatch_seq <= 0"#)
        .fetch_one(pool)
        .await
}
