//! Lease expiry and worker liveness, on every replica: expired leases are taken with
//! `FOR UPDATE SKIP LOCKED`, so replicas share the work and never expire one lease twice.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::expiry_pause::ExpiryPause;
use super::Reconciler;
use crate::db::lifecycle::{self, Expiring};
use crate::domain::WorkerId;

/// Leases expired per transaction.
const BATCH: i64 = 500;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub leases_expired: usize,
    pub tasks_requeued: usize,
    pub tasks_dead: usize,
    pub workers_offline: usize,
    pub tasks_rerouted: usize,
    /// Nothing was expired: the heartbeat path was broken less than a quiet window ago.
    pub expiry_paused: bool,
}

/// Runs [`run_once`] every `sweep_interval` until `cancel` fires, the first quiet window
/// after the start expiring nothing: a replica that starts has seen none of the beats
/// and heartbeats of the time before it, and when every replica was down (a rollout, a
/// crash loop) none of them was recorded, so live workers look silent and their leases
/// overdue. They beat again and retry their unanswered heartbeats within the window.
pub async fn run(r: Reconciler, cancel: CancellationToken) -> anyhow::Result<()> {
    r.expiry_pause.broken(r.clock.now_ms());
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(r.settings.sweep_interval) => {}
        }
        match run_once(&r).await {
            Ok(report) if report != SweepReport::default() => tracing::info!(?report, "sweep"),
            Ok(_) => {}
            Err(e) => {
                r.expiry_pause.broken(r.clock.now_ms());
                tracing::warn!(error = %e, "sweep failed");
            }
        }
    }
}

/// Expires overdue leases (requeueing or killing their tasks), marks silent NATS
/// workers offline, ends their leases and moves their routed tasks to the pool.
pub async fn run_once(r: &Reconciler) -> sqlx::Result<SweepReport> {
    let mut report = SweepReport::default();
    let (now, began) = (r.clock.now_ms(), Instant::now());
    // Live workers cannot renew while the heartbeat path is broken: wait until it has
    // been whole for a quiet window (see `expiry_pause`).
    if r.client.connection_state() != async_nats::connection::State::Connected {
        r.expiry_pause.broken(now);
    }
    let quiet = ExpiryPause::quiet_window(r.settings.streams.lease_ttl, r.settings.expiry_grace);
    if !r.expiry_pause.allows_expiry(now, quiet) {
        report.expiry_paused = true;
        r.metrics.sweeps_paused_total.inc();
        return Ok(report);
    }
    let cutoff = now - r.settings.expiry_grace.as_millis() as i64;
    loop {
        let expiry = lifecycle::expire(&r.pool, Expiring::Before(cutoff), BATCH, now).await?;
        report.leases_expired += expiry.expired;
        report.tasks_requeued += expiry.requeued.len();
        report.tasks_dead += expiry.dead;
        r.dispatcher.send(expiry.requeued);
        if (expiry.expired as i64) < BATCH {
            break;
        }
    }
    // Beats written behind a stall that held these statements too may not be in yet.
    r.expiry_pause.wrote(began.elapsed(), r.clock.now_ms());
    // Beats are published, not requested: one lost while the path was broken (or before
    // this replica started) is not sent again, and the next comes a beat interval later,
    // which only the worker knows. A worker is taken for silent once the path has been
    // whole for the worker timeout (several beat intervals) without a beat of it.
    let mut offline = Vec::new();
    if r.expiry_pause.allows_expiry(now, quiet.max(r.settings.worker_timeout)) {
        let silent_since = now - r.settings.worker_timeout.as_millis() as i64;
        // A lease outlives its worker's last beat by about its TTL and the grace.
        let look_back = (r.settings.streams.lease_ttl + r.settings.expiry_grace).as_millis() as i64;
        let silence = lifecycle::silence(&r.pool, silent_since, silent_since - look_back, now).await?;
        report.leases_expired += silence.expiry.expired;
        report.tasks_requeued += silence.expiry.requeued.len();
        report.tasks_dead += silence.expiry.dead;
        r.dispatcher.send(silence.expiry.requeued);
        offline = silence.offline;
    }
    report.workers_offline = offline.len();
    let m = &r.metrics;
    m.leases_expired_total.add(report.leases_expired as u64);
    m.tasks_requeued_total.add(report.tasks_requeued as u64);
    m.tasks_dead_total.add(report.tasks_dead as u64);
    m.workers_marked_offline_total.add(offline.len() as u64);
    report.tasks_rerouted = reroute(r, &offline).await;
    Ok(report)
}

/// Moves queued tasks routed to `offline` workers back to the pool and purges their
/// direct subjects. Returns the number of tasks moved.
pub async fn reroute(r: &Reconciler, offline: &[WorkerId]) -> usize {
    if offline.is_empty() {
        return 0;
    }
    let why = "Routed worker went offline: rerouted to the shared pool";
    match lifecycle::reroute(&r.pool, offline, why, "reconciler", r.clock.now_ms()).await {
        Ok(moved) => {
            let n = moved.len();
            r.metrics.tasks_rerouted_total.add(n as u64);
            r.dispatcher.send(moved);
            if let Ok(mut stream) = r.js.get_stream(r.names.tasks_stream()).await {
                for w in offline {
                    // The old dispatches can no longer be claimed; drop them from the stream.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(5), stream.purge().filter(r.names.worker_subject(w)))
                            .await;
                }
                let _ = stream.info().await;
            }
            n
        }
        Err(e) => {
            tracing::warn!(error = %e, "rerouting tasks of offline workers failed");
            0
        }
    }
}
