//! LLM tasks and the rules of their state machine.
//!
//! ```text
//!            lease/claim            heartbeat
//!   queued ───────────────► leased ───────────► running
//!     ▲  ▲                    │  │                │  │
//!     │  └── expire (attempts │  └── complete ────┴──┼──► completed | failed
//!     │      remain) ─────────┴─────────────────────┘  │
//!     │                       expire (no attempts left) └──► dead
//!     └──────────── requeue (admin) ◄── failed | dead
//! ```

use serde::{Deserialize, Serialize};

use super::result::ErrorKind;

use super::ids::{LeaseId, TaskId, WorkerId};

/// Status of a task. Stored as text with a CHECK constraint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum TaskStatus {
    Queued,
    Leased,
    Running,
    Completed,
    Failed,
    Dead,
    /// Stopped by a cancel request (an addition to the seed's statuses).
    Cancelled,
}

impl TaskStatus {
    /// All statuses, in lifecycle order.
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Queued,
        TaskStatus::Leased,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::Dead,
        TaskStatus::Cancelled,
    ];

    /// The status as stored and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Leased => "leased",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::Dead => "dead",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored or client-supplied status.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// A task in this status holds a lease (and a worker is working on it).
    pub fn is_leased(self) -> bool {
        matches!(self, TaskStatus::Leased | TaskStatus::Running)
    }

    /// The administrator may requeue a task in this status.
    pub fn is_requeueable(self) -> bool {
        matches!(self, TaskStatus::Failed | TaskStatus::Dead | TaskStatus::Cancelled)
    }

    /// No transition leaves this status except an explicit requeue.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Dead | TaskStatus::Cancelled)
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Output format the caller wants from the executor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum DesiredFormat {
    Json,
    #[default]
    Text,
}

impl DesiredFormat {
    /// The format as stored and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredFormat::Json => "json",
            DesiredFormat::Text => "text",
        }
    }
}

/// Execution policy of a task; each field defaults when absent (`{timeout_sec: 120, budget: 0}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct Policy {
    /// Wall-clock limit of one execution, 1..=3600 seconds.
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_sec: i64,
    /// Spending budget handed to the executor; 0 means none. Whole numbers are written
    /// as integers (`0`, not `0.0`), as JavaScript writes them.
    #[serde(serialize_with = "crate::domain::json_number::serialize")]
    #[schema(minimum = 0)]
    pub budget: f64,
    /// How failed runs are tried again (an addition, shown when set; absent, the
    /// defaults of [`RetryPolicy`] apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { timeout_sec: 120, budget: 0.0, retry: None }
    }
}

/// Which failures are tried again, and after how long. A failed run whose class `on`
/// lists is tried again while attempts remain, `backoff_ms` after the first attempt,
/// doubled for each further one, at most `max_backoff_ms` (half of the wait fixed, half
/// random) and never before the provider's Retry-After. A provider rate limit always
/// waits for its reset without using an attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct RetryPolicy {
    /// Classes tried again: any of `provider`, `timeout`, `execution`.
    #[schema(schema_with = RetryPolicy::on_schema)]
    pub on: Vec<ErrorKind>,
    #[schema(minimum = 0, maximum = 3600000)]
    pub backoff_ms: i64,
    #[schema(minimum = 0, maximum = 86400000)]
    pub max_backoff_ms: i64,
    /// Whose work a provider rate limit reported by a run holds until its reset (shown
    /// when not the default, `agent_slug`).
    #[serde(skip_serializing_if = "RateLimitHold::is_default")]
    pub hold: RateLimitHold,
}

/// Whose work a run's provider rate limit holds until the reset (`policy.retry.hold`);
/// the task itself always waits for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitHold {
    /// Every task of the run's agent: the agent is one provider account.
    #[default]
    AgentSlug,
    /// Every task with the run's `concurrency_key` (e.g. one of several API keys); the
    /// agent's tasks when the task has no key.
    ConcurrencyKey,
    /// Every task of the run's conversation.
    ContextId,
    /// No other task.
    Task,
}

impl RateLimitHold {
    pub const ALL: [RateLimitHold; 4] =
        [RateLimitHold::AgentSlug, RateLimitHold::ConcurrencyKey, RateLimitHold::ContextId, RateLimitHold::Task];

    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitHold::AgentSlug => "agent_slug",
            RateLimitHold::ConcurrencyKey => "concurrency_key",
            RateLimitHold::ContextId => "context_id",
            RateLimitHold::Task => "task",
        }
    }

    pub fn parse(s: &str) -> Option<RateLimitHold> {
        RateLimitHold::ALL.into_iter().find(|h| h.as_str() == s)
    }

    fn is_default(&self) -> bool {
        *self == RateLimitHold::default()
    }
}

