//! Stores workers' results and completes their tasks in Postgres. Results come two
//! ways, stored alike: as requests (`Names::results_request_subject`, served with the
//! other control requests, [`handle_requests`]), answered once their transaction
//! committed, and through the results stream (one durable consumer shared by every
//! replica, [`run`]), where a worker publishes what no replica answered. A batch of
//! messages (each holding one or more results) is one transaction; a stream message is
//! acknowledged, and a request answered `stored`, only after that transaction
//! committed, so a reconciler killed at any point loses no result (JetStream redelivers
//! it; the worker publishes an unanswered request to the stream) and a result that comes
//! again finds its lease no longer current and is recorded as late: never a second
//! completion.
//!
//! When Postgres refuses a batch (not a lost connection), its results are stored one by
//! one, so a result it refuses holds up no other, even one in the same message. A
//! request with a result that could not be stored is answered `not stored` (its worker
//! publishes it to the stream). A stream message with a result that could not be stored
//! is redelivered with a growing delay; when Postgres refuses it for its data (a
//! constraint, a value it cannot store) on the `result_max_deliveries`-th delivery, it is
//! terminated and counted in `results_refused_total`. Its task's lease then expires and
//! the task is retried, or dead after its last attempt, like any task whose result never
//! arrived.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Reconciler;
use crate::db::lifecycle::{self, Completion, CompletionOutcome};
use crate::db::Dedicated;
use crate::domain::{ArtifactId, Outcome, TaskStatus};
use crate::protocol::{ResultBatch, ResultMessage, ResultsReply};

/// Largest batch of results per transaction.
const MAX_BATCH: usize = 512;
/// Interval of in-progress acks for the result messages of a batch being stored.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
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

/// Idle heartbeat the server sends on the pull stream: two missed (the consumer's leader
/// lost with its server in a NATS cluster) start a fresh pull within 2 s.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Consumes results until `cancel` fires. Reconnects after NATS errors.
pub async fn run(r: Reconciler, cancel: CancellationToken) -> anyhow::Result<()> {
    // One batch in flight, on the replica's own connection; messages arriving meanwhile
    // go into the next batch, taken when it is stored.
    let fresh = || Dedicated::new(&r.pool, r.settings.db_timeout);
    let mut idle = Some(fresh());
    let mut in_flight: Option<JoinHandle<Dedicated>> = None;
    while !cancel.is_cancelled() {
        let consumer: Result<PullConsumer, _> =
            async { r.js.get_stream(r.names.results_stream()).await?.get_consumer(&r.names.results_consumer()).await }
                .await
                .map_err(|e| anyhow::anyhow!(e.to_string()));
        let messages = match consumer {
            Ok(c) => c.stream().max_messages_per_batch(MAX_BATCH).heartbeat(HEARTBEAT).messages().await,
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
            // The next batch is taken once the one in flight is stored: every result that
            // arrived meanwhile joins it (taken earlier, it held only those ready then, and
            // waited all the same).
            let mut db = match (idle.take(), in_flight.take()) {
                (Some(db), _) => db,
                // A handler that panicked lost its connection with it.
                (None, Some(h)) => h.await.unwrap_or_else(|_| fresh()),
                (None, None) => fresh(),
            };
            let batch = tokio::select! {
                _ = cancel.cancelled() => None,
                b = batches.next() => b,
            };
            let msgs: Vec<Message> = batch.into_iter().flatten().filter_map(Result::ok).collect();
            if msgs.is_empty() {
                // Stopping, or errors only (e.g. missed heartbeats): start a fresh pull
                // stream.
                idle = Some(db);
                break;
            }
            let r = r.clone();
            in_flight = Some(tokio::spawn(async move {
                handle(&r, msgs, &mut db).await;
                db
            }));
        }
    }
    if let Some(h) = in_flight {
        let _ = h.await;
    }
    Ok(())
}

/// Executors may print NUL bytes, which Postgres text cannot hold.
fn without_nul(s: &mut Option<String>) {
    *s = s.take().map(crate::protocol::without_nul);
}

