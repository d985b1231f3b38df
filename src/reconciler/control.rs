//! Claims, lease heartbeats, hand-backs, worker beats and results: NATS requests served by every
//! replica in one queue group (claims also on the replica's own subject, where a worker
//! sends them once a replica answered it). Requests that arrive together are decided
//! together, in one transaction per kind.

use std::collections::HashMap;
use std::time::Instant;

use async_nats::Message;
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::Reconciler;
use crate::bus::names::RECONCILER_QUEUE;
use crate::db::lifecycle::{self, Claim, ClaimOutcome};
use crate::db::workers::{self, Beat};
use crate::db::Dedicated;
use crate::domain::{WorkerId, WorkerStatus};
use crate::protocol::{
    ClaimDecision, ClaimReply, ClaimRequest, HeartbeatReply, HeartbeatRequest, LeaseGrant, ReleaseReply,
    ReleaseRequest, StartReply, StartRequest, WorkerBeat,
};

/// Largest number of requests decided in one transaction.
const MAX_BATCH: usize = 512;
/// Batches of one kind in flight at once per replica.
const PARALLEL_BATCHES: usize = 1;

/// Serves all control subjects until `cancel` fires.
pub async fn run(r: Reconciler, cancel: CancellationToken) -> anyhow::Result<()> {
    // Claims come through the queue group (a worker's first, or after its replica went
    // away) and on this replica's own subject (the worker's next ones, see
    // `Names::claim_replica_subject`).
    let claims = futures::stream::select(
        r.client.queue_subscribe(r.names.claim_subject(), RECONCILER_QUEUE.into()).await?,
        r.client.subscribe(r.names.claim_replica_subject(&r.replica)).await?,
    );
    let beats = r.client.queue_subscribe(r.names.heartbeat_subject(), RECONCILER_QUEUE.into()).await?;
    let releases = r.client.queue_subscribe(r.names.release_subject(), RECONCILER_QUEUE.into()).await?;
    let workers = r.client.queue_subscribe(r.names.worker_beat_subject(), RECONCILER_QUEUE.into()).await?;
    let starts = r.client.queue_subscribe(r.names.start_subject(), RECONCILER_QUEUE.into()).await?;
    let results = r.client.queue_subscribe(r.names.results_request_subject(), RECONCILER_QUEUE.into()).await?;
    // The server has the subscriptions once a message sent after them has come back
    // (it handles a connection's commands in order). While NATS is unreachable the
    // subscriptions wait in the client, and so does this.
    while let Err(e) = round_trip(&r.client, r.settings.request_timeout).await {
        tracing::warn!(error = %e, "control subscriptions not confirmed by NATS yet; retrying");
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
    r.serving.send_replace(true);
    // Not serving once this returns, whatever the reason.
    let _serving = ServingGuard(r.clone());
    tokio::join!(
        serve(r.clone(), claims, cancel.clone(), handle_claims),
        serve(r.clone(), beats, cancel.clone(), handle_heartbeats),
        serve(r.clone(), releases, cancel.clone(), handle_releases),
        serve(r.clone(), workers, cancel.clone(), handle_worker_beats),
        serve(r.clone(), starts, cancel.clone(), handle_starts),
        serve(r.clone(), results, cancel.clone(), super::results::handle_requests),
    );
    Ok(())
}

/// Sends a message to a private inbox and waits for it.
async fn round_trip(client: &async_nats::Client, timeout: std::time::Duration) -> anyhow::Result<()> {
    let inbox = client.new_inbox();
    let mut probe = client.subscribe(inbox.clone()).await?;
    client.publish(inbox, bytes::Bytes::new()).await?;
    tokio::time::timeout(timeout, probe.next()).await?.ok_or_else(|| anyhow::anyhow!("probe subscription closed"))?;
    Ok(())
}

/// Clears the replica's serving flag when dropped.
struct ServingGuard(Reconciler);

impl Drop for ServingGuard {
    fn drop(&mut self) {
        self.0.serving.send_replace(false);
    }
}

/// Decides the requests of `sub` in batches, each on one of the replica's
/// `PARALLEL_BATCHES` connections: a batch starts when a connection is free, and
/// requests arriving meanwhile join the next one. Batches in flight finish on shutdown.
async fn serve<S, F, Fut>(r: Reconciler, sub: S, cancel: CancellationToken, handle: F)
where
    S: Stream<Item = Message> + Unpin,
    F: Fn(Reconciler, Vec<Message>, Dedicated) -> Fut + Copy + Send + 'static,
    Fut: std::future::Future<Output = Dedicated> + Send + 'static,
{
    let connect = || Dedicated::new(&r.pool, r.settings.db_timeout);
    let mut idle: Vec<Dedicated> = (0..PARALLEL_BATCHES).map(|_| connect()).collect();
    // Handlers are spawned, not owned: one in flight finishes (and replies) even if this
    // loop is dropped, as a committed claim must be answered.
    let mut running: FuturesUnordered<tokio::task::JoinHandle<Dedicated>> = FuturesUnordered::new();
    let mut batches = sub.ready_chunks(MAX_BATCH);
    loop {
        while idle.is_empty() {
            // A handler that panicked lost its connection with it.
            match running.next().await {
                Some(db) => idle.push(db.unwrap_or_else(|_| connect())),
                None => idle.push(connect()),
            }
        }
        let batch = tokio::select! {
            _ = cancel.cancelled() => break,
            b = batches.next() => match b { Some(b) => b, None => break },
        };
        let db = idle.pop().expect("a free connection");
        running.push(tokio::spawn(handle(r.clone(), batch, db)));
    }
    while running.next().await.is_some() {}
}

pub(super) async fn reply<T: serde::Serialize>(r: &Reconciler, msg: &Message, body: &T) {
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

async fn handle_claims(r: Reconciler, msgs: Vec<Message>, mut db: Dedicated) -> Dedicated {
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
    let now = r.clock.now_ms();
    let outcomes = match db.run(move |c| Box::pin(async move { lifecycle::claim(c, &claims, now).await })).await {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "claim transaction failed");
            for (msg, _) in &requests {
                reply(&r, msg, &ClaimReply::Unavailable { reason: "database unavailable".into() }).await;
            }
            return db;
        }
    };
    let mut outcomes = outcomes.into_iter();
    let mut aside = Vec::new();
    for (msg, req) in &requests {
        let items: Vec<ClaimDecision> = req
            .items
            .iter()
            .map(|item| match outcomes.next() {
                Some(ClaimOutcome::Granted(lease)) => {
                    r.metrics.claims_granted_total.inc();
                    if item.created_at > 0 {
                        r.metrics.dispatch_latency_seconds.observe((now - item.created_at) as f64 / 1000.0);
                    }
                    ClaimDecision::Granted(LeaseGrant { lease_id: lease.id, expires_at: lease.expires_at, attempts: 0 })
                }
                Some(ClaimOutcome::Full) => {
                    r.metrics.claims_full_total.inc();
                    ClaimDecision::Full
                }
                Some(ClaimOutcome::Draining) => {
                    r.metrics.claims_full_total.inc();
                    ClaimDecision::Draining
                }
                Some(ClaimOutcome::SetAside { slot }) => {
                    r.metrics.claims_refused_total.inc();
                    aside.push(slot);
                    ClaimDecision::Refused
                }
                _ => {
                    r.metrics.claims_refused_total.inc();
                    ClaimDecision::Refused
                }
            })
            .collect();
        reply(&r, msg, &ClaimReply::Decided { items, replica: Some(r.replica.clone()) }).await;
    }
    r.slot_rechecks.recheck(&r, aside);
    db
}

