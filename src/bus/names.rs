//! Every stream, subject and consumer name, derived from one namespace so several
//! installations (and tests) can share a NATS server.

use crate::domain::{Priority, WorkerId};

/// Names of the runtime's NATS objects under one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    ns: String,
}

/// The reconciler's queue group for claim, heartbeat and worker-beat requests.
pub const RECONCILER_QUEUE: &str = "bloom-reconciler";

impl Names {
    /// Names under `namespace`, which must be a valid subject token.
    pub fn new(namespace: &str) -> Result<Names, String> {
        if namespace.is_empty() || !namespace.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(format!("namespace {namespace:?} must be non-empty and use only [A-Za-z0-9_-]"));
        }
        Ok(Names { ns: namespace.to_owned() })
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// The tasks stream (work-queue retention).
    pub fn tasks_stream(&self) -> String {
        format!("{}_TASKS", self.ns)
    }

    /// All task subjects.
    pub fn tasks_subjects(&self) -> String {
        format!("{}.tasks.>", self.ns)
    }

    /// The shared pool subject of priority 0.
    pub fn pool_subject(&self) -> String {
        self.pool_subject_of(Priority::default())
    }

    /// The shared pool subject of a priority: `<ns>.tasks.pool` for 0 (as before
    /// priorities existed), `<ns>.tasks.pool.p1`, `.m2` (minus 2), ... for the others.
    pub fn pool_subject_of(&self, priority: Priority) -> String {
        match band(priority) {
            None => format!("{}.tasks.pool", self.ns),
            Some(b) => format!("{}.tasks.pool.{b}", self.ns),
        }
    }

    /// The shared pull consumer of priority 0.
    pub fn pool_consumer(&self) -> String {
        self.pool_consumer_of(Priority::default())
    }

    /// The shared pull consumer of a priority's subject, which every worker pulls from:
    /// `pool` for 0, `pool-p1`, `pool-m2`, ... for the others.
    pub fn pool_consumer_of(&self, priority: Priority) -> String {
        match band(priority) {
            None => "pool".to_owned(),
            Some(b) => format!("pool-{b}"),
        }
    }

    /// A worker's direct subject (sticky routing).
    pub fn worker_subject(&self, worker: &WorkerId) -> String {
        format!("{}.tasks.worker.{}", self.ns, token(worker.as_str()))
    }

    /// A worker's own durable consumer on its direct subject.
    pub fn worker_consumer(&self, worker: &WorkerId) -> String {
        format!("worker-{}", token(worker.as_str()))
    }

    /// A worker id as it appears in its subject and consumer name.
    pub fn worker_token(&self, worker: &WorkerId) -> String {
        token(worker.as_str())
    }

    /// The subject of a dispatch: the routed worker's direct subject, else the pool
    /// subject of the task's priority.
    pub fn dispatch_subject(&self, routed_to: Option<&WorkerId>, priority: Priority) -> String {
        routed_to.map_or_else(|| self.pool_subject_of(priority), |w| self.worker_subject(w))
    }

    /// The results stream.
    pub fn results_stream(&self) -> String {
        format!("{}_RESULTS", self.ns)
    }

    /// The results subject.
    pub fn results_subject(&self) -> String {
        format!("{}.results", self.ns)
    }

    /// Result requests: a worker's results, answered once stored; what no reconciler
    /// answers goes to the results stream.
    pub fn results_request_subject(&self) -> String {
        format!("{}.ctl.results", self.ns)
    }

    /// The durable consumer the reconcilers share on the results stream.
    pub fn results_consumer(&self) -> String {
        "reconciler".to_owned()
    }

    /// Claim requests.
    pub fn claim_subject(&self) -> String {
        format!("{}.ctl.claim", self.ns)
    }

    /// Claim requests addressed to one reconciler replica: a worker sends its claims to
    /// the replica that answered its last one, so one replica decides all of a worker's
    /// claims and two replicas' batches do not wait for each other on its row.
    pub fn claim_replica_subject(&self, replica: &str) -> String {
        format!("{}.ctl.claim.replica.{}", self.ns, token(replica))
    }

    /// Lease heartbeat requests.
    pub fn heartbeat_subject(&self) -> String {
        format!("{}.ctl.heartbeat", self.ns)
    }

    /// Lease hand-back requests.
    pub fn release_subject(&self) -> String {
        format!("{}.ctl.release", self.ns)
    }

    /// Cancellations of leases: every worker hears them and stops the one it runs.
    pub fn cancel_subject(&self) -> String {
        format!("{}.ctl.cancel", self.ns)
    }

    /// Drain notices: every worker hears them and the one named stops or resumes pulling.
    pub fn drain_subject(&self) -> String {
        format!("{}.ctl.drain", self.ns)
    }

    /// Announcements of a worker process starting (request/reply).
    pub fn start_subject(&self) -> String {
        format!("{}.ctl.start", self.ns)
    }

    /// Worker liveness beats.
    pub fn worker_beat_subject(&self) -> String {
        format!("{}.ctl.worker", self.ns)
    }
}

/// A worker id as one subject token (also valid in a consumer name): kept as is when it
/// only has `[A-Za-z0-9_-]`, else hex-encoded with an `x` prefix, so the mapping is
/// injective and no id can inject `.`, `*` or `>` into a subject.
fn token(id: &str) -> String {
    if !id.is_empty() && !id.starts_with('x') && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        id.to_owned()
    } else {
        let hex: String = id.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x{hex}")
    }
}

/// The token of a priority's own subject and consumer (none for 0).
fn band(p: Priority) -> Option<String> {
    match p.0 {
        0 => None,
        n if n > 0 => Some(format!("p{n}")),
        n => Some(format!("m{}", -n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_priority_has_its_own_pool_subject_and_consumer() {
        let n = Names::new("t1").unwrap();
        assert_eq!(n.pool_subject(), "t1.tasks.pool");
        assert_eq!(n.pool_subject_of(Priority(2)), "t1.tasks.pool.p2");
        assert_eq!(n.pool_consumer_of(Priority(-1)), "pool-m1");
        let subjects: std::collections::HashSet<_> = Priority::all_descending().map(|p| n.pool_subject_of(p)).collect();
        assert_eq!(subjects.len(), 5);
        assert_eq!(n.dispatch_subject(None, Priority(1)), "t1.tasks.pool.p1");
        assert_eq!(n.dispatch_subject(Some(&"w".into()), Priority(1)), "t1.tasks.worker.w");
    }

    #[test]
    fn worker_subjects_cannot_escape_their_token() {
        let n = Names::new("t1").unwrap();
        assert_eq!(n.worker_subject(&"w-1".into()), "t1.tasks.worker.w-1");
        let evil = n.worker_subject(&"a.>".into());
        assert_eq!(evil.split('.').count(), 4, "{evil}");
        assert_ne!(n.worker_subject(&"x61".into()), n.worker_subject(&"a".into()));
        assert_ne!(token("xa"), token("a"));
    }

    #[test]
    fn namespace_is_validated() {
        assert!(Names::new("ok_ns-1").is_ok());
        assert!(Names::new("bad.ns").is_err());
        assert!(Names::new("").is_err());
    }
}
