//! `abandon`: a lease whose worker never took the task (an HTTP agent refused it, could
//! not be reached, or did not answer in time) ended; the task requeued or dead.

use sqlx::PgPool;

use crate::db::outbox::{self, Dispatch};
use crate::db::{audit, tasks};
use crate::domain::{AuditAction, LeaseId, NewAudit, TaskId, TaskStatus, WorkerId};

/// What became of an abandoned attempt's task.
#[derive(Debug)]
pub enum Abandoned {
    /// Attempts remain: queued again, with its new dispatch.
    Requeued(Box<Dispatch>),
    /// It was the last attempt: the task is `dead`.
    Dead,
    /// The lease was no longer the task's current one (completed, expired, requeued):
    /// nothing changed.
    NotCurrent,
}

/// Ends the attempt of `lease` on `task` because its worker never ran it: the lease is
/// marked `failed` and the task requeued through the outbox while attempts remain, else
/// `dead`, in one transaction guarded by the lease still being the task's current,
/// active one. Audited as `dispatch_failed` with `reason`.
pub async fn abandon(
    pool: &PgPool,
    task: &TaskId,
    lease: &LeaseId,
    worker: &WorkerId,
    reason: &str,
    now: i64,
) -> sqlx::Result<Abandoned> {
    let mut tx = pool.begin().await?;
    let ended = sqlx::query!(
        r#"WITH l AS (
              UPDATE leases SET status = 'failed' WHERE id = $2 AND task_id = $1 AND status = 'active' RETURNING id),
           t AS (
              UPDATE llm_tasks t SET
                  status = CASE WHEN t.attempts < t.max_attempts THEN 'queued' ELSE 'dead' END,
                  lease_id = CASE WHEN t.attempts < t.max_attempts THEN NULL ELSE t.lease_id END,
                  worker_id = CASE WHEN t.attempts < t.max_attempts THEN NULL ELSE t.worker_id END,
                  dispatch_seq = t.dispatch_seq + 1, routed_to = NULL, updated_at = $3
              FROM l WHERE t.id = $1 AND t.lease_id = l.id AND t.status IN ('leased', 'running')
              RETURNING t.status)
           SELECT status AS "status!: TaskStatus" FROM t"#,
        task.as_str(),
        lease.as_str(),
        now
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(ended) = ended else { return Ok(Abandoned::NotCurrent) };
    let mut entries = vec![NewAudit::new(
        AuditAction::DispatchFailed,
        "llm_task",
        task.as_str(),
        "router",
        format!("Dispatch to {worker} failed: {reason}"),
    )];
    let outcome = if ended.status == TaskStatus::Queued {
        entries.push(NewAudit::new(
            AuditAction::TaskRequeued,
            "llm_task",
            task.as_str(),
            "router",
            "Requeued after a failed dispatch",
        ));
        let requeued = tasks::get_many(&mut *tx, std::slice::from_ref(&task.0)).await?;
        match outbox::insert(&mut tx, requeued, now).await?.pop() {
            Some(d) => Abandoned::Requeued(Box::new(d)),
            None => Abandoned::NotCurrent,
        }
    } else {
        entries.push(NewAudit::new(
            AuditAction::TaskDead,
            "llm_task",
            task.as_str(),
            "router",
            "Dead after a failed dispatch: all attempts used",
        ));
        Abandoned::Dead
    };
    audit::insert(&mut *tx, &entries, now).await?;
    tx.commit().await?;
    Ok(outcome)
}
