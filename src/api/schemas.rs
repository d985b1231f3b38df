//! The bodies of requests and answers, as the OpenAPI document shows them: every
//! handler reads its request body into exactly the type the document describes
//! ([`RequestBody::parse`], with the seed's zod rules of [`super::validate`]) and answers
//! with one of these types or a domain type.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

pub use super::error::ErrorBody;
use super::validate::{FieldErrors, Fields};
use super::ApiError;
use crate::domain::{
    Artifact, Capabilities, DesiredFormat, ErrorKind, Lease, LlmResult, Metrics, NewTask, Outcome, Policy, Priority,
    RateLimitHold, Registration, ResultStatus, RetryPolicy, Task, Usage, Worker, WorkerId, WorkerStatus,
    MAX_REGISTERED_CONCURRENCY,
};

/// Largest accepted prompt, in bytes: a task must fit in one NATS message.
pub const MAX_PROMPT_BYTES: usize = 512 * 1024;
/// Largest token count, turn count or duration one run may report.
const MAX_USAGE_COUNT: i64 = 1_000_000_000_000_000;
/// Largest cost one run may report, in USD.
const MAX_RUN_COST_USD: f64 = 1e9;
/// Largest integer a JavaScript client can send exactly (times in epoch ms).
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Adds to the document the rules between fields that the derived schemas cannot state:
/// `not_before` and `delay_ms` are not given together, and a bulk selection names tasks
/// by at least one of `ids`, `context_id`, `agent_slug`, `prompt_prefix`.
pub(super) fn state_cross_field_rules(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::RefOr;
    let Some(components) = doc.components.as_mut() else { return };
    let mut add = |name: &str, keyword: &str, rule: Value| {
        if let Some(RefOr::T(Schema::Object(o))) = components.schemas.get_mut(name) {
            o.extensions.get_or_insert_with(Default::default).insert(keyword.to_owned(), rule);
        }
    };
    let given =
        |field: &str, kind: &str| serde_json::json!({"required": [field], "properties": {field: {"type": kind}}});
    add(
        "CreateTask",
        "not",
        serde_json::json!({
            "required": ["not_before", "delay_ms"],
            "properties": {"not_before": {"type": "integer"}, "delay_ms": {"type": "integer"}},
        }),
    );
    add(
        "BulkSelection",
        "anyOf",
        Value::Array(vec![
            given("ids", "array"),
            given("context_id", "string"),
            given("agent_slug", "string"),
            given("prompt_prefix", "string"),
        ]),
    );
}

