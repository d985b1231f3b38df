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
/// (`max_concurrency` less their active leases, counted) read after the lock, so
/// concurrent claims never take a worker beyond its capacity; a worker's current claims
/// take its free slots in task id order.
pub(super) const CLAIM_SQL: &str = include_str!("claim.sql");

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
    /// The dispatch is current but the worker is draining: hand the message back at once
    /// for another worker.
    Draining,
    /// The dispatch is not current (task already leased, completed, requeued, or gone):
    /// drop the message without executing.
    Refused,
    /// The task's concurrency slot `slot` was full: the task was put aside until a lease of
    /// the slot ends, and the message is dropped as for [`ClaimOutcome::Refused`]. Once
    /// the claim has committed, the caller rechecks the slot ([`crate::db::concurrency::recheck`]).
    SetAside { slot: String },
}

/// One decided claim, as [`CLAIM_SQL`] returns it: `granted`, `held`, `full`,
/// `draining` or `aside`, the lease when granted or held, the full slot when put aside.
#[derive(Clone)]
struct Decision {
    decision: String,
    task_id: TaskId,
    worker_id: WorkerId,
    id: Option<String>,
    started_at: Option<i64>,
    expires_at: Option<i64>,
    ttl_seconds: Option<i32>,
    last_heartbeat: Option<i64>,
    context_id: Option<String>,
    slot: Option<String>,
}

impl Decision {
    fn into_lease(self) -> Option<Lease> {
        Some(Lease {
            id: self.id?.into(),
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
    // Borrowed text arrays are bound as they are (`as _`): the macro's check wants owned
    // strings, Postgres checks the array types.
    let decided: Vec<Decision> = sqlx::query_file_as!(
        Decision,
        "src/db/lifecycle/claim.sql",
        now,
        workers.into_iter().collect::<Vec<_>>() as _,
        claims.iter().map(|c| c.task_id.as_str()).collect::<Vec<_>>() as _,
        &claims.iter().map(|c| c.dispatch_seq).collect::<Vec<_>>(),
        claims.iter().map(|c| c.worker_id.as_str()).collect::<Vec<_>>() as _,
        lease_ids.iter().map(|l| l.as_str()).collect::<Vec<_>>() as _,
        &claims.iter().map(|c| c.ttl_seconds).collect::<Vec<_>>(),
        &claims.iter().map(|_| new_id()).collect::<Vec<_>>(),
    )
    .fetch_all(db)
    .await?;
    let mut granted: HashMap<LeaseId, Lease> = HashMap::new();
    let mut held: HashMap<(TaskId, WorkerId), Lease> = HashMap::new();
    let mut full: HashSet<(TaskId, WorkerId)> = HashSet::new();
    let mut draining: HashSet<(TaskId, WorkerId)> = HashSet::new();
    let mut aside: HashMap<(TaskId, WorkerId), String> = HashMap::new();
    for d in decided {
        match d.decision.as_str() {
            "aside" => {
                aside.extend(d.slot.map(|slot| ((d.task_id, d.worker_id), slot)));
            }
            "held" => {
                let key = (d.task_id.clone(), d.worker_id.clone());
                held.extend(d.into_lease().map(|l| (key, l)));
            }
            "granted" => granted.extend(d.into_lease().map(|l| (l.id.clone(), l))),
            "draining" => {
                draining.insert((d.task_id, d.worker_id));
            }
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
                    None if draining.contains(&key) => ClaimOutcome::Draining,
                    None => match aside.get(&key) {
                        Some(slot) => ClaimOutcome::SetAside { slot: slot.clone() },
                        None => ClaimOutcome::Refused,
                    },
                },
            }
        })
        .collect())
}
