//! `bloom-reconciler`: the control plane that keeps Postgres authoritative.
//!
//! | duty | module | runs on |
//! |---|---|---|
//! | claims, lease heartbeats, hand-backs, worker beats | [`control`] | every replica (NATS queue group; claims also on the replica's own subject) |
//! | results → completed/failed tasks, artifacts | [`results`] | every replica (shared durable consumer) |
//! | outbox relay | [`relay`] | every replica (`FOR UPDATE SKIP LOCKED` batches) |
//! | delayed tasks due → dispatched; expired idempotency keys forgotten | [`due`] | every replica (`SKIP LOCKED`) |
//! | lease expiry, silent workers, rerouting | [`sweeper`] | every replica (`SKIP LOCKED` / guarded updates) |
//! | artifacts in Postgres (written behind, or left by an S3 failure) → S3 | [`artifact_moves`] | every replica (`SKIP LOCKED`), with S3 only |
//! | queued tasks → HTTP agents' `/execute-task` | [`agent_dispatch`] | every replica (worker row locks, `SKIP LOCKED`) |
//! | membridge agent sync | [`membridge_sync`] | the elected leader only ([`leader`]) |
//!
//! Every duty is a loop around a `run_once` that returns what it did, so tests drive
//! them directly.

pub mod agent_dispatch;
pub mod artifact_moves;
pub mod control;
pub mod due;
pub mod expiry_pause;
pub mod leader;
pub mod membridge_sync;
pub mod redispatch;
pub mod relay;
pub mod results;
pub mod slot_recheck;
pub mod sweeper;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::agent::AgentClient;
use crate::artifacts::ArtifactStore;
use crate::bus::provision::{self, StreamLayout};
use crate::bus::{Dispatcher, Names};
use crate::config::{DbArgs, MembridgeArgs, NatsArgs, ReconcilerArgs};
use crate::membridge;
use crate::metrics::Metrics;
use crate::time::Clock;

/// Settings of the reconciler's duties.
#[derive(Clone, Debug)]
pub struct ReconcilerSettings {
    /// Lease TTL (the consumers' ack-wait) and replicas to provision with.
    pub streams: StreamLayout,
    /// Extra time past `expires_at` before a lease is expired.
    pub expiry_grace: Duration,
    pub sweep_interval: Duration,
    /// How often artifacts kept in Postgres are moved to S3 (bounded batches, back to
    /// back while a backlog remains).
    pub artifact_move_interval: Duration,
    /// Outputs up to this size are stored in Postgres at completion and moved to S3
    /// after (0: every output is uploaded before its task completes).
    pub artifact_write_behind_max_bytes: usize,
    /// How often queued tasks are leased to HTTP agents with free slots and sent to them.
    pub agent_dispatch_interval: Duration,
    /// How long a newly submitted task is left to its client before it is leased to an
    /// HTTP agent (see `agent_dispatch`).
    pub agent_dispatch_client_window: Duration,
    /// The API's URL as HTTP agents reach it (their callbacks go there).
    pub runtime_url: String,
    /// The key HTTP agents require.
    pub agent_key: crate::domain::Secret,
    pub relay_interval: Duration,
    /// Outbox rows younger than this are left to the process that wrote them.
    pub relay_min_age: Duration,
    /// Unclaimed dispatches older than this are sent again (`None`: never).
    pub redispatch_after: Option<Duration>,
    /// How often delayed tasks are checked for being due.
    pub due_interval: Duration,
    /// Idempotency keys older than this are forgotten.
    pub idempotency_retention: Duration,
    /// A NATS worker silent this long is marked offline.
    pub worker_timeout: Duration,
    pub membridge_interval: Duration,
    /// Membridge workers absent from `/agents` and silent this long go offline (seed: 60 s).
    pub membridge_stale_after: Duration,
    pub membridge_default: membridge::Endpoint,
    /// Timeout of one membridge request.
    pub membridge_timeout: Duration,
    pub leader_poll: Duration,
    pub request_timeout: Duration,
    /// Client-side bound of one database call (longer than the statement timeout, so
    /// Postgres gives up first).
    pub db_timeout: Duration,
    /// A result message Postgres refuses on its own is redelivered after this delay times
    /// its delivery count (at most 30 s)…
    pub result_retry_delay: Duration,
    /// …and terminated on this delivery if Postgres still refuses it.
    pub result_max_deliveries: i64,
}

