//! Dispatch to HTTP agents, on every replica: queued tasks are leased to the free slots
//! of online HTTP agents (membridge agents, synced from membridge or registered with
//! their version) and sent to their `POST /execute-task`. The agent's heartbeat and
//! `complete` callbacks then drive the task over REST, as any REST worker's do. HTTP
//! agents and NATS workers serve the same queue: a task leased here has left `queued`, so
//! a NATS claim of it is refused.
//!
//! The lease is committed before the call and no transaction is held during it. An
//! agent that refuses the task (non-2xx: no Claude CLI, a wrong key), cannot be reached,
//! or does not answer within the task's timeout plus 30 s has its attempt abandoned: the
//! lease is `failed` and the task requeued, or `dead` after its last attempt. A call
//! that broke off after the agent took the task (its heartbeat came) leaves the task to
//! the agent's `complete` callback, or to the lease's expiry. An agent that could not be
//! reached or did not answer (and did not take the task), or refused with 401, 403 or
//! 503, is marked offline and paused (10 s, doubling with each consecutive failure up
//! to 5 min; its own registration or a healthy `agent-health` ends the pause), so it
//! does not burn the attempts of the tasks behind however often membridge's sync says
//! it is online. Once its pause is over, a pass asks its `/health`: an agent that
//! answers is online again and sent tasks; one that does not is paused again, for twice
//! as long.
//!
//! A task submitted less than `BLOOM_AGENT_DISPATCH_CLIENT_WINDOW_MS` (1 s) ago is left
//! to its client: one that submits a task and then dispatches it itself (the upstream web
//! client's Create & Dispatch, `POST /llm-tasks/:id/dispatch`) or leases it over REST
//! gets it, instead of a 409 because a pass took it between its two calls. A task queued
//! again (a retry, a requeue) is sent at the next pass.
//!
//! A reconciler that dies between committing a lease and sending the task leaves a lease
//! no agent knows of. The agent heartbeats a task as soon as it receives it, so an
//! agent's lease expires [`PICKUP_WINDOW`] after it was granted unless that heartbeat
//! came (which extends it to the task's full TTL); the sweeper then requeues the task.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Reconciler;
use crate::agent::{AgentClient, ExecuteTask, EXECUTE_MARGIN};
use crate::db::lifecycle::{self, Abandoned, Assigned, FailedCall};
use crate::db::settings;
use crate::db::workers::{self, HttpAgent};

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DispatchReport {
    /// Tasks leased to agents and sent (the calls run on after the pass).
    pub sent: usize,
}

/// Runs [`run_once`] every `agent_dispatch_interval` until `cancel` fires.
pub async fn run(r: Reconciler, cancel: CancellationToken) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(r.settings.agent_dispatch_interval) => {}
        }
        match run_once(&r).await {
            Ok(report) if report.sent > 0 => tracing::debug!(?report, "agent dispatch"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "agent dispatch failed"),
        }
    }
}

/// Leases queued tasks to every HTTP agent with free slots and starts sending them.
/// Returns once the leases are committed; each call runs on in a task of its own.
pub async fn run_once(r: &Reconciler) -> sqlx::Result<DispatchReport> {
    let mut report = DispatchReport::default();
    let now = r.clock.now_ms();
    for agent in workers::take_due_health_checks(&r.pool, now, now + HEALTH_CHECK_HOLD.as_millis() as i64).await? {
        tokio::spawn(check_health(r.clone(), agent));
    }
    let agents = workers::http_agents_with_room(&r.pool, now).await?;
    if agents.is_empty() {
        return Ok(report);
    }
    // The key agents require now (saved with `POST /config`, else `MEMBRIDGE_AGENT_KEY`).
    let client = r.agents.with_key(settings::agent_key(&r.pool, &r.settings.agent_key).await?);
    for agent in agents {
        let margin = (EXECUTE_MARGIN + LEASE_MARGIN).as_secs() as i32;
        let pickup = PICKUP_WINDOW.as_secs() as i32;
        let now = r.clock.now_ms();
        let window = r.settings.agent_dispatch_client_window;
        // No window: every task, whatever the API's host's clock said at its creation.
        let created_by = if window.is_zero() { i64::MAX } else { now - window.as_millis() as i64 };
        let assigned = lifecycle::assign(&r.pool, &agent.id, margin, pickup, created_by, now).await?;
        report.sent += assigned.len();
        for a in assigned {
            tokio::spawn(send(r.clone(), client.clone(), agent.clone(), a));
        }
    }
    r.metrics.agent_dispatches_total.add(report.sent as u64);
    Ok(report)
}

