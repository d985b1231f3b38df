//! `abandon`: a lease whose worker never took the task (an HTTP agent refused it, could
//! not be reached, or did not answer in time) ended; the task requeued or dead. A task
//! the agent took (its heartbeat made it `running`) before the call broke off is left
//! to the agent's `complete` callback, or to its lease's expiry. An agent that is down
//! is paused in the same transaction.

use sqlx::{PgPool, Postgres, Transaction};

use crate::db::outbox::{self, Dispatch};
use crate::db::{audit, tasks, workers};
use crate::domain::{AuditAction, LeaseId, LeaseStatus, NewAudit, TaskId, TaskStatus, WorkerId};

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
    /// The agent took the task (it is `running`, or the agent's `complete` callback
    /// ended the lease) and the call broke off without its answer: nothing changed; the
    /// callback or the lease's expiry ends the attempt.
    Taken,
}

/// A call to an agent that failed, as [`abandon`] weighs it.
#[derive(Clone, Copy, Debug)]
pub struct FailedCall<'a> {
    /// Why, for the audit entry.
    pub reason: &'a str,
    /// The request went out and the call broke off (a dropped connection, no answer in
    /// time): the agent may have taken the task, and then the attempt is left to it.
    pub may_have_run: bool,
    /// The agent cannot take tasks now (unreachable, or refusing every task): it is
    /// marked offline and paused, unless it took this one.
    pub agent_down: bool,
}

/// Ends the attempt of `lease` on `task` because its worker never ran it: the lease is
/// marked `failed` and the task requeued through the outbox while attempts remain, else
/// `dead`, guarded by the lease still being the task's current, active one, and, when
/// the call may have reached the agent, by the agent not having taken the task. Audited
/// as `dispatch_failed` with the call's reason, also when the agent took the task. A
/// lease the sweeper holds (to expire it) is left to it: [`Abandoned::NotCurrent`]. An
/// agent that is down and did not take the task is paused; all in one transaction.
pub async fn abandon(
    pool: &PgPool,
    task: &TaskId,
    lease: &LeaseId,
    worker: &WorkerId,
    call: &FailedCall<'_>,
    now: i64,
) -> sqlx::Result<Abandoned> {
    let mut tx = pool.begin().await?;
    // The task's row first, as heartbeats and completions lock it (then their lease): one
    // that changed the task has committed once this returns.
    let running = sqlx::query_scalar!(
        r#"SELECT (status = 'running' AND lease_id IS NOT DISTINCT FROM $2) AS "running!"
           FROM llm_tasks WHERE id = $1 FOR UPDATE"#,
        task.as_str(),
        lease.as_str()
    )
    .fetch_optional(&mut *tx)
    .await?;
    // Then the lease, unless the sweeper holds it (it locks leases first) to end it.
    let lease_status = sqlx::query_scalar!(
        r#"SELECT status AS "status: LeaseStatus" FROM leases WHERE id = $1 AND task_id = $2 FOR UPDATE SKIP LOCKED"#,
        lease.as_str(),
        task.as_str()
    )
    .fetch_optional(&mut *tx)
    .await?;
    let outcome = match (running, lease_status) {
        // The agent took the task: it is running it, or its `complete` callback, which
        // comes before its answer, ended the lease.
        (Some(running), Some(status)) if call.may_have_run && (running || status == LeaseStatus::Released) => {
            let reason = call.reason;
            let detail =
                format!("Dispatch to {worker} failed: {reason}; the agent took the task, its callback ends it");
            let entry = NewAudit::new(AuditAction::DispatchFailed, "llm_task", task.as_str(), "router", detail);
            audit::insert(&mut *tx, &[entry], now).await?;
            Abandoned::Taken
        }
        (Some(_), Some(_)) => end_attempt(&mut tx, task, lease, worker, call.reason, now).await?,
        _ => Abandoned::NotCurrent,
    };
    if call.agent_down && !matches!(outcome, Abandoned::Taken) {
        workers::record_dispatch_failure(&mut *tx, worker, now).await?;
    }
    tx.commit().await?;
    Ok(outcome)
}

/// The attempt's lease `failed`, its task requeued (with a dispatch) or `dead`, audited.
async fn end_attempt(
    tx: &mut Transaction<'static, Postgres>,
    task: &TaskId,
    lease: &LeaseId,
    worker: &WorkerId,
    reason: &str,
    now: i64,
) -> sqlx::Result<Abandoned> {
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
    .fetch_optional(&mut **tx)
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
        let requeued = tasks::get_many(&mut **tx, std::slice::from_ref(&task.0)).await?;
        match outbox::insert(tx, requeued, now).await?.pop() {
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
    audit::insert(&mut **tx, &entries, now).await?;
    Ok(outcome)
}
