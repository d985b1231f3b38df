//! `release`: a lease handed back by a stopping worker, the task `queued` again.

use sqlx::PgPool;

use crate::db::audit;
use crate::domain::{AuditAction, LeaseId, NewAudit, TaskId};

/// Hands a lease back without a result (a worker shutting down): the lease is
/// released and the task returns to `queued` with the same dispatch, so the message the
/// worker naks can be claimed by another worker at once. The attempt stays counted.
pub async fn release(pool: &PgPool, task_id: &TaskId, lease_id: &LeaseId, now: i64) -> sqlx::Result<bool> {
    let mut tx = pool.begin().await?;
    let released = sqlx::query!(
        "UPDATE llm_tasks SET status = 'queued', lease_id = NULL, worker_id = NULL, updated_at = $3
         WHERE id = $1 AND lease_id = $2 AND status IN ('leased', 'running')",
        task_id.as_str(),
        lease_id.as_str(),
        now
    )
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if released {
        sqlx::query!("UPDATE leases SET status = 'released' WHERE id = $1 AND status = 'active'", lease_id.as_str())
            .execute(&mut *tx)
            .await?;
        let detail = format!("Lease {lease_id} handed back by a stopping worker");
        audit::insert(
            &mut *tx,
            &[NewAudit::new(AuditAction::TaskRequeued, "llm_task", task_id.as_str(), "worker", detail)],
            now,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(released)
}
