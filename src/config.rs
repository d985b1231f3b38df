//! Configuration of every binary: clap structs with an environment variable on every
//! field. The environment is read here and nowhere else. Variable names of the original
//! service (`DATABASE_URL`, `RUNTIME_API_KEY`, `MEMBRIDGE_*`, `MINIO_*`, `NODE_ENV`,
//! `BLOOM_RUNTIME_PORT`) keep working.

use std::time::Duration;

use clap::Args;

use crate::domain::Secret;

/// Postgres connection.
#[derive(Args, Clone, Debug)]
pub struct DbArgs {
    /// Postgres URL.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:5432/bloom")]
    pub database_url: Secret,
    /// Pool size.
    #[arg(long, env = "BLOOM_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
    /// Statement timeout in milliseconds.
    #[arg(long, env = "BLOOM_DB_STATEMENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub db_statement_timeout_ms: u64,
    /// How long an idempotency key is remembered, in seconds: a submission repeating a
    /// key within it returns the key's task (the API), and the reconcilers forget keys
    /// older than it.
    #[arg(long, env = "BLOOM_IDEMPOTENCY_RETENTION_SECS", default_value_t = 86_400)]
    pub idempotency_retention_secs: u64,
}

impl DbArgs {
    /// Pool options.
    pub fn pool_options(&self) -> crate::db::PoolOptions {
        crate::db::PoolOptions {
            max_connections: self.db_max_connections.max(1),
            statement_timeout: self.statement_timeout(),
            ..Default::default()
        }
    }

    /// How long an idempotency key is remembered (at least a second).
    pub fn idempotency_retention(&self) -> Duration {
        Duration::from_secs(self.idempotency_retention_secs.max(1))
    }

    /// The statement timeout.
    pub fn statement_timeout(&self) -> Duration {
        Duration::from_millis(self.db_statement_timeout_ms.max(1))
    }

    /// The client-side bound of one database call: the statement timeout and a margin
    /// for connecting and the round trip, so that Postgres gives up on a statement
    /// first (a statement the client abandoned could still commit).
    pub fn call_timeout(&self) -> Duration {
        self.statement_timeout() + Duration::from_secs(5)
    }
}

/// NATS connection and naming.
#[derive(Args, Clone, Debug)]
pub struct NatsArgs {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Prefix of every stream, subject and consumer name.
    #[arg(long, env = "BLOOM_NATS_NAMESPACE", default_value = "bloom")]
    pub nats_namespace: String,
    /// Lease TTL in seconds: the tasks consumers' ack-wait, and the REST lease default.
    #[arg(long, env = "BLOOM_LEASE_TTL_SECS", default_value_t = 300)]
    pub lease_ttl_secs: u64,
    /// Timeout of JetStream publish acknowledgements and requests, in milliseconds.
    #[arg(long, env = "BLOOM_NATS_TIMEOUT_MS", default_value_t = 5_000)]
    pub nats_timeout_ms: u64,
    /// Replicas of each JetStream stream and its consumers: 1 on a single server, 3 on a
    /// cluster (at most 5). The processes create missing streams with it;
    /// `bloomctl nats apply` also changes it on existing streams.
    #[arg(long, env = "BLOOM_NATS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: u8,
    /// How long the tasks stream keeps a dispatch nobody took, in seconds (0: for ever).
    /// A task leased over REST or sent to an HTTP agent leaves its dispatch unconsumed when
    /// no NATS worker runs; a task still queued when its dispatch goes is dispatched again
    /// once a NATS worker has room (`BLOOM_REDISPATCH_AFTER_MS`), behind the dispatches
    /// then in the stream: keep it above the longest a task waits for a NATS worker.
    #[arg(long, env = "BLOOM_NATS_TASK_MAX_AGE_SECS", default_value_t = crate::bus::provision::DEFAULT_TASK_MAX_AGE_SECS)]
    pub nats_task_max_age_secs: u64,
}

