//! The task and lease state machine: every transition, for every path (REST, NATS,
//! sweeper, relay), is one function here.
//!
//! Invariants:
//! * each call is one transaction; a transition only happens when the row is still in
//!   the expected state (`UPDATE ... WHERE status = ... AND lease_id = ...`), so no race
//!   can lease a task twice or lose a completion;
//! * each transition writes its audit entries in the same transaction;
//! * every (re)queue writes an outbox row in the same transaction, so a queued task is
//!   always either on the bus or in the outbox;
//! * batch functions take many requests and commit once, in one statement: that is what
//!   lets the runtime go beyond one durable commit per task;
//! * hot statements find rows by primary key and compare the status as `status || ''`:
//!   the status indexes churn under load (every transition adds entries that only vacuum
//!   removes), and a plan that scans them instead of the primary key slows down as the
//!   table grows;
//! * batch statements also name their rows as `id = ANY($ids)`: the planner then sees
//!   how many rows the batch touches and looks them up by key, where a join against
//!   the batch's JSON rows (which it assumes to be 100) would scan the whole table.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

use super::outbox::{self, Dispatch};
use super::{audit, tasks, workers};
use crate::domain::{
    new_id, pick_worker, Artifact, ArtifactId, AuditAction, Lease, LeaseId, LeaseStatus, LlmResult, Metrics, NewAudit,
    NewTask, ResultId, ResultStatus, Task, TaskId, TaskStatus, Worker, WorkerId,
};
use crate::time::now_ms;

/// Batch creation: `$1` rows as JSON, `$2` now, `$3` actor, `$4` the rows' context ids.
const CREATE_SQL: &str = "WITH r AS (
            SELECT * FROM jsonb_to_recordset($1) AS r(id text, context_id text, agent_slug text, prompt text,
                context_hints jsonb, policy jsonb, desired_format text, max_attempts int, audit_id text, audit text)),
         recent AS (
            SELECT c.context_id, l.worker_id
            FROM (SELECT DISTINCT unnest($4::text[]) AS context_id) c
            CROSS JOIN LATERAL (
                SELECT worker_id FROM leases
                WHERE status = 'active' AND context_id = c.context_id
                ORDER BY started_at DESC LIMIT 1) l),
         sticky AS (
            SELECT recent.context_id, recent.worker_id
            FROM recent CROSS JOIN LATERAL (
                -- LIMIT keeps this a lookup by key per context (no join order that walks
                -- every worker), whatever the statistics of `workers` say.
                SELECT 1 FROM workers w
                WHERE w.id = recent.worker_id AND (w.status || '') = 'online' AND w.source = 'nats'
                  AND COALESCE((w.capabilities->>'claude_cli')::boolean, true)
                  AND w.active_leases < COALESCE((w.capabilities->>'max_concurrency')::int, 1)
                LIMIT 1) w),
         t AS (
            INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
                                   created_at, updated_at, attempts, max_attempts, dispatch_seq, routed_to)
            SELECT r.id, r.context_id, r.agent_slug, r.prompt, r.context_hints, r.policy, r.desired_format, 'queued',
                   $2, $2, 0, r.max_attempts, 1, s.worker_id
            FROM r LEFT JOIN sticky s ON s.context_id = r.context_id
            RETURNING id, routed_to),
         o AS (
            INSERT INTO outbox (task_id, dispatch_seq, worker_id, created_at)
            SELECT id, 1, routed_to, $2 FROM t RETURNING id, task_id, worker_id),
         a AS (
            INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
            SELECT r.audit_id, $2, 'task_created', 'llm_task', r.id, $3, r.audit FROM r)
         SELECT task_id, id, worker_id FROM o";

