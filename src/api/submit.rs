//! Group commit of task submissions.
//!
//! Concurrent `POST /llm-tasks` requests are gathered into batches: each batch is one
//! transaction (tasks, outbox rows, audit entries), so N submissions cost one durable
//! commit instead of N. Batching adds no delay: a loop takes whatever is waiting the
//! moment it is free, and several loops commit in parallel, each on its own connection
//! (see [`Dedicated`]).

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::sync::CancellationToken;

use super::error::ApiError;
use crate::bus::Dispatcher;
use crate::db::{lifecycle, Dedicated};
use crate::domain::{NewTask, Task};
use crate::metrics::Metrics;
use crate::telemetry::Carrier;
use crate::time::Clock;

type Reply = oneshot::Sender<Result<Task, ApiError>>;
type Request = (NewTask, Carrier, Reply);

/// Handle to the submission batcher.
#[derive(Clone)]
pub struct Submitter {
    tx: mpsc::Sender<Request>,
}

/// Largest batch committed at once.
const MAX_BATCH: usize = 256;

impl Submitter {
    /// Starts `loops` committing loops.
    pub fn spawn(
        pool: PgPool,
        dispatcher: Dispatcher,
        metrics: Arc<Metrics>,
        loops: usize,
        db_timeout: Duration,
        clock: Clock,
        cancel: CancellationToken,
    ) -> Submitter {
        let (tx, rx) = mpsc::channel(MAX_BATCH * 16);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..loops.max(1) {
            let db = Dedicated::new(&pool, db_timeout);
            let (dispatcher, metrics, rx, clock, cancel) =
                (dispatcher.clone(), metrics.clone(), rx.clone(), clock.clone(), cancel.clone());
            tokio::spawn(commit_loop(db, dispatcher, metrics, rx, clock, cancel));
        }
        Submitter { tx }
    }

    /// Creates a task; returns once it is committed (and queued for publishing, with
    /// the trace context `trace`).
    pub async fn submit(&self, task: NewTask, trace: Carrier) -> Result<Task, ApiError> {
        let (reply, rx) = oneshot::channel();
        let closed = || ApiError::Unavailable("Shutting down; retry later".into());
        self.tx.send((task, trace, reply)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }
}

async fn commit_loop(
    mut db: Dedicated,
    dispatcher: Dispatcher,
    metrics: Arc<Metrics>,
    rx: Arc<Mutex<mpsc::Receiver<Request>>>,
    clock: Clock,
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
        let now = clock.now_ms();
        match db.run(move |c| Box::pin(lifecycle::create(c, tasks, "api", now))).await {
            Ok(mut dispatches) => {
                metrics.tasks_submitted_total.add(dispatches.len() as u64);
                for ((d, reply), trace) in dispatches.iter_mut().zip(replies).zip(traces) {
                    d.trace = trace;
                    let _ = reply.send(Ok(d.task.clone()));
                }
                dispatcher.send(dispatches);
            }
            Err(e) => {
                tracing::error!(error = %e, "committing a batch of tasks failed");
                let unavailable = crate::db::is_unavailable(&e);
                for reply in replies {
                    let err = if unavailable {
                        ApiError::Unavailable("Database unavailable; retry later".into())
                    } else {
                        ApiError::internal(&e)
                    };
                    let _ = reply.send(Err(err));
                }
            }
        }
    }
}
