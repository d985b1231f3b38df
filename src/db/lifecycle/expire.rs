//! `expire`: leases past their time (or of a restarted worker) ended; tasks requeued or dead (batch).

use sqlx::{PgConnection, PgPool};

use crate::db::outbox::{self, Dispatch};
use crate::db::{audit, tasks};
use crate::domain::{AuditAction, NewAudit, TaskStatus, WorkerId};

/// What one sweep of expired leases did.
#[derive(Debug, Default)]
pub struct Expiry {
    /// Leases marked expired.
    pub expired: usize,
    /// Tasks requeued (attempts remained), with their new dispatches.
    pub requeued: Vec<Dispatch>,
    /// Tasks that ran out of attempts and are now `dead`.
    pub dead: usize,
}

impl Expiry {
    /// Adds what another pass did.
    fn absorb(&mut self, other: Expiry) {
        self.expired += other.expired;
        self.dead += other.dead;
        self.requeued.extend(other.requeued);
    }
}

/// Which active leases [`expire`] ends.
#[derive(Clone, Copy, Debug)]
pub enum Expiring<'a> {
    /// Those whose `expires_at` is before this time (ms).
    Before(i64),
    /// Those a worker held before its process restarted: the executions died with the
    /// previous process, so they need not wait for their TTL.
    HeldBy(&'a WorkerId),
    /// Those of a worker that went silent (no beat for the worker timeout): its process
    /// is gone or cut off, so they need not wait for their TTL either.
    OfSilent(&'a WorkerId),
}

/// One ended lease, and what became of its task (nothing when the lease was no longer
/// the task's current one).
struct Ended {
    lease_id: String,
    task_id: String,
    worker_id: String,
    status: Option<TaskStatus>,
    attempts: Option<i32>,
    max_attempts: Option<i32>,
}

/// Expires up to `limit` active leases, in one transaction: rows are taken with
/// `FOR UPDATE SKIP LOCKED` so several sweepers share the work. A task whose current
/// lease expired (in `leased` or `running`) is requeued through the outbox while
/// attempts remain, else becomes `dead`.
pub async fn expire(pool: &PgPool, which: Expiring<'_>, limit: i64, now: i64) -> sqlx::Result<Expiry> {
    let mut tx = pool.begin().await?;
    let report = expire_in(&mut tx, which, limit, now).await?;
    tx.commit().await?;
    Ok(report)
}

/// Leases [`expire_all_in`] ends per statement.
const BATCH: i64 = 500;

/// Ends every lease `which` names, in statements of [`BATCH`] leases within the caller's
/// transaction (a worker's leases, when its process restarted or went silent); adds what
/// it did to `all`.
pub(super) async fn expire_all_in(
    tx: &mut PgConnection,
    which: Expiring<'_>,
    now: i64,
    all: &mut Expiry,
) -> sqlx::Result<()> {
    loop {
        let batch = expire_in(tx, which, BATCH, now).await?;
        let more = batch.expired as i64 == BATCH;
        all.absorb(batch);
        if !more {
            return Ok(());
        }
    }
}

/// [`expire`] within the caller's transaction.
pub(super) async fn expire_in(
    tx: &mut PgConnection,
    which: Expiring<'_>,
    limit: i64,
    now: i64,
) -> sqlx::Result<Expiry> {
    let (cutoff, holder, ended) = match which {
        Expiring::Before(cutoff) => (cutoff, None, "expired"),
        Expiring::HeldBy(worker) => (i64::MAX, Some(worker), "ended: its worker restarted"),
        Expiring::OfSilent(worker) => (i64::MAX, Some(worker), "ended: its worker went silent"),
    };
    let rows = sqlx::query_as!(
        Ended,
        r#"WITH stale AS (
            SELECT id FROM leases WHERE $4::text IS NULL AND status = 'active' AND expires_at < $1
            ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED),
         -- A worker's own: through the index of the active leases by worker.
         held AS (
            SELECT id FROM leases WHERE worker_id = $4 AND (status || '') = 'active' AND expires_at < $1
            ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED),
         ex AS (
            UPDATE leases l SET status = 'expired' FROM (SELECT id FROM stale UNION ALL SELECT id FROM held) s
            WHERE l.id = s.id
            RETURNING l.id, l.task_id, l.worker_id),
         t AS (
            UPDATE llm_tasks t SET
                status = CASE WHEN t.attempts < t.max_attempts THEN 'queued' ELSE 'dead' END,
                lease_id = CASE WHEN t.attempts < t.max_attempts THEN NULL ELSE t.lease_id END,
                worker_id = CASE WHEN t.attempts < t.max_attempts THEN NULL ELSE t.worker_id END,
                dispatch_seq = t.dispatch_seq + 1,
                routed_to = NULL,
                updated_at = $3
            FROM ex WHERE t.id = ex.task_id AND t.lease_id = ex.id AND (t.status || '') IN ('leased', 'running')
            RETURNING t.id, t.status, t.attempts, t.max_attempts)
         SELECT ex.id AS "lease_id!", ex.task_id AS "task_id!", ex.worker_id AS "worker_id!",
                t.status AS "status?: TaskStatus", t.attempts AS "attempts?", t.max_attempts AS "max_attempts?"
         FROM ex LEFT JOIN t ON t.id = ex.task_id"#,
        cutoff,
        limit,
        now,
        holder.map(WorkerId::as_str)
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut report = Expiry { expired: rows.len(), ..Expiry::default() };
    let mut entries = Vec::new();
    let mut requeued_ids = Vec::new();
    for Ended { lease_id, task_id, worker_id, status, attempts, max_attempts } in rows {
        let (attempts, max) = (attempts.unwrap_or(0), max_attempts.unwrap_or(0));
        entries.push(NewAudit::new(
            AuditAction::LeaseExpired,
            "lease",
            &lease_id,
            "reconciler",
            format!("Lease of task {task_id} held by worker {worker_id} {ended} (attempt {attempts} of {max})"),
        ));
        match status {
            Some(TaskStatus::Queued) => {
                entries.push(NewAudit::new(
                    AuditAction::TaskRequeued,
                    "llm_task",
                    &task_id,
                    "reconciler",
                    format!("Requeued after lease expiry, {attempts} of {max} attempts used"),
                ));
                requeued_ids.push(task_id);
            }
            Some(TaskStatus::Dead) => {
                report.dead += 1;
                entries.push(NewAudit::new(
                    AuditAction::TaskDead,
                    "llm_task",
                    &task_id,
                    "reconciler",
                    format!("Dead after lease expiry, all {max} attempts used"),
                ));
            }
            _ => {}
        }
    }
    audit::insert(&mut *tx, &entries, now).await?;
    let requeued = tasks::get_many(&mut *tx, &requeued_ids).await?;
    report.requeued = outbox::insert(tx, requeued, now).await?;
    Ok(report)
}
