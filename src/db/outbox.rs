//! The transactional outbox: one row per dispatch of a task that JetStream has not yet
//! acknowledged. Rows are written by [`super::lifecycle`] in the transaction that
//! (re)queues the task, and deleted once the publish is acknowledged.

use std::collections::HashMap;

use sqlx::{PgConnection, PgExecutor};

use super::tasks;
use crate::domain::{Task, TaskStatus};

/// A committed dispatch of a task, ready to publish.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// The outbox row to delete once JetStream acknowledged the message.
    pub outbox_id: i64,
    /// The task as it was queued; `dispatch_seq` and `routed_to` name this dispatch.
    pub task: Task,
    /// Trace context (W3C header pairs) of the request that queued it, when known; not stored.
    pub trace: Vec<(String, String)>,
}

/// Inserts one outbox row per task (all queued, in the caller's transaction).
pub async fn insert(db: &mut PgConnection, tasks: Vec<Task>, now: i64) -> sqlx::Result<Vec<Dispatch>> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query!(
        "INSERT INTO outbox (task_id, dispatch_seq, worker_id, created_at)
         SELECT r.task_id, r.dispatch_seq, r.worker_id, $1
         FROM UNNEST($2::text[], $3::bigint[], $4::text[]) AS r(task_id, dispatch_seq, worker_id)
         RETURNING id, task_id",
        now,
        tasks.iter().map(|t| t.id.as_str()).collect::<Vec<_>>() as _,
        &tasks.iter().map(|t| t.dispatch_seq).collect::<Vec<_>>(),
        tasks.iter().map(|t| t.routed_to.as_ref().map(|w| w.as_str())).collect::<Vec<_>>() as _,
    )
    .fetch_all(&mut *db)
    .await?;
    let mut by_task: HashMap<String, i64> = rows.into_iter().map(|r| (r.task_id, r.id)).collect();
    Ok(tasks
        .into_iter()
        .filter_map(|task| {
            by_task.remove(task.id.as_str()).map(|outbox_id| Dispatch { outbox_id, task, trace: Vec::new() })
        })
        .collect())
}

/// Deletes rows whose publish JetStream acknowledged.
pub async fn delete(db: impl PgExecutor<'_>, ids: &[i64]) -> sqlx::Result<u64> {
    Ok(sqlx::query!("DELETE FROM outbox WHERE id = ANY($1)", ids).execute(db).await?.rows_affected())
}

/// Gives back rows a relay owned until `claimed_until` but could not publish, for any
/// relay to take again from `retry_at`; rows another relay has taken since are left alone.
pub async fn release(db: impl PgExecutor<'_>, ids: &[i64], claimed_until: i64, retry_at: i64) -> sqlx::Result<u64> {
    Ok(sqlx::query!(
        "UPDATE outbox SET claimed_until = $3 WHERE id = ANY($1) AND claimed_until = $2",
        ids,
        claimed_until,
        retry_at
    )
    .execute(db)
    .await?
    .rows_affected())
}

/// What the relay took from the outbox.
#[derive(Debug, Default)]
pub struct Taken {
    /// Dispatches still current: publish them.
    pub current: Vec<Dispatch>,
    /// Rows of dispatches that are no longer current (task claimed, requeued again,
    /// or gone) and were deleted.
    pub stale: u64,
}

/// Takes up to `limit` rows created before `older_than` that no relay owns, owning them
/// until `claim_until` (no transaction is held while publishing), and pairs each with
/// its task. Rows of dispatches that are no longer current are deleted.
pub async fn take_unsent(
    db: &mut PgConnection,
    older_than: i64,
    now: i64,
    claim_until: i64,
    limit: i64,
) -> sqlx::Result<Taken> {
    let rows = sqlx::query!(
        "WITH c AS (
            SELECT id FROM outbox
            WHERE created_at < $1 AND (claimed_until IS NULL OR claimed_until < $2)
            ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
         UPDATE outbox o SET claimed_until = $4 FROM c WHERE o.id = c.id
         RETURNING o.id, o.task_id, o.dispatch_seq",
        older_than,
        now,
        limit,
        claim_until
    )
    .fetch_all(&mut *db)
    .await?;
    if rows.is_empty() {
        return Ok(Taken::default());
    }
    let ids: Vec<String> = rows.iter().map(|r| r.task_id.clone()).collect();
    let mut tasks: HashMap<String, Task> =
        tasks::get_many(&mut *db, &ids).await?.into_iter().map(|t| (t.id.0.clone(), t)).collect();
    let mut taken = Taken::default();
    let mut stale = Vec::new();
    for row in rows {
        match tasks.remove(&row.task_id) {
            Some(task) if task.status == TaskStatus::Queued && task.dispatch_seq == row.dispatch_seq => {
                taken.current.push(Dispatch { outbox_id: row.id, task, trace: Vec::new() })
            }
            _ => stale.push(row.id),
        }
    }
    taken.stale = delete(&mut *db, &stale).await?;
    Ok(taken)
}
