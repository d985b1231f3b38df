//! Dispatches delayed tasks when they are due (see [`lifecycle::due`]), makes due the
//! tasks a concurrency slot has room for (see [`concurrency::wake`]), and forgets
//! idempotency keys older than their retention window: on every replica, sharing the
//! work through `FOR UPDATE SKIP LOCKED`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Reconciler;
use crate::db::{concurrency, idempotency, lifecycle};

/// Tasks dispatched per pass (passes follow each other at once while tasks are due).
const BATCH: i64 = 1000;
/// Idempotency keys deleted per pass.
const KEYS_BATCH: i64 = 5000;
/// How often expired keys are looked for.
const KEYS_EVERY: Duration = Duration::from_secs(30);
/// How often waiting tasks are checked against their concurrency slots (a lease's end
/// makes its slot's next task due at once; this catches up after a limit changed, or a
/// task made due was cancelled before its dispatch).
const WAKE_EVERY: Duration = Duration::from_secs(2);

/// Runs a due pass early when completions made waiting tasks due: a lease's end makes
/// the next tasks waiting for its concurrency slot due at once, and this replica's due
/// duty dispatches them right after the results batch, not at its next interval. Only
/// while some concurrency limit exists (checked every [`WAKE_EVERY`]): without one, no
/// completion makes anything due.
#[derive(Debug, Default)]
pub struct DueKick {
    limits: AtomicBool,
    notify: Notify,
}

impl DueKick {
    /// A results batch completed tasks.
    pub fn after_completions(&self) {
        if self.limits.load(Ordering::Relaxed) {
            self.notify.notify_one();
        }
    }

    /// Waiting tasks were made due: a pass now.
    pub fn made_due(&self) {
        self.notify.notify_one();
    }
}

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DueReport {
    /// Delayed tasks dispatched.
    pub dispatched: usize,
}

/// Runs [`run_once`] every `due_interval` (and [`forget_keys`] every 30 s) until `cancel` fires.
pub async fn run(r: Reconciler, cancel: CancellationToken) -> anyhow::Result<()> {
    let mut keys_at = tokio::time::Instant::now();
    let mut wake_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(r.settings.due_interval) => {}
            _ = r.due_kick.notify.notified() => {}
        }
        if wake_at.elapsed() >= WAKE_EVERY {
            wake_at = tokio::time::Instant::now();
            if let Ok(any) = concurrency::any_limit(&r.pool).await {
                r.due_kick.limits.store(any, Ordering::Relaxed);
            }
            match concurrency::wake(&r.pool).await {
                Ok(n) if n > 0 => {
                    tracing::debug!(tasks = n, "waiting tasks made due: their concurrency slots have room")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "checking concurrency slots failed"),
            }
        }
        loop {
            match run_once(&r).await {
                // A full batch: more may be due.
                Ok(report) if report.dispatched as i64 == BATCH => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "dispatching due tasks failed"),
            }
            break;
        }
        if keys_at.elapsed() >= KEYS_EVERY {
            keys_at = tokio::time::Instant::now();
            match forget_keys(&r).await {
                Ok(n) if n > 0 => tracing::debug!(keys = n, "expired idempotency keys forgotten"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "forgetting expired idempotency keys failed"),
            }
            if let Ok(n) = lifecycle::count_waiting(&r.pool).await {
                r.metrics.tasks_delayed.set(n.max(0) as u64);
            }
        }
    }
}

/// Dispatches the delayed tasks due now.
pub async fn run_once(r: &Reconciler) -> sqlx::Result<DueReport> {
    let dispatches = lifecycle::due(&r.pool, BATCH, r.clock.now_ms()).await?;
    let dispatched = dispatches.len();
    r.metrics.tasks_due_total.add(dispatched as u64);
    r.dispatcher.send(dispatches);
    Ok(DueReport { dispatched })
}

/// Deletes idempotency keys older than the retention window (batches until none is left).
pub async fn forget_keys(r: &Reconciler) -> sqlx::Result<u64> {
    let window_start = r.clock.now_ms() - r.settings.idempotency_retention.as_millis() as i64;
    let mut total = 0;
    loop {
        let n = idempotency::forget_expired(&r.pool, window_start, KEYS_BATCH).await?;
        total += n;
        r.metrics.idempotency_keys_forgotten_total.add(n);
        if n < KEYS_BATCH as u64 {
            return Ok(total);
        }
    }
}
