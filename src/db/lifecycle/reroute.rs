//! `reroute`: queued tasks routed to a worker that went offline or is being drained sent
//! to the shared pool (batch).

use sqlx::PgPool;

use crate::db::audit;
use crate::db::outbox::{self, Dispatch};
use crate::db::rows::TaskRow;
use crate::domain::{AuditAction, DesiredFormat, NewAudit, Policy, Task, TaskStatus, WorkerId};
use sqlx::types::Json;

/// Moves queued tasks routed to `workers` back to the shared pool (a new dispatch through
/// the outbox), audited with `why` by `actor`.
pub async fn reroute(
    pool: &PgPool,
    workers: &[WorkerId],
    why: &str,
    actor: &str,
    now: i64,
) -> sqlx::Result<Vec<Dispatch>> {
    if workers.is_empty() {
        return Ok(Vec::new());
    }
    let mut tx = pool.begin().await?;
    let workers: Vec<&str> = workers.iter().map(WorkerId::as_str).collect();
    let moved: Vec<Task> = sqlx::query_as!(
        TaskRow,
        r#"UPDATE llm_tasks SET dispatch_seq = dispatch_seq + 1, routed_to = NULL, updated_at = $2
           WHERE status = 'queued' AND routed_to = ANY($1)
           RETURNING id, context_id, agent_slug, prompt, context_hints AS "context_hints: Json<Vec<String>>",
                     policy AS "policy: Json<Policy>", desired_format AS "desired_format: DesiredFormat",
                     status AS "status: TaskStatus", created_at, updated_at, lease_id, worker_id, attempts,
                     max_attempts, priority, not_before, idempotency_key, concurrency_key, wait_reason, last_error, dispatch_seq, routed_to"#,
        workers as _,
        now
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(Task::from)
    .collect();
    let entries: Vec<NewAudit> =
        moved.iter().map(|t| NewAudit::new(AuditAction::TaskRerouted, "llm_task", t.id.as_str(), actor, why)).collect();
    audit::insert(&mut *tx, &entries, now).await?;
    let dispatches = outbox::insert(&mut tx, moved, now).await?;
    tx.commit().await?;
    Ok(dispatches)
}