impl NatsArgs {
    /// Validated names.
    pub fn names(&self) -> Result<crate::bus::Names, String> {
        crate::bus::Names::new(&self.nats_namespace).map_err(|e| format!("BLOOM_NATS_NAMESPACE: {e}"))
    }
    /// The lease TTL.
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs.clamp(1, 86_400))
    }
    /// The streams' shape: the consumers' ack-wait, the replicas and how long a dispatch
    /// is kept.
    pub fn streams(&self) -> crate::bus::provision::StreamLayout {
        crate::bus::provision::StreamLayout {
            lease_ttl: self.lease_ttl(),
            replicas: usize::from(self.nats_replicas),
            task_max_age: Duration::from_secs(self.nats_task_max_age_secs),
        }
    }
    /// Request and publish-ack timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.nats_timeout_ms.max(1))
    }
}

/// Logging and telemetry.
#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// `text` or `json`.
    #[arg(long, env = "BLOOM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
    /// Parse and validate the configuration, print it (secrets masked) and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// The membridge control plane.
#[derive(Args, Clone, Debug)]
pub struct MembridgeArgs {
    /// Default membridge URL until one is saved with `POST /api/runtime/config`.
    #[arg(long, env = "MEMBRIDGE_SERVER_URL", default_value = "http://127.0.0.1:8000")]
    pub membridge_server_url: String,
    /// Default admin key until one is saved with `POST /api/runtime/config`.
    #[arg(long, env = "MEMBRIDGE_ADMIN_KEY", default_value = "")]
    pub membridge_admin_key: Secret,
    /// Timeout of one membridge request, in milliseconds.
    #[arg(long, env = "MEMBRIDGE_TIMEOUT_MS", default_value_t = 10_000)]
    pub membridge_timeout_ms: u64,
    /// The key membridge agents require (`X-MEMBRIDGE-AGENT`) on every call the runtime
    /// makes to them.
    #[arg(long, env = "MEMBRIDGE_AGENT_KEY", default_value = "")]
    pub membridge_agent_key: Secret,
}

impl MembridgeArgs {
    /// Timeout of one membridge request.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.membridge_timeout_ms.max(1))
    }

    /// The membridge endpoint to use until one is saved in `runtime_settings`.
    pub fn endpoint(&self) -> crate::domain::Endpoint {
        crate::domain::Endpoint { url: self.membridge_server_url.clone(), admin_key: self.membridge_admin_key.clone() }
    }
}

/// S3 artifact storage. Without an endpoint or bucket, artifacts stay in Postgres.
/// The original service's `MINIO_*` variables are honoured.
#[derive(Args, Clone, Debug, Default)]
pub struct S3Args {
    /// S3 endpoint URL, e.g. `http://minio:9000`.
    #[arg(long, env = "BLOOM_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// Bucket for artifacts (created if missing).
    #[arg(long, env = "BLOOM_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// Region.
    #[arg(long, env = "BLOOM_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// Path-style addressing (needed by MinIO and most S3-compatible stores).
    #[arg(long, env = "BLOOM_S3_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub s3_path_style: bool,
    /// Timeout of one S3 operation, in milliseconds.
    #[arg(long, env = "BLOOM_S3_TIMEOUT_MS", default_value_t = 10_000)]
    pub s3_timeout_ms: u64,
    /// Seed compatibility: MinIO host name.
    #[arg(long, env = "MINIO_ENDPOINT")]
    pub minio_endpoint: Option<String>,
    /// Seed compatibility: MinIO port.
    #[arg(long, env = "MINIO_PORT", default_value_t = 9000)]
    pub minio_port: u16,
    /// Seed compatibility: MinIO access key.
    #[arg(long, env = "MINIO_ACCESS_KEY")]
    pub minio_access_key: Option<Secret>,
    /// Seed compatibility: MinIO secret key.
    #[arg(long, env = "MINIO_SECRET_KEY")]
    pub minio_secret_key: Option<Secret>,
    /// Seed compatibility: MinIO bucket.
    #[arg(long, env = "MINIO_ARTIFACT_BUCKET", default_value = "bloom-artifacts")]
    pub minio_artifact_bucket: String,
    /// Seed compatibility: use TLS to MinIO.
    #[arg(long, env = "MINIO_USE_SSL", default_value_t = false, action = clap::ArgAction::Set)]
    pub minio_use_ssl: bool,
}

