//! `bloom-worker`: pulls task dispatches from JetStream, claims them from the
//! reconcilers, runs the executor and publishes results.
//!
//! Per message: claim (request/reply; a refused claim terminates the message so it is
//! never executed twice) → execute, sending an in-progress ack and a lease heartbeat
//! every TTL/3 → publish the result to the results stream (with the other results ready
//! at that moment, see [`results`]) → ack the task message only after the result's
//! publish is acknowledged. On shutdown the worker stops pulling, lets in-flight tasks
//! finish within the grace period and hands the others back (lease released, message
//! nak'ed) so another worker takes them at once; its beats say offline from the start
//! of the shutdown to its end.

mod bands;
pub mod claim_route;
pub mod cli_output;
pub mod executor;
pub mod results;
mod running;
pub mod slots;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::provision::{self, StreamLayout};
use crate::bus::Names;
use crate::config::{NatsArgs, WorkerArgs};
use crate::domain::{Capabilities, LeaseId, Priority, WorkerId, WorkerStatus};
use crate::metrics::Metrics;
use crate::protocol::{
    ClaimDecision, ClaimItem, ClaimReply, ClaimRequest, DrainNotice, HeartbeatReply, HeartbeatRequest, LeaseGrant,
    ReleaseReply, ReleaseRequest, ResultMessage, StartReply, StartRequest, TaskMessage, WorkerBeat,
};
use claim_route::ClaimRoute;
pub use executor::Executor;
use results::{ResultPublisher, ResultsBus};
use running::Running;
use slots::{Slot, Slots};

/// Most messages asked for in one pull request.
const MAX_PULL: usize = 256;
/// How long a pull request waits on the server for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// Claim requests in flight at once per pull loop.
const MAX_CLAIMS_IN_FLIGHT: usize = 2;
/// How long a starting worker asks again for a reconciler to acknowledge its start.
const START_ANSWER_PATIENCE: Duration = Duration::from_secs(15);
/// Times a claim is sent before its messages are handed back for redelivery.
const CLAIM_ATTEMPTS: u32 = 3;
/// First wait before claiming again what Postgres refused for want of a free slot
/// (doubling each time): long enough for this worker's last results to be recorded.
const FULL_BACKOFF: Duration = Duration::from_millis(20);
/// Longest of those waits.
const FULL_BACKOFF_MAX: Duration = Duration::from_millis(320);
/// Time claims refused as full are retried before their messages are handed back (at
/// most half the lease TTL): longer than the results consumer's ack-wait, so results a
/// dead reconciler held are redelivered and recorded, and the slot freed, within it.
const FULL_GIVE_UP: Duration = Duration::from_secs(3);

/// How a worker runs.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub id: WorkerId,
    pub capabilities: Capabilities,
    pub executor: Executor,
    /// Lease TTL (the consumers' ack-wait) and replicas to provision with.
    pub streams: StreamLayout,
    /// Interval of liveness beats.
    pub beat_interval: Duration,
    /// Time in-flight tasks get to finish on shutdown before they are handed back.
    pub shutdown_grace: Duration,
    /// Timeout of heartbeat requests and result publishes.
    pub request_timeout: Duration,
    /// Time a claim waits for its answer before it is sent again, and a results request
    /// before its results go to the stream.
    pub claim_timeout: Duration,
}

impl WorkerSettings {
    /// The settings a `bloom-worker` runs with, from its configuration: the clamps and
    /// checks of every value are here, and only here.
    pub fn from_args(w: &WorkerArgs, nats: &NatsArgs) -> Result<WorkerSettings, String> {
        w.validate()?;
        let executor = match w.executor.as_str() {
            "builtin" => Executor::Builtin,
            _ => {
                Executor::Command { command: w.executor_command.clone(), max_output_bytes: w.executor_max_output_bytes }
            }
        };
        Ok(WorkerSettings {
            id: WorkerId(w.id()),
            capabilities: Capabilities {
                claude_cli: w.claude_cli,
                max_concurrency: w.max_concurrency,
                labels: w.labels.iter().filter(|l| !l.is_empty()).cloned().collect(),
                ..Capabilities::default()
            },
            executor,
            streams: nats.streams(),
            beat_interval: Duration::from_millis(w.beat_interval_ms.max(100)),
            shutdown_grace: Duration::from_secs(w.shutdown_grace_secs),
            request_timeout: nats.timeout(),
            claim_timeout: Duration::from_millis(w.claim_timeout_ms.max(100)),
        })
    }
}

