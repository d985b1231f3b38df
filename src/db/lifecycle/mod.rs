//! The task and lease state machine: every transition, for every path (REST, NATS,
//! sweeper, relay), is one function of this module, in a file named after it. Each
//! takes the time it happens at (`now`, milliseconds since the epoch) from its caller.
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
//! * batch statements take their rows as one typed array per column
//!   (`UNNEST($n::text[], ...)`, bound from the Rust types: no JSON to keep in step with
//!   the SQL by hand), and also name them as `id = ANY($ids)`: the planner then sees
//!   how many rows the batch touches and looks them up by key, where a join against
//!   the unnested rows (which it assumes to be many) could scan the whole table.

mod abandon;
mod assign;
mod cancel;
mod claim;
mod complete;
mod create;
mod due;
mod expire;
mod heartbeat;
mod lease;
mod redispatch;
mod release;
mod requeue;
mod reroute;
mod restart;
mod silence;

use sqlx::PgPool;

pub use abandon::{abandon, Abandoned, FailedCall};
pub use assign::{assign, Assigned};
pub use cancel::{cancel, cancel_many, Cancelled};
pub use claim::{claim, Claim, ClaimOutcome};
pub use complete::{complete, Completion, CompletionOutcome};
pub use create::{create, KeyRules, OnKeyConflict, Submitted};
pub use due::{count_waiting, due};
pub use expire::{expire, Expiring, Expiry};
pub use heartbeat::heartbeat;
pub use lease::{lease, LeaseRequest};
pub use redispatch::redispatch;
pub use release::release;
pub use requeue::{requeue, requeue_many};
pub use reroute::reroute;
pub use restart::{restart, Restart};
pub use silence::{silence, Silence};

use super::tasks;
use crate::domain::{Task, TaskId, TaskStatus};

/// The batch statements of the dispatch path, by name: they must find their rows by key
/// whatever the size of the tables when Postgres planned them (see `db::connect`).
pub const HOT_STATEMENTS: [(&str, &str); 4] = [
    ("create", create::CREATE_SQL),
    ("claim", claim::CLAIM_SQL),
    ("heartbeat", heartbeat::HEARTBEAT_SQL),
    ("complete", complete::COMPLETE_SQL),
];

/// The due pass's statements (`$1` now, `$2` a batch size), which look the due tasks up
/// in the index of waiting tasks and update them by key.
pub const DUE_STATEMENTS: [(&str, &str); 2] =
    [("due", due::DUE_SQL), ("hold_budget_waiters", due::HOLD_BUDGET_WAITERS_SQL)];

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
    /// A task can be sent only to a worker with a URL (an HTTP agent).
    #[error("Worker \"{0}\" has no URL configured")]
    NoUrl(crate::domain::WorkerId),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

fn task_not_found() -> TransitionError {
    TransitionError::NotFound("Task not found".into())
}

fn conflict_on(status: TaskStatus) -> TransitionError {
    TransitionError::Conflict(format!("Task status is '{status}', expected 'queued'"))
}

fn not_due(task: &Task) -> TransitionError {
    if let Some(why) = &task.wait_reason {
        return TransitionError::Conflict(format!("Task is waiting: {why}"));
    }
    let at = task.not_before.unwrap_or_default();
    TransitionError::Conflict(format!("Task is delayed: not dispatched before {at} (not_before)"))
}

/// Reads a task, for transitions that first decide on its current state.
pub async fn current(pool: &PgPool, task_id: &TaskId) -> Result<Task, TransitionError> {
    tasks::get(pool, task_id).await?.ok_or_else(task_not_found)
}