/// The effective S3 settings after merging `BLOOM_S3_*` and `MINIO_*`.
#[derive(Clone, Debug, PartialEq)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub bucket: String,
    pub region: String,
    pub path_style: bool,
    /// Static credentials (from `MINIO_*`); otherwise the standard AWS chain applies.
    pub static_credentials: Option<(Secret, Secret)>,
    pub timeout: Duration,
}

impl S3Args {
    /// S3 settings, or `None` when S3 is not configured (artifacts stay in Postgres).
    pub fn settings(&self) -> Option<S3Settings> {
        let timeout = Duration::from_millis(self.s3_timeout_ms.max(1));
        if let Some(bucket) = &self.s3_bucket {
            return Some(S3Settings {
                endpoint: self.s3_endpoint.clone(),
                bucket: bucket.clone(),
                region: self.s3_region.clone(),
                path_style: self.s3_path_style,
                static_credentials: self.minio_credentials(),
                timeout,
            });
        }
        // The seed's rule: MinIO is configured when endpoint and both keys are set.
        let host = self.minio_endpoint.as_ref().filter(|h| !h.is_empty())?;
        let creds = self.minio_credentials()?;
        let scheme = if self.minio_use_ssl { "https" } else { "http" };
        Some(S3Settings {
            endpoint: Some(format!("{scheme}://{host}:{}", self.minio_port)),
            bucket: self.minio_artifact_bucket.clone(),
            region: self.s3_region.clone(),
            path_style: true,
            static_credentials: Some(creds),
            timeout,
        })
    }

    fn minio_credentials(&self) -> Option<(Secret, Secret)> {
        match (&self.minio_access_key, &self.minio_secret_key) {
            (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => Some((a.clone(), s.clone())),
            _ => None,
        }
    }
}

/// The REST API server.
#[derive(Args, Clone, Debug)]
pub struct ApiArgs {
    /// Listen address.
    #[arg(long, env = "BLOOM_RUNTIME_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Listen port.
    #[arg(long, env = "BLOOM_RUNTIME_PORT", default_value_t = 3002)]
    pub port: u16,
    /// API key required in `X-Runtime-Api-Key`; unset disables auth (refused in production).
    #[arg(long, env = "RUNTIME_API_KEY")]
    pub runtime_api_key: Option<Secret>,
    /// `production` enables production mode.
    #[arg(long, env = "BLOOM_ENV", default_value = "")]
    pub bloom_env: String,
    /// The seed's production switch: `production` enables production mode.
    #[arg(long, env = "NODE_ENV", default_value = "")]
    pub node_env: String,
    /// Requests per minute per client on `/api/*`; 0 disables.
    #[arg(long, env = "BLOOM_RATE_LIMIT_PER_MIN", default_value_t = 100)]
    pub rate_limit_per_min: u32,
    /// Requests per minute per client on `/api/runtime/test-connection`; 0 disables.
    #[arg(long, env = "BLOOM_TEST_CONNECTION_RATE_LIMIT_PER_MIN", default_value_t = 20)]
    pub test_connection_rate_limit_per_min: u32,
    /// A built web client (a single-page application's output directory, holding its
    /// `index.html`, e.g. the upstream BLOOM web client's build) to serve at `/`; unset:
    /// none.
    #[arg(long, env = "BLOOM_WEB_DIR")]
    pub web_dir: Option<std::path::PathBuf>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "BLOOM_BODY_LIMIT_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub body_limit_bytes: usize,
    /// Apply migrations at start-up.
    #[arg(long, env = "BLOOM_MIGRATE_ON_START", default_value_t = false, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,
    /// Trust `X-Forwarded-For` for the client address (behind a proxy; on in production).
    #[arg(long, env = "BLOOM_TRUST_PROXY", default_value_t = false, action = clap::ArgAction::Set)]
    pub trust_proxy: bool,
    /// Concurrency limits set at start-up where the database has none for the same scope
    /// and key (limits changed through the API are kept): `scope:key=N`, comma
    /// separated, e.g. `context_id:*=1,agent_slug:writer=4`.
    #[arg(long, env = "BLOOM_CONCURRENCY_LIMITS", default_value = "")]
    pub concurrency_limits: String,
    /// Budgets set at start-up where the database has none for the same scope, key and
    /// rule (budgets changed through the API are kept): `scope:key:<metric>-per-<period>=N`,
    /// comma separated, e.g. `agent_slug:claude:usd-per-day=50,agent_slug:*:requests-per-minute=40`.
    #[arg(long, env = "BLOOM_BUDGETS", default_value = "")]
    pub budgets: String,
}

impl ApiArgs {
    /// The configured concurrency limits, or what is wrong with them.
    pub fn concurrency_limits(&self) -> Result<Vec<crate::domain::ConcurrencyLimit>, String> {
        crate::domain::ConcurrencyLimit::parse_list(&self.concurrency_limits)
            .map_err(|e| format!("BLOOM_CONCURRENCY_LIMITS: {e}"))
    }

