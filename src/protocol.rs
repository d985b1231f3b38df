//! The messages that cross NATS. JSON bodies, one type per subject.
//!
//! | subject (see [`crate::bus::Names`]) | body | reply |
//! |---|---|---|
//! | `<ns>.tasks.pool`, `<ns>.tasks.worker.<id>` (stream) | [`TaskMessage`] | – |
//! | `<ns>.ctl.claim` (request, reconciler queue group) | [`ClaimRequest`] | [`ClaimReply`] |
//! | `<ns>.ctl.claim.replica.<replica>` (request, one reconciler) | [`ClaimRequest`] | [`ClaimReply`] |
//! | `<ns>.ctl.heartbeat` (request, reconciler queue group) | [`HeartbeatRequest`] | [`HeartbeatReply`] |
//! | `<ns>.ctl.start` (request, reconciler queue group) | [`StartRequest`] | [`StartReply`] |
//! | `<ns>.ctl.worker` (publish) | [`WorkerBeat`] | – |
//! | `<ns>.ctl.results` (request, reconciler queue group) | [`ResultBatch`] | [`ResultsReply`] |
//! | `<ns>.results` (stream) | [`ResultBatch`] (one or several [`ResultMessage`]s) | – |

use serde::{Deserialize, Serialize};

use crate::domain::{Capabilities, DesiredFormat, LeaseId, Outcome, Policy, Task, TaskId, WorkerId, WorkerStatus};

/// A W3C trace context as header pairs (`traceparent`, `tracestate`): how a message
/// carries the span it was sent from (empty when not tracing).
pub type Carrier = Vec<(String, String)>;

/// Whether a JSON body carries a NUL character (`\u0000`), which no Postgres text column
/// can store: task, claim and control messages with one are malformed (ids, prompts and
/// capabilities never hold NUL), so they are rejected before they can fail a batch.
pub fn carries_nul(json: &[u8]) -> bool {
    json.windows(6).any(|w| w == b"\\u0000")
}

/// `text` with every NUL character replaced by U+FFFD, for text received from outside
/// (an executor's output, an agent's answer) that is stored as it came otherwise.
pub fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// One dispatch of a task, published to the tasks stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskMessage {
    pub task_id: TaskId,
    /// Identifies this dispatch; a claim must name the task's current one.
    pub dispatch_seq: i64,
    pub context_id: String,
    pub agent_slug: String,
    pub prompt: String,
    pub context_hints: Vec<String>,
    pub policy: Policy,
    pub desired_format: DesiredFormat,
    pub attempts: i32,
    pub max_attempts: i32,
    /// When the task was submitted (ms since the epoch), for dispatch latency.
    pub created_at: i64,
}

impl From<&Task> for TaskMessage {
    fn from(t: &Task) -> Self {
        TaskMessage {
            task_id: t.id.clone(),
            dispatch_seq: t.dispatch_seq,
            context_id: t.context_id.clone(),
            agent_slug: t.agent_slug.clone(),
            prompt: t.prompt.clone(),
            context_hints: t.context_hints.clone(),
            policy: t.policy.clone(),
            desired_format: t.desired_format,
            attempts: t.attempts,
            max_attempts: t.max_attempts,
            created_at: t.created_at,
        }
    }
}

impl TaskMessage {
    /// The JetStream de-duplication id of this dispatch.
    pub fn msg_id(&self) -> String {
        dispatch_msg_id(&self.task_id, self.dispatch_seq)
    }
}

/// The `Nats-Msg-Id` of one dispatch of a task.
pub fn dispatch_msg_id(task: &TaskId, dispatch_seq: i64) -> String {
    format!("{task}:{dispatch_seq}")
}

/// A worker claims the dispatches it pulled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimRequest {
    pub worker_id: WorkerId,
    /// Lease TTL: the ack-wait of the consumer the messages came from.
    pub ttl_seconds: i32,
    pub items: Vec<ClaimItem>,
}

/// One claimed dispatch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClaimItem {
    pub task_id: TaskId,
    pub dispatch_seq: i64,
    /// When the task was submitted (from its message), for dispatch latency.
    #[serde(default)]
    pub created_at: i64,
}

/// The reconciler's answer, one entry per item, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ClaimReply {
    /// The decisions, one per claimed item in request order, and the replica that took
    /// them: the worker sends its next claims to that replica's own subject.
    Decided {
        items: Vec<ClaimDecision>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replica: Option<String>,
    },
    /// The reconciler could not decide (e.g. Postgres unavailable): retry later.
    Unavailable { reason: String },
}