/// How long an agent's lease lasts before the agent's first heartbeat (which it sends on
/// receiving the task, before running it). Bounds what a reconciler that dies between
/// granting a lease and sending the task costs that task.
pub const PICKUP_WINDOW: Duration = Duration::from_secs(15);

/// Time a lease to an agent outlasts the call to it: the agent's `complete` callback
/// arrives before its answer, and may be slow.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// How long an agent taken for a health check is left to it (the check's timeout is 10 s).
const HEALTH_CHECK_HOLD: Duration = Duration::from_secs(15);

/// Asks an agent that failed dispatches paused whether it is up again (its `/health`, as
/// `agent-health` does): one that answers is online, and sent tasks from the next pass;
/// one that does not is paused again, for twice as long.
async fn check_health(r: Reconciler, agent: HttpAgent) {
    let recorded = match r.agents.health(&agent.url).await {
        Ok(_) => workers::record_healthy_after_pause(&r.pool, &agent.id).await,
        Err(e) => {
            tracing::info!(worker.id = %agent.id, error = %e, "a paused agent is still down");
            workers::record_dispatch_failure(&r.pool, &agent.id, r.clock.now_ms()).await.map(drop)
        }
    };
    if let Err(e) = recorded {
        tracing::warn!(worker.id = %agent.id, error = %e, "could not record an agent's health check");
    }
}

/// Sends one leased task to its agent; abandons the attempt when the agent did not take it.
async fn send(r: Reconciler, client: AgentClient, agent: HttpAgent, a: Assigned) {
    let body = ExecuteTask::new(&a.task, &r.settings.runtime_url);
    let failure = match client.execute(&agent.url, &body).await {
        // The agent ran it: its callbacks completed the task (or will).
        Ok(_) => {
            if let Err(e) = workers::record_dispatch_success(&r.pool, &agent.id).await {
                tracing::warn!(worker.id = %agent.id, error = %e, "could not clear an agent's dispatch pause");
            }
            return;
        }
        Err(e) => e,
    };
    r.metrics.agent_dispatch_failures_total.inc();
    tracing::warn!(task.id = %a.task.id, worker.id = %agent.id, error = %failure, "dispatch to an HTTP agent failed");
    // An agent that cannot be reached, or refuses every task (no Claude CLI, a wrong
    // key), is paused: 10 s, doubling with each consecutive failure, up to 5 min. One
    // that took the task and lost the call is running it, not down.
    let reason = failure.to_string();
    let call =
        FailedCall { reason: &reason, may_have_run: failure.may_have_run(), agent_down: failure.agent_is_down() };
    match lifecycle::abandon(&r.pool, &a.task.id, &a.lease.id, &agent.id, &call, r.clock.now_ms()).await {
        Ok(Abandoned::Requeued(dispatch)) => r.dispatcher.send(vec![*dispatch]),
        Ok(Abandoned::Dead | Abandoned::NotCurrent | Abandoned::Taken) => {}
        // The lease stays active: it expires after its TTL and the sweeper requeues the task.
        Err(e) => tracing::warn!(task.id = %a.task.id, error = %e, "could not abandon a failed dispatch"),
    }
}