#[derive(Clone)]
struct Ctx {
    client: async_nats::Client,
    /// Executions by lease, for cancel notices.
    running: Running,
    names: Names,
    settings: Arc<WorkerSettings>,
    metrics: Arc<Metrics>,
    ttl_secs: i32,
    results: ResultPublisher,
    /// The reconciler replica this worker's claims go to.
    claim_route: Arc<ClaimRoute>,
}

/// Runs the worker until `cancel` fires, then drains.
pub async fn run(
    client: async_nats::Client,
    names: Names,
    settings: WorkerSettings,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let js = crate::bus::jetstream(client.clone(), settings.request_timeout);
    provision::apply_at_start(&js, &names, &settings.streams, provision::START_PATIENCE).await?;
    provision::apply_worker_consumer(&js, &names, &settings.streams, &settings.id).await?;
    let stream = js.get_stream(names.tasks_stream()).await?;
    let mut pool = Vec::with_capacity(5);
    for priority in Priority::all_descending() {
        let consumer: PullConsumer =
            stream.get_consumer(&names.pool_consumer_of(priority)).await.map_err(|e| anyhow::anyhow!(e))?;
        pool.push(consumer);
    }
    let direct: PullConsumer =
        stream.get_consumer(&names.worker_consumer(&settings.id)).await.map_err(|e| anyhow::anyhow!(e))?;
    // The lease TTL is the ack-wait the consumer really has.
    let ack_wait = pool[0].info().await.map(|i| i.config.ack_wait).unwrap_or(settings.streams.lease_ttl);
    let ttl_secs = ack_wait.as_secs().clamp(1, 86_400) as i32;
    // Tasks stop on `hard`, which fires when the grace period after `cancel` runs out.
    let hard = CancellationToken::new();
    let bus = ResultsBus {
        client: client.clone(),
        js: js.clone(),
        names: names.clone(),
        timeout: settings.claim_timeout,
        metrics: metrics.clone(),
    };
    let results = ResultPublisher::spawn(bus, hard.clone());
    let running = Running::default();
    let cancels = client.subscribe(names.cancel_subject()).await?;
    let drains = client.subscribe(names.drain_subject()).await?;
    let ctx = Ctx {
        client,
        running: running.clone(),
        names,
        settings: Arc::new(settings),
        metrics,
        ttl_secs,
        results,
        claim_route: Arc::default(),
    };
    tokio::spawn(running.serve(cancels));
    tracing::info!(worker.id = %ctx.settings.id, ttl_secs, "worker started");

    let slots = Slots::new(ctx.settings.capabilities.max_concurrency.max(1) as usize);
    announce_start(&ctx, &slots).await;
    let mut tasks = JoinSet::new();
    let mut loops = JoinSet::new();
    let (exec_tx, mut exec_rx) = tokio::sync::mpsc::unbounded_channel();
    loops.spawn(bands::pool_loop(ctx.clone(), pool, slots.clone(), exec_tx.clone(), cancel.clone()));
    loops.spawn(pull_loop(ctx.clone(), direct, slots.clone(), exec_tx.clone(), cancel.clone()));
    drop(exec_tx);
    // Owned by this future: if it is dropped (a crash, in tests), its beats stop too.
    let mut beats = JoinSet::new();
    // Beats go on, saying offline, until the shutdown below is over (`stopped`).
    let stopped = CancellationToken::new();
    beats.spawn(beat_loop(ctx.clone(), slots.clone(), cancel.clone(), stopped.clone()));
    beats.spawn(drain_loop(ctx.clone(), drains, slots.clone(), cancel.clone()));

    // Leases executing here: a claim granted again a lease this worker already runs (a
    // redelivery of its message) must not start a second execution.
    let mut running: HashSet<LeaseId> = HashSet::new();
    let start = |running: &mut HashSet<LeaseId>, tasks: &mut JoinSet<LeaseId>, (msg, task, grant, permit): Claimed| {
        if !running.insert(grant.lease_id.clone()) {
            tracing::debug!(task.id = %task.task_id, "dispatch delivered again while it runs here; ignored");
            return;
        }
        let lease = grant.lease_id.clone();
        let run = traced_execute(ctx.clone(), msg, task, grant, permit, hard.clone());
        tasks.spawn(async move {
            run.await;
            lease
        });
    };
    loop {
        tokio::select! {
            Some(claimed) = exec_rx.recv() => start(&mut running, &mut tasks, claimed),
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok(lease) = done {
                    running.remove(&lease);
                }
            }
            _ = cancel.cancelled() => break,
        }
    }
    // Stop pulling; claimed messages still in the channel are handed back like in-flight ones.
    while loops.join_next().await.is_some() {}
    while let Ok(claimed) = exec_rx.try_recv() {
        start(&mut running, &mut tasks, claimed);
    }
    tracing::info!(in_flight = tasks.len(), grace = ?ctx.settings.shutdown_grace, "shutting down: finishing the runs in flight");
    let drained =
        tokio::time::timeout(ctx.settings.shutdown_grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        hard.cancel();
        while tasks.join_next().await.is_some() {}
    }
    stopped.cancel();
    while beats.join_next().await.is_some() {}
    Ok(())
}

