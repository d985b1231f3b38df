//! Request and response shapes for the OpenAPI document. Handlers validate bodies with
//! [`super::validate`] (the original zod rules); these types describe the same rules.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::{Artifact, Lease, LlmResult, Task, Worker};

/// Body of `POST /api/runtime/llm-tasks` (the seed's `insertLLMTaskSchema`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateTask {
    #[schema(min_length = 1)]
    pub context_id: String,
    #[schema(min_length = 1)]
    pub agent_slug: String,
    /// At most 512 KiB.
    #[schema(min_length = 1)]
    pub prompt: String,
    #[serde(default)]
    pub context_hints: Option<Vec<String>>,
    #[serde(default)]
    pub policy: Option<PolicyInput>,
    #[serde(default)]
    #[schema(pattern = "^(json|text)$")]
    pub desired_format: Option<String>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 10)]
    pub max_attempts: Option<i64>,
}

/// Execution policy; defaults `{timeout_sec: 120, budget: 0}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PolicyInput {
    #[serde(default)]
    #[schema(minimum = 1, maximum = 3600)]
    pub timeout_sec: Option<i64>,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub budget: Option<f64>,
}

/// Body of `POST .../lease`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LeaseBody {
    /// Lease to this worker (regardless of its capacity).
    #[serde(default)]
    #[schema(min_length = 1)]
    pub worker_id: Option<String>,
    /// Lease TTL; 0 or absent means the default (300 s).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400)]
    pub ttl_seconds: Option<i64>,
}

/// Answer of `POST .../lease`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LeaseResponse {
    pub lease: Lease,
    pub worker: Worker,
}

/// Optional proof of holding the lease (heartbeat and complete).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HolderBody {
    #[serde(default)]
    #[schema(min_length = 1)]
    pub lease_id: Option<String>,
    #[serde(default)]
    #[schema(min_length = 1)]
    pub worker_id: Option<String>,
}

/// Answer of `POST .../heartbeat`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    pub lease: Lease,
    pub expires_at: i64,
}

/// Body of `POST .../complete` (the seed's `completeTaskSchema`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompleteBody {
    #[schema(pattern = "^(success|error)$")]
    pub status: String,
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub error_message: Option<String>,
    pub metrics: MetricsInput,
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub artifact_tags: Option<Vec<String>>,
    #[serde(default)]
    #[schema(min_length = 1)]
    pub lease_id: Option<String>,
    #[serde(default)]
    #[schema(min_length = 1)]
    pub worker_id: Option<String>,
}

/// Execution metrics reported by a worker.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MetricsInput {
    #[schema(minimum = 0)]
    pub duration_ms: i64,
    #[serde(default)]
    #[schema(minimum = 0)]
    pub tokens_used: Option<i64>,
}

/// Answer of `POST .../complete`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CompleteResponse {
    pub task: Task,
    pub artifact: Artifact,
    pub result: LlmResult,
}

/// Body of `POST /api/runtime/workers` (the seed's `registerWorkerSchema`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RegisterWorker {
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    #[schema(pattern = "^(online|offline|syncing|error|unknown)$")]
    pub status: Option<String>,
    #[serde(default)]
    pub capabilities: Option<CapabilitiesInput>,
    #[serde(default)]
    pub ip_addrs: Option<Vec<String>>,
}

/// Worker capabilities; defaults `{claude_cli: true, max_concurrency: 1, labels: []}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CapabilitiesInput {
    #[serde(default)]
    pub claude_cli: Option<bool>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 32)]
    pub max_concurrency: Option<i64>,
    #[serde(default)]
    pub labels: Option<Vec<String>>,
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
    /// An absolute URL.
    pub membridge_server_url: String,
    #[schema(min_length = 1)]
    pub admin_key: String,
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

/// Any error: `error` is a message, or for a 400 zod's `flatten()` object
/// (`{formErrors: [...], fieldErrors: {field: [...]}}`). A body that could not be read
/// (invalid JSON, too large) also carries the message as `message`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A JSON document passed through from membridge.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct Passthrough(pub serde_json::Value);
