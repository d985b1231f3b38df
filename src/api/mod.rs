//! The REST API, compatible with the original service's `routes.ts`: same paths, JSON
//! shapes, status codes and validation rules.
//!
//! Layers, outermost first: [`edge`] (metrics, production HTTPS redirect, NUL refusal,
//! JSON errors), body limit, then for `/api/*`: rate limit, API-key check. Handlers
//! only parse, call `db`/`lifecycle`, and shape the response; they hold no SQL.

pub mod activity;
pub mod agent_ops;
pub mod auth;
pub mod body;
pub mod budgets;
pub mod bulk;
pub mod concurrency;
pub mod dispatch;
pub mod docs;
pub mod error;
pub mod failures;
pub mod holds;
pub mod membridge_proxy;
pub mod projects;
pub mod rate_limit;
pub mod reads;
pub mod runtime_config;
pub mod schemas;
pub mod submissions;
pub mod submit;
pub mod tasks;
pub mod ui;
pub mod usage;
pub mod validate;
pub mod web;
pub mod workers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use sqlx::PgPool;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::artifacts::ArtifactStore;
use crate::bus::provision::StreamLayout;
use crate::bus::Dispatcher;
use crate::config::{ApiArgs, DbArgs, MembridgeArgs, NatsArgs};
use crate::domain::Secret;
use crate::membridge;
use crate::metrics::Metrics;
use crate::time::Clock;
pub use error::ApiError;
use rate_limit::RateLimiter;
use submit::Submitter;

/// Settings of the API that handlers need.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    pub api_key: Option<Secret>,
    pub production: bool,
    pub rate_limit_per_min: u32,
    pub test_connection_rate_limit_per_min: u32,
    pub body_limit_bytes: usize,
    pub trust_proxy: bool,
    /// The streams to provision; their lease TTL is also the REST lease default (the
    /// seed's 300 s).
    pub streams: StreamLayout,
    /// Membridge endpoint used until one is saved in `runtime_settings`.
    pub membridge_default: membridge::Endpoint,
    /// Timeout of one membridge request (the seed's 10 s).
    pub membridge_timeout: Duration,
    /// Client-side bound of one database call (longer than the statement timeout, so
    /// Postgres gives up first).
    pub db_timeout: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_retention: Duration,
    /// Bound of one JetStream request (provisioning, publish acknowledgements).
    pub nats_timeout: Duration,
    /// The key membridge agents require (`X-MEMBRIDGE-AGENT`).
    pub agent_key: Secret,
    /// A built web client served at `/` (see [`web`]).
    pub web_dir: Option<std::path::PathBuf>,
}

impl ApiSettings {
    /// The settings `bloom-api` runs with, from its configuration: the checks and clamps
    /// of every value are here, and only here.
    pub fn from_args(
        api: &ApiArgs,
        nats: &NatsArgs,
        membridge: &MembridgeArgs,
        db: &DbArgs,
    ) -> Result<ApiSettings, String> {
        api.validate()?;
        Ok(ApiSettings {
            api_key: api.api_key().cloned(),
            production: api.is_production(),
            rate_limit_per_min: api.rate_limit_per_min,
            test_connection_rate_limit_per_min: api.test_connection_rate_limit_per_min,
            body_limit_bytes: api.body_limit_bytes,
            trust_proxy: api.trust_proxy,
            streams: nats.streams(),
            membridge_default: membridge.endpoint(),
            membridge_timeout: membridge.timeout(),
            db_timeout: db.call_timeout(),
            idempotency_retention: db.idempotency_retention(),
            nats_timeout: nats.timeout(),
            agent_key: membridge.membridge_agent_key.clone(),
            web_dir: api.web_dir.clone(),
        })
    }
}

/// Shared state of all handlers; cloning it (every request does, once per layer) is
/// one reference count.
#[derive(Clone)]
pub struct AppState(Arc<AppContext>);