impl ReconcilerSettings {
    /// The settings a `bloom-reconciler` runs with, from its configuration: the clamps of
    /// every value are here, and only here.
    pub fn from_args(
        r: &ReconcilerArgs,
        nats: &NatsArgs,
        membridge: &MembridgeArgs,
        db: &DbArgs,
    ) -> ReconcilerSettings {
        ReconcilerSettings {
            streams: nats.streams(),
            expiry_grace: Duration::from_millis(r.expiry_grace_ms),
            sweep_interval: Duration::from_millis(r.sweep_interval_ms.max(10)),
            artifact_move_interval: Duration::from_millis(r.artifact_move_interval_ms.max(10)),
            artifact_write_behind_max_bytes: r.artifact_write_behind_max_bytes,
            agent_dispatch_interval: Duration::from_millis(r.agent_dispatch_interval_ms.max(10)),
            agent_dispatch_client_window: Duration::from_millis(r.agent_dispatch_client_window_ms),
            runtime_url: r.runtime_url(),
            agent_key: membridge.membridge_agent_key.clone(),
            relay_interval: Duration::from_millis(r.relay_interval_ms.max(10)),
            relay_min_age: Duration::from_millis(r.relay_min_age_ms),
            redispatch_after: (r.redispatch_after_ms > 0).then(|| Duration::from_millis(r.redispatch_after_ms)),
            worker_timeout: Duration::from_millis(r.worker_timeout_ms.max(1000)),
            membridge_interval: Duration::from_millis(r.membridge_sync_interval_ms.max(100)),
            membridge_default: membridge.endpoint(),
            membridge_timeout: membridge.timeout(),
            leader_poll: Duration::from_millis(r.leader_poll_ms.max(50)),
            request_timeout: nats.timeout(),
            db_timeout: db.call_timeout(),
            idempotency_retention: db.idempotency_retention(),
            ..ReconcilerSettings::default()
        }
    }
}

