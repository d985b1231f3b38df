//! `silence`: NATS workers silent past the worker timeout go offline, and the leases they
//! held end at once (batch).

use sqlx::PgPool;

use super::expire::{expire_all_in, Expiring, Expiry};
use crate::db::workers;
use crate::domain::WorkerId;

/// What one pass did.
#[derive(Debug, Default)]
pub struct Silence {
    /// The workers marked offline (not those whose beats already said so).
    pub offline: Vec<WorkerId>,
    /// Their leases, ended; their tasks requeued (or dead after their last attempt).
    pub expiry: Expiry,
}

/// Marks the NATS workers whose last beat is older than `cutoff` offline (audited
/// `worker_offline`) and ends the leases they held, in one transaction: a worker that
/// stopped beating for the worker timeout (its process killed, its pod replaced under
/// another name, its host gone) leaves its tasks to be run again now instead of after
/// their TTL. So do workers that were already offline but still held leases when they
/// went silent: a worker keeps beating, offline, while its runs finish after SIGTERM,
/// so one killed in that grace is found the same way (`since`: how far back to look
/// for those; leases of a worker silent before it have reached their TTL). The workers'
/// rows stay locked until the commit and a claim locks its worker's row too, so a lease
/// granted meanwhile is either ended with the others or granted after the worker was
/// seen offline. A worker that was only cut off learns that its leases ended from its
/// next lease heartbeat (answered `lost`: it stops the run) and its result is recorded
/// as late; its next beat brings it back online. A lease a statement in flight holds (a
/// completion, a heartbeat) is skipped, as the sweep skips it: that statement ends or
/// renews it, or the TTL does.
pub async fn silence(pool: &PgPool, cutoff: i64, since: i64, now: i64) -> sqlx::Result<Silence> {
    let mut tx = pool.begin().await?;
    let silent = workers::silent_nats_workers(&mut tx, cutoff, since, now).await?;
    let mut expiry = Expiry::default();
    for worker in &silent {
        expire_all_in(&mut tx, Expiring::OfSilent(&worker.id), now, &mut expiry).await?;
    }
    tx.commit().await?;
    let offline = silent.into_iter().filter(|w| w.marked_offline).map(|w| w.id).collect();
    Ok(Silence { offline, expiry })
}