type Claimed = (Message, TaskMessage, LeaseGrant, Slot);

/// Pulls from one consumer (the worker's direct one; the pool is pulled by
/// [`bands::pool_loop`]) as many messages as slots are free, claims what arrives,
/// and hands granted tasks to the executor. Claims run beside the pull: messages that
/// arrive while one is decided go out in the next claim without waiting for it.
async fn pull_loop(
    ctx: Ctx,
    consumer: PullConsumer,
    slots: Slots,
    exec: tokio::sync::mpsc::UnboundedSender<Claimed>,
    cancel: CancellationToken,
) {
    let mut claims = JoinSet::new();
    pull(&ctx, &consumer, &slots, &exec, &mut claims, &cancel).await;
    // Granted tasks of claims still in flight reach the executor (or the hand-back).
    while claims.join_next().await.is_some() {}
}

async fn pull(
    ctx: &Ctx,
    consumer: &PullConsumer,
    slots: &Slots,
    exec: &tokio::sync::mpsc::UnboundedSender<Claimed>,
    claims: &mut JoinSet<()>,
    cancel: &CancellationToken,
) {
    loop {
        let free = tokio::select! {
            _ = cancel.cancelled() => return,
            n = slots.wait_free() => n.min(MAX_PULL),
        };
        let batch = consumer.batch().max_messages(free).expires(PULL_EXPIRES).messages().await;
        // A pull request dies with the server holding it (a consumer leader lost in a NATS
        // cluster): then neither messages nor its end arrive. It is given up a second
        // after it expired on the server, once nothing more can come.
        let lost_after = tokio::time::Instant::now() + PULL_EXPIRES + Duration::from_secs(1);
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "pull failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        let mut chunks = batch.ready_chunks(free);
        loop {
            // With enough claims in flight, messages wait and go out together in the next.
            while claims.len() >= MAX_CLAIMS_IN_FLIGHT {
                claims.join_next().await;
            }
            let chunk = tokio::select! {
                biased;
                _ = cancel.cancelled() => None,
                c = chunks.next() => c,
                _ = tokio::time::sleep_until(lost_after) => None,
            };
            let Some(chunk) = chunk else { break };
            let mut msgs = Vec::with_capacity(chunk.len());
            let mut taken = Vec::with_capacity(chunk.len());
            for msg in
                chunk.into_iter().filter_map(|m| m.map_err(|e| tracing::debug!(error = %e, "pull batch ended")).ok())
            {
                match slots.try_take() {
                    Some(slot) => {
                        taken.push(slot);
                        msgs.push(msg);
                    }
                    // The other loop filled the last slot meanwhile.
                    None => {
                        let _ = msg.ack_with(AckKind::Nak(None)).await;
                    }
                }
            }
            let (ctx, exec) = (ctx.clone(), exec.clone());
            claims.spawn(async move {
                // A message keeps its slot until it is granted or given up.
                claim(&ctx, msgs, |msg, task, grant| {
                    let slot = taken.pop().expect("one slot per claimed message");
                    let _ = exec.send((msg, task, grant, slot));
                })
                .await;
            });
        }
        if cancel.is_cancelled() {
            return;
        }
    }
}