/// Batch claim: `$1` rows as JSON, `$2` now, `$3` the claimed task ids, `$4` the
/// claiming worker ids. Returns one row
/// per decided claim: `granted` (a new lease), `held` (the worker already holds this
/// dispatch: a retried claim gets the same lease) or `full` (the dispatch is current but
/// the worker has no free slot in Postgres, or no row).
///
/// The claiming workers' rows are locked in id order and their free slots
/// (`max_concurrency - active_leases`, kept by triggers) read after the lock, so
/// concurrent claims never take a worker beyond its capacity; a worker's current claims
/// take its free slots in task id order.
const CLAIM_SQL: &str = "WITH r AS (
            SELECT * FROM jsonb_to_recordset($1)
                AS r(task_id text, seq bigint, worker_id text, lease_id text, ttl int, audit_id text)),
         room AS MATERIALIZED (
            SELECT w.id, COALESCE((w.capabilities->>'max_concurrency')::int, 1) - w.active_leases AS free
            FROM workers w WHERE w.id = ANY($4) ORDER BY w.id FOR UPDATE),
         fresh AS (
            SELECT r.*, row_number() OVER (PARTITION BY r.worker_id ORDER BY r.task_id) AS pos
            FROM r JOIN llm_tasks t ON t.id = ANY($3) AND t.id = r.task_id AND (t.status || '') = 'queued'
                AND t.dispatch_seq = r.seq),
         t AS (
            UPDATE llm_tasks t SET status = 'leased', lease_id = r.lease_id, worker_id = r.worker_id,
                   attempts = t.attempts + 1, updated_at = $2, routed_to = NULL
            FROM fresh r JOIN room ON room.id = r.worker_id AND r.pos <= room.free
            WHERE t.id = ANY($3) AND t.id = r.task_id AND (t.status || '') = 'queued' AND t.dispatch_seq = r.seq
            RETURNING t.id, t.context_id, r.lease_id, r.worker_id, r.ttl, r.audit_id),
         l AS (
            INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
                                context_id)
            SELECT lease_id, id, worker_id, $2, $2 + ttl::bigint * 1000, ttl, 'active', $2, context_id FROM t),
         a AS (
            INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
            SELECT audit_id, $2, 'task_leased', 'lease', lease_id, 'router',
                   'Task ' || id || ' leased to worker ' || worker_id || ', TTL ' || ttl || 's' FROM t),
         held AS (
            SELECT DISTINCT ON (r.task_id, r.worker_id) r.task_id, r.worker_id, l.id AS lease_id, l.started_at,
                   l.expires_at, l.ttl_seconds, l.last_heartbeat, l.context_id
            FROM r JOIN llm_tasks t ON t.id = ANY($3) AND t.id = r.task_id
                AND (t.status || '') IN ('leased', 'running') AND t.dispatch_seq = r.seq AND t.worker_id = r.worker_id
            JOIN leases l ON l.id = t.lease_id AND (l.status || '') = 'active'),
         full_ AS (
            SELECT r.task_id, r.worker_id FROM fresh r LEFT JOIN room ON room.id = r.worker_id
            WHERE room.id IS NULL OR r.pos > room.free)
         SELECT 'granted' AS decision, id AS task_id, worker_id, lease_id AS id, $2 AS started_at,
                $2 + ttl::bigint * 1000 AS expires_at, ttl AS ttl_seconds, $2 AS last_heartbeat, context_id
         FROM t
         UNION ALL
         SELECT 'held', task_id, worker_id, lease_id, started_at, expires_at, ttl_seconds, last_heartbeat, context_id
         FROM held
         UNION ALL
         SELECT 'full', task_id, worker_id, NULL, NULL, NULL, NULL, NULL, NULL FROM full_";

/// Batch lease heartbeat: `$1` task ids, `$2` lease ids, `$3` now.
const HEARTBEAT_SQL: &str = "WITH r AS (SELECT * FROM UNNEST($1::text[], $2::text[]) AS r(task_id, lease_id)),
         t AS (
            UPDATE llm_tasks t SET status = 'running', updated_at = $3
            FROM r WHERE t.id = r.task_id AND t.lease_id = r.lease_id AND (t.status || '') IN ('leased', 'running')
            RETURNING t.lease_id)
         UPDATE leases l SET last_heartbeat = $3, expires_at = $3 + l.ttl_seconds::bigint * 1000
         FROM t WHERE l.id = t.lease_id AND (l.status || '') = 'active'
         RETURNING l.*";

/// Batch completion: `$1` rows as JSON, `$2` now, `$3` the completed task ids.
const COMPLETE_SQL: &str = "WITH r AS (
            SELECT * FROM jsonb_to_recordset($1) AS r(task_id text, lease_id text, final_status text, status text,
                output text, error_message text, metrics jsonb, artifact_id text, artifact_type text, tags jsonb,
                url text, inline boolean, result_id text, audit_id text, done text, late text)),
         t AS (
            UPDATE llm_tasks t SET status = r.final_status, updated_at = $2, lease_id = r.lease_id,
                   worker_id = COALESCE(t.worker_id, (SELECT l.worker_id FROM leases l WHERE l.id = r.lease_id)),
                   routed_to = NULL
            FROM r WHERE t.id = ANY($3) AND t.id = r.task_id AND (
                (t.lease_id = r.lease_id AND (t.status || '') IN ('leased', 'running'))
                -- The lease expired and the task was requeued, but nobody leased it again:
                -- the result of the work done is still the task's only one.
                OR ((t.status || '') = 'queued' AND EXISTS (
                    SELECT 1 FROM leases l WHERE l.id = r.lease_id AND l.task_id = t.id AND (l.status || '') = 'expired')))
            RETURNING t.*),
         w AS (SELECT r.*, COALESCE(t.worker_id, 'unknown') AS worker
               FROM r JOIN t ON t.id = r.task_id AND t.lease_id = r.lease_id),
         l AS (
            UPDATE leases SET status = 'released'
            FROM w WHERE leases.id = w.lease_id AND (leases.status || '') = 'active'),
         art AS (
            INSERT INTO runtime_artifacts (id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags,
                                           content)
            SELECT artifact_id, task_id, NULL, artifact_type, $2, true, url, '[]'::jsonb, tags,
                   CASE WHEN inline THEN output END FROM w),
         res AS (
            INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message, metrics,
                                     completed_at)
            SELECT result_id, task_id, worker, artifact_id, status, output, error_message, metrics, $2 FROM w),
         a AS (
            INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
            SELECT audit_id, $2, 'task_completed', 'llm_task', task_id, worker, done FROM w
            UNION ALL
            SELECT audit_id, $2, 'result_late', 'llm_task', task_id, 'reconciler', late
            FROM r WHERE NOT EXISTS (SELECT 1 FROM w WHERE w.task_id = r.task_id AND w.lease_id = r.lease_id))
         SELECT * FROM t";

