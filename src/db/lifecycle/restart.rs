//! `restart`: a NATS worker's process starts; the leases its id held end at once, once
//! per process (batch).

use sqlx::PgPool;

use super::expire::{expire_all_in, Expiring, Expiry};
use crate::db::workers::{self, Beat};
use crate::domain::WorkerId;

/// What a worker's start did.
#[derive(Debug, Default)]
pub struct Restart {
    /// The leases of its earlier processes that ended (none when this start had been
    /// acted on already).
    pub expiry: Expiry,
    /// The worker is being drained: it starts without pulling.
    pub draining: bool,
}

/// Registers a starting worker (`beat`, when it sent its capabilities) and ends the
/// leases its earlier processes held (their executions died with them), in one
/// transaction: whoever sees it online no longer sees them held. `boot` names the
/// starting process with a time-ordered id, and the leases end only when it is later than
/// the one the worker's row records: a start request handled again (the worker asked
/// again when no answer came, then the first request was handled after the worker had
/// begun claiming) or one of an earlier process ends nothing, so only leases granted
/// before this process's start end. The worker's row is locked from the first statement
/// to the commit, and a claim locks it too: no lease of the worker is granted meanwhile.
/// Without `boot` (a worker of an earlier version), every start ends them.
pub async fn restart(
    pool: &PgPool,
    worker: &WorkerId,
    beat: Option<&Beat>,
    boot: Option<&str>,
    now: i64,
) -> sqlx::Result<Restart> {
    let mut tx = pool.begin().await?;
    let draining = match beat {
        Some(beat) => workers::record_beats(&mut *tx, std::slice::from_ref(beat), now).await?.iter().any(|(_, d)| *d),
        None => false,
    };
    let first = match boot {
        Some(boot) => sqlx::query_scalar!(
            r#"UPDATE workers SET boot_id = $2 WHERE id = $1 AND (boot_id IS NULL OR boot_id < $2) RETURNING id AS "id!""#,
            worker.as_str(),
            boot
        )
        .fetch_optional(&mut *tx)
        .await?
        .is_some(),
        None => true,
    };
    let mut expiry = Expiry::default();
    if first {
        expire_all_in(&mut tx, Expiring::HeldBy(worker), now, &mut expiry).await?;
    }
    tx.commit().await?;
    Ok(Restart { expiry, draining })
}
