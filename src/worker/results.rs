//! Hands a worker's results to the reconcilers, several per message.
//!
//! Executions hand their result to one publisher loop and wait. The loop takes every
//! result that is ready (it never waits for more) and sends them as one request to the
//! reconcilers (`Names::results_request_subject`), which answer once the results are
//! stored in Postgres; what none stored in time (no reconciler listening, one killed
//! holding the request, Postgres refusing), and batches too large for a request, go to
//! the results stream, which a reconciler consumes when it can. Each result's task
//! message is acked once its result is stored or in the stream. Results that finish
//! while a batch is on its way go out together in the next one, so a busy worker sends
//! one message per batch instead of one per task, and an idle one sends each result at
//! once.
//!
//! The request path costs a request and its answer; the stream's, a publish, its
//! acknowledgement, the stored message's delivery to a reconciler, its ack and its
//! removal from the work queue (`docs/benchmarks.md`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, Message};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::bus::Names;
use crate::metrics::Metrics;
use crate::protocol::{ResultMessage, ResultsReply, TracedResult};

/// Most results in one message.
const MAX_RESULTS: usize = 256;
/// A message grows by results until its body passes this size (one larger result
/// goes alone).
const MAX_BYTES: usize = 256 * 1024;
/// Larger batches go to the stream directly: the reconciler uploads large outputs to S3
/// before it answers, which may take longer than a request waits.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

struct Finished {
    msg: Message,
    result: TracedResult,
    body: Vec<u8>,
    done: oneshot::Sender<bool>,
}

/// Handle of the publisher loop.
#[derive(Clone)]
pub struct ResultPublisher {
    tx: mpsc::UnboundedSender<Finished>,
}

impl ResultPublisher {
    /// Starts the loop; it ends when every handle is dropped. A request unanswered after
    /// `timeout` goes to the stream; publishes are retried until JetStream acknowledges
    /// them or `hard` fires.
    pub fn spawn(bus: ResultsBus, hard: CancellationToken) -> ResultPublisher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(bus, rx, hard));
        ResultPublisher { tx }
    }

    /// Publishes `result` and then acks `msg`, the task message it answers. Returns
    /// whether both happened; if not, the message is redelivered after its ack-wait.
    pub async fn publish(&self, msg: Message, result: ResultMessage) -> bool {
        let result = TracedResult { result, trace: crate::telemetry::current_carrier() };
        let body = serde_json::to_vec(&result).expect("result serializes");
        let (done, acked) = oneshot::channel();
        if self.tx.send(Finished { msg, result, body, done }).is_err() {
            return false;
        }
        acked.await.unwrap_or(false)
    }
}

/// Where results go: the reconcilers' request subject, else the results stream.
pub struct ResultsBus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub names: Names,
    /// How long a request waits for its answer.
    pub timeout: Duration,
    pub metrics: Arc<Metrics>,
}

async fn run(bus: ResultsBus, mut rx: mpsc::UnboundedReceiver<Finished>, hard: CancellationToken) {
    let mut ready = Vec::with_capacity(MAX_RESULTS);
    while rx.recv_many(&mut ready, MAX_RESULTS).await > 0 {
        let mut rest = ready.drain(..).peekable();
        while rest.peek().is_some() {
            let mut batch = Vec::new();
            let mut bytes = 0;
            while let Some(next) = rest.next_if(|f| batch.is_empty() || bytes + f.body.len() <= MAX_BYTES) {
                bytes += next.body.len() + 1;
                batch.push(next);
            }
            let published = send(&bus, &batch, &hard).await;
            for f in batch {
                let acked = published && f.msg.ack().await.is_ok();
                let _ = f.done.send(acked);
            }
        }
    }
}

/// A JSON array of already serialized values.
fn json_array<'a>(items: impl Iterator<Item = &'a [u8]>) -> Bytes {
    let mut out = b"[".to_vec();
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item);
    }
    out.push(b']');
    Bytes::from(out)
}

/// Sends one batch: as a request the reconcilers answer once it is stored, else to the
/// stream. Returns whether it was stored or is in the stream.
async fn send(bus: &ResultsBus, batch: &[Finished], hard: &CancellationToken) -> bool {
    let payload = json_array(batch.iter().map(|f| f.body.as_slice()));
    if payload.len() <= MAX_REQUEST_BYTES {
        let asked = bus.client.request(bus.names.results_request_subject(), payload.clone());
        match tokio::time::timeout(bus.timeout, asked).await {
            Ok(Ok(reply)) => match serde_json::from_slice::<ResultsReply>(&reply.payload) {
                Ok(ResultsReply { stored: true }) => return true,
                other => tracing::debug!(results = batch.len(), reply = ?other, "results not stored by request"),
            },
            Ok(Err(e)) => tracing::debug!(results = batch.len(), error = %e, "results request failed"),
            Err(_) => tracing::debug!(results = batch.len(), "results request unanswered"),
        }
    }
    bus.metrics.results_streamed_total.inc();
    publish(&bus.js, &bus.names, batch, payload, hard).await
}

/// Publishes one batch to the results stream, retrying with backoff until acknowledged
/// or `hard` fires.
async fn publish(
    js: &jetstream::Context,
    names: &Names,
    batch: &[Finished],
    payload: Bytes,
    hard: &CancellationToken,
) -> bool {
    // Retries of this batch carry the same id, so JetStream stores it once.
    let msg_id = match batch {
        [one] => format!("result:{}", one.result.result.lease_id),
        _ => format!("results:{}", uuid::Uuid::now_v7()),
    };
    let mut delay = Duration::from_millis(100);
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id.as_str());
        let attempt = async {
            js.publish_with_headers(names.results_subject(), headers, payload.clone()).await?.await?;
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => return true,
            Err(e) => tracing::warn!(results = batch.len(), error = %e, "publishing results failed; retrying"),
        }
        tokio::select! {
            _ = hard.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        // At most a second between tries: a stream leader elected meanwhile (a few
        // seconds in a NATS cluster) is used within a second.
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Metrics, Outcome};
    use crate::protocol::ResultBatch;

    fn result(lease: &str) -> TracedResult {
        TracedResult {
            result: ResultMessage {
                task_id: "t".into(),
                lease_id: lease.into(),
                worker_id: "w".into(),
                outcome: Outcome::success("out".into(), Metrics { duration_ms: 1, ..Default::default() }),
            },
            trace: vec![("traceparent".into(), "00-abc-def-01".into())],
        }
    }

    #[test]
    fn a_batch_body_is_an_array_of_the_results_and_parses_back() {
        let results = [result("l1"), result("l2")];
        let bodies: Vec<Vec<u8>> = results.iter().map(|r| serde_json::to_vec(r).unwrap()).collect();
        let out = json_array(bodies.iter().map(Vec::as_slice));
        let parsed: ResultBatch = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed.into_results(), results.to_vec());
    }

    #[test]
    fn a_single_result_object_is_a_batch_of_one() {
        let one = serde_json::to_vec(&result("l1").result).unwrap();
        let parsed: ResultBatch = serde_json::from_slice(&one).unwrap();
        let results = parsed.into_results();
        assert_eq!(results.len(), 1);
        assert_eq!(results[0].result.lease_id.as_str(), "l1");
        assert!(results[0].trace.is_empty());
    }
}
