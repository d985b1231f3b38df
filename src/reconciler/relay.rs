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
/// How long a relay owns the rows it took (longer than publishing them takes).
const CLAIM_FOR: Duration = Duration::from_secs(30);
/// When rows JetStream did not acknowledge (a stream without a leader during a NATS
/// failover, NATS down) are taken again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

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
    let claimed_until = now + CLAIM_FOR.as_millis() as i64;
    let taken = {
        let mut conn = r.pool.acquire().await?;
        outbox::take_unsent(&mut conn, older_than, now, claimed_until, BATCH).await?
    };
    let mut report = RelayReport { stale: taken.stale, ..RelayReport::default() };
    // Published one after the other, acknowledged together.
    let mut acks = Vec::with_capacity(taken.current.len());
    let mut unsent = Vec::new();
    for d in &taken.current {
        match publish(&r.js, &r.names, d).await {
            Ok(ack) => acks.push(async move { (d.outbox_id, ack.await.is_ok()) }),
            Err(_) => unsent.push(d.outbox_id),
        }
    }
    let mut sent = Vec::new();
    for (id, acked) in futures::future::join_all(acks).await {
        if acked {
            sent.push(id);
        } else {
            unsent.push(id);
        }
    }
    report.published = sent.len();
    report.failed = unsent.len();
    outbox::delete(&r.pool, &sent).await?;
    if !unsent.is_empty() {
        let retry_at = r.clock.now_ms() + RETRY_AFTER.as_millis() as i64;
        outbox::release(&r.pool, &unsent, claimed_until, retry_at).await?;
    }
    r.metrics.outbox_rows_relayed.add(sent.len() as u64);
    Ok(report)
}