    /// The configured budgets, or what is wrong with them.
    pub fn budgets(&self) -> Result<Vec<crate::domain::BudgetLimit>, String> {
        crate::domain::BudgetLimit::parse_list(&self.budgets).map_err(|e| format!("BLOOM_BUDGETS: {e}"))
    }

    /// Production mode (`BLOOM_ENV=production` or `NODE_ENV=production`).
    pub fn is_production(&self) -> bool {
        self.bloom_env == "production" || self.node_env == "production"
    }

    /// The API key, if one is configured and non-empty.
    pub fn api_key(&self) -> Option<&Secret> {
        self.runtime_api_key.as_ref().filter(|k| !k.is_empty())
    }

    /// Checks settings that clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.is_production() && self.api_key().is_none() {
            return Err("RUNTIME_API_KEY must be set in production (BLOOM_ENV/NODE_ENV=production)".into());
        }
        if self.body_limit_bytes < 1024 {
            return Err("BLOOM_BODY_LIMIT_BYTES must be at least 1024".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_not_printed() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn seed_minio_variables_configure_s3() {
        let args = S3Args {
            minio_endpoint: Some("minio".into()),
            minio_port: 9000,
            minio_access_key: Some(Secret::new("a")),
            minio_secret_key: Some(Secret::new("b")),
            minio_artifact_bucket: "bloom-artifacts".into(),
            s3_region: "us-east-1".into(),
            s3_timeout_ms: 1000,
            ..Default::default()
        };
        let s = args.settings().unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("http://minio:9000"));
        assert_eq!(s.bucket, "bloom-artifacts");
        assert!(s.path_style);
        let none = S3Args { minio_endpoint: Some("minio".into()), ..Default::default() };
        assert!(none.settings().is_none(), "seed requires both keys");
    }

    #[test]
    fn agents_call_back_the_api_on_its_port_unless_told_where() {
        assert_eq!(callback_url(None, None), "http://127.0.0.1:3002");
        assert_eq!(callback_url(Some(" "), Some("5000")), "http://127.0.0.1:5000");
        assert_eq!(callback_url(None, Some("tcp://10.0.0.7:3002")), "http://127.0.0.1:3002", "a service link");
        assert_eq!(callback_url(Some("https://bloom.example/ "), Some("5000")), "https://bloom.example");
    }
}

/// The executor's default command: the Claude CLI in print mode with JSON output,
/// prompt on stdin.
pub const DEFAULT_EXECUTOR_COMMAND: &str =
    r#"claude -p --output-format json ${BLOOM_MAX_BUDGET_USD:+--max-budget-usd "$BLOOM_MAX_BUDGET_USD"}"#;

/// A `bloom-worker` process.
#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    /// Worker id (its name); defaults to the host name.
    #[arg(long, env = "BLOOM_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Tasks run at once (1..=256).
    #[arg(long, env = "BLOOM_WORKER_MAX_CONCURRENCY", default_value_t = 1)]
    pub max_concurrency: i32,
    /// Labels, comma separated.
    #[arg(long, env = "BLOOM_WORKER_LABELS", default_value = "", value_delimiter = ',')]
    pub labels: Vec<String>,
    /// The worker can run the Claude CLI.
    #[arg(long, env = "BLOOM_WORKER_CLAUDE_CLI", default_value_t = true, action = clap::ArgAction::Set)]
    pub claude_cli: bool,
    /// `command` (run `BLOOM_EXECUTOR_COMMAND`) or `builtin` (the test executor).
    #[arg(long, env = "BLOOM_EXECUTOR", default_value = "command", value_parser = ["command", "builtin"])]
    pub executor: String,
    /// Command run through `sh -c`, prompt on stdin.
    #[arg(long, env = "BLOOM_EXECUTOR_COMMAND", default_value = DEFAULT_EXECUTOR_COMMAND)]
    pub executor_command: String,
    /// Largest output accepted from the executor, in bytes (must fit a NATS message).
    #[arg(long, env = "BLOOM_EXECUTOR_MAX_OUTPUT_BYTES", default_value_t = 512 * 1024)]
    pub executor_max_output_bytes: usize,
    /// Liveness beat interval in milliseconds.
    #[arg(long, env = "BLOOM_WORKER_BEAT_INTERVAL_MS", default_value_t = 5_000)]
    pub beat_interval_ms: u64,
    /// Seconds in-flight tasks get to finish on SIGTERM before they are handed back.
    #[arg(long, env = "BLOOM_WORKER_SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,
    /// Milliseconds a claim waits for a reconciler's answer before it is sent again
    /// (claims are idempotent; a reconciler that died holding one costs this much), and
    /// a results request before its results go to the results stream.
    #[arg(long, env = "BLOOM_CLAIM_TIMEOUT_MS", default_value_t = 1_500)]
    pub claim_timeout_ms: u64,
    /// Port of `/healthz` and `/metrics`; 0 disables.
    #[arg(long, env = "BLOOM_WORKER_HTTP_PORT", default_value_t = 9091)]
    pub http_port: u16,
}

