//! Dispatches again what nobody claimed (see [`lifecycle::redispatch`]): on every
//! replica, sharing the work through `FOR UPDATE SKIP LOCKED`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Reconciler;
use crate::db::lifecycle;

/// Tasks dispatched again per pass.
const BATCH: i64 = 500;

/// Runs [`run_once`] every quarter of `redispatch_after` until `cancel` fires; a zero
/// `redispatch_after` disables the duty.
pub async fn run(r: Reconciler, cancel: CancellationToken) -> anyhow::Result<()> {
    let Some(after) = r.settings.redispatch_after else { return Ok(()) };
    let every = (after / 4).max(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        match run_once(&r, after).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(tasks = n, "dispatches unclaimed while workers had room: dispatched again"),
            Err(e) => tracing::warn!(error = %e, "redispatch failed"),
        }
    }
}

/// Dispatches again the tasks whose dispatch is older than `after` while a NATS worker
/// has room; returns how many.
pub async fn run_once(r: &Reconciler, after: Duration) -> sqlx::Result<usize> {
    let now = r.clock.now_ms();
    let moved = lifecycle::redispatch(&r.pool, now - after.as_millis() as i64, BATCH, now).await?;
    let n = moved.len();
    r.metrics.tasks_redispatched_total.add(n as u64);
    r.dispatcher.send(moved);
    Ok(n)
}