/// The batch statements of the dispatch path, by name: they must find their rows by key
/// whatever the size of the tables when Postgres planned them (see `db::connect`).
pub const HOT_STATEMENTS: [(&str, &str); 4] =
    [("create", CREATE_SQL), ("claim", CLAIM_SQL), ("heartbeat", HEARTBEAT_SQL), ("complete", COMPLETE_SQL)];

/// Why a single-task transition was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    /// No such task (or, for heartbeats, no lease on it).
    #[error("{0}")]
    NotFound(String),
    /// The task or lease is not in the state the transition expects.
    #[error("{0}")]
    Conflict(String),
    /// No worker can take the lease.
    #[error("No available worker with free capacity")]
    NoWorker,
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

fn task_not_found() -> TransitionError {
    TransitionError::NotFound("Task not found".into())
}

/// Creates tasks, their outbox rows and audit entries in one transaction. A task whose
/// context has an active lease on an online NATS worker with free capacity is routed to
/// that worker (sticky); the others go to the shared pool.
pub async fn create<'c>(db: impl PgExecutor<'c>, new: Vec<NewTask>, actor: &str) -> sqlx::Result<Vec<Dispatch>> {
    let now = now_ms();
    let mut created: Vec<Task> = new
        .into_iter()
        .map(|n| Task {
            id: TaskId::generate(),
            routed_to: None,
            context_id: n.context_id,
            agent_slug: n.agent_slug,
            prompt: n.prompt,
            context_hints: n.context_hints,
            policy: n.policy,
            desired_format: n.desired_format,
            status: TaskStatus::Queued,
            created_at: now,
            updated_at: now,
            lease_id: None,
            worker_id: None,
            attempts: 0,
            max_attempts: n.max_attempts,
            dispatch_seq: 1,
        })
        .collect();
    let rows: Vec<serde_json::Value> = created
        .iter()
        .map(|t| {
            serde_json::json!({
                "id": t.id, "context_id": t.context_id, "agent_slug": t.agent_slug, "prompt": t.prompt,
                "context_hints": t.context_hints, "policy": t.policy, "desired_format": t.desired_format,
                "max_attempts": t.max_attempts, "audit_id": new_id(),
                "audit": format!("Task for agent {}, context {}", t.agent_slug, t.context_id),
            })
        })
        .collect();
    // One statement, so one round trip and one commit for the whole batch.
    let written: Vec<(TaskId, i64, Option<WorkerId>)> = sqlx::query_as(CREATE_SQL)
        .bind(serde_json::Value::Array(rows))
        .bind(now)
        .bind(actor)
        .bind(created.iter().map(|t| t.context_id.as_str()).collect::<Vec<_>>())
        .fetch_all(db)
        .await?;
    let mut by_task: HashMap<TaskId, (i64, Option<WorkerId>)> =
        written.into_iter().map(|(task, outbox, routed)| (task, (outbox, routed))).collect();
    Ok(created
        .drain(..)
        .filter_map(|mut task| {
            let (outbox_id, routed) = by_task.remove(&task.id)?;
            task.routed_to = routed;
            Some(Dispatch { outbox_id, task, trace: Vec::new() })
        })
        .collect())
}

/// A REST lease request.
#[derive(Clone, Debug)]
pub struct LeaseRequest {
    /// Lease to this worker, if it is eligible (online, Claude CLI, a free slot).
    pub worker_id: Option<WorkerId>,
    pub ttl_seconds: i32,
}

