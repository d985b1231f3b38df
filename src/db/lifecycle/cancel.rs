//! `cancel`: a queued, leased or running task stopped for good (until requeued).

use sqlx::PgPool;

use super::{task_not_found, TransitionError};
use crate::db::audit;
use crate::db::rows::TaskRow;
use crate::db::tasks::TaskFilter;
use crate::domain::{AuditAction, DesiredFormat, LeaseId, NewAudit, Policy, Task, TaskId, TaskStatus, WorkerId};
use sqlx::types::Json;

/// A cancelled task, and the lease it held (whose worker is to stop running it).
#[derive(Debug)]
pub struct Cancelled {
    pub task: Task,
    pub lease: Option<(LeaseId, WorkerId)>,
}

/// Cancels a task that is `queued`, `leased` or `running`: it becomes `cancelled` and its
/// active lease `cancelled`, in one transaction with the audit entry. Its dispatch
/// message, if any is still on the bus, is refused when claimed (the task is no longer
/// queued); a result of the lease arriving later is recorded as late and ignored.
pub async fn cancel(pool: &PgPool, task_id: &TaskId, actor: &str, now: i64) -> Result<Cancelled, TransitionError> {
    let mut tx = pool.begin().await?;
    let prev = sqlx::query!(
        r#"SELECT status AS "status: TaskStatus", lease_id, worker_id FROM llm_tasks WHERE id = $1 FOR UPDATE"#,
        task_id.as_str()
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(task_not_found)?;
    if prev.status.is_terminal() {
        return Err(TransitionError::Conflict(format!(
            "Cannot cancel task with status '{}': only queued, leased or running tasks can be cancelled",
            prev.status
        )));
    }
    let task: Task = sqlx::query_as!(
        TaskRow,
        r#"UPDATE llm_tasks SET status = 'cancelled', wait_reason = NULL, blocked_on = NULL, updated_at = $2
           WHERE id = $1 AND status IN ('queued', 'leased', 'running')
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
    let lease = match (prev.status.is_leased(), prev.lease_id, prev.worker_id) {
        (true, Some(lease), Some(worker)) => {
            sqlx::query!("UPDATE leases SET status = 'cancelled' WHERE id = $1 AND status = 'active'", lease)
                .execute(&mut *tx)
                .await?;
            Some((LeaseId::from(lease), WorkerId::from(worker)))
        }
        _ => None,
    };
    let detail = match &lease {
        Some((l, w)) => format!("Cancelled while {} (lease {l} on worker {w})", prev.status),
        None => format!("Cancelled while {}", prev.status),
    };
    audit::insert(
        &mut *tx,
        &[NewAudit::new(AuditAction::TaskCancelled, "llm_task", task_id.as_str(), actor, detail)],
        now,
    )
    .await?;
    tx.commit().await?;
    Ok(Cancelled { task, lease })
}

/// Cancels up to `limit` unfinished tasks of `filter` (its statuses must be among
/// `queued`, `leased`, `running`), oldest first, in one transaction: each becomes
/// `cancelled`, its active lease `cancelled`, with an audit entry each. Tasks that
/// finish meanwhile are not touched (the statuses are checked under the row locks).
pub async fn cancel_many(
    pool: &PgPool,
    filter: &TaskFilter,
    limit: i64,
    actor: &str,
    now: i64,
) -> sqlx::Result<Vec<(TaskId, Option<(LeaseId, WorkerId)>)>> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query!(
        r#"WITH c AS (
             SELECT id, status, lease_id, worker_id FROM llm_tasks
             WHERE status = ANY($1) AND status IN ('queued', 'leased', 'running')
               AND ($2::text[] IS NULL OR id = ANY($2))
               AND ($3::text IS NULL OR context_id = $3) AND ($4::text IS NULL OR agent_slug = $4)
               AND ($7::smallint IS NULL OR priority = $7) AND ($8::bigint IS NULL OR created_at >= $8)
               AND ($9::bigint IS NULL OR created_at < $9)
               AND ($10::text IS NULL OR lower(left(prompt, char_length($10))) = lower($10))
             ORDER BY created_at LIMIT $5 FOR UPDATE),
           l AS (
             UPDATE leases SET status = 'cancelled'
             WHERE id IN (SELECT lease_id FROM c WHERE status IN ('leased', 'running')) AND status = 'active'
             RETURNING id),
           t AS (
             UPDATE llm_tasks t SET status = 'cancelled', wait_reason = NULL, blocked_on = NULL, updated_at = $6 FROM c
             WHERE t.id = c.id AND t.status IN ('queued', 'leased', 'running')
             RETURNING t.id)
           SELECT c.id AS "id!", c.status AS "status!: TaskStatus", c.lease_id, c.worker_id FROM c JOIN t ON t.id = c.id"#,
        &filter.status_texts().unwrap_or_else(|| unfinished()) as _,
        filter.ids.as_deref() as _,
        filter.context_id.as_deref(),
        filter.agent_slug.as_deref(),
        limit,
        now,
        filter.priority_value(),
        filter.created_from,
        filter.created_to,
        filter.prompt_prefix.as_deref(),
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    let mut entries = Vec::with_capacity(rows.len());
    for r in rows {
        let lease = match (r.status.is_leased(), r.lease_id, r.worker_id) {
            (true, Some(l), Some(w)) => Some((LeaseId::from(l), WorkerId::from(w))),
            _ => None,
        };
        let detail = match &lease {
            Some((l, w)) => format!("Cancelled while {} (lease {l} on worker {w})", r.status),
            None => format!("Cancelled while {}", r.status),
        };
        entries.push(NewAudit::new(AuditAction::TaskCancelled, "llm_task", &r.id, actor, detail));
        out.push((TaskId(r.id), lease));
    }
    audit::insert(&mut *tx, &entries, now).await?;
    tx.commit().await?;
    Ok(out)
}

/// The statuses a cancellation applies to.
fn unfinished() -> Vec<String> {
    TaskStatus::ALL.iter().filter(|s| !s.is_terminal()).map(|s| s.as_str().to_owned()).collect()
}