/// A request body read with the seed's zod rules: every field's failures are collected
/// and answered as one 400 in zod's `flatten()` shape.
pub trait RequestBody: Sized {
    /// Reads the body's fields, recording each failure in `f.errors`; `None` when a
    /// field could not be read.
    fn read(f: &mut Fields<'_>) -> Option<Self>;

    /// Reads a JSON body: the value, or a 400 naming every failed field.
    fn parse(body: &Value) -> Result<Self, ApiError> {
        let mut errors = FieldErrors::default();
        let read = Self::read(&mut Fields::root(body, &mut errors));
        match read {
            Some(value) => Ok(errors.finish(value)?),
            None => Err(ApiError::Validation(errors)),
        }
    }
}

/// `policy.retry` (an addition): failures listed in `on` are tried again after a backoff.
fn read_retry(p: &mut Fields<'_>) -> Option<Option<RetryPolicy>> {
    let mut r = match p.object("retry") {
        Some(Some(r)) => r,
        Some(None) => return Some(None),
        None => return None,
    };
    let d = RetryPolicy::default();
    let on = r.opt_strings("on");
    let backoff_ms = r.int("backoff_ms", 0, RetryPolicy::MAX_BACKOFF_MS, Some(d.backoff_ms));
    let max_backoff_ms = r.int("max_backoff_ms", 0, RetryPolicy::MAX_MAX_BACKOFF_MS, Some(d.max_backoff_ms));
    let holds: Vec<&'static str> = RateLimitHold::ALL.iter().map(|h| h.as_str()).collect();
    let hold = r.one_of("hold", &holds, Some(d.hold.as_str())).and_then(RateLimitHold::parse);
    let on = match on? {
        None => d.on,
        Some(names) => {
            let kinds: Vec<Option<ErrorKind>> =
                names.iter().map(|n| ErrorKind::parse(n).filter(|k| RetryPolicy::RETRYABLE.contains(k))).collect();
            if kinds.iter().any(Option::is_none) {
                let allowed: Vec<&str> = RetryPolicy::RETRYABLE.iter().map(|k| k.as_str()).collect();
                r.errors.add("policy", format!("retry.on: each class must be one of {}", allowed.join(", ")));
                return None;
            }
            kinds.into_iter().flatten().collect()
        }
    };
    let (backoff_ms, max_backoff_ms, hold) = (backoff_ms?, max_backoff_ms?, hold?);
    if max_backoff_ms < backoff_ms {
        r.errors.add("policy", "retry.max_backoff_ms must be at least retry.backoff_ms");
        return None;
    }
    Some(Some(RetryPolicy { on, backoff_ms, max_backoff_ms, hold }))
}

/// What a run used, from a `complete` body's `metrics` (additions to the seed's
/// `duration_ms` and `tokens_used`): unknown fields are ignored, known ones must have
/// their type and not be negative.
fn read_usage(f: &mut Fields<'_>) -> Option<Usage> {
    let Some(metrics) = f.raw("metrics").filter(|m| m.is_object()) else {
        return Some(Usage::default());
    };
    let usage: Usage = match serde_json::from_value(metrics.clone()) {
        Ok(u) => u,
        Err(e) => {
            f.errors.add("metrics", format!("Invalid usage: {e}"));
            return None;
        }
    };
    let counts = [
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
        usage.num_turns,
        usage.duration_api_ms,
    ];
    // Bounded so that sums over millions of results cannot overflow.
    let count_ok = |n: &i64| (0..=MAX_USAGE_COUNT).contains(n);
    let cost_ok = |c: f64| (0.0..=MAX_RUN_COST_USD).contains(&c);
    if !counts.iter().flatten().all(count_ok) || !usage.total_cost_usd.map_or(true, cost_ok) {
        let msg = format!(
            "Token counts, turns and durations must be integers from 0 to {MAX_USAGE_COUNT}, total_cost_usd a number \
             from 0 to {MAX_RUN_COST_USD}"
        );
        f.errors.add("metrics", msg);
        return None;
    }
    Some(usage)
}

/// `POST /api/runtime/llm-tasks` (the seed's `insertLLMTaskSchema`).
impl RequestBody for NewTask {
    fn read(f: &mut Fields<'_>) -> Option<NewTask> {
        let context_id = f.string("context_id", 1, None);
        let agent_slug = f.string("agent_slug", 1, None);
        let prompt = f.string("prompt", 1, None);
        let context_hints = f.opt_strings("context_hints").map(Option::unwrap_or_default);
        let policy = match f.object("policy") {
            Some(Some(mut p)) => {
                let timeout_sec = p.int("timeout_sec", 1, 3600, Some(Policy::default().timeout_sec));
                let budget = p.number("budget", 0.0, 0.0);
                let retry = read_retry(&mut p);
                match (timeout_sec, budget, retry) {
                    (Some(timeout_sec), Some(budget), Some(retry)) => Some(Policy { timeout_sec, budget, retry }),
                    _ => None,
                }
            }
            Some(None) => Some(Policy::default()),
            None => None,
        };
        let desired_format = f.one_of("desired_format", &["json", "text"], Some("text")).map(|s| {
            if s == "json" {
                DesiredFormat::Json
            } else {
                DesiredFormat::Text
            }
        });
        let max_attempts = f.int("max_attempts", 1, 10, Some(i64::from(NewTask::DEFAULT_MAX_ATTEMPTS)));
        if prompt.as_ref().is_some_and(|p| p.len() > MAX_PROMPT_BYTES) {
            f.errors.add("prompt", format!("String must contain at most {MAX_PROMPT_BYTES} bytes"));
        }
        // Additions to the seed's fields.
        let priority =
            f.int("priority", Priority::MIN.into(), Priority::MAX.into(), Some(0)).map(|p| Priority(p as i16));
        let not_before = f.opt_int("not_before", 0, MAX_SAFE_INTEGER);
        let delay_ms = f.opt_int("delay_ms", 0, NewTask::MAX_DELAY_MS);
        if matches!((&not_before, &delay_ms), (Some(Some(_)), Some(Some(_)))) {
            f.errors.add("delay_ms", "Only one of not_before and delay_ms may be given");
        }
        let idempotency_key = f.opt_string("idempotency_key", 1, Some(NewTask::MAX_KEY_CHARS), true);
        let concurrency_key = f.opt_string("concurrency_key", 1, Some(NewTask::MAX_KEY_CHARS), true);
        Some(NewTask {
            context_id: context_id?,
            agent_slug: agent_slug?,
            prompt: prompt?,
            context_hints: context_hints?,
            policy: policy?,
            desired_format: desired_format?,
            max_attempts: max_attempts? as i32,
            priority: priority?,
            not_before: not_before?,
            delay_ms: delay_ms?,
            idempotency_key: idempotency_key?,
            concurrency_key: concurrency_key?,
        })
    }
}

/// Body of `POST .../lease`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LeaseBody {
    /// Lease to this worker, if it can take it (online, Claude CLI, a free slot); empty or
    /// absent: the runtime picks one.
    #[serde(default)]
    pub worker_id: Option<String>,
    /// Lease TTL; 0 or absent means the default (300 s).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400)]
    pub ttl_seconds: Option<i64>,
}

