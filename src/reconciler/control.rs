//! Claims, lease heartbeats, hand-backs and worker beats: NATS requests served by every
//! replica in one queue group. Requests that arrive together are decided together, in
//! one transaction per kind.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::{Message, Subscriber};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Reconciler;
use crate::bus::names::RECONCILER_QUEUE;
use crate::db::lifecycle::{self, Claim, ClaimOutcome};
use crate::db::workers::{self, Beat};
use crate::domain::{WorkerId, WorkerStatus};
use crate::protocol::{
    ClaimReply, ClaimRequest, HeartbeatReply, HeartbeatRequest, LeaseGrant, ReleaseReply, ReleaseRequest, WorkerBeat,
};
use crate::time::now_ms;

/// Largest number of requests decided in one transaction.
const MAX_BATCH: usize = 512;
/// Batches of one kind in flight at once per replica.
const PARALLEL_BATCHES: usize = 1;

/// Serves all control subjects until `cancel` fires.
pub async fn run(r: Reconciler, cancel: CancellationToken) -> anyhow::Result<()> {
    let claims = r.client.queue_subscribe(r.names.claim_subject(), RECONCILER_QUEUE.into()).await?;
    let beats = r.client.queue_subscribe(r.names.heartbeat_subject(), RECONCILER_QUEUE.into()).await?;
    let releases = r.client.queue_subscribe(r.names.release_subject(), RECONCILER_QUEUE.into()).await?;
    let workers = r.client.queue_subscribe(r.names.worker_beat_subject(), RECONCILER_QUEUE.into()).await?;
    tokio::join!(
        serve(r.clone(), claims, cancel.clone(), handle_claims),
        serve(r.clone(), beats, cancel.clone(), handle_heartbeats),
        serve(r.clone(), releases, cancel.clone(), handle_releases),
        serve(r.clone(), workers, cancel.clone(), handle_worker_beats),
    );
    Ok(())
}

async fn serve<F, Fut>(r: Reconciler, sub: Subscriber, cancel: CancellationToken, handle: F)
where
    F: Fn(Reconciler, Vec<Message>) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(PARALLEL_BATCHES));
    let mut batches = sub.ready_chunks(MAX_BATCH);
    loop {
        let batch = tokio::select! {
            _ = cancel.cancelled() => return,
            b = batches.next() => match b { Some(b) => b, None => return },
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let r = r.clone();
        tokio::spawn(async move {
            handle(r, batch).await;
            drop(permit);
        });
    }
}