impl Default for ReconcilerSettings {
    fn default() -> Self {
        ReconcilerSettings {
            streams: StreamLayout {
                lease_ttl: Duration::from_secs(300),
                replicas: 1,
                task_max_age: Duration::from_secs(provision::DEFAULT_TASK_MAX_AGE_SECS),
            },
            expiry_grace: Duration::from_secs(2),
            sweep_interval: Duration::from_secs(1),
            artifact_move_interval: Duration::from_millis(250),
            artifact_write_behind_max_bytes: 1 << 20,
            agent_dispatch_interval: Duration::from_millis(500),
            agent_dispatch_client_window: Duration::from_secs(1),
            runtime_url: "http://127.0.0.1:3002".into(),
            agent_key: Default::default(),
            db_timeout: Duration::from_secs(35),
            result_retry_delay: Duration::from_secs(1),
            result_max_deliveries: 10,
            relay_interval: Duration::from_millis(500),
            relay_min_age: Duration::from_secs(2),
            redispatch_after: Some(Duration::from_secs(15)),
            due_interval: Duration::from_millis(250),
            idempotency_retention: Duration::from_secs(86_400),
            worker_timeout: Duration::from_secs(30),
            membridge_interval: Duration::from_secs(10),
            membridge_stale_after: Duration::from_secs(60),
            membridge_default: membridge::Endpoint {
                url: "http://127.0.0.1:8000".into(),
                admin_key: Default::default(),
            },
            membridge_timeout: Duration::from_secs(10),
            leader_poll: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// Everything the duties share.
#[derive(Clone)]
pub struct Reconciler {
    pub pool: PgPool,
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    pub names: Names,
    pub dispatcher: Dispatcher,
    pub artifacts: ArtifactStore,
    pub membridge: Arc<membridge::Client>,
    /// Calls HTTP agents.
    pub agents: AgentClient,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<ReconcilerSettings>,
    /// The time every duty and transition uses (the system clock; tests move their own).
    pub clock: Clock,
    /// When this replica last saw the heartbeat path broken; the sweeper waits a quiet
    /// window after it before expiring leases.
    pub expiry_pause: Arc<expiry_pause::ExpiryPause>,
    /// Wakes the due duty after completions that freed concurrency slots.
    pub due_kick: Arc<due::DueKick>,
    /// Rechecks the concurrency slots claims put tasks aside for, after their commit.
    pub slot_rechecks: Arc<slot_recheck::SlotRechecks>,
    /// This replica's id (new at each start): names its own claim subject.
    pub replica: String,
    /// True once the control subjects are subscribed on the server: from then on a
    /// claim sent to this replica is answered.
    serving: Arc<watch::Sender<bool>>,
}

impl Reconciler {
    /// Provisions NATS and builds the shared state.
    pub async fn new(
        pool: PgPool,
        client: async_nats::Client,
        names: Names,
        artifacts: ArtifactStore,
        metrics: Arc<Metrics>,
        settings: ReconcilerSettings,
        cancel: &CancellationToken,
    ) -> anyhow::Result<Reconciler> {
        let js = crate::bus::jetstream(client.clone(), settings.request_timeout);
        provision::apply_at_start(&js, &names, &settings.streams, provision::START_PATIENCE).await?;
        let dispatcher = Dispatcher::spawn(js.clone(), names.clone(), pool.clone(), metrics.clone(), cancel.clone());
        let membridge = Arc::new(membridge::Client::new(settings.membridge_timeout, pool.clone()));
        let agents = AgentClient::new(settings.agent_key.clone());
        Ok(Reconciler {
            pool,
            client,
            js,
            names,
            dispatcher,
            artifacts,
            membridge,
            agents,
            metrics,
            settings: Arc::new(settings),
            clock: Clock::system(),
            replica: crate::domain::new_id(),
            serving: Arc::new(watch::Sender::new(false)),
            expiry_pause: Arc::default(),
            due_kick: Arc::default(),
            slot_rechecks: Arc::default(),
        })
    }

    /// Whether the control subjects are subscribed (part of `/readyz`).
    pub fn is_serving(&self) -> bool {
        *self.serving.borrow()
    }

    /// Waits until the control subjects are subscribed.
    pub async fn serving(&self) {
        let mut rx = self.serving.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Runs every duty until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let mut duties = JoinSet::new();
        duties.spawn(control::run(self.clone(), cancel.clone()));
        duties.spawn(results::run(self.clone(), cancel.clone()));
        duties.spawn(relay::run(self.clone(), cancel.clone()));
        duties.spawn(redispatch::run(self.clone(), cancel.clone()));
        duties.spawn(due::run(self.clone(), cancel.clone()));
        duties.spawn(sweeper::run(self.clone(), cancel.clone()));
        duties.spawn(artifact_moves::run(self.clone(), cancel.clone()));
        duties.spawn(agent_dispatch::run(self.clone(), cancel.clone()));
        duties.spawn(leader::run_as_leader(self.clone(), cancel.clone()));
        let (pool, c) = (self.pool.clone(), cancel.clone());
        duties.spawn(async move {
            crate::db::sessions::run(pool, crate::db::sessions::EVERY, c).await;
            Ok(())
        });
        while let Some(done) = duties.join_next().await {
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    cancel.cancel();
                    return Err(e);
                }
                Err(e) => {
                    cancel.cancel();
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }
}

/// The reconciler's own HTTP endpoints: `/healthz`, `/readyz`, `/metrics`, `/status`.
pub fn router(r: Reconciler) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route(
            "/metrics",
            get(|State(r): State<Reconciler>| async move {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], r.metrics.render())
            }),
        )
        .route("/status", get(status))
        .with_state(r)
}

async fn ready(State(r): State<Reconciler>) -> impl IntoResponse {
    let db = crate::db::ping(&r.pool).await;
    let nats = r.client.connection_state() == async_nats::connection::State::Connected;
    let serving = r.is_serving();
    let code = if db && nats && serving { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(serde_json::json!({ "database": db, "nats": nats, "serving": serving })))
}

/// What the duties have done, for operators.
async fn status(State(r): State<Reconciler>) -> Json<serde_json::Value> {
    let m = &r.metrics;
    let client = r.membridge.state().await.unwrap_or_default();
    let sync = crate::db::settings::membridge_sync(&r.pool).await.unwrap_or_default();
    Json(serde_json::json!({
        "leader": m.is_leader.get() == 1,
        "leader_changes": m.leader_changes_total.get(),
        "claims": { "granted": m.claims_granted_total.get(), "refused": m.claims_refused_total.get() },
        "heartbeats": { "renewed": m.heartbeats_total.get(), "lost": m.heartbeats_lost_total.get() },
        "results": { "completed": m.results_completed_total.get(), "late": m.results_late_total.get(),
                     "rejected": m.results_rejected_total.get() },
        "leases_expired": m.leases_expired_total.get(),
        "tasks_requeued": m.tasks_requeued_total.get(),
        "tasks_dead": m.tasks_dead_total.get(),
        "tasks_rerouted": m.tasks_rerouted_total.get(),
        "workers_marked_offline": m.workers_marked_offline_total.get(),
        "outbox": { "relayed": m.outbox_rows_relayed.get(), "backlog": m.outbox_backlog.get() },
        "membridge_sync": { "runs": m.membridge_sync_runs_total.get(), "errors": m.membridge_sync_errors_total.get(),
                            "client": client, "last": sync },
        "s3_fallbacks": m.s3_fallbacks_total.get(),
        "artifacts": { "moved_to_s3": m.artifacts_moved_total.get(), "move_failures": m.artifact_moves_failed_total.get(),
                       "inline_backlog": m.artifacts_inline_backlog.get() },
    }))
}
