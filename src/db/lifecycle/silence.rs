//! `silence`: NATS workers silent past the worker timeout go offline, and the leases they
//! held end at once (batch).

use sqlx::PgPool;

use super::expire::{expire_all_in, Expiring, Expiry};
use crate::db::workers;
use crate::domain::WorkerId;

/// What one pass did.
#[derive(Debug, Default)]
pub struct Silence {
    /// The workers marked offline.
    pub offline: Vec<WorkerId>,
    /// Their leases, ended; their tasks requeued (or dead after their last attempt).
    pub expiry: Expiry,
}

/// Marks the NATS workers whose last beat is older than `cutoff` offline and ends the
/// leases they held, in one transaction: a worker that stopped beating for the worker
/// timeout (its process killed, its pod replaced under another name, its host gone)
/// leaves its tasks to be run again now instead of after their TTL. The workers' rows
/// stay locked until the commit and a claim locks its worker's row too, so a lease
/// granted meanwhile is either ended with the others or granted after the worker was
/// seen offline. A worker that was only cut off learns that its leases ended from its
/// next lease heartbeat (answered `lost`: it stops the run) and its result is recorded
/// as late; its next beat brings it back online. A lease a statement in flight holds (a
/// completion, a heartbeat) is skipped, as the sweep skips it: that statement ends or
/// renews it, or the TTL does.
pub async fn silence(pool: &PgPool, cutoff: i64, now: i64) -> sqlx::Result<Silence> {
    let mut tx = pool.begin().await?;
    let offline = workers::expire_silent_nats_workers(&mut *tx, cutoff).await?;
    let mut expiry = Expiry::default();
    for worker in &offline {
        expire_all_in(&mut tx, Expiring::OfSilent(worker), now, &mut expiry).await?;
    }
    tx.commit().await?;
    Ok(Silence { offline, expiry })
}
