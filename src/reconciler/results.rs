//! Consumes the results stream (one durable consumer shared by every replica) and
//! completes tasks in Postgres. A batch of messages (each holding one or more results) is
//! one transaction; each message is acknowledged only after that transaction committed,
//! so a reconciler killed at any point loses no result (JetStream redelivers it) and a
//! redelivered result finds its lease no longer current and is recorded as late: never
//! a second completion.
//!
//! A message Postgres refuses (a constraint, a value it cannot store; not a lost
//! connection) is stored apart from its batch, so it holds up no other result, and is
//! redelivered with a growing delay; after `result_max_deliveries` deliveries it is
//! terminated and counted in `results_refused_total`. Its task's lease then expires and
//! the task is retried, or dead after its last attempt, like any task whose result
//! never arrived.

use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Reconciler;
use crate::db::lifecycle::{self, Completion, CompletionOutcome};
use crate::db::Dedicated;
use crate::domain::ArtifactId;
use crate::protocol::ResultBatch;

/// Largest batch of results per transaction.
const MAX_BATCH: usize = 512;
/// Longest wait before a refused or unstored result message is delivered again.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// What one batch did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ResultsReport {
    pub completed: usize,
    pub late: usize,
    pub rejected: usize,
}

impl std::ops::AddAssign for ResultsReport {
    fn add_assign(&mut self, other: ResultsReport) {
        self.completed += other.completed;
        self.late += other.late;
        self.rejected += other.rejected;
    }
}

