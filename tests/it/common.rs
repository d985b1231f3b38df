//! `TestApp`: the API, reconcilers and workers of one test, in-process, against a fresh
//! database and a private NATS namespace.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bloom::api::{self, ApiSettings};
use bloom::artifacts::ArtifactStore;
use bloom::bus::Names;
use bloom::config::{ApiArgs, DbArgs, MembridgeArgs, NatsArgs, ReconcilerArgs, S3Settings, WorkerArgs};
use bloom::domain::Endpoint;
use bloom::domain::Secret;

use bloom::metrics::Metrics;
use bloom::reconciler::{Reconciler, ReconcilerSettings};
use bloom::worker::WorkerSettings;
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

pub fn admin_db_url() -> String {
    std::env::var("BLOOM_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn nats_url() -> String {
    std::env::var("BLOOM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

pub fn s3_endpoint() -> String {
    std::env::var("BLOOM_TEST_S3_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9311".into())
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// The beat of an online NATS worker with the Claude CLI and `max_concurrency` slots, as
/// `bloom-worker` sends it.
pub fn online_beat(id: &str, max_concurrency: i32) -> bloom::db::workers::Beat {
    bloom::db::workers::Beat {
        id: id.into(),
        status: bloom::domain::WorkerStatus::Online,
        capabilities: bloom::domain::Capabilities { max_concurrency, ..Default::default() },
        ip_addrs: vec![],
    }
}

/// A fresh, migrated database. Returns its pool and URL.
pub async fn fresh_db() -> (PgPool, String) {
    fresh_db_with("").await
}

/// A migrated database created with `options` (`CREATE DATABASE <name> <options>`).
pub async fn fresh_db_with(options: &str) -> (PgPool, String) {
    let admin = admin_db_url();
    let name = format!("bloom_test_{}", short_id());
    let mut conn = PgConnection::connect(&admin).await.expect("connect to Postgres as admin");
    sqlx::query(&format!("CREATE DATABASE \"{name}\" {options}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    conn.close().await.ok();
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or(admin);
    let url = format!("{base}/{name}");
    let pool = bloom::db::connect(&url, &bloom::db::PoolOptions { max_connections: 12, ..Default::default() })
        .await
        .expect("connect to test database");
    bloom::db::migrate(&pool).await.expect("migrate");
    (pool, url)
}

/// Options of a test installation.
#[derive(Clone)]
pub struct Opts {
    pub api_key: Option<&'static str>,
    pub rate_limit: u32,
    pub test_connection_limit: u32,
    pub body_limit: usize,
    pub lease_ttl_secs: i32,
    /// How long the tasks stream keeps a message (`--nats-task-max-age-secs`).
    pub task_max_age_secs: u64,
    pub production: bool,
    pub membridge: Option<Endpoint>,
    pub membridge_timeout: Duration,
    pub s3: Option<S3Settings>,
    /// The API's clock (the system clock when `None`).
    pub clock: Option<bloom::time::Clock>,
    /// A web client directory served at `/` (`--web-dir`).
    pub web_dir: Option<std::path::PathBuf>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            api_key: None,
            rate_limit: 0,
            test_connection_limit: 0,
            body_limit: 1024 * 1024,
            lease_ttl_secs: 300,
            task_max_age_secs: 86_400,
            production: false,
            membridge: None,
            membridge_timeout: Duration::from_secs(10),
            s3: None,
            clock: None,
            web_dir: None,
        }
    }
}

/// The API's settings as `bloom-api` maps them from its configuration.
fn api_settings(opts: &Opts) -> ApiSettings {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        nats: NatsArgs,
        #[command(flatten)]
        membridge: MembridgeArgs,
        #[command(flatten)]
        db: DbArgs,
    }
    let membridge =
        opts.membridge.clone().unwrap_or(Endpoint { url: "http://127.0.0.1:9".into(), admin_key: Secret::default() });
    let mut args = vec![
        "bloom-api".to_owned(),
        format!("--rate-limit-per-min={}", opts.rate_limit),
        format!("--test-connection-rate-limit-per-min={}", opts.test_connection_limit),
        format!("--body-limit-bytes={}", opts.body_limit),
        format!("--lease-ttl-secs={}", opts.lease_ttl_secs),
        format!("--nats-task-max-age-secs={}", opts.task_max_age_secs),
        format!("--membridge-server-url={}", membridge.url),
        format!("--membridge-admin-key={}", membridge.admin_key.expose()),
        format!("--membridge-timeout-ms={}", opts.membridge_timeout.as_millis()),
        format!("--runtime-api-key={}", opts.api_key.unwrap_or("")),
        format!("--bloom-env={}", if opts.production { "production" } else { "test" }),
    ];
    args.extend(["--node-env=".into(), "--trust-proxy=false".into()]);
    if let Some(dir) = &opts.web_dir {
        args.push(format!("--web-dir={}", dir.display()));
    }
    let cli = <Cli as clap::Parser>::try_parse_from(args).expect("API arguments");
    ApiSettings::from_args(&cli.api, &cli.nats, &cli.membridge, &cli.db).expect("API settings")
}

/// One test installation.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    pub pool: PgPool,
    pub names: Names,
    pub nats: async_nats::Client,
    pub metrics: Arc<Metrics>,
    pub opts: Opts,
    pub cancel: CancellationToken,
    pub state: api::AppState,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(Opts::default()).await
    }

    pub async fn spawn_with(opts: Opts) -> TestApp {
        if std::env::var_os("BLOOM_TEST_LOG").is_some() {
            std::mem::forget(bloom::telemetry::init("text", "bloom-test"));
        }
        let (pool, _) = fresh_db().await;
        let names = Names::new(&format!("t{}", short_id())).unwrap();
        let nats = bloom::bus::connect(&nats_url(), "bloom-test").await.expect("connect to NATS");
        let metrics = Arc::new(Metrics::default());
        let artifacts = ArtifactStore::from_settings(opts.s3.clone(), metrics.clone()).await;
        let settings = api_settings(&opts);
        let cancel = CancellationToken::new();
        let state = api::build_state(
            pool.clone(),
            nats.clone(),
            names.clone(),
            settings,
            artifacts,
            metrics.clone(),
            opts.clock.clone().unwrap_or_else(bloom::time::Clock::system),
            cancel.clone(),
        )
        .await
        .expect("build API state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(bloom::process::serve_on(listener, api::router(state.clone()), cancel.clone()));
        TestApp {
            base: format!("http://{addr}"),
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
            pool,
            names,
            nats,
            metrics,
            opts,
            cancel,
            state,
        }
    }

    /// A copy sharing this installation, for use from blocking threads.
    pub fn clone_handle(&self) -> TestApp {
        TestApp {
            base: self.base.clone(),
            http: self.http.clone(),
            pool: self.pool.clone(),
            names: self.names.clone(),
            nats: self.nats.clone(),
            metrics: self.metrics.clone(),
            opts: self.opts.clone(),
            cancel: self.cancel.child_token(),
            state: self.state.clone(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.opts.api_key {
            Some(k) => req.header("X-Runtime-Api-Key", k),
            None => req,
        }
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.auth(self.http.get(self.url(path))).send().await.expect("GET");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The body of a GET as text (artifact content, pages).
    pub async fn get_text(&self, path: &str) -> String {
        self.auth(self.http.get(self.url(path))).send().await.expect("GET").text().await.expect("body")
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self.auth(self.http.post(self.url(path))).json(&body).send().await.expect("POST");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self.auth(self.http.put(self.url(path))).json(&body).send().await.expect("PUT");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        let r = self.auth(self.http.delete(self.url(path))).send().await.expect("DELETE");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Creates a task with `prompt` and returns its JSON.
    pub async fn submit(&self, prompt: &str) -> Value {
        self.submit_with(serde_json::json!({"context_id": "ctx-1", "agent_slug": "writer", "prompt": prompt})).await
    }

    pub async fn submit_with(&self, body: Value) -> Value {
        let (status, task) = self.post("/api/runtime/llm-tasks", body).await;
        assert_eq!(status, StatusCode::CREATED, "{task}");
        task
    }

    /// Creates a task with `prompt` and leases it over REST (a worker must be registered).
    /// Returns the task id and the lease answer.
    pub async fn leased_task(&self, prompt: &str) -> (String, Value) {
        let id = self.submit(prompt).await["id"].as_str().expect("task id").to_owned();
        let (status, leased) = self.post(&format!("/api/runtime/llm-tasks/{id}/lease"), serde_json::json!({})).await;
        assert_eq!(status, StatusCode::CREATED, "{leased}");
        (id, leased)
    }

    /// Registers an online REST worker.
    pub async fn register_worker(&self, name: &str, max_concurrency: i32) -> Value {
        let (status, w) = self
            .post(
                "/api/runtime/workers",
                serde_json::json!({"name": name, "capabilities": {"max_concurrency": max_concurrency}}),
            )
            .await;
        assert!(status.is_success(), "{w}");
        w
    }

    /// A reconciler's settings as `bloom-reconciler` maps them from its configuration,
    /// with the test's shorter intervals.
    pub fn reconciler_settings(&self) -> ReconcilerSettings {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            reconciler: ReconcilerArgs,
            #[command(flatten)]
            nats: NatsArgs,
            #[command(flatten)]
            membridge: MembridgeArgs,
            #[command(flatten)]
            db: DbArgs,
        }
        let ep = &self.state.settings.membridge_default;
        let cli = <Cli as clap::Parser>::try_parse_from([
            "bloom-reconciler".to_owned(),
            format!("--lease-ttl-secs={}", self.opts.lease_ttl_secs),
            format!("--nats-task-max-age-secs={}", self.opts.task_max_age_secs),
            "--expiry-grace-ms=0".into(),
            "--sweep-interval-ms=200".into(),
            "--relay-interval-ms=200".into(),
            "--relay-min-age-ms=500".into(),
            "--worker-timeout-ms=5000".into(),
            "--membridge-sync-interval-ms=300".into(),
            "--agent-dispatch-client-window-ms=0".into(),
            "--leader-poll-ms=200".into(),
            format!("--membridge-server-url={}", ep.url),
            format!("--membridge-admin-key={}", ep.admin_key.expose()),
            format!("--membridge-timeout-ms={}", self.opts.membridge_timeout.as_millis()),
        ])
        .expect("reconciler arguments");
        ReconcilerSettings {
            result_retry_delay: Duration::from_millis(100),
            ..ReconcilerSettings::from_args(&cli.reconciler, &cli.nats, &cli.membridge, &cli.db)
        }
    }

    /// Builds a reconciler (not started) sharing this installation.
    pub async fn reconciler_with(&self, settings: ReconcilerSettings, cancel: &CancellationToken) -> Reconciler {
        let nats = bloom::bus::connect(&nats_url(), "bloom-test-reconciler").await.unwrap();
        let metrics = Arc::new(Metrics::default());
        let artifacts = ArtifactStore::from_settings(self.opts.s3.clone(), metrics.clone()).await;
        Reconciler::new(self.pool.clone(), nats, self.names.clone(), artifacts, metrics, settings, cancel)
            .await
            .expect("reconciler")
    }

    /// Starts a reconciler; it stops with the returned token (or the app's).
    pub async fn start_reconciler(&self) -> (Reconciler, CancellationToken) {
        self.start_reconciler_with(self.reconciler_settings()).await
    }

    /// Starts a reconciler with these settings; it stops with the returned token (or the app's).
    pub async fn start_reconciler_with(&self, settings: ReconcilerSettings) -> (Reconciler, CancellationToken) {
        let cancel = self.cancel.child_token();
        let r = self.reconciler_with(settings, &cancel).await;
        tokio::spawn(r.clone().run(cancel.clone()));
        tokio::time::timeout(Duration::from_secs(10), r.serving()).await.expect("reconciler subscribed");
        (r, cancel)
    }

    /// A worker's settings as `bloom-worker` maps them from its configuration: the
    /// built-in executor, faster beats.
    pub fn worker_settings(&self, id: &str, max_concurrency: i32) -> WorkerSettings {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            worker: WorkerArgs,
            #[command(flatten)]
            nats: NatsArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from([
            "bloom-worker".to_owned(),
            format!("--worker-id={id}"),
            format!("--max-concurrency={max_concurrency}"),
            "--executor=builtin".into(),
            "--beat-interval-ms=300".into(),
            "--shutdown-grace-secs=5".into(),
            format!("--lease-ttl-secs={}", self.opts.lease_ttl_secs),
            format!("--nats-task-max-age-secs={}", self.opts.task_max_age_secs),
        ])
        .expect("worker arguments");
        WorkerSettings::from_args(&cli.worker, &cli.nats).expect("worker settings")
    }

    /// Starts a worker; returns its stop token and join handle.
    pub async fn start_worker_with(
        &self,
        settings: WorkerSettings,
    ) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
        let client = bloom::bus::connect(&nats_url(), "bloom-test-worker").await.unwrap();
        let cancel = self.cancel.child_token();
        let h = tokio::spawn(bloom::worker::run(
            client,
            self.names.clone(),
            settings,
            Arc::new(Metrics::default()),
            cancel.clone(),
        ));
        (cancel, h)
    }

    pub async fn start_worker(
        &self,
        id: &str,
        max_concurrency: i32,
    ) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
        self.start_worker_with(self.worker_settings(id, max_concurrency)).await
    }

    /// Task status as stored.
    pub async fn status_of(&self, id: &str) -> String {
        sqlx::query_scalar("SELECT status FROM llm_tasks WHERE id = $1").bind(id).fetch_one(&self.pool).await.unwrap()
    }

    pub async fn status_of_worker(&self, id: &str) -> String {
        sqlx::query_scalar("SELECT status FROM workers WHERE id = $1").bind(id).fetch_one(&self.pool).await.unwrap()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.pool).await.unwrap()
    }

    /// Deletes this test's streams.
    pub async fn stop(self) {
        self.cancel.cancel();
        let js = async_nats::jetstream::new(self.nats.clone());
        let _ = js.delete_stream(self.names.tasks_stream()).await;
        let _ = js.delete_stream(self.names.results_stream()).await;
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process, killed when dropped.
pub struct Kill(pub std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