impl std::ops::Deref for AppState {
    type Target = AppContext;
    fn deref(&self) -> &AppContext {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct AppContext {
    pub pool: PgPool,
    pub submitter: Submitter,
    pub dispatcher: Dispatcher,
    pub nats: async_nats::Client,
    /// Subjects and streams of the NATS namespace.
    pub names: crate::bus::Names,
    pub membridge: Arc<membridge::Client>,
    pub artifacts: ArtifactStore,
    /// Calls HTTP agents (dispatch, agent operations).
    pub agents: crate::agent::AgentClient,
    pub metrics: Arc<Metrics>,
    pub api_key: Option<Secret>,
    pub settings: Arc<ApiSettings>,
    /// The time handlers and transitions use (the system clock when deployed).
    pub clock: Clock,
    pub started: Instant,
    /// The minutes of `GET /activity` that have ended.
    pub activity: activity::ActivityCache,
}

/// The API's routes with their OpenAPI description: both come from the same
/// `routes!` registrations, so the document cannot drift from the router.
fn api_routes(strict_limiter: Arc<RateLimiter>) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (schemas, paths, test_connection) = routes!(runtime_config::test_connection);
    let test_connection = (
        schemas,
        paths,
        test_connection.route_layer(middleware::from_fn_with_state(strict_limiter, rate_limit::limit)),
    );
    let parts = OpenApiRouter::with_openapi(openapi_base())
        .routes(routes!(runtime_config::health))
        .routes(routes!(runtime_config::get_config, runtime_config::set_config))
        .routes(test_connection)
        .routes(routes!(workers::list, workers::register))
        .routes(routes!(workers::show, workers::remove))
        .routes(routes!(workers::drain))
        .routes(routes!(workers::resume))
        .routes(routes!(agent_ops::health))
        .routes(routes!(agent_ops::update))
        .routes(routes!(agent_ops::restart))
        .routes(routes!(agent_ops::uninstall))
        .routes(routes!(agent_ops::install_script))
        .routes(routes!(tasks::list, submissions::create))
        .routes(routes!(submissions::create_batch))
        .routes(routes!(tasks::show))
        .routes(routes!(tasks::results))
        .routes(routes!(tasks::history))
        .routes(routes!(tasks::lease))
        .routes(routes!(tasks::heartbeat))
        .routes(routes!(tasks::complete))
        .routes(routes!(tasks::requeue))
        .routes(routes!(tasks::cancel))
        .routes(routes!(bulk::cancel))
        .routes(routes!(bulk::requeue))
        .routes(routes!(dispatch::dispatch))
        .routes(routes!(reads::leases))
        .routes(routes!(reads::runs))
        .routes(routes!(reads::artifacts))
        .routes(routes!(reads::artifact))
        .routes(routes!(reads::artifact_content))
        .routes(routes!(reads::audit))
        .routes(routes!(reads::stats))
        .routes(routes!(usage::usage))
        .routes(routes!(failures::failures))
        .routes(routes!(activity::activity))
        .routes(routes!(holds::list))
        .routes(routes!(holds::agents))
        .routes(routes!(concurrency::list))
        .routes(routes!(concurrency::set, concurrency::remove))
        .routes(routes!(concurrency::keys))
        .routes(routes!(budgets::list))
        .routes(routes!(budgets::set, budgets::remove))
        .routes(routes!(budgets::usage))
        .routes(routes!(projects::list, projects::create))
        .routes(routes!(projects::show, projects::remove))
        .routes(routes!(projects::node_status))
        .routes(routes!(projects::clone))
        .routes(routes!(projects::propagate))
        .routes(routes!(projects::sync_memory))
        .routes(routes!(membridge_proxy::health))
        .routes(routes!(membridge_proxy::projects))
        .routes(routes!(membridge_proxy::leadership))
        .routes(routes!(membridge_proxy::nodes))
        .routes(routes!(membridge_proxy::select_leader))
        .split_for_parts();
    let (router, mut doc) = parts;
    schemas::state_cross_field_rules(&mut doc);
    (router, doc)
}

fn openapi_base() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
    let mut doc = utoipa::openapi::OpenApiBuilder::new()
        .info(
            utoipa::openapi::InfoBuilder::new()
                .title("BLOOM runtime API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Dispatches LLM tasks to workers. Compatible with the original BLOOM runtime REST API. \
                     When RUNTIME_API_KEY is set, every /api route except the health checks and \
                     test-connection needs the X-Runtime-Api-Key header.",
                ))
                .build(),
        )
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "runtime_api_key",
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Runtime-Api-Key"))),
    );
    doc.security =
        Some(vec![utoipa::openapi::security::SecurityRequirement::new("runtime_api_key", Vec::<String>::new())]);
    doc
}

