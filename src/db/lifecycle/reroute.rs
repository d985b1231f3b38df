//! `reroute`: queued tasks routed to an offline worker sent to the shared pool (batch).

use sqlx::PgPool;

use crate::db::audit;
use crate::db::outbox::{self, Dispatch};
use crate::domain::{AuditAction, NewAudit, Task, WorkerId};

/// Moves queued tasks routed to workers that went offline back to the shared pool (a new
/// dispatch through the outbox).
pub async fn reroute(pool: &PgPool, offline: &[WorkerId], now: i64) -> sqlx::Result<Vec<Dispatch>> {
    if offline.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = pool.begin().await?;
    let moved: Vec<Task> = sqlx::query_as(
        "UPDATE llm_tasks SET dispatch_seq = dispatch_seq + 1, routed_to = NULL, updated_at = $2
         WHERE status = 'queued' AND routed_to = ANY($1) RETURNING *",
    )
    .bind(offline)
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let entries: Vec<NewAudit> = moved
        .iter()
        .map(|t| {
            NewAudit::new(
                AuditAction::TaskRerouted,
                "llm_task",
                t.id.as_str(),
                "reconciler",
                "Routed worker went offline: rerouted to the shared pool",
            )
        })
        .collect();
    audit::insert(&mut *tx, &entries, now).await?;
    let dispatches = outbox::insert(&mut tx, moved, now).await?;
    tx.commit().await?;
    Ok(dispatches)
}
