//! `claim`: NATS workers' claims of dispatches, `queued -> leased` (batch).

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use sqlx::PgExecutor;

use crate::domain::{new_id, Lease, LeaseId, LeaseStatus, TaskId, WorkerId};

/// Batch claim: `$1` now, `$2` the claiming worker ids (each once), then one array per
/// column of the claims (`$3` the task ids). Returns one row
/// per decided claim: `granted` (a new lease), `held` (the worker already holds this
/// dispatch: a retried claim gets the same lease) or `full` (the dispatch is current but
/// the worker has no free slot in Postgres, or no row).
///
/// The claiming workers' rows are locked in id order and their free slots
/// (`max_concurrency - active_leases`, kept by triggers) read after the lock, so
/// concurrent claims never take a worker beyond its capacity; a worker's current claims
/// take its free slots in task id order.
pub(super) const CLAIM_SQL: &str = "WITH r AS (
            SELECT * FROM UNNEST($3::text[], $4::bigint[], $5::text[], $6::text[], $7::int[], $8::text[])
                AS r(task_id, seq, worker_id, lease_id, ttl, audit_id)),
         room AS MATERIALIZED (
            SELECT w.id, COALESCE((w.capabilities->>'max_concurrency')::int, 1) - w.active_leases AS free
            FROM workers w WHERE w.id = ANY($2) ORDER BY w.id FOR UPDATE),
         fresh AS (
            SELECT r.*, row_number() OVER (PARTITION BY r.worker_id ORDER BY r.task_id) AS pos
            FROM r JOIN llm_tasks t ON t.id = ANY($3) AND t.id = r.task_id AND (t.status || '') = 'queued'
                AND t.dispatch_seq = r.seq),
         t AS (
            UPDATE llm_tasks t SET status = 'leased', lease_id = r.lease_id, worker_id = r.worker_id,
                   attempts = t.attempts + 1, updated_at = $1, routed_to = NULL
            FROM fresh r JOIN room ON room.id = r.worker_id AND r.pos <= room.free
            WHERE t.id = ANY($3) AND t.id = r.task_id AND (t.status || '') = 'queued' AND t.dispatch_seq = r.seq
            RETURNING t.id, t.context_id, r.lease_id, r.worker_id, r.ttl, r.audit_id),
         l AS (
            INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
                                context_id)
            SELECT lease_id, id, worker_id, $1, $1 + ttl::bigint * 1000, ttl, 'active', $1, context_id FROM t),
         a AS (
            INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
            SELECT audit_id, $1, 'task_leased', 'lease', lease_id, 'router',
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
         SELECT 'granted' AS decision, id AS task_id, worker_id, lease_id AS id, $1 AS started_at,
                $1 + ttl::bigint * 1000 AS expires_at, ttl AS ttl_seconds, $1 AS last_heartbeat, context_id
         FROM t
         UNION ALL
         SELECT 'held', task_id, worker_id, lease_id, started_at, expires_at, ttl_seconds, last_heartbeat, context_id
         FROM held
         UNION ALL
         SELECT 'full', task_id, worker_id, NULL, NULL, NULL, NULL, NULL, NULL FROM full_";

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
pub async fn claim<'c>(db: impl PgExecutor<'c>, claims: &[Claim], now: i64) -> sqlx::Result<Vec<ClaimOutcome>> {
    // Every claim gets its own prospective lease id. When several claims in the batch
    // match the same task, Postgres applies exactly one of them and returns its lease id.
    let lease_ids: Vec<LeaseId> = claims.iter().map(|_| LeaseId::generate()).collect();
    let workers: HashSet<&str> = claims.iter().map(|c| c.worker_id.as_str()).collect();
    let decided: Vec<Decision> = sqlx::query_as(CLAIM_SQL)
        .bind(now)
        .bind(workers.into_iter().collect::<Vec<_>>())
        .bind(claims.iter().map(|c| c.task_id.as_str()).collect::<Vec<_>>())
        .bind(claims.iter().map(|c| c.dispatch_seq).collect::<Vec<_>>())
        .bind(claims.iter().map(|c| c.worker_id.as_str()).collect::<Vec<_>>())
        .bind(lease_ids.iter().map(|l| l.as_str()).collect::<Vec<_>>())
        .bind(claims.iter().map(|c| c.ttl_seconds).collect::<Vec<_>>())
        .bind(claims.iter().map(|_| new_id()).collect::<Vec<_>>())
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