async fn handle_heartbeats(r: Reconciler, msgs: Vec<Message>, mut db: Dedicated) -> Dedicated {
    let mut requests = Vec::with_capacity(msgs.len());
    for msg in msgs {
        if let Some(req) = parse::<HeartbeatRequest>(&r, &msg) {
            requests.push((msg, req));
        }
    }
    let pairs: Vec<_> = requests.iter().map(|(_, q)| (q.task_id.clone(), q.lease_id.clone())).collect();
    let now = r.clock.now_ms();
    let began = Instant::now();
    let renewed = db.run(move |c| Box::pin(async move { lifecycle::heartbeat(c, &pairs, now).await })).await;
    r.expiry_pause.wrote(began.elapsed(), r.clock.now_ms());
    match renewed {
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
            r.expiry_pause.broken(r.clock.now_ms());
            tracing::error!(error = %e, "heartbeat transaction failed");
            for (msg, _) in &requests {
                reply(&r, msg, &HeartbeatReply::Unavailable { reason: "database unavailable".into() }).await;
            }
        }
    }
    db
}

/// Hand-backs, starts and worker beats are rare: they use the pool, and their lane's
/// connection is never opened.
async fn handle_releases(r: Reconciler, msgs: Vec<Message>, db: Dedicated) -> Dedicated {
    for msg in msgs {
        let Some(req) = parse::<ReleaseRequest>(&r, &msg) else {
            continue;
        };
        let released = match lifecycle::release(&r.pool, &req.task_id, &req.lease_id, r.clock.now_ms()).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, task.id = %req.task_id, "release failed");
                false
            }
        };
        reply(&r, &msg, &ReleaseReply { released }).await;
    }
    db
}

