//! `cancel`: a queued, leased or running task stopped for good (until requeued).

use sqlx::PgPool;

use super::{task_not_found, TransitionError};
use crate::db::audit;
use crate::db::rows::TaskRow;
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
        r#"UPDATE llm_tasks SET status = 'cancelled', updated_at = $2
           WHERE id = $1 AND status IN ('queued', 'leased', 'running')
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
