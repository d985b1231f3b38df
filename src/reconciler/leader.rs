//! Leader election for the duties that must run on exactly one replica (the membridge
//! sync). The leader holds a Postgres session advisory lock on a dedicated connection;
//! when it dies, the lock goes with its connection and another replica takes over at
//! its next poll (`leader_poll`, default 2 s).

use tokio_util::sync::CancellationToken;

use super::{membridge_sync, Reconciler};
use crate::db::leader::{self, Leadership};

/// Advisory lock key of the membridge sync leader ("bloom-ms").
pub const MEMBRIDGE_SYNC_LOCK: i64 = 0x626c_6f6f_6d2d_6d73;

/// Competes for leadership and runs the leader-only duties while leading.
pub async fn run_as_leader(r: Reconciler, cancel: CancellationToken) -> anyhow::Result<()> {
    let mut held: Option<Leadership> = None;
    let mut next_sync = tokio::time::Instant::now();
    loop {
        match held.as_mut() {
            None => match leader::try_acquire(&r.pool, MEMBRIDGE_SYNC_LOCK).await {
                Ok(Some(l)) => {
                    tracing::info!("became leader: running the membridge sync");
                    r.metrics.leader_changes_total.inc();
                    r.metrics.is_leader.set(1);
                    held = Some(l);
                    next_sync = tokio::time::Instant::now();
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "leader election failed"),
            },
            Some(l) => {
                if !l.still_held().await {
                    tracing::warn!("lost leadership");
                    r.metrics.leader_changes_total.inc();
                    r.metrics.is_leader.set(0);
                    held = None;
                }
            }
        }
        if held.is_some() && tokio::time::Instant::now() >= next_sync {
            membridge_sync::run_logged(&r).await;
            next_sync = tokio::time::Instant::now() + r.settings.membridge_interval;
        }
        let wait = if held.is_some() {
            r.settings.leader_poll.min(next_sync.saturating_duration_since(tokio::time::Instant::now()))
        } else {
            r.settings.leader_poll
        };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if let Some(l) = held {
        l.release().await;
        r.metrics.is_leader.set(0);
    }
    Ok(())
}
