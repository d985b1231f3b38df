//! Reads of `leases`. Writes are state transitions and live in [`super::lifecycle`].

use sqlx::PgExecutor;

use super::Page;
use crate::domain::{Lease, LeaseId, LeaseStatus, TaskId, WorkerId};

/// One lease.
pub async fn get(db: impl PgExecutor<'_>, id: &LeaseId) -> sqlx::Result<Option<Lease>> {
    sqlx::query_as!(
        Lease,
        r#"SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status AS "status: LeaseStatus",
                  last_heartbeat, context_id
           FROM leases WHERE id = $1"#,
        id.as_str()
    )
    .fetch_optional(db)
    .await
}

/// Most recently started first, optionally of one status.
pub async fn list(db: impl PgExecutor<'_>, status: Option<LeaseStatus>, page: &Page) -> sqlx::Result<Vec<Lease>> {
    let (key, id) = page.bounds();
    sqlx::query_as!(
        Lease,
        r#"SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status AS "status: LeaseStatus",
                  last_heartbeat, context_id
           FROM leases
           WHERE ($1::text IS NULL OR status = $1) AND (started_at, id) < ($2, $3)
           ORDER BY started_at DESC, id DESC LIMIT $4"#,
        status.map(LeaseStatus::as_str),
        key,
        id,
        page.limit
    )
    .fetch_all(db)
    .await
}

/// Active leases held by one worker, most recent first.
pub async fn active_for_worker(db: impl PgExecutor<'_>, worker: &WorkerId) -> sqlx::Result<Vec<Lease>> {
    sqlx::query_as!(
        Lease,
        r#"SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status AS "status: LeaseStatus",
                  last_heartbeat, context_id
           FROM leases WHERE worker_id = $1 AND (status || '') = 'active' ORDER BY started_at DESC"#,
        worker.as_str()
    )
    .fetch_all(db)
    .await
}

/// The leases of a task, oldest first, at most `limit`.
pub async fn of_task(db: impl PgExecutor<'_>, task: &TaskId, limit: i64) -> sqlx::Result<Vec<Lease>> {
    sqlx::query_as!(
        Lease,
        r#"SELECT id, task_id, worker_id, started_at, expires_at, ttl_seconds, status AS "status: LeaseStatus",
                  last_heartbeat, context_id
           FROM leases WHERE task_id = $1 ORDER BY started_at, id LIMIT $2"#,
        task.as_str(),
        limit
    )
    .fetch_all(db)
    .await
}