/// Leases a queued task to a worker chosen as the seed's `pickWorker` does (or the
/// explicitly named one). The chosen worker's row is locked and its free slots read
/// after the lock, so concurrent leases cannot overfill it; the task is then updated
/// only if still `queued`, so of two concurrent leases exactly one wins and the other
/// gets a conflict.
pub async fn lease(pool: &PgPool, task_id: &TaskId, req: &LeaseRequest) -> Result<(Lease, Worker), TransitionError> {
    let mut tx = pool.begin().await?;
    // Rows are locked worker first, then task, as claims lock them: the task is read
    // here and its `queued` status checked again by the guarded update below.
    let task: Task = tasks::get(&mut *tx, task_id).await?.ok_or_else(task_not_found)?;
    if task.status != TaskStatus::Queued {
        return Err(conflict_on(task.status));
    }
    let worker = match &req.worker_id {
        // A named worker must be able to take the lease like a chosen one: online, with
        // the Claude CLI and a free slot (the original leased to it regardless).
        Some(id) => {
            workers::get_for_update(&mut tx, id).await?.filter(Worker::is_eligible).ok_or(TransitionError::NoWorker)?
        }
        None => choose_worker(&mut tx, &task).await?,
    };
    let now = now_ms();
    let lease = new_lease(&task, &worker.id, req.ttl_seconds, now);
    // Of two concurrent leases of the task, the one that updates it first wins.
    let won = sqlx::query(
        "UPDATE llm_tasks SET status = 'leased', lease_id = $2, worker_id = $3, attempts = attempts + 1,
                updated_at = $4
         WHERE id = $1 AND status = 'queued'",
    )
    .bind(&task.id)
    .bind(&lease.id)
    .bind(&worker.id)
    .bind(now)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if !won {
        // A statement of its own sees what the winner committed.
        let now_status = tasks::get(&mut *tx, task_id).await?.ok_or_else(task_not_found)?.status;
        return Err(conflict_on(now_status));
    }
    insert_leases(&mut tx, std::slice::from_ref(&lease)).await?;
    let detail = format!("Task {} leased to worker {}, TTL {}s", task.id, worker.id, req.ttl_seconds);
    audit::insert(
        &mut *tx,
        &[NewAudit::new(AuditAction::TaskLeased, "lease", lease.id.as_str(), "router", detail)],
        now,
    )
    .await?;
    tx.commit().await?;
    // The worker as it was chosen (its active leases before this one), as the original
    // answered.
    Ok((lease, worker))
}

fn conflict_on(status: TaskStatus) -> TransitionError {
    TransitionError::Conflict(format!("Task status is '{status}', expected 'queued'"))
}

/// Picks a worker as the seed's `pickWorker` does and locks its row. A worker that
/// filled up between the read and the lock (concurrent leases) is passed over, its lock
/// given back (so no two worker locks are ever held out of id order), and the choice
/// made again among the others.
async fn choose_worker(tx: &mut sqlx::PgConnection, task: &Task) -> Result<Worker, TransitionError> {
    const CHOICES: usize = 4;
    let sticky: Option<WorkerId> = sqlx::query_scalar(
        "SELECT worker_id FROM leases WHERE status = 'active' AND context_id = $1
         ORDER BY started_at DESC LIMIT 1",
    )
    .bind(&task.context_id)
    .fetch_optional(&mut *tx)
    .await?;
    let mut full: Vec<WorkerId> = Vec::new();
    for _ in 0..CHOICES {
        let mut candidates = workers::candidates(&mut *tx).await?;
        candidates.retain(|w| !full.contains(&w.id));
        let chosen = pick_worker(&candidates, sticky.as_ref()).ok_or(TransitionError::NoWorker)?.id.clone();
        // A savepoint: rolling back to it releases the lock of a worker passed over.
        let mut attempt = sqlx::Connection::begin(&mut *tx).await?;
        match workers::get_for_update(&mut attempt, &chosen).await? {
            Some(locked) if locked.is_eligible() => {
                attempt.commit().await?;
                return Ok(locked);
            }
            _ => {
                attempt.rollback().await?;
                full.push(chosen);
            }
        }
    }
    Err(TransitionError::NoWorker)
}

fn new_lease(task: &Task, worker: &WorkerId, ttl_seconds: i32, now: i64) -> Lease {
    Lease {
        id: LeaseId::generate(),
        task_id: task.id.clone(),
        worker_id: worker.clone(),
        started_at: now,
        expires_at: now + i64::from(ttl_seconds) * 1000,
        ttl_seconds,
        status: LeaseStatus::Active,
        last_heartbeat: now,
        context_id: Some(task.context_id.clone()),
    }
}

async fn insert_leases(db: &mut sqlx::PgConnection, leases: &[Lease]) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
                             context_id)
         SELECT r.id, r.task_id, r.worker_id, r.started_at, r.expires_at, r.ttl_seconds, 'active',
                r.last_heartbeat, r.context_id
         FROM jsonb_to_recordset($1) AS r(id text, task_id text, worker_id text, started_at bigint,
              expires_at bigint, ttl_seconds int, last_heartbeat bigint, context_id text)",
    )
    .bind(sqlx::types::Json(leases))
    .execute(db)
    .await?;
    Ok(())
}

/// A NATS worker's claim of one dispatch of a task.
#[derive(Clone, Debug, Serialize)]
pub struct Claim {
    pub task_id: TaskId,
    pub dispatch_seq: i64,
    pub worker_id: WorkerId,
    pub ttl_seconds: i32,
}

/// The answer to a claim.
#[derive(Clone, Debug, PartialEq)]
pub enum ClaimOutcome {
    /// The worker holds this lease: execute. A claim the worker made before (its reply
    /// was lost, or it asked again) is granted the lease it already holds.
    Granted(Lease),
    /// The dispatch is current but the worker has no free slot in Postgres (the leases
    /// it finished are not all recorded yet, or it claimed beyond its capacity), or is
    /// not registered yet: claim again later.
    Full,
    /// The dispatch is not current (task already leased, completed, requeued, or gone):
    /// drop the message without executing.
    Refused,
}