impl RequestBody for LeaseBody {
    fn read(f: &mut Fields<'_>) -> Option<LeaseBody> {
        // The seed picks a worker when `worker_id` is falsy: absent, null or empty.
        let worker_id = match f.raw("worker_id") {
            Some(Value::String(s)) if s.is_empty() => Some(None),
            _ => f.opt_string("worker_id", 1, None, true),
        };
        // The seed falls back to its default for a missing or zero TTL.
        let ttl_seconds = match f.raw("ttl_seconds") {
            None | Some(Value::Null) => Some(None),
            Some(v) if v.as_f64() == Some(0.0) => Some(None),
            Some(_) => f.int("ttl_seconds", 1, 86_400, None).map(Some),
        };
        Some(LeaseBody { worker_id: worker_id?, ttl_seconds: ttl_seconds? })
    }
}

/// Answer of `POST .../lease`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LeaseResponse {
    pub lease: Lease,
    pub worker: Worker,
}

/// Optional proof of holding the lease (heartbeat and complete): when given and not the
/// task's current holder, the call is refused with 409.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct HolderBody {
    #[serde(default)]
    #[schema(min_length = 1)]
    pub lease_id: Option<String>,
    #[serde(default)]
    #[schema(min_length = 1)]
    pub worker_id: Option<String>,
}

impl RequestBody for HolderBody {
    fn read(f: &mut Fields<'_>) -> Option<HolderBody> {
        let lease_id = f.opt_string("lease_id", 1, None, true);
        let worker_id = f.opt_string("worker_id", 1, None, true);
        Some(HolderBody { lease_id: lease_id?, worker_id: worker_id? })
    }
}

/// Answer of `POST .../heartbeat`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    pub lease: Lease,
    pub expires_at: i64,
}

/// Body of `POST .../complete` (the seed's `completeTaskSchema`): the outcome, where its
/// artifact goes, and who claims to hold the lease.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompleteBody {
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Default `LLM_RESULT`.
    #[serde(default = "CompleteBody::default_artifact_type")]
    pub artifact_type: String,
    #[serde(default)]
    pub artifact_tags: Vec<String>,
    #[serde(flatten)]
    pub holder: HolderBody,
}

impl CompleteBody {
    fn default_artifact_type() -> String {
        "LLM_RESULT".into()
    }
}