impl RetryPolicy {
    /// Classes that may be listed in `on`: the others are never tried blindly again.
    pub const RETRYABLE: [ErrorKind; 3] = [ErrorKind::Provider, ErrorKind::Timeout, ErrorKind::Execution];
    /// Longest `backoff_ms`: an hour.
    pub const MAX_BACKOFF_MS: i64 = 3_600_000;
    /// Longest `max_backoff_ms`: a day.
    pub const MAX_MAX_BACKOFF_MS: i64 = 86_400_000;

    /// The OpenAPI schema of `on`: the retryable classes only.
    fn on_schema() -> utoipa::openapi::schema::Array {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
        let kinds = RetryPolicy::RETRYABLE.map(|k| k.as_str());
        ArrayBuilder::new()
            .items(ObjectBuilder::new().schema_type(Type::String).enum_values(Some(kinds)))
            .default(Some(serde_json::json!(RetryPolicy::default().on)))
            .description(Some("Classes tried again: any of `provider`, `timeout`, `execution`."))
            .build()
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            on: vec![ErrorKind::Provider, ErrorKind::Timeout],
            backoff_ms: 1000,
            max_backoff_ms: 300_000,
            hold: RateLimitHold::AgentSlug,
        }
    }
}

/// A request to create a task: the body of `POST /api/runtime/llm-tasks` as the seed's
/// `insertLLMTaskSchema` reads it (absent fields take their defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = CreateTask)]
pub struct NewTask {
    #[schema(min_length = 1)]
    pub context_id: String,
    #[schema(min_length = 1)]
    pub agent_slug: String,
    /// At most 512 KiB.
    #[schema(min_length = 1)]
    pub prompt: String,
    #[serde(default)]
    pub context_hints: Vec<String>,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub desired_format: DesiredFormat,
    #[serde(default = "NewTask::default_max_attempts")]
    #[schema(minimum = 1, maximum = 10)]
    pub max_attempts: i32,
    /// Higher is claimed first (an addition to the seed's fields).
    #[serde(default)]
    pub priority: Priority,
    /// Not dispatched before this time, in milliseconds since the epoch (an addition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 9007199254740991_i64)]
    pub not_before: Option<i64>,
    /// Not dispatched before this many milliseconds after submission, at most 30 days
    /// (an addition; not together with `not_before`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 2592000000_i64)]
    pub delay_ms: Option<i64>,
    /// A client's key for this submission (an addition; the `Idempotency-Key` header
    /// sets it too): the same key within the retention window returns the task it
    /// created instead of creating another. 1..=255 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 255)]
    pub idempotency_key: Option<String>,
    /// A free key that concurrency limits of scope `concurrency_key` count the task by
    /// (an addition): e.g. a tenant or a repository. 1..=255 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(min_length = 1, max_length = 255)]
    pub concurrency_key: Option<String>,
}

impl NewTask {
    /// A request with every optional field at its default.
    pub fn new(context_id: impl Into<String>, agent_slug: impl Into<String>, prompt: impl Into<String>) -> NewTask {
        NewTask {
            context_id: context_id.into(),
            agent_slug: agent_slug.into(),
            prompt: prompt.into(),
            context_hints: Vec::new(),
            policy: Policy::default(),
            desired_format: DesiredFormat::Text,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            priority: Priority::default(),
            not_before: None,
            delay_ms: None,
            idempotency_key: None,
            concurrency_key: None,
        }
    }

    /// Attempts of a task that names none.
    pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;
    /// Longest `delay_ms`: 30 days.
    pub const MAX_DELAY_MS: i64 = 30 * 24 * 3600 * 1000;
    /// Longest idempotency key, in characters.
    pub const MAX_KEY_CHARS: usize = 255;

    fn default_max_attempts() -> i32 {
        Self::DEFAULT_MAX_ATTEMPTS
    }

    /// The time the task may first be dispatched, if later than its submission at `now`.
    pub fn due_at(&self, now: i64) -> Option<i64> {
        self.not_before.or(self.delay_ms.map(|d| now.saturating_add(d))).filter(|&t| t > now)
    }