/// The OpenAPI document of the API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes(RateLimiter::new(0, Duration::from_secs(60), false)).1
}

/// The full router.
pub fn router(state: AppState) -> Router {
    let s = &state.settings;
    let api_limiter = RateLimiter::new(s.rate_limit_per_min, Duration::from_secs(60), s.trust_proxy || s.production);
    let strict_limiter =
        RateLimiter::new(s.test_connection_rate_limit_per_min, Duration::from_secs(60), s.trust_proxy || s.production);
    let (api, doc) = api_routes(strict_limiter);
    let doc = Arc::new(doc);
    let api = api
        .fallback(fallback)
        .layer(middleware::from_fn_with_state(state.clone(), auth::require_key))
        .layer(middleware::from_fn_with_state(api_limiter, rate_limit::limit));

    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(runtime_config::ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(move || async move { Json(doc.as_ref().clone()) }))
        .merge(docs::routes())
        .merge(ui::routes())
        .merge(api)
        .layer(DefaultBodyLimit::max(s.body_limit_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), edge))
        .with_state(state)
}

/// What every request goes through, in one layer (each layer of its own would box and
/// move the request's future once more), outermost first:
/// * metrics and the `/api` request log;
/// * in production, the HTTPS redirect;
/// * a path or query carrying a NUL byte (`%00`) is refused with 400: Postgres text
///   cannot hold it;
/// * errors produced outside the handlers become JSON (see [`json_errors`]).
async fn edge(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = if let Some(redirect) = https_redirect(&state, &req) {
        redirect
    } else if carries_nul(&req) {
        ApiError::BadRequest("The request path or query contains a NUL (%00) byte".into()).into_response()
    } else {
        json_errors(next.run(req).await).await
    };
    let elapsed = start.elapsed();
    let m = &state.metrics;
    m.http_requests_total.inc();
    m.http_request_duration_seconds.observe(elapsed.as_secs_f64());
    if resp.status().is_server_error() {
        m.http_request_errors_total.inc();
    }
    if path.starts_with("/api") {
        tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_ms = elapsed.as_millis() as u64, "request");
    }
    resp
}

fn carries_nul(req: &Request) -> bool {
    let has_nul = |s: &str| s.as_bytes().windows(3).any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0');
    has_nul(req.uri().path()) || req.uri().query().is_some_and(has_nul)
}

/// Errors produced outside the handlers (axum's extractor rejections: a malformed query
/// string or path, a wrong method) come as plain text; clients get every error as
/// `{"error": "..."}`.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json =
        resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, 64 * 1024).await {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_owned() } else { text };
    let mut out = (status, Json(error::ErrorBody::message(message))).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// The agent client with the key agents require now (saved with `POST /config`, else
/// `MEMBRIDGE_AGENT_KEY`).
pub(crate) async fn agent_client(state: &AppState) -> Result<crate::agent::AgentClient, ApiError> {
    let key = crate::db::settings::agent_key(&state.pool, &state.settings.agent_key).await?;
    Ok(state.agents.with_key(key))
}

/// An unknown path: the web client's, when one is served, else a JSON 404.
async fn fallback(State(state): State<AppState>, uri: axum::http::Uri) -> Response {
    match &state.settings.web_dir {
        Some(root) if web::is_web_path(uri.path()) => web::serve(root, &uri).await,
        _ => ApiError::NotFound("Not found".into()).into_response(),
    }
}