/// Claims a batch of messages in one request and hands each granted one to `granted`
/// as soon as it is decided. Malformed messages and refused claims are terminated;
/// claims refused for want of a free slot in Postgres (results of this worker not yet
/// recorded) are sent again after a short back-off; those of a draining worker are
/// handed back at once, for another worker; if the reconcilers cannot decide,
/// or the worker stays full, the messages are nak'ed for later.
async fn claim(ctx: &Ctx, msgs: Vec<Message>, mut granted: impl FnMut(Message, TaskMessage, LeaseGrant)) {
    let mut pending = Vec::with_capacity(msgs.len());
    for msg in msgs {
        if msg.info().is_ok_and(|i| i.delivered > 1) {
            ctx.metrics.redeliveries_total.inc();
        }
        let task = if crate::protocol::carries_nul(&msg.payload) {
            Err(serde::de::Error::custom("a NUL character"))
        } else {
            serde_json::from_slice::<TaskMessage>(&msg.payload)
        };
        match task {
            Ok(task) => pending.push((msg, task)),
            Err(e) => {
                ctx.metrics.malformed_messages_total.inc();
                tracing::warn!(subject = %msg.subject, error = %e, "malformed task message terminated");
                let _ = msg.ack_with(AckKind::Term).await;
            }
        }
    }
    let mut backoff = FULL_BACKOFF;
    let give_up = FULL_GIVE_UP.min(Duration::from_secs(ctx.ttl_secs as u64) / 2);
    let mut waited = Duration::ZERO;
    while !pending.is_empty() {
        let req = ClaimRequest {
            worker_id: ctx.settings.id.clone(),
            ttl_seconds: ctx.ttl_secs,
            items: pending
                .iter()
                .map(|(_, t)| ClaimItem {
                    task_id: t.task_id.clone(),
                    dispatch_seq: t.dispatch_seq,
                    created_at: t.created_at,
                })
                .collect(),
        };
        let decisions = match claim_request(ctx, &req).await {
            Ok(ClaimReply::Decided { items, .. }) if items.len() == pending.len() => items,
            other => {
                tracing::warn!(reply = ?other, "claim undecided; messages will be redelivered");
                nak_all(pending, Duration::from_secs(1)).await;
                return;
            }
        };
        let mut full = Vec::new();
        let mut draining = Vec::new();
        for ((msg, task), decision) in pending.into_iter().zip(decisions) {
            match decision {
                ClaimDecision::Granted(grant) => granted(msg, task, grant),
                ClaimDecision::Full => full.push((msg, task)),
                ClaimDecision::Draining => draining.push((msg, task)),
                ClaimDecision::Refused => {
                    tracing::debug!(task.id = %task.task_id, seq = task.dispatch_seq, "claim refused: dispatch not current");
                    let _ = msg.ack_with(AckKind::Term).await;
                }
            }
        }
        if !draining.is_empty() {
            tracing::debug!(claims = draining.len(), "this worker is draining; messages handed back");
            nak_all(draining, Duration::ZERO).await;
        }
        if !full.is_empty() {
            ctx.metrics.claims_full_total.add(full.len() as u64);
            if waited >= give_up {
                tracing::warn!(claims = full.len(), "no free slot in Postgres for this worker; messages handed back");
                nak_all(full, Duration::from_secs(1)).await;
                return;
            }
            tokio::time::sleep(backoff).await;
            waited += backoff;
            backoff = (backoff * 2).min(FULL_BACKOFF_MAX);
        }
        pending = full;
    }
}