impl RequestBody for CompleteBody {
    fn read(f: &mut Fields<'_>) -> Option<CompleteBody> {
        let status = f.one_of("status", &["success", "error"], None).map(|s| {
            if s == "success" {
                ResultStatus::Success
            } else {
                ResultStatus::Error
            }
        });
        let output = f.opt_string("output", 0, None, true);
        let error_message = f.opt_string("error_message", 0, None, true);
        let metrics = match f.object("metrics") {
            Some(Some(mut m)) => {
                let duration_ms = m.int("duration_ms", 0, i64::MAX, None);
                // The membridge agent always sends `tokens_used: null`: absent.
                let tokens = match m.raw("tokens_used") {
                    None | Some(Value::Null) => Some(None),
                    Some(_) => m.int("tokens_used", 0, i64::MAX, None).map(Some),
                };
                duration_ms.zip(tokens).map(|(duration_ms, tokens_used)| Metrics {
                    duration_ms,
                    tokens_used,
                    usage: Usage::default(),
                })
            }
            Some(None) => {
                f.errors.add("metrics", "Required");
                None
            }
            None => None,
        };
        let artifact_type =
            f.opt_string("artifact_type", 0, None, false).map(|t| t.unwrap_or_else(Self::default_artifact_type));
        let artifact_tags = f.opt_strings("artifact_tags").map(Option::unwrap_or_default);
        let holder = HolderBody::read(f);
        // Additions: what the run used, the class of a failure, when to try again.
        let usage = read_usage(f);
        let kinds: Vec<&'static str> = ErrorKind::ALL.iter().map(|k| k.as_str()).collect();
        let error_kind = match f.raw("error_kind") {
            None | Some(Value::Null) => Some(None),
            Some(_) => f.one_of("error_kind", &kinds, None).map(ErrorKind::parse),
        };
        let retry_at = f.opt_int("retry_at", 0, MAX_SAFE_INTEGER);
        let mut metrics = metrics?;
        metrics.usage = usage?;
        Some(CompleteBody {
            outcome: Outcome {
                status: status?,
                output: output?,
                error_message: error_message?,
                metrics,
                error_kind: error_kind?,
                retry_at: retry_at?,
            },
            artifact_type: artifact_type?,
            artifact_tags: artifact_tags?,
            holder: holder?,
        })
    }
}

/// Answer of `POST .../dispatch`: `execution` is the agent's answer as it gave it (its
/// `{detail}` when it refused); `error` says why no agent answered (502).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Dispatched {
    pub dispatched: bool,
    #[schema(value_type = String)]
    pub task_id: crate::domain::TaskId,
    #[schema(value_type = String)]
    pub worker_id: WorkerId,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub lease_id: Option<crate::domain::LeaseId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Answer of `POST .../complete`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompleteResponse {
    pub task: Task,
    pub artifact: Artifact,
    pub result: LlmResult,
}

/// `POST /api/runtime/workers` (the seed's `registerWorkerSchema`).
impl RequestBody for Registration {
    fn read(f: &mut Fields<'_>) -> Option<Registration> {
        let name = f.string("name", 1, Some(128));
        let url = f.opt_string("url", 0, None, false);
        let status = f
            .one_of("status", &["online", "offline", "syncing", "error", "unknown"], Some("online"))
            .and_then(WorkerStatus::parse);
        let capabilities = match f.object("capabilities") {
            Some(Some(mut c)) => {
                let claude_cli = c.boolean("claude_cli", true);
                let max_concurrency = c.int("max_concurrency", 1, MAX_REGISTERED_CONCURRENCY, Some(1));
                let labels = c.opt_strings("labels").map(Option::unwrap_or_default);
                match (claude_cli, max_concurrency, labels) {
                    (Some(claude_cli), Some(m), Some(labels)) => {
                        // Other keys are dropped, as the seed's schema drops them.
                        Some(Capabilities { claude_cli, max_concurrency: m as i32, labels, ..Capabilities::default() })
                    }
                    _ => None,
                }
            }
            Some(None) => Some(Capabilities::default()),
            None => None,
        };
        let ip_addrs = f.opt_strings("ip_addrs").map(Option::unwrap_or_default);
        // What an agent says of itself (upstream dropped these; they are stored). An empty
        // version or install method (the agent sends its environment's value as it is) says
        // nothing: the row keeps what it had.
        let said = |v: Option<Option<String>>| v.map(|v| v.filter(|s| !s.is_empty()));
        let agent_version = said(f.opt_string("agent_version", 0, Some(64), true));
        let os_info = f.opt_string("os_info", 0, Some(512), true);
        let install_method = said(f.opt_string("install_method", 0, Some(64), true));
        Some(Registration {
            name: WorkerId(name?),
            url: url?,
            status: status?,
            capabilities: capabilities?,
            ip_addrs: ip_addrs?,
            agent_version: agent_version?,
            os_info: os_info?,
            install_method: install_method?,
        })
    }
}