/// The process metrics plus the state of the installation, read from Postgres at scrape
/// time: tasks by status, queue depth and outbox backlog.
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    use std::fmt::Write as _;
    let mut text = state.metrics.render();
    if let (Ok(stats), Ok(backlog)) =
        (crate::db::stats::load(&state.pool).await, crate::db::stats::outbox_backlog(&state.pool).await)
    {
        let _ = writeln!(text, "# HELP bloom_tasks Tasks by status.\n# TYPE bloom_tasks gauge");
        for status in crate::domain::TaskStatus::ALL {
            let n = stats.tasks.by_status.get(status.as_str()).copied().unwrap_or(0);
            let _ = writeln!(text, "bloom_tasks{{status=\"{status}\"}} {n}");
        }
        let queued = stats.tasks.by_status.get("queued").copied().unwrap_or(0);
        let _ = writeln!(text, "# HELP bloom_queue_depth Tasks waiting for a worker.\n# TYPE bloom_queue_depth gauge");
        let _ = writeln!(text, "bloom_queue_depth {queued}");
        let _ = writeln!(text, "# HELP bloom_active_leases Leases held now.\n# TYPE bloom_active_leases gauge");
        let _ = writeln!(text, "bloom_active_leases {}", stats.leases.active);
        let _ = writeln!(
            text,
            "# HELP bloom_outbox_rows Dispatches not yet acknowledged by JetStream.\n# TYPE bloom_outbox_rows gauge"
        );
        let _ = writeln!(text, "bloom_outbox_rows {backlog}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// In production, a request that came over plain HTTP through a proxy is redirected to
/// HTTPS with 301, as the seed does.
fn https_redirect(state: &AppState, req: &Request) -> Option<Response> {
    if !(state.settings.production && req.headers().get("x-forwarded-proto").is_some_and(|v| v.as_bytes() == b"http")) {
        return None;
    }
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let target = format!("https://{host}{}", req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    Some(match HeaderValue::from_str(&target) {
        Ok(_) => (StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, target)]).into_response(),
        Err(_) => Redirect::permanent("/").into_response(),
    })
}

/// Builds the API's state: provisions NATS, starts the dispatcher, the submission
/// batcher and the schema watch (all stop with `cancel`). Handlers and transitions read the time from
/// `clock` (the system clock when deployed).
#[allow(clippy::too_many_arguments)] // each is one part the binary and the tests build
pub async fn build_state(
    pool: PgPool,
    nats: async_nats::Client,
    names: crate::bus::Names,
    settings: ApiSettings,
    artifacts: ArtifactStore,
    metrics: Arc<Metrics>,
    clock: Clock,
    cancel: tokio_util::sync::CancellationToken,
) -> anyhow::Result<AppState> {
    let js = crate::bus::jetstream(nats.clone(), settings.nats_timeout);
    crate::bus::provision::apply_at_start(&js, &names, &settings.streams, crate::bus::provision::START_PATIENCE)
        .await?;
    tokio::spawn(crate::db::sessions::run(pool.clone(), crate::db::sessions::EVERY, cancel.clone()));
    let dispatcher = Dispatcher::spawn(js, names.clone(), pool.clone(), metrics.clone(), cancel.clone());
    let submitter = Submitter::spawn(
        pool.clone(),
        dispatcher.clone(),
        metrics.clone(),
        submit::Limits {
            loops: 2,
            db_timeout: settings.db_timeout,
            idempotency_retention: settings.idempotency_retention,
        },
        clock.clone(),
        cancel,
    );
    let membridge = Arc::new(membridge::Client::new(settings.membridge_timeout, pool.clone()));
    let agents = crate::agent::AgentClient::new(settings.agent_key.clone());
    Ok(AppState(Arc::new(AppContext {
        pool,
        submitter,
        dispatcher,
        nats,
        names,
        membridge,
        artifacts,
        agents,
        metrics,
        api_key: settings.api_key.clone(),
        settings: Arc::new(settings),
        clock,
        started: Instant::now(),
        activity: activity::ActivityCache::default(),
    })))
}