/// One decided claim, as [`CLAIM_SQL`] returns it: `granted`, `held` or `full`, and the
/// lease unless `full`.
#[derive(Clone, sqlx::FromRow)]
struct Decision {
    decision: String,
    task_id: TaskId,
    worker_id: WorkerId,
    id: Option<LeaseId>,
    started_at: Option<i64>,
    expires_at: Option<i64>,
    ttl_seconds: Option<i32>,
    last_heartbeat: Option<i64>,
    context_id: Option<String>,
}

impl Decision {
    fn into_lease(self) -> Option<Lease> {
        Some(Lease {
            id: self.id?,
            task_id: self.task_id,
            worker_id: self.worker_id,
            started_at: self.started_at?,
            expires_at: self.expires_at?,
            ttl_seconds: self.ttl_seconds?,
            status: LeaseStatus::Active,
            last_heartbeat: self.last_heartbeat?,
            context_id: self.context_id,
        })
    }
}

/// Claims dispatches in one statement: `queued -> leased` for each task whose current
/// dispatch is the claimed one, while the worker has a free slot in Postgres. Claiming
/// again what the worker already holds returns the same lease, so a worker may safely
/// retry a claim that got no answer. Outcomes are in the order of `claims`.
pub async fn claim<'c>(db: impl PgExecutor<'c>, claims: &[Claim]) -> sqlx::Result<Vec<ClaimOutcome>> {
    let now = now_ms();
    // Every claim gets its own prospective lease id. When several claims in the batch
    // match the same task, Postgres applies exactly one of them and returns its lease id.
    let lease_ids: Vec<LeaseId> = claims.iter().map(|_| LeaseId::generate()).collect();
    let rows: Vec<serde_json::Value> = claims
        .iter()
        .zip(&lease_ids)
        .map(|(c, l)| {
            serde_json::json!({"task_id": c.task_id, "seq": c.dispatch_seq, "worker_id": c.worker_id, "lease_id": l,
                               "ttl": c.ttl_seconds, "audit_id": new_id()})
        })
        .collect();
    let decided: Vec<Decision> = sqlx::query_as(CLAIM_SQL)
        .bind(serde_json::Value::Array(rows))
        .bind(now)
        .bind(claims.iter().map(|c| c.task_id.as_str()).collect::<Vec<_>>())
        .bind(claims.iter().map(|c| c.worker_id.as_str()).collect::<HashSet<_>>().into_iter().collect::<Vec<_>>())
        .fetch_all(db)
        .await?;
    let mut granted: HashMap<LeaseId, Lease> = HashMap::new();
    let mut held: HashMap<(TaskId, WorkerId), Lease> = HashMap::new();
    let mut full: HashSet<(TaskId, WorkerId)> = HashSet::new();
    for d in decided {
        match d.decision.as_str() {
            "held" => {
                let key = (d.task_id.clone(), d.worker_id.clone());
                held.extend(d.into_lease().map(|l| (key, l)));
            }
            "granted" => granted.extend(d.into_lease().map(|l| (l.id.clone(), l))),
            _ => {
                full.insert((d.task_id, d.worker_id));
            }
        }
    }
    Ok(claims
        .iter()
        .zip(lease_ids)
        .map(|(c, id)| {
            let key = (c.task_id.clone(), c.worker_id.clone());
            match granted.remove(&id) {
                Some(lease) => ClaimOutcome::Granted(lease),
                None => match held.get(&key) {
                    Some(lease) => ClaimOutcome::Granted(lease.clone()),
                    None if full.contains(&key) => ClaimOutcome::Full,
                    None => ClaimOutcome::Refused,
                },
            }
        })
        .collect())
}

/// Renews active leases (`expires_at = now + ttl`) and moves their tasks to `running`,
/// in one transaction. A lease is renewed only while it is active and still the
/// current lease of its task. Returns the renewed leases.
pub async fn heartbeat<'c>(db: impl PgExecutor<'c>, beats: &[(TaskId, LeaseId)]) -> sqlx::Result<Vec<Lease>> {
    let now = now_ms();
    let tasks: Vec<&TaskId> = beats.iter().map(|(t, _)| t).collect();
    let leases: Vec<&LeaseId> = beats.iter().map(|(_, l)| l).collect();
    sqlx::query_as(HEARTBEAT_SQL).bind(tasks).bind(leases).bind(now).fetch_all(db).await
}

