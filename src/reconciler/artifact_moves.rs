//! Artifact moves, on every replica: the content of artifacts kept in Postgres is
//! uploaded to S3 and their rows pointed at the copy, oldest first. Two kinds wait here:
//! outputs written behind (stored with their completion so that a task never waits for
//! S3, see `BLOOM_ARTIFACT_WRITE_BEHIND_MAX_BYTES`) and outputs kept in Postgres because
//! S3 failed. A pass takes a bounded batch (64 artifacts, 16 MiB) and uploads it 16 at a
//! time; passes run back to back while a full batch was moved, then every
//! `BLOOM_ARTIFACT_MOVE_INTERVAL_MS`. Replicas lock the rows they move (`SKIP LOCKED`) and
//! so share the work; a row is switched to its S3 URL only after the upload succeeded,
//! in one statement guarded by the row still being inline, so a reader always finds the
//! content in one place or the other, and a crash between the two leaves it inline (the
//! next pass uploads it again to the same key). While S3 is down, uploads fail at once
//! (the store's cooldown) and the pass ends.

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::Reconciler;
use crate::db::{artifacts, audit};
use crate::domain::{AuditAction, NewAudit};

/// Artifacts locked per pass.
const BATCH: i64 = 64;
/// Uploads of one pass in flight at once.
const CONCURRENT_UPLOADS: usize = 16;
/// Content uploaded per pass, at most (a larger artifact goes alone).
const BYTES_PER_PASS: i64 = 16 * 1024 * 1024;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MoveReport {
    /// Artifacts whose content is now in S3.
    pub moved: usize,
    /// Uploads that failed (the pass stops at the first: S3 is likely down).
    pub failed: usize,
    /// Artifacts still in Postgres after the pass.
    pub backlog: i64,
}

/// Runs [`run_once`] every `artifact_move_interval` until `cancel` fires; nothing to do
/// without S3.
pub async fn run(r: Reconciler, cancel: CancellationToken) -> anyhow::Result<()> {
    if !r.artifacts.uses_s3() {
        return Ok(());
    }
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(r.settings.artifact_move_interval) => {}
        }
        // Back to back while full batches move (a burst of written-behind outputs).
        loop {
            match run_once(&r).await {
                Ok(report) => {
                    if report.failed > 0 {
                        tracing::info!(?report, "artifact moves");
                    }
                    if report.moved < BATCH as usize || cancel.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "artifact moves failed");
                    break;
                }
            }
        }
    }
}

/// Moves up to a batch of artifacts kept in Postgres to S3, in one transaction.
pub async fn run_once(r: &Reconciler) -> sqlx::Result<MoveReport> {
    let mut report = MoveReport::default();
    if !r.artifacts.uses_s3() {
        return Ok(report);
    }
    let mut tx = r.pool.begin().await?;
    let inline = artifacts::lock_inline(&mut tx, BATCH).await?;
    let mut picked = Vec::new();
    let mut budget = BYTES_PER_PASS;
    for artifact in inline {
        if budget <= 0 {
            break;
        }
        budget -= artifact.bytes;
        if let Some(content) = artifacts::inline_content(&mut *tx, &artifact.id).await? {
            picked.push((artifact, content));
        }
    }
    // The rows stay locked while their uploads run, 16 at a time.
    let uploads = picked.into_iter().map(|(artifact, content)| async move {
        let uploaded = r.artifacts.upload_moved(&artifact.task_id, &artifact.id, content).await;
        (artifact, uploaded)
    });
    let uploaded: Vec<_> = futures::stream::iter(uploads).buffer_unordered(CONCURRENT_UPLOADS).collect().await;
    let mut entries = Vec::new();
    for (artifact, result) in uploaded {
        match result {
            Ok(url) => {
                if artifacts::moved_to_s3(&mut *tx, &artifact.id, &url).await? {
                    report.moved += 1;
                    let detail = format!("Content moved from PostgreSQL to {url}");
                    let id = artifact.id.as_str();
                    entries.push(NewAudit::new(AuditAction::ArtifactMoved, "artifact", id, "reconciler", detail));
                }
            }
            Err(e) => {
                report.failed += 1;
                tracing::debug!(artifact.id = %artifact.id, error = %e, "moving an artifact to S3 failed; retried later");
            }
        }
    }
    audit::insert(&mut *tx, &entries, r.clock.now_ms()).await?;
    tx.commit().await?;
    let m = &r.metrics;
    m.artifacts_moved_total.add(report.moved as u64);
    m.artifact_moves_failed_total.add(report.failed as u64);
    report.backlog = artifacts::inline_backlog(&r.pool).await?;
    m.artifacts_inline_backlog.set(report.backlog.max(0) as u64);
    Ok(report)
}