    /// SHA-256 (hex) of the request's fields other than its key: what decides whether a
    /// second submission with the same key is the same request.
    pub fn request_hash(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut fields = self.clone();
        fields.idempotency_key = None;
        let digest = Sha256::digest(serde_json::to_vec(&fields).expect("a task request serializes"));
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Priority of a task: `-2` (background) to `2` (most urgent), `0` by default. Each
/// value is a band of its own on the bus; within a band tasks go first in, first out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Priority(pub i16);

impl utoipa::PartialSchema for Priority {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int32)))
            .minimum(Some(Priority::MIN))
            .maximum(Some(Priority::MAX))
            .description(Some(
                "Priority of a task: `-2` (background) to `2` (most urgent), `0` by default. Each value is a band \
                 of its own on the bus; within a band tasks go first in, first out.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Priority {}

impl Priority {
    pub const MIN: i16 = -2;
    pub const MAX: i16 = 2;

    /// Every priority, most urgent first.
    pub fn all_descending() -> impl Iterator<Item = Priority> {
        (Self::MIN..=Self::MAX).rev().map(Priority)
    }

    /// The default priority, 0.
    pub fn is_default(&self) -> bool {
        self.0 == 0
    }

    /// The priority if `n` is within range.
    pub fn new(n: i64) -> Option<Priority> {
        (i64::from(Self::MIN)..=i64::from(Self::MAX)).contains(&n).then_some(Priority(n as i16))
    }
}

/// A row of `llm_tasks`, serialized exactly as the seed's `LLMTask`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Task {
    pub id: TaskId,
    pub context_id: String,
    pub agent_slug: String,
    pub prompt: String,
    pub context_hints: Vec<String>,
    pub policy: Policy,
    pub desired_format: DesiredFormat,
    pub status: TaskStatus,
    pub created_at: i64,
    pub updated_at: i64,
    pub lease_id: Option<LeaseId>,
    pub worker_id: Option<WorkerId>,
    pub attempts: i32,
    pub max_attempts: i32,
    /// Higher is claimed first (an addition to the seed's fields, shown when not 0: a
    /// task submitted as the seed's clients submit shows the seed's shape).
    #[serde(default, skip_serializing_if = "Priority::is_default")]
    pub priority: Priority,
    /// Not dispatched before this time (epoch ms), when submitted delayed (an addition,
    /// shown when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    /// The key the task was submitted with (an addition, shown when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The free key concurrency limits count the task by (an addition, shown when set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    /// Why the queued task is not dispatched now (an addition, shown when set): a retry
    /// waiting for `not_before`, a provider rate limit, a concurrency limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_reason: Option<String>,
    /// The error of the last failed run that was tried again (an addition, shown when
    /// set): `<class>: <message>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Incremented every time the task is (re)queued; identifies one dispatch of the
    /// task on the bus so a stale message can never claim a newer dispatch. 0 while a
    /// delayed task waits to be due (it has no dispatch yet); minus the last dispatch's
    /// number while a task put back waits to be tried again (its next dispatch gets
    /// `1 - dispatch_seq`).
    #[serde(skip)]
    pub dispatch_seq: i64,
    /// The worker whose direct subject the current dispatch was routed to, if sticky.
    #[serde(skip)]
    pub routed_to: Option<WorkerId>,
}

impl Task {
    /// Attempts remain: an expired lease requeues the task instead of killing it.
    pub fn has_attempts_left(&self) -> bool {
        self.attempts < self.max_attempts
    }

    /// A task waiting to be due (delayed, or put back to be tried again later): queued
    /// without a current dispatch.
    pub fn is_waiting(&self) -> bool {
        self.status == TaskStatus::Queued && self.dispatch_seq <= 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_through_its_text() {
        for st in TaskStatus::ALL {
            assert_eq!(TaskStatus::parse(st.as_str()), Some(st));
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
        assert_eq!(TaskStatus::parse("QUEUED"), None);
    }

    #[test]
    fn priorities_are_bounded_and_listed_most_urgent_first() {
        assert_eq!(Priority::new(3), None);
        assert_eq!(Priority::new(-2), Some(Priority(-2)));
        let all: Vec<i16> = Priority::all_descending().map(|p| p.0).collect();
        assert_eq!(all, vec![2, 1, 0, -1, -2]);
        assert_eq!(serde_json::to_value(Priority(1)).unwrap(), 1);
    }

    #[test]
    fn a_request_hash_ignores_the_key_only() {
        let mut a: NewTask =
            serde_json::from_value(serde_json::json!({"context_id": "c", "agent_slug": "a", "prompt": "p"})).unwrap();
        let h = a.request_hash();
        a.idempotency_key = Some("k".into());
        assert_eq!(a.request_hash(), h);
        a.priority = Priority(1);
        assert_ne!(a.request_hash(), h);
        assert_eq!(a.due_at(1000), None);
        a.delay_ms = Some(500);
        assert_eq!(a.due_at(1000), Some(1500));
        a.delay_ms = None;
        a.not_before = Some(900);
        assert_eq!(a.due_at(1000), None, "a time already past is due at once");
    }

    #[test]
    fn only_finished_tasks_that_did_not_complete_are_requeueable() {
        let re: Vec<_> = TaskStatus::ALL.into_iter().filter(|s| s.is_requeueable()).collect();
        assert_eq!(re, vec![TaskStatus::Failed, TaskStatus::Dead, TaskStatus::Cancelled]);
        let terminal: Vec<_> = TaskStatus::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, vec![TaskStatus::Completed, TaskStatus::Failed, TaskStatus::Dead, TaskStatus::Cancelled]);
    }
}
