//! Publishes committed dispatches (outbox rows) to JetStream and deletes their outbox
//! rows once JetStream acknowledged them.
//!
//! A publish that fails or is never acknowledged leaves its row in the outbox, where the
//! reconciler's relay finds it; JetStream de-duplicates by `Nats-Msg-Id`
//! (`<task>:<dispatch_seq>`), so publishing a dispatch twice delivers it once.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use sqlx::{PgConnection, PgPool};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

use super::Names;
use crate::db::outbox::{self, Dispatch};
use crate::metrics::Metrics;
use crate::protocol::TaskMessage;

/// Batches of publishes awaiting acknowledgement at once.
const MAX_IN_FLIGHT_BATCHES: usize = 32;
/// Largest batch taken from the queue at once.
const MAX_BATCH: usize = 512;
/// Largest batch of outbox rows deleted at once.
const MAX_DELETE: usize = 4096;
/// How long acknowledged rows wait for others before they are deleted together.
const DELETE_LINGER: Duration = Duration::from_millis(50);

/// Handle to the background dispatcher. Cloning is cheap.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::UnboundedSender<Vec<Dispatch>>,
}

impl Dispatcher {
    /// Starts the publisher and the outbox cleaner; both stop when `cancel` fires.
    pub fn spawn(
        js: jetstream::Context,
        names: Names,
        pool: PgPool,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Dispatcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let (sent_tx, sent_rx) = mpsc::unbounded_channel();
        tokio::spawn(publish_loop(js, names, rx, sent_tx, metrics.clone(), cancel.clone()));
        tokio::spawn(delete_loop(pool, sent_rx, metrics, cancel));
        Dispatcher { tx }
    }

    /// Queues committed dispatches for publishing. Never blocks; if the dispatcher has
    /// stopped, the rows stay in the outbox for the relay.
    pub fn send(&self, dispatches: Vec<Dispatch>) {
        if !dispatches.is_empty() {
            let _ = self.tx.send(dispatches);
        }
    }
}

/// Publishes one dispatch; returns the future of its acknowledgement.
pub async fn publish(
    js: &jetstream::Context,
    names: &Names,
    d: &Dispatch,
) -> Result<jetstream::context::PublishAckFuture, jetstream::context::PublishError> {
    let msg = TaskMessage::from(&d.task);
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg.msg_id().as_str());
    crate::telemetry::apply_carrier(&d.trace, &mut headers);
    let body = Bytes::from(serde_json::to_vec(&msg).expect("task message serializes"));
    js.publish_with_headers(names.dispatch_subject(d.task.routed_to.as_ref(), d.task.priority), headers, body).await
}

async fn publish_loop(
    js: jetstream::Context,
    names: Names,
    mut rx: mpsc::UnboundedReceiver<Vec<Dispatch>>,
    sent: mpsc::UnboundedSender<i64>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BATCHES));
    let mut buf: Vec<Vec<Dispatch>> = Vec::new();
    loop {
        buf.clear();
        tokio::select! {
            _ = cancel.cancelled() => return,
            n = rx.recv_many(&mut buf, MAX_BATCH) => if n == 0 { return },
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut acks = Vec::new();
        for d in buf.drain(..).flatten() {
            match publish(&js, &names, &d).await {
                Ok(ack) => acks.push((d.outbox_id, ack)),
                Err(e) => {
                    metrics.outbox_publish_failures.inc();
                    tracing::warn!(task.id = %d.task.id, error = %e, "publish failed; the outbox relay will retry");
                }
            }
        }
        let sent = sent.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            // Awaited together: each acknowledgement's timeout runs from when it is awaited,
            // so lost ones (a stream leader gone mid-publish) cost one timeout per batch.
            let acks = futures::future::join_all(acks.into_iter().map(|(id, ack)| async move { (id, ack.await) }));
            for (id, ack) in acks.await {
                match ack {
                    Ok(_) => {
                        metrics.tasks_published.inc();
                        let _ = sent.send(id);
                    }
                    Err(e) => {
                        metrics.outbox_publish_failures.inc();
                        tracing::warn!(outbox.id = id, error = %e, "publish not acknowledged; the outbox relay will retry");
                    }
                }
            }
            drop(permit);
        });
    }
}

async fn delete_loop(
    pool: PgPool,
    mut rx: mpsc::UnboundedReceiver<i64>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    // Losing one of these deletes in a crash only makes the relay publish a dispatch
    // again, which JetStream de-duplicates: a dedicated connection commits them
    // asynchronously, in one round trip per batch.
    //
    // A delete waits `DELETE_LINGER` for company: below a few hundred tasks per second
    // each would otherwise be a statement of its own, and a row's stay is invisible (the
    // relay leaves rows younger than `BLOOM_RELAY_MIN_AGE_MS` alone).
    let mut conn: Option<PgConnection> = None;
    let mut ids = Vec::new();
    loop {
        ids.clear();
        tokio::select! {
            _ = cancel.cancelled() => return,
            n = rx.recv_many(&mut ids, MAX_DELETE) => if n == 0 { return },
        }
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(DELETE_LINGER) => {}
        }
        while ids.len() < MAX_DELETE {
            match rx.try_recv() {
                Ok(id) => ids.push(id),
                Err(_) => break,
            }
        }
        if conn.is_none() {
            conn = crate::db::async_commit_connection(&pool)
                .await
                .map_err(|e| tracing::warn!(error = %e, "outbox connection"))
                .ok();
        }
        let Some(c) = conn.as_mut() else { continue };
        match outbox::delete(&mut *c, &ids).await {
            Ok(_) => metrics.outbox_rows_deleted.add(ids.len() as u64),
            Err(e) => {
                conn = None;
                tracing::warn!(error = %e, rows = ids.len(), "deleting sent outbox rows failed; the relay will resend them");
            }
        }
    }
}