/// A worker with its active leases.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WorkerDetail {
    #[serde(flatten)]
    pub worker: Worker,
    pub leases: Vec<Lease>,
}

/// Answer of `DELETE /api/runtime/workers/:id`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Removed {
    pub removed: bool,
    pub id: String,
}

/// Body of `POST /api/runtime/config`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ConfigInput {
    /// The key membridge agents require (`X-MEMBRIDGE-AGENT`), replacing
    /// `MEMBRIDGE_AGENT_KEY`; kept when absent, never returned.
    #[serde(default)]
    #[schema(min_length = 1)]
    pub agent_key: Option<String>,
    /// An absolute URL.
    #[schema(pattern = "^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$")]
    pub membridge_server_url: String,
    #[schema(min_length = 1)]
    pub admin_key: String,
}

impl RequestBody for ConfigInput {
    fn read(f: &mut Fields<'_>) -> Option<ConfigInput> {
        let url = f.string("membridge_server_url", 0, None);
        let key = f.string("admin_key", 1, None);
        if url.as_deref().is_some_and(|u| reqwest::Url::parse(u).is_err()) {
            f.errors.add("membridge_server_url", "Invalid url");
        }
        let agent_key = f.opt_string("agent_key", 1, None, true);
        Some(ConfigInput { membridge_server_url: url?, admin_key: key?, agent_key: agent_key? })
    }
}

/// The membridge configuration as returned (the key masked).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RuntimeConfigView {
    pub membridge_server_url: String,
    pub admin_key_masked: String,
    pub connected: bool,
    pub last_test: Option<i64>,
}

/// Answer of `POST /api/runtime/test-connection`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TestConnection {
    pub connected: bool,
    /// Membridge's `/health` when connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<serde_json::Value>,
    /// Why not, when not connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Body of `POST /api/membridge/projects/:cid/leadership/select` (passed to membridge).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LeadershipSelect {
    pub primary_node_id: String,
    #[serde(default)]
    pub lease_seconds: Option<i64>,
}

/// Answer of `GET /api/runtime/artifacts/:id/content?presign=true`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Presigned {
    /// A GET URL of the object in S3.
    pub url: String,
    /// Seconds the URL stays valid.
    pub expires_in: u64,
}

/// Answer of `GET /api/runtime/health` (fields in the order the original wrote them).
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub database: Connected,
    /// The membridge connection state every process shares, and the agent sync's.
    pub membridge: Value,
    pub nats: Connected,
    pub service: &'static str,
    pub status: &'static str,
    pub storage: &'static str,
    /// Seconds since this process started.
    pub uptime: f64,
}

/// Whether a dependency answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Connected {
    pub connected: bool,
}

/// Answer of `GET /readyz`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    pub database: bool,
    pub nats: bool,
}

/// An agent's answer passed on: `{status, ...answer}` for an operation, `{reachable,
/// ...health}` or `{reachable: false, error}` for a health check.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct AgentAnswer(pub serde_json::Map<String, Value>);

/// A JSON document passed through from membridge.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct Passthrough(pub serde_json::Value);