/// Hands a lease back without a result (a worker shutting down): the lease is
/// released and the task returns to `queued` with the same dispatch, so the message the
/// worker naks can be claimed by another worker at once. The attempt stays counted.
pub async fn release(pool: &PgPool, task_id: &TaskId, lease_id: &LeaseId) -> sqlx::Result<bool> {
    let now = now_ms();
    let mut tx = pool.begin().await?;
    let released = sqlx::query(
        "UPDATE llm_tasks SET status = 'queued', lease_id = NULL, worker_id = NULL, updated_at = $3
         WHERE id = $1 AND lease_id = $2 AND status IN ('leased', 'running')",
    )
    .bind(task_id)
    .bind(lease_id)
    .bind(now)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if released {
        sqlx::query("UPDATE leases SET status = 'released' WHERE id = $1 AND status = 'active'")
            .bind(lease_id)
            .execute(&mut *tx)
            .await?;
        let detail = format!("Lease {lease_id} handed back by a stopping worker");
        audit::insert(
            &mut *tx,
            &[NewAudit::new(AuditAction::TaskRequeued, "llm_task", task_id.as_str(), "worker", detail)],
            now,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(released)
}

/// Where an artifact's content went.
#[derive(Clone, Debug, PartialEq)]
pub enum ArtifactBody {
    /// Uploaded to S3: the object's URL.
    S3 { url: String },
    /// Kept in Postgres: the artifact's content is the result's output (written once to
    /// the statement, not twice).
    Inline,
}

/// A result reported for one lease.
#[derive(Clone, Debug)]
pub struct Completion {
    pub task_id: TaskId,
    pub lease_id: LeaseId,
    pub status: ResultStatus,
    pub output: Option<String>,
    pub error_message: Option<String>,
    pub metrics: Metrics,
    pub artifact_type: String,
    pub artifact_tags: Vec<String>,
    /// Id of the artifact to create: deterministic per lease so a redelivered result
    /// maps onto the same artifact.
    pub artifact_id: ArtifactId,
    pub artifact: ArtifactBody,
}

/// One row of [`COMPLETE_SQL`]'s `$1`; field names are its column names.
#[derive(Serialize)]
struct CompleteRow<'a> {
    task_id: &'a TaskId,
    lease_id: &'a LeaseId,
    final_status: TaskStatus,
    status: ResultStatus,
    output: Option<&'a str>,
    error_message: Option<&'a str>,
    metrics: &'a Metrics,
    artifact_id: &'a ArtifactId,
    artifact_type: &'a str,
    tags: &'a [String],
    url: Option<&'a String>,
    inline: bool,
    result_id: &'a ResultId,
    audit_id: String,
    done: String,
    late: String,
}

/// The answer to a completion.
#[derive(Clone, Debug, PartialEq)]
pub enum CompletionOutcome {
    /// The result was for the current lease: the task is final, and the result and
    /// artifact rows were written (see [`Completion::into_records`]).
    Completed { task: Task, result_id: ResultId, completed_at: i64 },
    /// The lease is no longer current (expired, requeued, already completed): the result
    /// was recorded as late in the audit log and changed nothing.
    Late,
}

impl Completion {
    /// The artifact and result rows a completion of `task` wrote, built from the
    /// completion itself: its output moves into the result (and is copied once into the
    /// artifact when that keeps its content inline).
    pub fn into_records(self, task: &Task, result_id: ResultId, completed_at: i64) -> (Artifact, LlmResult) {
        let (url, content) = match self.artifact {
            ArtifactBody::S3 { url } => (Some(url), None),
            ArtifactBody::Inline => (None, self.output.clone()),
        };
        let artifact = Artifact {
            id: self.artifact_id,
            task_id: task.id.clone(),
            job_id: None,
            kind: self.artifact_type,
            created_at: completed_at,
            finalized: true,
            url,
            entity_refs: Vec::new(),
            tags: self.artifact_tags,
            content,
        };
        let result = LlmResult {
            id: result_id,
            task_id: task.id.clone(),
            worker_id: task.worker_id.clone().unwrap_or_else(|| WorkerId::from("unknown")),
            artifact_id: artifact.id.clone(),
            status: self.status,
            output: self.output,
            error_message: self.error_message,
            metrics: self.metrics,
            completed_at,
        };
        (artifact, result)
    }
}

/// Completes tasks in one transaction: for each completion whose lease is still the
/// task's current lease, the task becomes `completed` (success) or `failed` (error),
/// the lease is released, and an artifact, a result and an audit entry are written.
/// A result of an expired lease whose task was requeued but not leased again also
/// completes it (the requeued dispatch is then refused at claim); a result of a lease
/// that another lease superseded is late and changes nothing.
/// Outcomes are in the order of `completions`.
pub async fn complete<'c>(db: impl PgExecutor<'c>, completions: &[Completion]) -> sqlx::Result<Vec<CompletionOutcome>> {
    let now = now_ms();
    // A (task, lease) pair reported twice in one batch: only its first report can win.
    let mut seen = HashSet::new();
    let first: Vec<bool> = completions.iter().map(|c| seen.insert((&c.task_id, &c.lease_id))).collect();
    let result_ids: Vec<ResultId> = completions.iter().map(|_| ResultId::generate()).collect();
    let rows: Vec<CompleteRow> = completions
        .iter()
        .zip(&first)
        .zip(&result_ids)
        .filter(|((_, first), _)| **first)
        .map(|((c, _), result_id)| CompleteRow {
            task_id: &c.task_id,
            lease_id: &c.lease_id,
            final_status: c.status.final_task_status(),
            status: c.status,
            output: c.output.as_deref(),
            error_message: c.error_message.as_deref(),
            metrics: &c.metrics,
            artifact_id: &c.artifact_id,
            artifact_type: &c.artifact_type,
            tags: &c.artifact_tags,
            url: match &c.artifact {
                ArtifactBody::S3 { url } => Some(url),
                ArtifactBody::Inline => None,
            },
            inline: c.artifact == ArtifactBody::Inline,
            result_id,
            audit_id: new_id(),
            done: format!(
                "Status: {}, artifact: {}, duration: {}ms",
                c.status.as_str(),
                c.artifact_id,
                c.metrics.duration_ms
            ),
            late: format!("Late {} result for lease {} ignored: not the current lease", c.status.as_str(), c.lease_id),
        })
        .collect();
    // One statement: the task, lease, artifact, result and audit writes of the whole batch
    // commit together, in one round trip.
    // Serialized once, straight into the statement's parameter: the outputs are not copied.
    let done: Vec<Task> = sqlx::query_as(COMPLETE_SQL)
        .bind(sqlx::types::Json(&rows))
        .bind(now)
        .bind(completions.iter().map(|c| c.task_id.as_str()).collect::<Vec<_>>())
        .fetch_all(db)
        .await?;
    let mut done: HashMap<(TaskId, LeaseId), Task> =
        done.into_iter().filter_map(|t| t.lease_id.clone().map(|l| ((t.id.clone(), l), t))).collect();
    Ok(completions
        .iter()
        .zip(first)
        .zip(result_ids)
        .map(|((c, first), result_id)| {
            let task = if first { done.remove(&(c.task_id.clone(), c.lease_id.clone())) } else { None };
            match task {
                Some(task) => CompletionOutcome::Completed { task, result_id, completed_at: now },
                None => CompletionOutcome::Late,
            }
        })
        .collect())
}