async fn nak_all(msgs: Vec<(Message, TaskMessage)>, delay: Duration) {
    for (msg, _) in msgs {
        let _ = msg.ack_with(AckKind::Nak(Some(delay))).await;
    }
}

/// Sends a claim (to the replica on the worker's [`ClaimRoute`], else to the queue
/// group), and sends it again when no reconciler answered within `claim_timeout` (one
/// that died holding it, or a lost reply): claiming is idempotent, a dispatch the worker
/// already holds is granted the same lease again. A replica that does not answer loses
/// the route and the claim goes through the group at once, without using an attempt; one
/// that answers it cannot decide loses the route for the next claim.
async fn claim_request(ctx: &Ctx, req: &ClaimRequest) -> anyhow::Result<ClaimReply> {
    let body = Bytes::from(serde_json::to_vec(req)?);
    let mut attempt = 1;
    let mut via_group = false;
    loop {
        let replica = if via_group { None } else { ctx.claim_route.target(Instant::now()) };
        let subject = match &replica {
            Some(id) => ctx.names.claim_replica_subject(id),
            None => ctx.names.claim_subject(),
        };
        let sent = ctx.client.request(subject, body.clone());
        let err = match tokio::time::timeout(ctx.settings.claim_timeout, sent).await {
            Ok(Ok(msg)) => {
                let reply: ClaimReply = serde_json::from_slice(&msg.payload)?;
                match &reply {
                    ClaimReply::Decided { replica: by, .. } => {
                        ctx.claim_route.answered_by(by.as_deref(), Instant::now())
                    }
                    // A replica that cannot decide (its Postgres connections failing) is
                    // left: the next claim goes through the group to another one.
                    ClaimReply::Unavailable { .. } => {
                        if let Some(id) = &replica {
                            ctx.claim_route.failed(id)
                        }
                    }
                }
                return Ok(reply);
            }
            Ok(Err(e)) => anyhow::Error::from(e),
            Err(elapsed) => anyhow::Error::from(elapsed),
        };
        if let Some(id) = replica {
            ctx.metrics.claims_retried_total.inc();
            tracing::debug!(error = %err, replica = %id, "claim unanswered by its replica; sending it to the group");
            ctx.claim_route.failed(&id);
            via_group = true;
            continue;
        }
        if attempt == CLAIM_ATTEMPTS {
            return Err(err.context(format!("no answer to the claim after {attempt} attempts")));
        }
        attempt += 1;
        ctx.metrics.claims_retried_total.inc();
        tracing::debug!(error = %err, attempt, "claim unanswered; sending it again");
        // No reconciler listening answers at once: give one time to (re)connect.
        if err.downcast_ref::<async_nats::RequestError>().is_some() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn request<Req: serde::Serialize, Rep: serde::de::DeserializeOwned>(
    ctx: &Ctx,
    subject: String,
    req: &Req,
) -> anyhow::Result<Rep> {
    let body = Bytes::from(serde_json::to_vec(req)?);
    let msg = tokio::time::timeout(ctx.settings.request_timeout, ctx.client.request(subject, body)).await??;
    Ok(serde_json::from_slice(&msg.payload)?)
}

/// [`execute`] in a span that continues the trace the task message carries.
fn traced_execute(
    ctx: Ctx,
    msg: Message,
    task: TaskMessage,
    grant: LeaseGrant,
    slot: Slot,
    hard: CancellationToken,
) -> impl std::future::Future<Output = ()> {
    use tracing::Instrument;
    let span = tracing::info_span!("execute task", task.id = %task.task_id, lease.id = %grant.lease_id, worker.id = %ctx.settings.id);
    crate::telemetry::extract(msg.headers.as_ref(), &span);
    execute(ctx, msg, task, grant, slot, hard).instrument(span)
}

/// Runs one granted task to its result.
async fn execute(ctx: Ctx, msg: Message, task: TaskMessage, grant: LeaseGrant, slot: Slot, hard: CancellationToken) {
    let _slot = slot;
    let lost = CancellationToken::new();
    let run_cancel = CancellationToken::new();
    let cancelled = ctx.running.register(&grant.lease_id);
    // Heartbeats run inside this future, so they stop with it whatever ends it.
    let outcome = tokio::select! {
        o = ctx.settings.executor.run(&task, &run_cancel) => o,
        _ = heartbeat_loop(&ctx, &msg, &task.task_id, &grant.lease_id, &lost) => { run_cancel.cancel(); None }
        _ = cancelled.token.cancelled() => { run_cancel.cancel(); None }
        _ = hard.cancelled() => { run_cancel.cancel(); None }
    };
    let Some(outcome) = outcome else {
        if cancelled.token.is_cancelled() {
            ctx.metrics.executions_cancelled_total.inc();
            tracing::info!(task.id = %task.task_id, "task cancelled; execution stopped");
            let _ = msg.ack_with(AckKind::Term).await;
        } else if lost.is_cancelled() {
            tracing::warn!(task.id = %task.task_id, "lease lost while running; result dropped");
            let _ = msg.ack_with(AckKind::Term).await;
        } else {
            hand_back(&ctx, &msg, &task, &grant.lease_id).await;
        }
        return;
    };
    ctx.metrics.executions_total.inc();
    if outcome.status == crate::domain::ResultStatus::Error {
        ctx.metrics.executions_failed_total.inc();
    }
    let result = ResultMessage {
        task_id: task.task_id.clone(),
        lease_id: grant.lease_id.clone(),
        worker_id: ctx.settings.id.clone(),
        outcome,
    };
    if !ctx.results.publish(msg, result).await {
        // Not acknowledged: the message is redelivered after the TTL and the lease expires.
        tracing::error!(task.id = %task.task_id, "result could not be published");
    }
}

/// Every TTL/3: an in-progress ack (JetStream's lease) and a lease heartbeat
/// (Postgres's lease). A heartbeat that got no answer, or was answered that the
/// database is unavailable, is retried after [`HEARTBEAT_RETRY`] rather than a whole
/// period, so that the lease is renewed as soon as the path is back. Returns (after
/// cancelling `lost`) only when a heartbeat is answered `Lost`; otherwise runs until
/// dropped.
async fn heartbeat_loop(
    ctx: &Ctx,
    msg: &Message,
    task_id: &crate::domain::TaskId,
    lease_id: &LeaseId,
    lost: &CancellationToken,
) {
    let period = Duration::from_millis((ctx.ttl_secs as u64 * 1000 / 3).max(200));
    let mut wait = period;
    loop {
        tokio::time::sleep(wait).await;
        let _ = msg.ack_with(AckKind::Progress).await;
        let req = HeartbeatRequest { task_id: task_id.clone(), lease_id: lease_id.clone() };
        wait = match request::<_, HeartbeatReply>(ctx, ctx.names.heartbeat_subject(), &req).await {
            Ok(HeartbeatReply::Lost) => {
                lost.cancel();
                return;
            }
            Ok(HeartbeatReply::Renewed { .. }) => period,
            Ok(HeartbeatReply::Unavailable { reason }) => {
                tracing::warn!(task.id = %task_id, %reason, "lease heartbeat not recorded; retrying");
                HEARTBEAT_RETRY.min(period)
            }
            Err(e) => {
                tracing::warn!(task.id = %task_id, error = %e, "lease heartbeat failed; retrying");
                HEARTBEAT_RETRY.min(period)
            }
        };
    }
}

/// How soon a heartbeat that failed is sent again.
const HEARTBEAT_RETRY: Duration = Duration::from_millis(200);

/// Tells the reconcilers this worker (re)started, before it claims anything: the leases
/// its id still holds belong to a process that died, and their tasks are requeued now
/// instead of after their TTL (they would also count against its `max_concurrency`).
/// Without an answer the worker starts anyway; those leases then expire as usual.
async fn announce_start(ctx: &Ctx, slots: &Slots) {
    // This process's name: a start request of it handled late (after an answer to the
    // same request sent again) ends nothing, nor the leases this process claims.
    let req = StartRequest {
        worker_id: ctx.settings.id.clone(),
        capabilities: Some(ctx.settings.capabilities.clone()),
        boot_id: Some(crate::domain::new_id()),
    };
    // Workers often start before the reconcilers: until one answers, Postgres does not
    // know this worker and would answer its claims `full`. Asked again for a while.
    let deadline = Instant::now() + START_ANSWER_PATIENCE;
    let mut answer = request::<_, StartReply>(ctx, ctx.names.start_subject(), &req).await;
    while answer.is_err() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        answer = request::<_, StartReply>(ctx, ctx.names.start_subject(), &req).await;
    }
    match answer {
        Ok(StartReply { ended, draining }) => {
            if ended > 0 {
                tracing::info!(ended, "leases of this worker's previous process ended");
            }
            if draining {
                tracing::info!("this worker is being drained: it takes no task until resumed");
                slots.set_paused(true);
            }
        }
        Err(e) => tracing::warn!(error = %e, "start not acknowledged by a reconciler; stale leases will expire"),
    }
}

/// Stops pulling while this worker is drained and pulls again once it is resumed, as the
/// drain notices naming it say; what runs meanwhile finishes.
async fn drain_loop(ctx: Ctx, mut notices: async_nats::Subscriber, slots: Slots, cancel: CancellationToken) {
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return,
            m = notices.next() => match m { Some(m) => m, None => return },
        };
        let Ok(notice) = serde_json::from_slice::<DrainNotice>(&msg.payload) else {
            ctx.metrics.malformed_messages_total.inc();
            continue;
        };
        if notice.worker_id != ctx.settings.id || notice.draining == slots.paused() {
            continue;
        }
        slots.set_paused(notice.draining);
        if notice.draining {
            tracing::info!(in_flight = slots.used(), "draining: no new task; those running finish");
        } else {
            tracing::info!("resumed: taking tasks again");
        }
    }
}

