//! Results of task executions.

use serde::{Deserialize, Serialize};

use super::ids::{ArtifactId, ResultId, TaskId, WorkerId};
use super::task::TaskStatus;

/// Whether an execution succeeded, as reported by a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum ResultStatus {
    Success,
    Error,
}

impl ResultStatus {
    /// The status as stored and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            ResultStatus::Success => "success",
            ResultStatus::Error => "error",
        }
    }

    /// The task status a current-lease result moves the task to.
    pub fn final_task_status(self) -> TaskStatus {
        match self {
            ResultStatus::Success => TaskStatus::Completed,
            ResultStatus::Error => TaskStatus::Failed,
        }
    }
}

/// What one execution of a task produced. Defined once: the executor returns it, the
/// results stream and the REST `complete` body carry it, the lifecycle stores it and the
/// result row (and its JSON) holds it, with the same fields everywhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Outcome {
    pub status: ResultStatus,
    pub output: Option<String>,
    pub error_message: Option<String>,
    pub metrics: Metrics,
    /// What kind of failure an error was, when the worker could tell (an addition): it
    /// decides whether the task is tried again (see [`ErrorKind`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    /// The earliest time (epoch ms) the provider allows another run: a rate limit's
    /// reset, a Retry-After (an addition, carried with the result, not stored in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub retry_at: Option<i64>,
}

impl Outcome {
    /// A successful execution and its output.
    pub fn success(output: String, metrics: Metrics) -> Outcome {
        Outcome {
            status: ResultStatus::Success,
            output: Some(output),
            error_message: None,
            metrics,
            error_kind: None,
            retry_at: None,
        }
    }

    /// A failed execution: why, and what it printed when that is worth keeping.
    pub fn error(message: impl Into<String>, output: Option<String>, metrics: Metrics) -> Outcome {
        Outcome {
            status: ResultStatus::Error,
            output,
            error_message: Some(message.into()),
            metrics,
            error_kind: None,
            retry_at: None,
        }
    }

    /// This outcome, classified as a failure of `kind`.
    pub fn kind(mut self, kind: ErrorKind) -> Outcome {
        self.error_kind = Some(kind);
        self
    }
}

/// The class of a failed run. It decides what happens next: a `rate_limited` run waits
/// for the provider's reset and gives its attempt back; the classes the task's
/// `policy.retry.on` lists (by default `provider` and `timeout`) are tried again after a
/// backoff while attempts remain; every other class is final (no blind retry), as is an
/// error without a class (the seed's behaviour).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum ErrorKind {
    /// The provider refused the call for a rate or usage limit (HTTP 429, a rejected
    /// rate-limit event).
    RateLimited,
    /// The provider failed or was overloaded (HTTP 5xx, 529).
    Provider,
    /// The run exceeded `policy.timeout_sec`.
    Timeout,
    /// The agent stopped at its turn limit (`error_max_turns`).
    MaxTurns,
    /// The run reached its budget (`error_max_budget_usd`, or a reported cost above
    /// `policy.budget`).
    MaxBudget,
    /// The output is not what `desired_format` asks for.
    InvalidOutput,
    /// Any other failure of the run (the executor exited non-zero, reported an error).
    Execution,
}

impl ErrorKind {
    /// Every class, as named in JSON and in `policy.retry.on`.
    pub const ALL: [ErrorKind; 7] = [
        ErrorKind::RateLimited,
        ErrorKind::Provider,
        ErrorKind::Timeout,
        ErrorKind::MaxTurns,
        ErrorKind::MaxBudget,
        ErrorKind::InvalidOutput,
        ErrorKind::Execution,
    ];

    /// The class as stored and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::Provider => "provider",
            ErrorKind::Timeout => "timeout",
            ErrorKind::MaxTurns => "max_turns",
            ErrorKind::MaxBudget => "max_budget",
            ErrorKind::InvalidOutput => "invalid_output",
            ErrorKind::Execution => "execution",
        }
    }

    /// The class named `s`.
    pub fn parse(s: &str) -> Option<ErrorKind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Execution metrics: the seed's `duration_ms` and `tokens_used` (input plus output
/// tokens), and what an LLM run reported it used (additions).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Metrics {
    #[schema(minimum = 0)]
    pub duration_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub tokens_used: Option<i64>,
    #[serde(flatten)]
    pub usage: Usage,
}

/// What one LLM run used, named as the Claude CLI's result names it. Every field is
/// optional: a run reports what it knows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    /// What the run cost, in USD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub total_cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub input_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub output_tokens: Option<i64>,
    /// Input tokens read from the prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub cache_read_input_tokens: Option<i64>,
    /// Input tokens written to the prompt cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub cache_creation_input_tokens: Option<i64>,
    /// Agent turns the run took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub num_turns: Option<i64>,
    /// Time spent in provider API calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub duration_api_ms: Option<i64>,
    /// The CLI session, to resume the conversation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// How the run ended (`success`, `error_max_turns`, `error_during_execution`,
    /// `error_max_budget_usd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtype: Option<String>,
    /// The CLI's own verdict: a failed API call can end with `subtype: success` and
    /// `is_error: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
    /// The HTTP status of the provider's failed call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_error_status: Option<i64>,
}

impl Usage {
    /// Input plus output tokens, when the run reported either (the seed's `tokens_used`).
    pub fn tokens(&self) -> Option<i64> {
        match (self.input_tokens, self.output_tokens) {
            (None, None) => None,
            (i, o) => Some(i.unwrap_or(0) + o.unwrap_or(0)),
        }
    }
}

/// A row of `llm_results`, serialized exactly as the seed's `LLMResult`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LlmResult {
    pub id: ResultId,
    pub task_id: TaskId,
    pub worker_id: WorkerId,
    pub artifact_id: ArtifactId,
    #[serde(flatten)]
    pub outcome: Outcome,
    pub completed_at: i64,
}
