//! `redispatch`: queued tasks whose dispatch nobody claimed for a long time, while NATS
//! workers had room, dispatched again (batch).
//!
//! A dispatch can be lost after JetStream accepted it: delivered to a worker through a
//! NATS server that died before passing it on, the message is only redelivered after
//! the consumer's ack-wait, the lease TTL (minutes). Postgres sees the symptom: a task
//! queued long past any normal dispatch latency while workers have free slots. Such a
//! task gets a new dispatch sequence and outbox row; the old message, should it turn up,
//! is refused as stale.

use sqlx::PgPool;

use crate::db::audit;
use crate::db::outbox::{self, Dispatch};
use crate::db::rows::TaskRow;
use crate::domain::{AuditAction, DesiredFormat, NewAudit, Policy, Task, TaskStatus};
use sqlx::types::Json;

/// Dispatches again up to `limit` tasks queued (and dispatched) before `dispatched_before`,
/// oldest first, provided an online NATS worker has room; their routing is kept unless
/// the worker is being drained.
pub async fn redispatch(pool: &PgPool, dispatched_before: i64, limit: i64, now: i64) -> sqlx::Result<Vec<Dispatch>> {
    let mut tx = pool.begin().await?;
    let moved: Vec<Task> = sqlx::query_as!(
        TaskRow,
        r#"WITH c AS (
             SELECT id FROM llm_tasks
             WHERE status = 'queued' AND updated_at < $1 AND dispatch_seq > 0
               AND EXISTS (SELECT 1 FROM workers w
                           WHERE w.transport = 'nats' AND w.status = 'online' AND w.draining_since IS NULL
                             AND bloom_worker_leases(w.id) < COALESCE((w.capabilities->>'max_concurrency')::int, 1))
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)
           UPDATE llm_tasks t SET dispatch_seq = t.dispatch_seq + 1, updated_at = $3,
                  routed_to = CASE WHEN EXISTS (SELECT 1 FROM workers w WHERE w.id = t.routed_to AND w.draining_since IS NOT NULL)
                                   THEN NULL ELSE t.routed_to END
           FROM c WHERE t.id = c.id AND t.status = 'queued'
           RETURNING t.id, t.context_id, t.agent_slug, t.prompt, t.context_hints AS "context_hints: Json<Vec<String>>",
                     t.policy AS "policy: Json<Policy>", t.desired_format AS "desired_format: DesiredFormat",
                     t.status AS "status: TaskStatus", t.created_at, t.updated_at, t.lease_id, t.worker_id,
                     t.attempts, t.max_attempts, t.priority, t.not_before, t.idempotency_key, t.concurrency_key, t.wait_reason, t.last_error, t.dispatch_seq,
                     t.routed_to"#,
        dispatched_before,
        limit,
        now
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(Task::from)
    .collect();
    let entries: Vec<NewAudit> = moved
        .iter()
        .map(|t| {
            NewAudit::new(
                AuditAction::TaskRedispatched,
                "llm_task",
                t.id.as_str(),
                "reconciler",
                "Dispatch unclaimed while workers had room: dispatched again",
            )
        })
        .collect();
    audit::insert(&mut *tx, &entries, now).await?;
    let dispatches = outbox::insert(&mut tx, moved, now).await?;
    tx.commit().await?;
    Ok(dispatches)
}