/// Releases the lease and naks the message so another worker gets the task at once.
async fn hand_back(ctx: &Ctx, msg: &Message, task: &TaskMessage, lease_id: &LeaseId) {
    let req = ReleaseRequest { task_id: task.task_id.clone(), lease_id: lease_id.clone() };
    match request::<_, ReleaseReply>(ctx, ctx.names.release_subject(), &req).await {
        Ok(ReleaseReply { released: true }) => {
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            tracing::info!(task.id = %task.task_id, "task handed back");
        }
        other => {
            // The lease stays; it expires and the sweeper requeues the task.
            tracing::warn!(task.id = %task.task_id, reply = ?other, "hand-back refused; the lease will expire");
        }
    }
}

/// Publishes a liveness beat every `beat_interval` until `stopped` fires. From `cancel`
/// (shutdown) on, the beats say offline, at once and then while the runs in flight
/// finish: the worker takes no new task, but the reconcilers still see it alive while
/// it holds leases, so a worker killed during its grace has them ended once it is silent
/// for the worker timeout, not after their TTL. A last beat goes out when `stopped`
/// fires.
async fn beat_loop(ctx: Ctx, slots: Slots, cancel: CancellationToken, stopped: CancellationToken) {
    let beat = |status| WorkerBeat {
        worker_id: ctx.settings.id.clone(),
        status,
        capabilities: ctx.settings.capabilities.clone(),
        ip_addrs: Vec::new(),
        in_flight: slots.used() as u32,
        draining: slots.paused(),
    };
    loop {
        let status = if cancel.is_cancelled() { WorkerStatus::Offline } else { WorkerStatus::Online };
        let body = serde_json::to_vec(&beat(status)).expect("beat serializes");
        ctx.metrics.in_flight.set(slots.used() as u64);
        if let Err(e) = ctx.client.publish(ctx.names.worker_beat_subject(), body.into()).await {
            tracing::warn!(error = %e, "worker beat failed");
        }
        if stopped.is_cancelled() {
            let _ = ctx.client.flush().await;
            return;
        }
        tokio::select! {
            _ = stopped.cancelled() => {}
            _ = cancel.cancelled(), if status == WorkerStatus::Online => {}
            _ = tokio::time::sleep(ctx.settings.beat_interval) => {}
        }
    }
}