/// Consumes results until `cancel` fires. Reconnects after NATS errors.
pub async fn run(r: Reconciler, cancel: CancellationToken) -> anyhow::Result<()> {
    // One batch in flight, on the replica's own connection; messages arriving meanwhile
    // go into the next batch.
    let fresh = || Dedicated::new(&r.pool, r.settings.db_timeout);
    let mut idle = Some(fresh());
    let mut in_flight: Option<JoinHandle<Dedicated>> = None;
    while !cancel.is_cancelled() {
        let consumer: Result<PullConsumer, _> =
            async { r.js.get_stream(r.names.results_stream()).await?.get_consumer(&r.names.results_consumer()).await }
                .await
                .map_err(|e| anyhow::anyhow!(e.to_string()));
        let messages = match consumer {
            Ok(c) => c.stream().max_messages_per_batch(MAX_BATCH).heartbeat(Duration::from_secs(5)).messages().await,
            Err(e) => {
                tracing::warn!(error = %e, "results consumer unavailable; retrying");
                tokio::select! { _ = cancel.cancelled() => break, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                continue;
            }
        };
        let Ok(messages) = messages else {
            tokio::select! { _ = cancel.cancelled() => break, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
            continue;
        };
        let mut batches = messages.ready_chunks(MAX_BATCH);
        loop {
            let batch = tokio::select! {
                _ = cancel.cancelled() => break,
                b = batches.next() => match b { Some(b) => b, None => break },
            };
            let msgs: Vec<Message> = batch.into_iter().filter_map(Result::ok).collect();
            if msgs.is_empty() {
                // Errors only (e.g. missed heartbeats): start a fresh pull stream.
                break;
            }
            let mut db = match (idle.take(), in_flight.take()) {
                (Some(db), _) => db,
                // A handler that panicked lost its connection with it.
                (None, Some(h)) => h.await.unwrap_or_else(|_| fresh()),
                (None, None) => fresh(),
            };
            let r = r.clone();
            in_flight = Some(tokio::spawn(async move {
                if let Err(e) = handle(&r, msgs, &mut db).await {
                    tracing::error!(error = %e, "storing results failed; they will be redelivered");
                }
                db
            }));
        }
    }
    if let Some(h) = in_flight {
        let _ = h.await;
    }
    Ok(())
}

fn without_nul(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

/// Stores the results of a batch of messages in one transaction, then acknowledges the
/// messages. A message may carry several results (see [`ResultBatch`]).
pub async fn handle(r: &Reconciler, msgs: Vec<Message>, db: &mut Dedicated) -> sqlx::Result<ResultsReport> {
    let mut report = ResultsReport::default();
    let mut accepted = Vec::with_capacity(msgs.len());
    let mut results = Vec::with_capacity(msgs.len());
    // One span per result, continuing the task's trace, open until the batch committed.
    let mut spans = Vec::with_capacity(msgs.len());
    for msg in msgs {
        let parsed = match serde_json::from_slice::<ResultBatch>(&msg.payload) {
            Ok(b) if b.has_nul_id() => Err("an id holds a NUL character".to_owned()),
            other => other.map_err(|e| e.to_string()),
        };
        match parsed {
            Ok(batch) => {
                for traced in batch.into_results() {
                    let span = tracing::info_span!("store result", task.id = %traced.result.task_id);
                    if traced.trace.is_empty() {
                        crate::telemetry::extract(msg.headers.as_ref(), &span);
                    } else {
                        crate::telemetry::extract_carrier(&traced.trace, &span);
                    }
                    spans.push(span);
                    results.push(traced.result);
                }
                accepted.push(msg);
            }
            Err(e) => {
                report.rejected += 1;
                r.metrics.results_rejected_total.inc();
                tracing::warn!(error = %e, "malformed result message terminated");
                let _ = msg.ack_with(AckKind::Term).await;
            }
        }
    }
    // Uploads of one batch run concurrently.
    let uploads: Vec<_> = results
        .iter()
        .map(|res| {
            let (store, task, lease, output) = (
                r.artifacts.clone(),
                res.task_id.clone(),
                res.lease_id.clone(),
                res.output.as_deref().map(without_nul),
            );
            async move { store.store(&task, &lease, output.as_deref()).await }
        })
        .collect();
    let bodies: Vec<_> = futures::stream::iter(uploads).buffered(32).collect().await;
    let completions: Vec<Completion> = results
        .iter()
        .zip(bodies)
        .map(|(res, artifact)| Completion {
            task_id: res.task_id.clone(),
            lease_id: res.lease_id.clone(),
            status: res.status,
            // Executors may print NUL bytes, which Postgres text cannot hold.
            output: res.output.as_deref().map(without_nul),
            error_message: res.error_message.as_deref().map(without_nul),
            metrics: res.metrics.clone(),
            artifact_type: "LLM_RESULT".into(),
            artifact_tags: Vec::new(),
            artifact_id: ArtifactId::generate(),
            artifact,
        })
        .collect();
    let outcomes = match db.run(move |c| Box::pin(async move { lifecycle::complete(c, &completions).await })).await {
        Ok(o) => o,
        // Postgres refused the statement (not a lost connection): one message may be what
        // it refuses, so store them one by one and only that one waits for redelivery.
        Err(e) if crate::db::is_refusal(&e) && accepted.len() > 1 => {
            tracing::warn!(error = %e, messages = accepted.len(), "storing a batch of results failed; storing them one by one");
            drop(spans);
            for msg in accepted {
                // A message that fails alone has been nak'ed for redelivery.
                if let Ok(one) = Box::pin(handle(r, vec![msg], db)).await {
                    report += one;
                }
            }
            return Ok(report);
        }
        Err(e) => {
            let refused = crate::db::is_refusal(&e);
            for msg in &accepted {
                let delivered = msg.info().map_or(1, |i| i.delivered).max(1);
                if refused && delivered >= r.settings.result_max_deliveries {
                    r.metrics.results_refused_total.inc();
                    let tasks: Vec<&str> = results.iter().map(|res| res.task_id.as_str()).collect();
                    tracing::error!(error = %e, delivered, ?tasks,
                        "Postgres refused a result message on every delivery; terminated");
                    let _ = msg.ack_with(AckKind::Term).await;
                } else {
                    let delay = (r.settings.result_retry_delay * delivered as u32).min(MAX_RETRY_DELAY);
                    let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
                }
            }
            return Err(e);
        }
    };
    for (res, outcome) in results.iter().zip(outcomes) {
        match outcome {
            CompletionOutcome::Completed { .. } => {
                report.completed += 1;
                r.metrics.results_completed_total.inc();
                r.metrics.task_duration_seconds.observe(res.metrics.duration_ms as f64 / 1000.0);
            }
            CompletionOutcome::Late => {
                report.late += 1;
                r.metrics.results_late_total.inc();
            }
        }
    }
    for msg in &accepted {
        let _ = msg.ack().await;
    }
    drop(spans);
    Ok(report)
}
