//! Operations on HTTP agents (membridge agents), as the upstream runtime offers them:
//! health check, self-update, restart, uninstall, and the install script.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::body::JsonBody;
use super::dispatch::caller_origin;
use super::schemas::{AgentAnswer, ErrorBody};
use super::validate::FieldErrors;
use super::{ApiError, AppState};
use crate::db::{audit, workers};
use crate::domain::{AuditAction, Capabilities, NewAudit, Worker, WorkerId, WorkerStatus, UNINSTALLED_AGENT_VERSION};

/// The repository the agent updates itself from and the install script clones.
const DEFAULT_REPO: &str = "https://github.com/maxfraieho/membridge.git";

/// The worker, when it exists and has a URL (upstream's precheck, in its order).
async fn agent(state: &AppState, id: String) -> Result<Worker, ApiError> {
    let worker = workers::get(&state.pool, &WorkerId(id)).await?;
    let worker = worker.ok_or_else(|| ApiError::NotFound("Worker not found".into()))?;
    if worker.url.is_empty() {
        return Err(ApiError::Invalid("Worker has no URL configured".into()));
    }
    Ok(worker)
}

/// The agent's answer with `status` set unless it sent one (`{status, ...answer}`).
fn answer(status: &str, reply: Value) -> AgentAnswer {
    let mut map = match reply {
        Value::Object(m) => m,
        other => Map::from_iter([("result".to_owned(), other)]),
    };
    map.entry("status").or_insert_with(|| Value::String(status.into()));
    AgentAnswer(map)
}

/// `GET /api/runtime/workers/:id/agent-health`: the agent's `/health`; records what it
/// says (version, OS, capability flags, online), or the worker offline when it does not
/// answer. 200 either way: `{reachable: true, ...health}` or `{reachable: false, error}`.
#[utoipa::path(get, path = "/api/runtime/workers/{id}/agent-health", tag = "workers", params(("id" = String, Path, description = "Worker id")), responses((status = 200, body = AgentAnswer), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn health(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<AgentAnswer>, ApiError> {
    let worker = agent(&state, id).await?;
    let now = state.clock.now_ms();
    let health = match super::agent_client(&state).await?.health(&worker.url).await {
        Ok(Value::Object(health)) => health,
        Ok(_) => Map::new(),
        Err(e) => {
            workers::record_agent_unreachable(&state.pool, &worker.id, now).await?;
            let reply = Map::from_iter([
                ("reachable".to_owned(), Value::Bool(false)),
                ("error".to_owned(), Value::String(e.to_string())),
            ]);
            return Ok(Json(AgentAnswer(reply)));
        }
    };
    let text = |key: &str| health.get(key).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
    let report = workers::AgentReport {
        version: text("version"),
        os_info: text("os_info").or_else(|| text("hostname")),
        capabilities: health.get("capabilities").and_then(Capabilities::agent_report),
        ip_addrs: health.get("ip_addrs").and_then(|v| serde_json::from_value(v.clone()).ok()),
    };
    workers::record_agent_health(&state.pool, &worker.id, &report, now).await?;
    let mut reply = Map::from_iter([("reachable".to_owned(), Value::Bool(true))]);
    reply.extend(health);
    Ok(Json(AgentAnswer(reply)))
}

/// Body of `POST .../agent-update`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct UpdateBody {
    /// Passed to the agent (which updates from its own checkout).
    #[serde(default)]
    pub repo_url: Option<String>,
}

/// `POST /api/runtime/workers/:id/agent-update`: the agent's `/self-update` (120 s).
#[utoipa::path(post, path = "/api/runtime/workers/{id}/agent-update", tag = "workers", params(("id" = String, Path, description = "Worker id")), request_body = UpdateBody, responses((status = 200, body = AgentAnswer), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<AgentAnswer>, ApiError> {
    let worker = agent(&state, id).await?;
    let repo_url = body.get("repo_url").and_then(Value::as_str).filter(|s| !s.is_empty()).unwrap_or(DEFAULT_REPO);
    let sent = serde_json::json!({ "repo_url": repo_url });
    let reply = call(&state, &worker, "/self-update", Some(&sent), Duration::from_secs(120)).await?;
    let mut tx = state.pool.begin().await?;
    let detail = format!("Agent update triggered on {}: {reply}", worker.id);
    let entry = NewAudit::new(AuditAction::AgentUpdated, "worker", worker.id.as_str(), "admin", detail);
    audit::insert(&mut *tx, &[entry], state.clock.now_ms()).await?;
    if let Some(version) = reply.get("version").and_then(Value::as_str).filter(|v| !v.is_empty()) {
        workers::set_agent_version(&mut *tx, &worker.id, version, None).await?;
    }
    tx.commit().await?;
    Ok(Json(answer("updated", reply)))
}