/// The decision on one claimed dispatch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum ClaimDecision {
    /// Execute under this lease. Claiming a dispatch again (after a lost reply) grants
    /// the lease the worker already holds.
    Granted(LeaseGrant),
    /// The worker has no free slot in Postgres (its finished leases are not all recorded
    /// yet, or it claimed beyond its `max_concurrency`): keep the message, claim again
    /// shortly.
    Full,
    /// The worker is draining (`POST /api/runtime/workers/:id/drain`): hand the message
    /// back at once, for another worker.
    Draining,
    /// The dispatch is not current: terminate the message without executing.
    Refused,
}

/// A granted lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub lease_id: LeaseId,
    pub expires_at: i64,
    pub attempts: i32,
}

/// Renew a lease while the task runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub task_id: TaskId,
    pub lease_id: LeaseId,
}

/// Whether the lease is still the task's current lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum HeartbeatReply {
    Renewed {
        expires_at: i64,
    },
    /// The lease expired or the task moved on: stop working on it.
    Lost,
    Unavailable {
        reason: String,
    },
}

/// A worker process starting, before it pulls: the leases its id still holds belong to
/// a previous process of that worker, whose executions died with it. With its
/// capabilities, the worker is registered (online) before its first claim, so Postgres
/// knows its `max_concurrency`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartRequest {
    pub worker_id: WorkerId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Capabilities>,
    /// The starting process, a time-ordered id: with capabilities, the leases end once
    /// per process (a request handled again, or one of an earlier process, ends
    /// nothing); without, every start ends them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

/// The answer to a [`StartRequest`]: how many leases of the previous process were ended
/// (their tasks requeued at once, or dead after their last attempt).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StartReply {
    pub ended: usize,
    /// The worker is being drained: it starts without pulling.
    #[serde(default)]
    pub draining: bool,
}

/// A worker's liveness beat and self-description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerBeat {
    pub worker_id: WorkerId,
    pub status: WorkerStatus,
    pub capabilities: Capabilities,
    #[serde(default)]
    pub ip_addrs: Vec<String>,
    #[serde(default)]
    pub in_flight: u32,
    /// The worker is not pulling, told it is being drained.
    #[serde(default)]
    pub draining: bool,
}

/// The outcome of executing one lease, published to the results stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultMessage {
    pub task_id: TaskId,
    pub lease_id: LeaseId,
    pub worker_id: WorkerId,
    /// On the wire, its fields sit beside the ids (`status`, `output`, ...).
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The body of a results-stream message: the results a worker had ready when it
/// published, as a JSON array, or (as older workers send) a single result object. Each
/// result carries its own trace context, since the message's headers can carry only one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ResultBatch {
    Many(Vec<TracedResult>),
    One(Box<TracedResult>),
}

impl TracedResult {
    /// Whether an id holds a NUL character, which Postgres cannot store (outputs may:
    /// the reconciler replaces it).
    pub fn has_nul_id(&self) -> bool {
        let r = &self.result;
        [r.task_id.as_str(), r.lease_id.as_str(), r.worker_id.as_str()].iter().any(|s| s.contains('\0'))
    }
}

impl ResultBatch {
    /// Whether one of the results has an id Postgres cannot store.
    pub fn has_nul_id(&self) -> bool {
        match self {
            ResultBatch::Many(v) => v.iter().any(TracedResult::has_nul_id),
            ResultBatch::One(r) => r.has_nul_id(),
        }
    }

    /// The results, in order.
    pub fn into_results(self) -> Vec<TracedResult> {
        match self {
            ResultBatch::Many(v) => v,
            ResultBatch::One(r) => vec![*r],
        }
    }
}

/// A result and the W3C trace context of the execution that produced it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TracedResult {
    #[serde(flatten)]
    pub result: ResultMessage,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trace: Carrier,
}

/// A lease whose task was cancelled: the worker running it kills its executor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CancelNotice {
    pub task_id: TaskId,
    pub lease_id: LeaseId,
}

/// A worker is being drained (it stops pulling and finishes what it runs) or resumed.
/// Sent when an operator drains or resumes it, and again whenever its beat disagrees
/// with Postgres (a notice lost, or a process restarted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainNotice {
    pub worker_id: WorkerId,
    pub draining: bool,
}

/// A worker hands a lease back without a result (graceful shutdown): the task becomes
/// claimable again by the same dispatch, which the worker then naks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub task_id: TaskId,
    pub lease_id: LeaseId,
}

/// Whether the lease was handed back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleaseReply {
    pub released: bool,
}

/// Whether every result of a request was stored (committed); if not, the worker
/// publishes them to the results stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultsReply {
    pub stored: bool,
}
