//! `due`: waiting tasks whose `not_before` has come get a dispatch (batch).
//!
//! A delayed task is created `queued` with no dispatch (`dispatch_seq` 0, no outbox
//! row), and a failed run tried again later leaves its task `queued` with minus its
//! last dispatch's number: nothing can claim, lease or send either. This transition
//! gives it dispatch `1 - dispatch_seq` (1 for a delayed task, a number no earlier
//! message carries for a retry) and its outbox row, as `create` gives a new task. A task
//! put aside by a concurrency limit waits with no `not_before` until a slot of its frees
//! (`not_before` 0 then).
//!
//! Tasks waiting for a budget's window all become due when it ends. Before dispatching,
//! a pass ranks the due waiters of each budget counter as admission would take them
//! (highest priority, then oldest) and dispatches only those the counter can still admit
//! (what is left of its budget in the current window, less each one's reservation); the
//! others wait for the end of the next window, in the same transaction: one row update
//! each, instead of a dispatch, a claim and an admission that would put them aside again.

use sqlx::PgPool;

use crate::db::audit;
use crate::db::outbox::{self, Dispatch};
use crate::db::rows::TaskRow;
use crate::domain::{AuditAction, DesiredFormat, NewAudit, Policy, Task, TaskStatus};
use sqlx::types::Json;

/// Gives the due tasks their dispatch: `$1` now, `$2` at most this many.
pub(super) const DUE_SQL: &str = include_str!("due.sql");
/// Holds the due waiters of budget counters that cannot admit them: `$1` now, `$2` the
/// due tasks looked at.
pub(super) const HOLD_BUDGET_WAITERS_SQL: &str = include_str!("hold_budget_waiters.sql");

/// Dispatches up to `limit` delayed tasks due at `now`, most overdue first.
pub async fn due(pool: &PgPool, limit: i64, now: i64) -> sqlx::Result<Vec<Dispatch>> {
    let mut tx = pool.begin().await?;
    hold_budget_waiters(&mut tx, limit, now).await?;
    let tasks: Vec<Task> = sqlx::query_file_as!(TaskRow, "src/db/lifecycle/due.sql", now, limit)
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

/// Moves the due waiters of budget counters beyond what the counters can admit at `now`
/// to the end of the next window (`not_before`), each with its `wait_reason` and a
/// `task_deferred` audit entry; looks at the counters of the first `limit` due tasks
/// (those the dispatch that follows takes), and at every due waiter of each.
async fn hold_budget_waiters(tx: &mut sqlx::PgConnection, limit: i64, now: i64) -> sqlx::Result<()> {
    sqlx::query_file!("src/db/lifecycle/hold_budget_waiters.sql", now, limit).execute(&mut *tx).await?;
    Ok(())
}

/// Tasks waiting to be due (delayed, or to be tried again).
pub async fn count_waiting(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM llm_tasks WHERE status = 'queued' AND dispatch_seq <= 0"#)
        .fetch_one(pool)
        .await
}