/// What one sweep of expired leases did.
#[derive(Debug, Default)]
pub struct Expiry {
    /// Leases marked expired.
    pub expired: usize,
    /// Tasks requeued (attempts remained), with their new dispatches.
    pub requeued: Vec<Dispatch>,
    /// Tasks that ran out of attempts and are now `dead`.
    pub dead: usize,
}

/// Which active leases [`expire`] ends.
#[derive(Clone, Copy, Debug)]
pub enum Expiring<'a> {
    /// Those whose `expires_at` is before this time (ms).
    Before(i64),
    /// Those a worker held before its process restarted: the executions died with the
    /// previous process, so they need not wait for their TTL.
    HeldBy(&'a WorkerId),
}

/// Expires up to `limit` active leases, in one transaction: rows are taken with
/// `FOR UPDATE SKIP LOCKED` so several sweepers share the work. A task whose current
/// lease expired (in `leased` or `running`) is requeued through the outbox while
/// attempts remain, else becomes `dead`.
pub async fn expire(pool: &PgPool, which: Expiring<'_>, limit: i64) -> sqlx::Result<Expiry> {
    let now = now_ms();
    let (cutoff, holder, ended) = match which {
        Expiring::Before(cutoff) => (cutoff, None, "expired"),
        Expiring::HeldBy(worker) => (i64::MAX, Some(worker), "ended: its worker restarted"),
    };
    let mut tx = pool.begin().await?;
    let rows: Vec<(LeaseId, TaskId, WorkerId, Option<TaskStatus>, Option<i32>, Option<i32>)> = sqlx::query_as(
        "WITH stale AS (
            SELECT id FROM leases WHERE status = 'active' AND expires_at < $1 AND ($4::text IS NULL OR worker_id = $4)
            ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED),
         ex AS (
            UPDATE leases l SET status = 'expired' FROM stale WHERE l.id = stale.id
            RETURNING l.id, l.task_id, l.worker_id),
         t AS (
            UPDATE llm_tasks t SET
                status = CASE WHEN t.attempts < t.max_attempts THEN 'queued' ELSE 'dead' END,
                lease_id = CASE WHEN t.attempts < t.max_attempts THEN NULL ELSE t.lease_id END,
                worker_id = CASE WHEN t.attempts < t.max_attempts THEN NULL ELSE t.worker_id END,
                dispatch_seq = t.dispatch_seq + 1,
                routed_to = NULL,
                updated_at = $3
            FROM ex WHERE t.id = ex.task_id AND t.lease_id = ex.id AND (t.status || '') IN ('leased', 'running')
            RETURNING t.id, t.status, t.attempts, t.max_attempts)
         SELECT ex.id, ex.task_id, ex.worker_id, t.status, t.attempts, t.max_attempts
         FROM ex LEFT JOIN t ON t.id = ex.task_id",
    )
    .bind(cutoff)
    .bind(limit)
    .bind(now)
    .bind(holder)
    .fetch_all(&mut *tx)
    .await?;
    let mut report = Expiry { expired: rows.len(), ..Expiry::default() };
    let mut entries = Vec::new();
    let mut requeued_ids = Vec::new();
    for (lease_id, task_id, worker_id, status, attempts, max) in rows {
        let (attempts, max) = (attempts.unwrap_or(0), max.unwrap_or(0));
        entries.push(NewAudit::new(
            AuditAction::LeaseExpired,
            "lease",
            lease_id.as_str(),
            "reconciler",
            format!("Lease of task {task_id} held by worker {worker_id} {ended} (attempt {attempts} of {max})"),
        ));
        match status {
            Some(TaskStatus::Queued) => {
                entries.push(NewAudit::new(
                    AuditAction::TaskRequeued,
                    "llm_task",
                    task_id.as_str(),
                    "reconciler",
                    format!("Requeued after lease expiry, {attempts} of {max} attempts used"),
                ));
                requeued_ids.push(task_id.0);
            }
            Some(TaskStatus::Dead) => {
                report.dead += 1;
                entries.push(NewAudit::new(
                    AuditAction::TaskDead,
                    "llm_task",
                    task_id.as_str(),
                    "reconciler",
                    format!("Dead after lease expiry, all {max} attempts used"),
                ));
            }
            _ => {}
        }
    }
    audit::insert(&mut *tx, &entries, now).await?;
    let requeued = tasks::get_many(&mut *tx, &requeued_ids).await?;
    report.requeued = outbox::insert(&mut tx, requeued, now).await?;
    tx.commit().await?;
    Ok(report)
}