impl WorkerArgs {
    /// Checks settings that clap cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=256).contains(&self.max_concurrency) {
            return Err("BLOOM_WORKER_MAX_CONCURRENCY must be between 1 and 256".into());
        }
        if self.executor == "command" && self.executor_command.trim().is_empty() {
            return Err("BLOOM_EXECUTOR_COMMAND must not be empty".into());
        }
        Ok(())
    }

    /// The worker id: configured, else the host name, else a random one.
    pub fn id(&self) -> String {
        self.worker_id
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
            .or_else(|| {
                std::fs::read_to_string("/etc/hostname").ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
            })
            .unwrap_or_else(|| format!("worker-{}", &crate::domain::new_id()[..8]))
    }
}

/// A `bloom-reconciler` process.
#[derive(Args, Clone, Debug)]
pub struct ReconcilerArgs {
    /// Port of `/healthz`, `/readyz`, `/metrics` and `/status`; 0 disables.
    #[arg(long, env = "BLOOM_RECONCILER_HTTP_PORT", default_value_t = 9090)]
    pub http_port: u16,
    /// Lease sweep interval in milliseconds.
    #[arg(long, env = "BLOOM_SWEEP_INTERVAL_MS", default_value_t = 1_000)]
    pub sweep_interval_ms: u64,
    /// How often (ms) artifacts whose content is in Postgres (written behind, or kept
    /// there because S3 failed) are moved to S3, at most 64 artifacts and 16 MiB per
    /// pass, passes back to back while a backlog remains (with S3 configured).
    #[arg(long, env = "BLOOM_ARTIFACT_MOVE_INTERVAL_MS", default_value_t = 250)]
    pub artifact_move_interval_ms: u64,
    /// Outputs up to this size (bytes) reported over NATS are stored in Postgres when
    /// their task completes and uploaded to S3 right after by the artifact mover, off the
    /// completion path; larger ones are uploaded before the task completes. 0 uploads
    /// every output before its task completes. Without S3, every output stays in Postgres.
    #[arg(long, env = "BLOOM_ARTIFACT_WRITE_BEHIND_MAX_BYTES", default_value_t = 1_048_576)]
    pub artifact_write_behind_max_bytes: usize,
    /// How often (ms) queued tasks are leased to HTTP agents with free slots and sent to
    /// their `/execute-task`.
    #[arg(long, env = "BLOOM_AGENT_DISPATCH_INTERVAL_MS", default_value_t = 500)]
    pub agent_dispatch_interval_ms: u64,
    /// How long (ms) a newly submitted task is left to its client before it is leased to
    /// an HTTP agent: a client that submits a task and then dispatches or leases it
    /// itself (the upstream web client's Create & Dispatch) gets it. 0: at once.
    #[arg(long, env = "BLOOM_AGENT_DISPATCH_CLIENT_WINDOW_MS", default_value_t = 1000)]
    pub agent_dispatch_client_window_ms: u64,
    /// The API's URL as HTTP agents reach it: they send their heartbeat and `complete`
    /// callbacks there (`runtime_url` of `/execute-task`). Unset:
    /// `http://127.0.0.1:<BLOOM_RUNTIME_PORT>`, the API on this host.
    #[arg(long, env = "BLOOM_RUNTIME_URL")]
    pub runtime_url: Option<String>,
    /// The API's port (the variable the API listens by), for the default `runtime_url`.
    /// Read only then, and a value that is not a port (Kubernetes sets
    /// `<SERVICE>_PORT=tcp://...` for a Service named `bloom-runtime`) counts as unset.
    #[arg(long = "api-port", env = "BLOOM_RUNTIME_PORT")]
    pub api_port: Option<String>,
    /// Grace past `expires_at` before a lease is expired, in milliseconds.
    #[arg(long, env = "BLOOM_EXPIRY_GRACE_MS", default_value_t = 2_000)]
    pub expiry_grace_ms: u64,
    /// Outbox relay interval in milliseconds.
    #[arg(long, env = "BLOOM_RELAY_INTERVAL_MS", default_value_t = 500)]
    pub relay_interval_ms: u64,
    /// Outbox rows younger than this (ms) are left to their writer.
    #[arg(long, env = "BLOOM_RELAY_MIN_AGE_MS", default_value_t = 2_000)]
    pub relay_min_age_ms: u64,
    /// A task queued this long (ms) with the same dispatch while a NATS worker has room is
    /// dispatched again (its message was lost with a NATS server); 0 disables.
    #[arg(long, env = "BLOOM_REDISPATCH_AFTER_MS", default_value_t = 15_000)]
    pub redispatch_after_ms: u64,
    /// A NATS worker silent this long (ms) is marked offline and its leases end.
    #[arg(long, env = "BLOOM_WORKER_TIMEOUT_MS", default_value_t = 30_000)]
    pub worker_timeout_ms: u64,
    /// Membridge agent sync interval in milliseconds.
    #[arg(long, env = "BLOOM_MEMBRIDGE_SYNC_INTERVAL_MS", default_value_t = 10_000)]
    pub membridge_sync_interval_ms: u64,
    /// Leader election poll interval in milliseconds.
    #[arg(long, env = "BLOOM_LEADER_POLL_MS", default_value_t = 2_000)]
    pub leader_poll_ms: u64,
}

impl ReconcilerArgs {
    /// Where HTTP agents send their callbacks: `BLOOM_RUNTIME_URL`, else the API on this
    /// host at `BLOOM_RUNTIME_PORT`.
    pub fn runtime_url(&self) -> String {
        callback_url(self.runtime_url.as_deref(), self.api_port.as_deref())
    }
}

/// `url` without its trailing `/`, else the API on this host at `port` (3002 when it is
/// not a port number).
fn callback_url(url: Option<&str>, port: Option<&str>) -> String {
    match url.map(str::trim).filter(|u| !u.is_empty()) {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let port = port.and_then(|p| p.trim().parse::<u16>().ok()).unwrap_or(3002);
            format!("http://127.0.0.1:{port}")
        }
    }
}