/// Results of a batch of messages, in order, with the message each came from.
#[derive(Default)]
struct Parsed {
    results: Vec<ResultMessage>,
    /// The index of its message, for each result.
    owners: Vec<usize>,
    /// One span per result, continuing the task's trace, open until the batch committed.
    spans: Vec<tracing::Span>,
    messages: usize,
}

impl Parsed {
    /// Parses `msgs` (`inner`: the NATS message of each): the results of those that hold
    /// some, those messages, and the others with why they hold none.
    fn of<M>(msgs: Vec<M>, inner: impl Fn(&M) -> &async_nats::Message) -> (Parsed, Vec<M>, Vec<(M, String)>) {
        let mut parsed = Parsed::default();
        let (mut accepted, mut rejected) = (Vec::with_capacity(msgs.len()), Vec::new());
        for msg in msgs {
            let m = inner(&msg);
            match parsed.add(&m.payload, m.headers.as_ref()) {
                Ok(()) => accepted.push(msg),
                Err(e) => rejected.push((msg, e)),
            }
        }
        (parsed, accepted, rejected)
    }

    /// Adds the results of one message, or says why it holds none that can be stored.
    fn add(&mut self, payload: &[u8], headers: Option<&async_nats::HeaderMap>) -> Result<(), String> {
        let batch = match serde_json::from_slice::<ResultBatch>(payload) {
            Ok(b) if b.has_nul_id() => return Err("an id holds a NUL character".to_owned()),
            Ok(b) => b,
            Err(e) => return Err(e.to_string()),
        };
        for traced in batch.into_results() {
            let span = tracing::info_span!("store result", task.id = %traced.result.task_id);
            if traced.trace.is_empty() {
                crate::telemetry::extract(headers, &span);
            } else {
                crate::telemetry::extract_carrier(&traced.trace, &span);
            }
            self.spans.push(span);
            self.results.push(traced.result);
            self.owners.push(self.messages);
        }
        self.messages += 1;
        Ok(())
    }
}

/// Why a message's results were not all stored.
struct Unstored {
    error: String,
    /// Whether Postgres refused the data of each result it did not store (rather than
    /// being unreachable).
    data: bool,
    tasks: Vec<String>,
}

/// Stores the results of a batch of stream messages in one transaction, then
/// acknowledges the messages. A message may carry several results (see [`ResultBatch`]).
pub async fn handle(r: &Reconciler, msgs: Vec<Message>, db: &mut Dedicated) -> ResultsReport {
    let mut report = ResultsReport::default();
    let (parsed, accepted, rejected) = Parsed::of(msgs, |m| &m.message);
    for (msg, e) in rejected {
        report.rejected += 1;
        r.metrics.results_rejected_total.inc();
        tracing::warn!(error = %e, "malformed result message terminated");
        let _ = msg.ack_with(AckKind::Term).await;
    }
    let unstored = while_in_progress(&accepted, store(r, parsed, db, &mut report)).await;
    for (msg, unstored) in accepted.iter().zip(unstored) {
        match unstored {
            None => {
                let _ = msg.ack().await;
            }
            Some(u) => settle_unstored(r, msg, &u).await,
        }
    }
    report
}

/// Stores the results of a batch of result requests in one transaction, then answers
/// each: `stored` once its results are committed, `not stored` otherwise (its worker
/// then publishes them to the results stream). Serves `Names::results_request_subject`.
pub async fn handle_requests(r: Reconciler, msgs: Vec<async_nats::Message>, mut db: Dedicated) -> Dedicated {
    let mut report = ResultsReport::default();
    let (parsed, accepted, rejected) = Parsed::of(msgs, |m| m);
    for (msg, e) in rejected {
        // Not stored: through the stream it is rejected and counted there.
        tracing::warn!(error = %e, "malformed result request");
        super::control::reply(&r, &msg, &ResultsReply { stored: false }).await;
    }
    let unstored = store(&r, parsed, &mut db, &mut report).await;
    for (msg, unstored) in accepted.iter().zip(unstored) {
        super::control::reply(&r, msg, &ResultsReply { stored: unstored.is_none() }).await;
    }
    db
}

