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

/// Dispatches up to `limit` delayed tasks due at `now`, most overdue first.
pub async fn due(pool: &PgPool, limit: i64, now: i64) -> sqlx::Result<Vec<Dispatch>> {
    let mut tx = pool.begin().await?;
    hold_budget_waiters(&mut tx, limit, now).await?;
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

/// Moves the due waiters of budget counters beyond what the counters can admit at `now`
/// to the end of the next window (`not_before`), each with its `wait_reason` and a
/// `task_deferred` audit entry; looks at the counters of the first `limit` due tasks
/// (those the dispatch that follows takes), and at every due waiter of each.
async fn hold_budget_waiters(tx: &mut sqlx::PgConnection, limit: i64, now: i64) -> sqlx::Result<()> {
    sqlx::query!(
        r#"WITH due AS (
             SELECT blocked_on FROM llm_tasks
             WHERE status = 'queued' AND dispatch_seq <= 0 AND not_before <= $1 AND EXISTS (SELECT 1 FROM budget_limits)
             ORDER BY not_before LIMIT $2),
           -- The counters passed as a column, not a subquery: a SQL function's body is
           -- inlined into this statement's plan only then, else planned at every call.
           b AS (SELECT r.* FROM (SELECT ARRAY(SELECT DISTINCT blocked_on FROM due WHERE blocked_on IS NOT NULL) AS counters) x
                 CROSS JOIN LATERAL bloom_budget_room(x.counters, $1) r),
           w AS (
             SELECT t.id, t.blocked_on, t.priority, t.created_at, t.policy FROM llm_tasks t
             WHERE t.blocked_on = ANY(ARRAY(SELECT counter FROM b)) AND t.status = 'queued' AND t.dispatch_seq <= 0
               AND t.not_before <= $1
             FOR UPDATE SKIP LOCKED),
           ranked AS (
             SELECT w.id, b.*, r.reserve,
                    sum(r.reserve) OVER (PARTITION BY b.counter ORDER BY w.priority DESC, w.created_at, w.id) AS upto
             FROM w JOIN b ON b.counter = w.blocked_on
             CROSS JOIN LATERAL (SELECT bloom_reserve(b.metric, b.max_amount, w.policy, b.estimate, b.average) AS reserve) r),
           held AS (
             UPDATE llm_tasks t SET not_before = h.window_end, updated_at = $1,
                    wait_reason = 'budget of ' || h.scope || ' ' || h.key || ' for ' || h.metric || ' per ' || h.period
                                  || ' taken by tasks ahead (' || bloom_amount(h.metric, GREATEST(h.room, 0)) || ' of '
                                  || bloom_amount(h.metric, h.max_amount) || ' left) until ' || bloom_iso_time(h.window_end)
             FROM ranked h
             WHERE t.id = h.id AND t.status = 'queued' AND t.dispatch_seq <= 0
               AND NOT (h.upto <= h.room AND h.upto - h.reserve < h.room)
             RETURNING t.id, t.wait_reason)
           INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
           SELECT gen_random_uuid()::text, $1, 'task_deferred', 'llm_task', id, 'reconciler', 'Still waiting: ' || wait_reason
           FROM held"#,
        now,
        limit
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Tasks waiting to be due (delayed, or to be tried again).
pub async fn count_waiting(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM llm_tasks WHERE status = 'queued' AND dispatch_seq <= 0"#)
        .fetch_one(pool)
        .await
}
