//! The outbox relay: republishes dispatches whose writer did not get them acknowledged
//! by JetStream (NATS down at submit time, a crash between commit and publish). Rows are
//! owned for a while with a `claimed_until` stamp taken under `FOR UPDATE SKIP LOCKED`,
//! so replicas split the backlog and no transaction is held while publishing.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Reconciler;
use crate::bus::dispatcher::publish;
use crate::db::{outbox, stats};

/// Rows taken per pass.
const BATCH: i64 = 500;
/// How long a relay owns the rows it took.
const CLAIM_FOR: Duration = Duration::from_secs(30);

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RelayReport {
    pub published: usize,
    pub failed: usize,
    pub stale: u64,
}

/// Runs [`run_once`] every `relay_interval` until `cancel` fires.
pub async fn run(r: Reconciler, cancel: CancellationToken) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(r.settings.relay_interval) => {}
        }
        match run_once(&r).await {
            Ok(report) if report != RelayReport::default() => {
                tracing::info!(?report, "outbox relay")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "outbox relay failed"),
        }
        if let Ok(n) = stats::outbox_backlog(&r.pool).await {
            r.metrics.outbox_backlog.set(n.max(0) as u64);
        }
    }
}

/// Publishes one batch of unsent outbox rows older than `relay_min_age`.
pub async fn run_once(r: &Reconciler) -> sqlx::Result<RelayReport> {
    let now = r.clock.now_ms();
    let older_than = now - r.settings.relay_min_age.as_millis() as i64;
    let taken = {
        let mut conn = r.pool.acquire().await?;
        outbox::take_unsent(&mut conn, older_than, now, now + CLAIM_FOR.as_millis() as i64, BATCH).await?
    };
    let mut report = RelayReport { stale: taken.stale, ..RelayReport::default() };
    let mut sent = Vec::new();
    for d in &taken.current {
        let acked = match publish(&r.js, &r.names, d).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if acked {
            sent.push(d.outbox_id);
        } else {
            report.failed += 1;
        }
    }
    report.published = sent.len();
    outbox::delete(&r.pool, &sent).await?;
    r.metrics.outbox_rows_relayed.add(sent.len() as u64);
    Ok(report)
}