async fn reply<T: serde::Serialize>(r: &Reconciler, msg: &Message, body: &T) {
    if let Some(to) = &msg.reply {
        let bytes = serde_json::to_vec(body).expect("reply serializes");
        if let Err(e) = r.client.publish(to.clone(), bytes.into()).await {
            tracing::warn!(error = %e, "reply failed");
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(r: &Reconciler, msg: &Message) -> Option<T> {
    if crate::protocol::carries_nul(&msg.payload) {
        r.metrics.malformed_messages_total.inc();
        tracing::warn!(subject = %msg.subject, "control message with a NUL character rejected");
        return None;
    }
    match serde_json::from_slice(&msg.payload) {
        Ok(v) => Some(v),
        Err(e) => {
            r.metrics.malformed_messages_total.inc();
            tracing::warn!(subject = %msg.subject, error = %e, "malformed control message rejected");
            None
        }
    }
}

async fn handle_claims(r: Reconciler, msgs: Vec<Message>) {
    let mut requests = Vec::with_capacity(msgs.len());
    for msg in msgs {
        match parse::<ClaimRequest>(&r, &msg) {
            Some(req) => requests.push((msg, req)),
            None => reply(&r, &msg, &ClaimReply::Unavailable { reason: "malformed claim".into() }).await,
        }
    }
    let claims: Vec<Claim> = requests
        .iter()
        .flat_map(|(_, req)| {
            req.items.iter().map(|i| Claim {
                task_id: i.task_id.clone(),
                dispatch_seq: i.dispatch_seq,
                worker_id: req.worker_id.clone(),
                ttl_seconds: req.ttl_seconds.clamp(1, 86_400),
            })
        })
        .collect();
    let outcomes = match lifecycle::claim(&r.pool, &claims).await {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "claim transaction failed");
            for (msg, _) in &requests {
                reply(&r, msg, &ClaimReply::Unavailable { reason: "database unavailable".into() }).await;
            }
            return;
        }
    };
    let now = now_ms();
    let mut outcomes = outcomes.into_iter();
    for (msg, req) in &requests {
        let items: Vec<Option<LeaseGrant>> = req
            .items
            .iter()
            .map(|item| match outcomes.next() {
                Some(ClaimOutcome::Granted(lease)) => {
                    r.metrics.claims_granted_total.inc();
                    if item.created_at > 0 {
                        r.metrics.dispatch_latency_seconds.observe((now - item.created_at) as f64 / 1000.0);
                    }
                    Some(LeaseGrant { lease_id: lease.id, expires_at: lease.expires_at, attempts: 0 })
                }
                _ => {
                    r.metrics.claims_refused_total.inc();
                    None
                }
            })
            .collect();
        reply(&r, msg, &ClaimReply::Decided { items }).await;
    }
}

async fn handle_heartbeats(r: Reconciler, msgs: Vec<Message>) {
    let mut requests = Vec::with_capacity(msgs.len());
    for msg in msgs {
        if let Some(req) = parse::<HeartbeatRequest>(&r, &msg) {
            requests.push((msg, req));
        }
    }
    let pairs: Vec<_> = requests.iter().map(|(_, q)| (q.task_id.clone(), q.lease_id.clone())).collect();
    match lifecycle::heartbeat(&r.pool, &pairs).await {
        Ok(renewed) => {
            let by_lease: HashMap<_, _> = renewed.iter().map(|l| (l.id.clone(), l.expires_at)).collect();
            for (msg, req) in &requests {
                let answer = match by_lease.get(&req.lease_id) {
                    Some(expires_at) => {
                        r.metrics.heartbeats_total.inc();
                        HeartbeatReply::Renewed { expires_at: *expires_at }
                    }
                    None => {
                        r.metrics.heartbeats_lost_total.inc();
                        HeartbeatReply::Lost
                    }
                };
                reply(&r, msg, &answer).await;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "heartbeat transaction failed");
            for (msg, _) in &requests {
                reply(&r, msg, &HeartbeatReply::Unavailable { reason: "database unavailable".into() }).await;
            }
        }
    }
}

async fn handle_releases(r: Reconciler, msgs: Vec<Message>) {
    for msg in msgs {
        let Some(req) = parse::<ReleaseRequest>(&r, &msg) else {
            continue;
        };
        let released = match lifecycle::release(&r.pool, &req.task_id, &req.lease_id).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, task.id = %req.task_id, "release failed");
                false
            }
        };
        reply(&r, &msg, &ReleaseReply { released }).await;
    }
}

async fn handle_worker_beats(r: Reconciler, msgs: Vec<Message>) {
    // The last beat of each worker in the batch wins.
    let mut latest: HashMap<WorkerId, WorkerBeat> = HashMap::new();
    for msg in msgs {
        if let Some(beat) = parse::<WorkerBeat>(&r, &msg) {
            latest.insert(beat.worker_id.clone(), beat);
        }
    }
    let beats: Vec<Beat> = latest
        .into_values()
        .map(|b| Beat { id: b.worker_id, status: b.status, capabilities: b.capabilities, ip_addrs: b.ip_addrs })
        .collect();
    if let Err(e) = workers::record_beats(&r.pool, &beats, now_ms()).await {
        tracing::error!(error = %e, "recording worker beats failed");
        return;
    }
    let gone: Vec<WorkerId> =
        beats.iter().filter(|b| b.status == WorkerStatus::Offline).map(|b| b.id.clone()).collect();
    super::sweeper::reroute(&r, &gone).await;
}