/// Runs `work` while telling JetStream every [`PROGRESS_EVERY`] that `msgs` are still
/// being worked on: the results consumer's ack-wait is short (2 s), so that the
/// messages a killed reconciler held go to another one at once, and only this keeps a
/// slow batch (S3 uploads, a busy database) from being redelivered meanwhile.
async fn while_in_progress<T>(msgs: &[Message], work: impl std::future::Future<Output = T>) -> T {
    let keep_alive = async {
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            for msg in msgs {
                let _ = msg.ack_with(AckKind::Progress).await;
            }
        }
    };
    tokio::select! {
        done = work => done,
        _ = keep_alive => unreachable!("in-progress acks go on until the work is done"),
    }
}

/// Uploads the batch's artifacts and completes its tasks in one statement. Returns, for
/// each message, why its results were not all stored (`None`: they were).
async fn store(
    r: &Reconciler,
    parsed: Parsed,
    db: &mut Dedicated,
    report: &mut ResultsReport,
) -> Vec<Option<Unstored>> {
    let Parsed { mut results, owners, spans, messages } = parsed;
    if results.is_empty() {
        return (0..messages).map(|_| None).collect();
    }
    for res in &mut results {
        without_nul(&mut res.outcome.output);
        without_nul(&mut res.outcome.error_message);
    }
    // Small outputs are written behind (stored with the completion, moved to S3 by the
    // artifact mover); larger ones are uploaded first, the uploads of a batch at once.
    let behind = r.settings.artifact_write_behind_max_bytes;
    let uploads: Vec<_> = results
        .iter()
        .map(|res| r.artifacts.store_or_defer(&res.task_id, &res.lease_id, res.outcome.output.as_deref(), behind))
        .collect();
    let bodies: Vec<_> = futures::stream::iter(uploads).buffered(32).collect().await;
    // The outputs move into the completions; `results` keeps what the bookkeeping needs.
    let completions: Vec<Completion> = results
        .iter_mut()
        .zip(bodies)
        .map(|(res, artifact)| Completion {
            task_id: res.task_id.clone(),
            lease_id: res.lease_id.clone(),
            outcome: Outcome {
                status: res.outcome.status,
                output: res.outcome.output.take(),
                error_message: res.outcome.error_message.take(),
                metrics: res.outcome.metrics.clone(),
                error_kind: res.outcome.error_kind,
                retry_at: res.outcome.retry_at,
            },
            artifact_type: "LLM_RESULT".into(),
            artifact_tags: Vec::new(),
            artifact_id: ArtifactId::generate(),
            artifact,
        })
        .collect();
    let completions = Arc::new(completions);
    let all = completions.clone();
    let now = r.clock.now_ms();
    let stored = db.run(move |c| Box::pin(async move { lifecycle::complete(c, &all, now).await })).await;
    drop(spans);
    match stored {
        Ok(outcomes) => {
            record(r, &results, outcomes, report);
            (0..messages).map(|_| None).collect()
        }
        Err(e) if crate::db::is_refusal(&e) && completions.len() > 1 => {
            tracing::warn!(error = %e, results = completions.len(), "storing a batch of results failed; storing them one by one");
            store_one_by_one(r, messages, &owners, &results, &completions, db, report).await
        }
        Err(e) => {
            tracing::error!(error = %e, results = results.len(), "storing results failed; they will come again");
            // Results that cannot be stored leave their leases unreleased: no expiry
            // until they can be.
            r.expiry_pause.broken(r.clock.now_ms());
            let data = crate::db::is_data_refusal(&e);
            let tasks: Vec<String> = results.iter().map(|res| res.task_id.to_string()).collect();
            (0..messages).map(|_| Some(Unstored { error: e.to_string(), data, tasks: tasks.clone() })).collect()
        }
    }
}

