//! Why a task was executed more than once: each result that arrived after another
//! execution had taken the task over (audit `result_late`) is attributed to the fault
//! that made its lease end while it ran, from the run's fault log and the lease's row.
//!
//! Causes, in the order they are tried:
//! * `worker_killed`: the lease's worker was SIGKILLed during the lease, or its restart
//!   ended the lease (it finished, published, and died before its result was stored).
//!   Unavoidable: the executing process died.
//! * `heartbeat_lost_postgres_restart`, `heartbeat_lost_nats_restart`,
//!   `heartbeat_lost_reconciler_killed`: the worker lived, but the lease expired within
//!   a lease TTL of that fault (its heartbeats or its result could not get through).
//! * `results_delayed_s3_outage`: the same, next to an S3 outage.
//! * `lease_expired_without_fault`: none of the above (an overloaded machine).
//! * `other`: the late lease did not expire (not expected).
//!
//! A result delivered twice (a reconciler stored it and died before acknowledging the
//! message) is also recorded as late, but it is the same execution: it is counted apart,
//! as `results_redelivered`, not as a duplicate execution. So is the result of a run whose
//! task was cancelled while it ran (`cancelled_runs`): its lease ended with the task, and
//! no other execution took it over.

use std::collections::BTreeMap;

use serde_json::{json, Value};
use sqlx::PgPool;

/// A fault the run injected, at a wall-clock time (ms since the epoch, as the
/// runtime's rows record time on this machine).
#[derive(Clone, Debug)]
pub struct Fault {
    pub at_ms: i64,
    pub kind: FaultKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL of a worker (its worker id).
    WorkerKill(String),
    ReconcilerKill,
    NatsRestart,
    /// A server of the NATS cluster killed or restarted.
    NatsServerDown,
    PostgresRestart,
    /// Postgres refusing writes for a while.
    PostgresReadOnly,
    S3Outage,
}

/// One late result and the lease it came from.
#[derive(Debug, sqlx::FromRow)]
struct Late {
    /// The late lease is the one the task completed with: the same result, delivered again.
    same_result: bool,
    /// The late lease was ended by its task's cancellation.
    cancelled: bool,
    worker_id: Option<String>,
    started_at: Option<i64>,
    last_heartbeat: Option<i64>,
    ended_at: Option<i64>,
    ended_how: Option<String>,
}

/// Counts the late results by cause: `{total, avoidable, by_cause: {...},
/// results_redelivered, cancelled_runs}`.
pub async fn attribute(pool: &PgPool, faults: &[Fault], lease_ttl_ms: i64) -> sqlx::Result<Value> {
    let lates: Vec<Late> = sqlx::query_as(
        r"SELECT COALESCE(t.status = 'completed' AND t.lease_id = x.lease_id, false) AS same_result,
                 COALESCE(l.status = 'cancelled', false) AS cancelled,
                 l.worker_id, l.started_at, l.last_heartbeat, e.timestamp AS ended_at, e.detail AS ended_how
          FROM (SELECT entity_id AS task_id, substring(detail from 'for lease (\S+) ignored') AS lease_id
                FROM audit_logs WHERE action = 'result_late') x
          LEFT JOIN llm_tasks t ON t.id = x.task_id
          LEFT JOIN leases l ON l.id = x.lease_id
          LEFT JOIN audit_logs e ON e.entity_id = x.lease_id AND e.action = 'lease_expired'",
    )
    .fetch_all(pool)
    .await?;
    let mut by_cause: BTreeMap<&'static str, u64> = BTreeMap::new();
    let redelivered = lates.iter().filter(|l| l.same_result).count();
    let cancelled = lates.iter().filter(|l| !l.same_result && l.cancelled).count();
    for late in lates.iter().filter(|l| !l.same_result && !l.cancelled) {
        *by_cause.entry(cause(late, faults, lease_ttl_ms)).or_default() += 1;
    }
    let total: u64 = by_cause.values().sum();
    let avoidable: u64 = by_cause.iter().filter(|(c, _)| **c != "worker_killed").map(|(_, n)| n).sum();
    Ok(json!({"total": total, "avoidable": avoidable, "by_cause": by_cause, "results_redelivered": redelivered,
              "cancelled_runs": cancelled}))
}

fn cause(late: &Late, faults: &[Fault], lease_ttl_ms: i64) -> &'static str {
    let (Some(worker), Some(started), Some(ended)) = (&late.worker_id, late.started_at, late.ended_at) else {
        return "other";
    };
    if late.ended_how.as_deref().is_some_and(|d| d.contains("worker restarted")) {
        return "worker_killed";
    }
    let killed = |f: &Fault| matches!(&f.kind, FaultKind::WorkerKill(w) if w == worker);
    if faults.iter().any(|f| killed(f) && (started..=ended).contains(&f.at_ms)) {
        return "worker_killed";
    }
    // The fault that kept the lease from being renewed: between a TTL before its last
    // renewal and its expiry.
    let from = late.last_heartbeat.unwrap_or(started) - lease_ttl_ms;
    let near = |kind: &FaultKind| faults.iter().any(|f| &f.kind == kind && (from..=ended).contains(&f.at_ms));
    if near(&FaultKind::PostgresRestart) {
        "heartbeat_lost_postgres_restart"
    } else if near(&FaultKind::PostgresReadOnly) {
        "heartbeat_lost_postgres_read_only"
    } else if near(&FaultKind::NatsRestart) {
        "heartbeat_lost_nats_restart"
    } else if near(&FaultKind::NatsServerDown) {
        "heartbeat_lost_nats_server_down"
    } else if near(&FaultKind::ReconcilerKill) {
        "heartbeat_lost_reconciler_killed"
    } else if near(&FaultKind::S3Outage) {
        "results_delayed_s3_outage"
    } else {
        "lease_expired_without_fault"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn late(worker: &str, started: i64, beat: i64, ended: i64, how: &str) -> Late {
        Late {
            same_result: false,
            cancelled: false,
            worker_id: Some(worker.into()),
            started_at: Some(started),
            last_heartbeat: Some(beat),
            ended_at: Some(ended),
            ended_how: Some(how.into()),
        }
    }

    #[test]
    fn each_late_result_gets_the_fault_that_ended_its_lease() {
        let faults = [
            Fault { at_ms: 1_500, kind: FaultKind::WorkerKill("chaos-1".into()) },
            Fault { at_ms: 10_000, kind: FaultKind::NatsRestart },
            Fault { at_ms: 20_000, kind: FaultKind::ReconcilerKill },
        ];
        let ttl = 2_000;
        assert_eq!(cause(&late("chaos-1", 1_000, 1_400, 4_000, "expired"), &faults, ttl), "worker_killed");
        assert_eq!(cause(&late("chaos-2", 0, 100, 300, "ended: its worker restarted"), &faults, ttl), "worker_killed");
        assert_eq!(
            cause(&late("chaos-2", 9_000, 9_500, 12_000, "expired"), &faults, ttl),
            "heartbeat_lost_nats_restart"
        );
        assert_eq!(
            cause(&late("chaos-1", 19_000, 19_900, 22_400, "expired"), &faults, ttl),
            "heartbeat_lost_reconciler_killed"
        );
        assert_eq!(
            cause(&late("chaos-3", 30_000, 30_500, 33_000, "expired"), &faults, ttl),
            "lease_expired_without_fault"
        );
        let unknown = Late {
            same_result: false,
            cancelled: false,
            worker_id: None,
            started_at: None,
            last_heartbeat: None,
            ended_at: None,
            ended_how: None,
        };
        assert_eq!(cause(&unknown, &faults, ttl), "other");
    }
}