/// Ends the leases a restarted worker's previous process held (see [`StartRequest`]).
/// Rare: the pool, like hand-backs.
async fn handle_starts(r: Reconciler, msgs: Vec<Message>, db: Dedicated) -> Dedicated {
    for msg in msgs {
        let Some(req) = parse::<StartRequest>(&r, &msg) else {
            continue;
        };
        let beat = req.capabilities.clone().map(|capabilities| Beat {
            id: req.worker_id.clone(),
            status: WorkerStatus::Online,
            capabilities,
            ip_addrs: Vec::new(),
        });
        let started =
            lifecycle::restart(&r.pool, &req.worker_id, beat.as_ref(), req.boot_id.as_deref(), r.clock.now_ms()).await;
        let (ended, draining) = match started {
            Ok(restart) => {
                let expiry = restart.expiry;
                r.metrics.leases_expired_total.add(expiry.expired as u64);
                r.metrics.tasks_requeued_total.add(expiry.requeued.len() as u64);
                r.metrics.tasks_dead_total.add(expiry.dead as u64);
                r.dispatcher.send(expiry.requeued);
                (expiry.expired, restart.draining)
            }
            Err(e) => {
                tracing::error!(error = %e, worker.id = %req.worker_id, "registering a starting worker failed");
                (0, false)
            }
        };
        if ended > 0 {
            tracing::info!(worker.id = %req.worker_id, ended, "worker restarted: its previous leases ended");
        }
        reply(&r, &msg, &StartReply { ended, draining }).await;
    }
    db
}

async fn handle_worker_beats(r: Reconciler, msgs: Vec<Message>, db: Dedicated) -> Dedicated {
    // The last beat of each worker in the batch wins.
    let mut latest: HashMap<WorkerId, WorkerBeat> = HashMap::new();
    for msg in msgs {
        if let Some(beat) = parse::<WorkerBeat>(&r, &msg) {
            latest.insert(beat.worker_id.clone(), beat);
        }
    }
    let told: HashMap<WorkerId, bool> = latest.iter().map(|(id, b)| (id.clone(), b.draining)).collect();
    let beats: Vec<Beat> = latest
        .into_values()
        .map(|b| Beat { id: b.worker_id, status: b.status, capabilities: b.capabilities, ip_addrs: b.ip_addrs })
        .collect();
    let began = Instant::now();
    let stored = workers::record_beats(&r.pool, &beats, r.clock.now_ms()).await;
    r.expiry_pause.wrote(began.elapsed(), r.clock.now_ms());
    let stored = match stored {
        Ok(stored) => stored,
        Err(e) => {
            r.expiry_pause.broken(r.clock.now_ms());
            tracing::error!(error = %e, "recording worker beats failed");
            return db;
        }
    };
    // A worker whose beat disagrees with Postgres about draining is told again.
    for (worker_id, draining) in stored {
        if told.get(&worker_id).is_some_and(|t| *t != draining) {
            crate::bus::tell_draining(&r.client, &r.names, worker_id, draining).await;
        }
    }
    let gone: Vec<WorkerId> =
        beats.iter().filter(|b| b.status == WorkerStatus::Offline).map(|b| b.id.clone()).collect();
    super::sweeper::reroute(&r, &gone).await;
    db
}