/// Counts what storing `results` did.
fn record(r: &Reconciler, results: &[ResultMessage], outcomes: Vec<CompletionOutcome>, report: &mut ResultsReport) {
    for (res, outcome) in results.iter().zip(outcomes) {
        match outcome {
            CompletionOutcome::Completed { task, .. } => {
                report.completed += 1;
                r.metrics.results_completed_total.inc();
                r.metrics.record_run(&res.outcome.metrics, task.status == TaskStatus::Queued);
                r.metrics.task_duration_seconds.observe(res.outcome.metrics.duration_ms as f64 / 1000.0);
            }
            CompletionOutcome::Late => {
                report.late += 1;
                r.metrics.results_late_total.inc();
            }
        }
    }
    if report.completed > 0 {
        r.due_kick.after_completions();
    }
}

/// Stores each result in its own statement; returns, for each message, why its results
/// were not all stored. Results stored before their message comes again are recorded as
/// late then.
async fn store_one_by_one(
    r: &Reconciler,
    messages: usize,
    owners: &[usize],
    results: &[ResultMessage],
    completions: &[Completion],
    db: &mut Dedicated,
    report: &mut ResultsReport,
) -> Vec<Option<Unstored>> {
    // Per message: the first error, and whether every error was a refusal of its data.
    let mut failures: Vec<Option<(sqlx::Error, bool)>> = (0..messages).map(|_| None).collect();
    let mut lost: Option<usize> = None;
    for (i, completion) in completions.iter().enumerate() {
        let one = vec![completion.clone()];
        let now = r.clock.now_ms();
        let (e, data) = match db.run(move |c| Box::pin(async move { lifecycle::complete(c, &one, now).await })).await {
            Ok(outcomes) => {
                record(r, &results[i..=i], outcomes, report);
                continue;
            }
            Err(e) => {
                let data = crate::db::is_data_refusal(&e);
                (e, data)
            }
        };
        let stop = !crate::db::is_refusal(&e);
        let failure = &mut failures[owners[i]];
        match failure {
            Some((_, all_data)) => *all_data &= data,
            None => *failure = Some((e, data)),
        }
        if stop {
            // The database is gone: the rest wait for redelivery rather than for one
            // timeout each.
            lost = Some(i + 1);
            break;
        }
    }
    if let Some(from) = lost {
        for &m in &owners[from..] {
            match &mut failures[m] {
                Some((_, data)) => *data = false,
                none => {
                    let gone =
                        std::io::Error::new(std::io::ErrorKind::NotConnected, "not stored: the database was lost");
                    *none = Some((sqlx::Error::Io(gone), false));
                }
            }
        }
    }
    failures
        .into_iter()
        .enumerate()
        .map(|(m, failure)| {
            failure.map(|(e, data)| Unstored {
                error: e.to_string(),
                data,
                tasks: results
                    .iter()
                    .zip(owners)
                    .filter(|(_, o)| **o == m)
                    .map(|(res, _)| res.task_id.to_string())
                    .collect(),
            })
        })
        .collect()
}

/// A message whose results could not all be stored: terminated when Postgres refused
/// its data (`data`) on its last allowed delivery, otherwise redelivered after a delay
/// growing with its delivery count.
async fn settle_unstored(r: &Reconciler, msg: &Message, unstored: &Unstored) {
    let Unstored { error, data, tasks } = unstored;
    let delivered = msg.info().map_or(1, |i| i.delivered).max(1);
    if *data && delivered >= r.settings.result_max_deliveries {
        r.metrics.results_refused_total.inc();
        tracing::error!(%error, delivered, ?tasks, "Postgres refused a result message's data on its last allowed delivery; terminated");
        let _ = msg.ack_with(AckKind::Term).await;
    } else {
        let factor = u32::try_from(delivered).unwrap_or(u32::MAX);
        let delay = r.settings.result_retry_delay.saturating_mul(factor).min(MAX_RETRY_DELAY);
        let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
    }
}