/// `POST /api/runtime/workers/:id/agent-restart`: the agent's `/restart` (30 s).
#[utoipa::path(post, path = "/api/runtime/workers/{id}/agent-restart", tag = "workers", params(("id" = String, Path, description = "Worker id")), responses((status = 200, body = AgentAnswer), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn restart(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<AgentAnswer>, ApiError> {
    let worker = agent(&state, id).await?;
    let reply = call(&state, &worker, "/restart", None, Duration::from_secs(30)).await?;
    let detail = format!("Agent restart triggered on {}", worker.id);
    let entry = NewAudit::new(AuditAction::AgentRestarted, "worker", worker.id.as_str(), "admin", detail);
    audit::insert(&state.pool, &[entry], state.clock.now_ms()).await?;
    Ok(Json(answer("restarted", reply)))
}

/// `POST /api/runtime/workers/:id/agent-uninstall`: the agent's `/uninstall` (60 s); the
/// worker stays, `offline` with version `uninstalled`.
#[utoipa::path(post, path = "/api/runtime/workers/{id}/agent-uninstall", tag = "workers", params(("id" = String, Path, description = "Worker id")), responses((status = 200, body = AgentAnswer), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn uninstall(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<AgentAnswer>, ApiError> {
    let worker = agent(&state, id).await?;
    let reply = call(&state, &worker, "/uninstall", None, Duration::from_secs(60)).await?;
    let mut tx = state.pool.begin().await?;
    workers::set_agent_version(&mut *tx, &worker.id, UNINSTALLED_AGENT_VERSION, Some(WorkerStatus::Offline)).await?;
    let detail = format!("Agent uninstalled from {}", worker.id);
    let entry = NewAudit::new(AuditAction::AgentUninstalled, "worker", worker.id.as_str(), "admin", detail);
    audit::insert(&mut *tx, &[entry], state.clock.now_ms()).await?;
    tx.commit().await?;
    Ok(Json(answer("uninstalled", reply)))
}

/// An agent call whose failure is answered 502 `{"error": ...}`.
async fn call(
    state: &AppState,
    worker: &Worker,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Value, ApiError> {
    let agents = super::agent_client(state).await?;
    agents.post(&worker.url, path, body, timeout).await.map_err(|e| ApiError::BadGateway(e.to_string()))
}

/// Query of `GET /api/runtime/agent-install-script`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
pub struct ScriptQuery {
    /// The runtime URL the agent registers with and calls back (default: as the caller
    /// reached the API).
    pub server_url: Option<String>,
    /// The node's id (default: its host name, read on the node).
    pub node_id: Option<String>,
    /// The agent's repository.
    pub repo_url: Option<String>,
    /// The agent's port (default 8001).
    pub port: Option<String>,
    /// `true`: embed the runtime's real agent key (`MEMBRIDGE_AGENT_KEY`); otherwise the
    /// script carries the placeholder `YOUR_AGENT_KEY` to replace on the node.
    pub include_agent_key: Option<String>,
}

/// A value quoted for bash: `'...'`, with every `'` closed, escaped and reopened, so no
/// value can run a command.
fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// `GET /api/runtime/agent-install-script` → a bash installer for the membridge agent
/// (text/plain). Every value is quoted; the real agent key is embedded only when the
/// (authorized) caller asks with `include_agent_key=true`.
#[utoipa::path(get, path = "/api/runtime/agent-install-script", tag = "workers", params(ScriptQuery), responses((status = 200, description = "a bash script", content_type = "text/plain", body = String), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn install_script(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<ScriptQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let port = match q.port.as_deref() {
        None | Some("") => 8001,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => {
                let mut errors = FieldErrors::default();
                errors.add("port", "Expected a port number between 1 and 65535");
                return Err(ApiError::Validation(errors));
            }
        },
    };
    let server = q.server_url.filter(|s| !s.is_empty()).unwrap_or_else(|| caller_origin(&headers));
    let repo = q.repo_url.filter(|s| !s.is_empty()).unwrap_or_else(|| DEFAULT_REPO.to_owned());
    let node = match q.node_id.filter(|s| !s.is_empty()) {
        Some(n) => sh_quote(&n),
        None => "\"$(hostname)\"".to_owned(),
    };
    // The key agents require now: saved with `POST /config`, else `MEMBRIDGE_AGENT_KEY`.
    let agent_key = crate::db::settings::agent_key(&state.pool, &state.settings.agent_key).await?;
    let with_key = q.include_agent_key.as_deref() == Some("true") && !agent_key.expose().is_empty();
    let key = if with_key { agent_key.expose().to_owned() } else { "YOUR_AGENT_KEY".to_owned() };
    let script = INSTALL_SCRIPT
        .replace("@SERVER_URL@", &sh_quote(&server))
        .replace("@NODE_ID@", &node)
        .replace("@REPO_URL@", &sh_quote(&repo))
        .replace("@PORT@", &sh_quote(&port.to_string()))
        .replace("@AGENT_KEY@", &sh_quote(&key));
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], script))
}

/// The installer, with `@NAME@` placeholders replaced by quoted values.
const INSTALL_SCRIPT: &str = include_str!("agent-install.sh");
