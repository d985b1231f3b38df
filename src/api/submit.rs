//! Group commit of task submissions.
//!
//! Concurrent `POST /llm-tasks` requests are gathered into batches: each batch is one
//! transaction (tasks, outbox rows, audit entries, idempotency keys), so N submissions
//! cost one durable commit instead of N. Batching adds no delay: a loop takes whatever
//! is waiting the moment it is free, and several loops commit in parallel, each on its
//! own connection (see [`Dedicated`]). A batch submission (`POST /llm-tasks/batch`) is
//! one transaction of its own, all or nothing.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use crate::bus::Dispatcher;
use crate::db::lifecycle::{self, KeyRules, OnKeyConflict, Submitted};
use crate::db::Dedicated;
use crate::domain::NewTask;
use crate::metrics::Metrics;
use crate::telemetry::Carrier;
use crate::time::Clock;

type Reply = oneshot::Sender<Result<Submitted, ApiError>>;
type Request = (NewTask, Carrier, Reply);

/// How the batcher runs.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Committing loops (each with its own connection).
    pub loops: usize,
    /// Bound of one commit.
    pub db_timeout: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_retention: Duration,
}

/// Handle to the submission batcher.
#[derive(Clone)]
pub struct Submitter {
    tx: mpsc::Sender<Request>,
    pool: PgPool,
    dispatcher: Dispatcher,
    metrics: Arc<Metrics>,
    limits: Limits,
    clock: Clock,
}

/// Largest batch committed at once.
const MAX_BATCH: usize = 256;

impl Submitter {
    /// Starts the committing loops.
    pub fn spawn(
        pool: PgPool,
        dispatcher: Dispatcher,
        metrics: Arc<Metrics>,
        limits: Limits,
        clock: Clock,
        cancel: CancellationToken,
    ) -> Submitter {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 16);
        let rx = Arc::new(Mutex::new(rx));
        let submitter = Submitter { tx, pool: pool.clone(), dispatcher, metrics, limits, clock };
        for _ in 0..limits.loops.max(1) {
            let db = Dedicated::new(&pool, limits.db_timeout);
            tokio::spawn(commit_loop(db, submitter.clone(), rx.clone(), cancel.clone()));
        }
        submitter
    }

    /// Creates a task (or finds the one its idempotency key created); returns once it
    /// is committed (and queued for publishing, with the trace context `trace`).
    pub async fn submit(&self, task: NewTask, trace: Carrier) -> Result<Submitted, ApiError> {
        let (reply, rx) = oneshot::channel();
        let closed = || ApiError::Unavailable("Shutting down; retry later".into());
        self.tx.send((task, trace, reply)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    /// Creates many tasks in one transaction, all or nothing; one answer per task, in order.
    pub async fn submit_many(&self, tasks: Vec<NewTask>, trace: Carrier) -> Result<Vec<Submitted>, ApiError> {
        let (now, window_start) = self.times();
        let created = tokio::time::timeout(self.limits.db_timeout, async {
            let mut conn = self.pool.acquire().await?;
            let keys = KeyRules { window_start, on_conflict: OnKeyConflict::Withdraw };
            lifecycle::create(&mut conn, tasks, "api", now, keys).await
        })
        .await
        .map_err(|_| ApiError::Unavailable("Database unavailable; retry later".into()))?;
        match created {
            Ok(mut answers) => {
                self.dispatch(&mut answers, |_| trace.clone());
                Ok(answers)
            }
            Err(e) => Err(commit_failed(&e)),
        }
    }

    /// Now and the start of the idempotency window.
    fn times(&self) -> (i64, i64) {
        let now = self.clock.now_ms();
        (now, now - self.limits.idempotency_retention.as_millis() as i64)
    }

    /// Hands the created tasks' dispatches (with their trace contexts) to the dispatcher.
    fn dispatch(&self, answers: &mut [Submitted], mut trace: impl FnMut(usize) -> Carrier) {
        let mut dispatches = Vec::new();
        let mut created = 0;
        for (i, a) in answers.iter_mut().enumerate() {
            match a {
                Submitted::Created(d) => {
                    created += 1;
                    d.trace = trace(i);
                    dispatches.push(d.clone());
                }
                Submitted::Scheduled(_) => created += 1,
                Submitted::Existing(_) | Submitted::KeyConflict { .. } | Submitted::Withdrawn => {}
            }
        }
        self.metrics.tasks_submitted_total.add(created);
        self.dispatcher.send(dispatches);
    }
}

fn commit_failed(e: &sqlx::Error) -> ApiError {
    tracing::error!(error = %e, "committing tasks failed");
    if crate::db::is_unavailable(e) {
        ApiError::Unavailable("Database unavailable; retry later".into())
    } else {
        ApiError::internal(e)
    }
}

async fn commit_loop(
    mut db: Dedicated,
    s: Submitter,
    rx: Arc<Mutex<mpsc::Receiver<Request>>>,
    cancel: CancellationToken,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        batch.clear();
        {
            let mut rx = rx.lock().await;
            tokio::select! {
                _ = cancel.cancelled() => return,
                n = rx.recv_many(&mut batch, MAX_BATCH) => if n == 0 { return },
            }
        }
        let mut tasks = Vec::with_capacity(batch.len());
        let mut traces = Vec::with_capacity(batch.len());
        let mut replies = Vec::with_capacity(batch.len());
        for (task, trace, reply) in batch.drain(..) {
            tasks.push(task);
            traces.push(trace);
            replies.push(reply);
        }
        let (now, window_start) = s.times();
        let keys = KeyRules { window_start, on_conflict: OnKeyConflict::Answer };
        match db.run(move |c| Box::pin(lifecycle::create(c, tasks, "api", now, keys))).await {
            Ok(mut answers) => {
                s.dispatch(&mut answers, |i| std::mem::take(&mut traces[i]));
                for (answer, reply) in answers.into_iter().zip(replies) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(e) => {
                let err = commit_failed(&e);
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}
