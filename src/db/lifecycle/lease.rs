//! `lease`: a REST lease, `queued -> leased`, to a chosen or named worker.

use sqlx::PgPool;

use super::{conflict_on, not_due, task_not_found, TransitionError};
use crate::db::admission;
use crate::db::{holds, tasks, workers};
use crate::domain::{
    new_id, pick_worker, AuditAction, Lease, LeaseId, LeaseStatus, NewAudit, Task, TaskId, TaskStatus, Worker,
    WorkerId, WorkerTransport,
};

/// A REST lease request.
#[derive(Clone, Debug)]
pub struct LeaseRequest {
    /// Lease to this worker, if it is eligible (online, Claude CLI, a free slot).
    pub worker_id: Option<WorkerId>,
    pub ttl_seconds: i32,
    /// A lease to send the task to an HTTP agent (`POST .../dispatch`): only agents are
    /// chosen, a named worker must have a URL, and it is audited as `task_dispatched`.
    pub dispatch: bool,
}

/// Leases a queued task to a worker chosen as the seed's `pickWorker` does (or the
/// explicitly named one). The chosen worker's row is locked and its free slots read
/// after the lock, so concurrent leases cannot overfill it; the task is then updated
/// only if still `queued`, so of two concurrent leases exactly one wins and the other
/// gets a conflict.
pub async fn lease(
    pool: &PgPool,
    task_id: &TaskId,
    req: &LeaseRequest,
    now: i64,
) -> Result<(Lease, Worker), TransitionError> {
    let mut tx = pool.begin().await?;
    admission::hold_limits(&mut tx).await?;
    // Rows are locked worker first, then task, as claims lock them: the task is read
    // here and its `queued` status checked again by the guarded update below.
    let task: Task = tasks::get(&mut *tx, task_id).await?.ok_or_else(task_not_found)?;
    if task.status != TaskStatus::Queued {
        return Err(conflict_on(task.status));
    }
    if task.is_waiting() {
        return Err(not_due(&task));
    }
    if let Some(hold) = holds::held(&mut *tx, &task, now).await? {
        return Err(TransitionError::Conflict(format!(
            "Task '{}' waits: {}; it is not leased before then",
            task.id, hold.reason
        )));
    }
    let worker = match &req.worker_id {
        // A named worker must be able to take the lease like a chosen one: online, with
        // the Claude CLI and a free slot (the original leased to it regardless).
        Some(id) => {
            workers::get_for_update(&mut tx, id).await?.filter(Worker::is_eligible).ok_or(TransitionError::NoWorker)?
        }
        None => choose_worker(&mut tx, &task, req.dispatch).await?,
    };
    if req.dispatch && worker.url.is_empty() {
        return Err(TransitionError::NoUrl(worker.id));
    }
    let lease = new_lease(&task, &worker.id, req.ttl_seconds, now);
    let entry = if req.dispatch {
        let detail = format!("Task {} dispatched to worker {}", task.id, worker.id);
        NewAudit::new(AuditAction::TaskDispatched, "llm_task", task.id.as_str(), "router", detail)
    } else {
        let detail = format!("Task {} leased to worker {}, TTL {}s", task.id, worker.id, req.ttl_seconds);
        NewAudit::new(AuditAction::TaskLeased, "lease", lease.id.as_str(), "router", detail)
    };
    // One statement while the worker's row is locked, as a claim's: of two concurrent
    // leases of the task the one that updates it first wins; the task, now locked, takes
    // its concurrency slots and reserves on its budgets, and only then gets its lease and
    // audit entry. A task the admission refuses stays queued (the transaction rolls back):
    // its dispatch on the bus is claimed (and put aside) or it is leased again later.
    let decided = sqlx::query!(
        r#"WITH won AS (
               UPDATE llm_tasks SET status = 'leased', lease_id = $2, worker_id = $3, attempts = attempts + 1,
                      updated_at = $4
               WHERE id = $1 AND status = 'queued' AND dispatch_seq > 0
               RETURNING id, context_id),
           admitted AS (SELECT a.admit_task, a.admit_slots, a.admit_charges, a.admit_reason
                        FROM bloom_admit(ARRAY(SELECT id FROM won), $4) a),
           leased AS (
               INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,
                                   last_heartbeat, context_id, slots, charges)
               SELECT $2, w.id, $3, $4, $5::bigint, $6::int, 'active', $4, w.context_id,
                      COALESCE(a.admit_slots, '{}'), COALESCE(a.admit_charges, '[]')
               FROM won w LEFT JOIN admitted a ON a.admit_task = w.id
               WHERE a.admit_task IS NULL OR a.admit_slots IS NOT NULL
               RETURNING id),
           audited AS (
               INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
               SELECT $7::text, $4, $8::text, $9::text, $10::text, $11::text, $12::text FROM leased)
           SELECT EXISTS (SELECT 1 FROM won) AS "won!",
                  (SELECT a.admit_reason FROM admitted a WHERE a.admit_slots IS NULL) AS "refused?""#,
        task.id.as_str(),
        lease.id.as_str(),
        worker.id.as_str(),
        now,
        lease.expires_at,
        lease.ttl_seconds,
        new_id(),
        entry.action,
        entry.entity_type,
        entry.entity_id,
        entry.actor,
        entry.detail
    )
    .fetch_one(&mut *tx)
    .await?;
    if !decided.won {
        // A statement of its own sees what the winner committed.
        let now = tasks::get(&mut *tx, task_id).await?.ok_or_else(task_not_found)?;
        return Err(if now.is_waiting() { not_due(&now) } else { conflict_on(now.status) });
    }
    if let Some(reason) = decided.refused {
        return Err(TransitionError::Conflict(format!("Task is not leased: the {reason}")));
    }
    tx.commit().await?;
    // The worker as it was chosen (its active leases before this one), as the original
    // answered.
    Ok((lease, worker))
}