/// Requeues a `failed` or `dead` task (administrator action): attempts start again from
/// zero, the previous count is kept in an `attempts_reset` audit entry beside the
/// original's `task_requeued` one, and the leases remain as history.
pub async fn requeue(pool: &PgPool, task_id: &TaskId, actor: &str) -> Result<Dispatch, TransitionError> {
    let now = now_ms();
    let mut tx = pool.begin().await?;
    let prev: Option<(TaskStatus, i32)> =
        sqlx::query_as("SELECT status, attempts FROM llm_tasks WHERE id = $1 FOR UPDATE")
            .bind(task_id)
            .fetch_optional(&mut *tx)
            .await?;
    let (prev_status, prev_attempts) = prev.ok_or_else(task_not_found)?;
    if !prev_status.is_requeueable() {
        return Err(TransitionError::Conflict(format!("Cannot requeue task with status '{prev_status}'")));
    }
    let task: Task = sqlx::query_as(
        "UPDATE llm_tasks SET status = 'queued', lease_id = NULL, worker_id = NULL, attempts = 0,
                dispatch_seq = dispatch_seq + 1, routed_to = NULL, updated_at = $2
         WHERE id = $1 AND status IN ('failed', 'dead') RETURNING *",
    )
    .bind(task_id)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    // The original's entry keeps its exact text; the count it reset is an entry of its own.
    let reset = format!("Attempts reset to 0 from {prev_attempts}");
    let detail = format!("Requeued from {prev_status}");
    audit::insert(
        &mut *tx,
        &[
            NewAudit::new(AuditAction::AttemptsReset, "llm_task", task_id.as_str(), actor, reset),
            NewAudit::new(AuditAction::TaskRequeued, "llm_task", task_id.as_str(), actor, detail),
        ],
        now,
    )
    .await?;
    let mut dispatches = outbox::insert(&mut tx, vec![task], now).await?;
    tx.commit().await?;
    dispatches.pop().ok_or(TransitionError::Db(sqlx::Error::RowNotFound))
}

/// Moves queued tasks routed to workers that went offline back to the shared pool (a new
/// dispatch through the outbox).
pub async fn reroute(pool: &PgPool, offline: &[WorkerId]) -> sqlx::Result<Vec<Dispatch>> {
    if offline.is_empty() {
        return Ok(Vec::new());
    }
    let now = now_ms();
    let mut tx = pool.begin().await?;
    let moved: Vec<Task> = sqlx::query_as(
        "UPDATE llm_tasks SET dispatch_seq = dispatch_seq + 1, routed_to = NULL, updated_at = $2
         WHERE status = 'queued' AND routed_to = ANY($1) RETURNING *",
    )
    .bind(offline)
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    let entries: Vec<NewAudit> = moved
        .iter()
        .map(|t| {
            NewAudit::new(
                AuditAction::TaskRerouted,
                "llm_task",
                t.id.as_str(),
                "reconciler",
                "Routed worker went offline: rerouted to the shared pool",
            )
        })
        .collect();
    audit::insert(&mut *tx, &entries, now).await?;
    let dispatches = outbox::insert(&mut tx, moved, now).await?;
    tx.commit().await?;
    Ok(dispatches)
}

/// Reads a task, for transitions that first decide on its current state.
pub async fn current(pool: &PgPool, task_id: &TaskId) -> Result<Task, TransitionError> {
    tasks::get(pool, task_id).await?.ok_or_else(task_not_found)
}