/// Picks a worker as the seed's `pickWorker` does (among HTTP agents only when
/// `agents_only`) and locks its row. A worker that filled up between the read and the
/// lock (concurrent leases) is passed over, its lock given back (so no two worker locks
/// are ever held out of id order), and the choice made again among the others.
async fn choose_worker(tx: &mut sqlx::PgConnection, task: &Task, agents_only: bool) -> Result<Worker, TransitionError> {
    const CHOICES: usize = 4;
    let sticky = sqlx::query_scalar!(
        "SELECT worker_id FROM leases WHERE status = 'active' AND context_id = $1
         ORDER BY started_at DESC LIMIT 1",
        task.context_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .map(WorkerId::from);
    let mut full: Vec<WorkerId> = Vec::new();
    for _ in 0..CHOICES {
        let mut candidates = workers::candidates(&mut *tx).await?;
        candidates.retain(|w| !full.contains(&w.id) && (!agents_only || w.transport == WorkerTransport::Http));
        let chosen = pick_worker(&candidates, sticky.as_ref()).ok_or(TransitionError::NoWorker)?.id.clone();
        // A savepoint: rolling back to it releases the lock of a worker passed over.
        let mut attempt = sqlx::Connection::begin(&mut *tx).await?;
        match workers::get_for_update(&mut attempt, &chosen).await? {
            Some(locked) if locked.is_eligible() => {
                attempt.commit().await?;
                return Ok(locked);
            }
            _ => {
                attempt.rollback().await?;
                full.push(chosen);
            }
        }
    }
    Err(TransitionError::NoWorker)
}

/// A new active lease of `task` to `worker`, starting `now`.
pub(super) fn new_lease(task: &Task, worker: &WorkerId, ttl_seconds: i32, now: i64) -> Lease {
    Lease {
        id: LeaseId::generate(),
        task_id: task.id.clone(),
        worker_id: worker.clone(),
        started_at: now,
        expires_at: now + i64::from(ttl_seconds) * 1000,
        ttl_seconds,
        status: LeaseStatus::Active,
        last_heartbeat: now,
        context_id: Some(task.context_id.clone()),
    }
}
