//! `/api/membridge/*`: a proxy to a few membridge routes. Path parameters are
//! percent-encoded so a `cid` cannot change the upstream path; `.` and `..` are refused
//! with 400.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::Value;

use super::body::JsonBody;
use super::schemas::{ErrorBody, LeadershipSelect};
use super::{ApiError, AppState};
use crate::db::{audit, settings};
use crate::domain::{AuditAction, NewAudit};
use crate::membridge::{segment, Auth, Response, Retry};

pub(super) async fn call(
    state: &AppState,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    retry: Retry,
    auth: Auth,
) -> Result<Response, ApiError> {
    let ep = settings::membridge(&state.pool, &state.settings.membridge_default).await?.endpoint();
    state.membridge.call(&ep, method, path, body, retry, auth).await.map_err(|e| ApiError::BadGateway(e.to_string()))
}

/// The path of a project's route, or 400 when `cid` cannot be one path segment.
fn project_path(cid: &str, rest: &str) -> Result<String, ApiError> {
    let cid = segment(cid).ok_or_else(|| ApiError::BadRequest(format!("Invalid cid: '{cid}' is not a project id")))?;
    Ok(format!("/projects/{cid}/{rest}"))
}

/// Passes a 2xx JSON body on; any other status becomes `{error}` with that status.
fn relay(r: Response) -> Result<Json<Value>, ApiError> {
    if !r.is_success() {
        let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
        return Err(ApiError::Upstream(status, format!("Membridge returned {}", r.status)));
    }
    r.json().map(Json).map_err(|e| ApiError::BadGateway(format!("Membridge sent invalid JSON: {e}")))
}

/// `GET /api/membridge/health` (open).
#[utoipa::path(get, path = "/api/membridge/health", tag = "membridge", responses((status = 200, description = "membridge's JSON, passed through"), (status = 502, body = ErrorBody), (status = 404, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn health(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    relay(call(&state, reqwest::Method::GET, "/health", None, Retry::Idempotent(1), Auth::Open).await?)
}

/// `GET /api/membridge/projects`.
#[utoipa::path(get, path = "/api/membridge/projects", tag = "membridge", responses((status = 200, description = "membridge's JSON, passed through"), (status = 502, body = ErrorBody), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn projects(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    relay(call(&state, reqwest::Method::GET, "/projects", None, Retry::Idempotent(3), Auth::Checked).await?)
}

/// `GET /api/membridge/projects/:cid/leadership`.
#[utoipa::path(get, path = "/api/membridge/projects/{cid}/leadership", tag = "membridge", params(("cid" = String, Path, description = "project canonical id")), responses((status = 200, description = "membridge's JSON, passed through"), (status = 502, body = ErrorBody), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn leadership(State(state): State<AppState>, Path(cid): Path<String>) -> Result<Json<Value>, ApiError> {
    let path = project_path(&cid, "leadership")?;
    relay(call(&state, reqwest::Method::GET, &path, None, Retry::Idempotent(3), Auth::Checked).await?)
}

/// `GET /api/membridge/projects/:cid/nodes`.
#[utoipa::path(get, path = "/api/membridge/projects/{cid}/nodes", tag = "membridge", params(("cid" = String, Path, description = "project canonical id")), responses((status = 200, description = "membridge's JSON, passed through"), (status = 502, body = ErrorBody), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn nodes(State(state): State<AppState>, Path(cid): Path<String>) -> Result<Json<Value>, ApiError> {
    let path = project_path(&cid, "nodes")?;
    relay(call(&state, reqwest::Method::GET, &path, None, Retry::Idempotent(3), Auth::Checked).await?)
}

/// `POST /api/membridge/projects/:cid/leadership/select`: not idempotent, so only
/// retried when the request never reached membridge. Writes a `leadership_promote`
/// audit entry on success.
#[utoipa::path(post, path = "/api/membridge/projects/{cid}/leadership/select", tag = "membridge", params(("cid" = String, Path, description = "project canonical id")), request_body = LeadershipSelect, responses((status = 200, description = "membridge's JSON, passed through"), (status = 502, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn select_leader(
    State(state): State<AppState>,
    Path(cid): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let path = project_path(&cid, "leadership/select")?;
    let r = call(&state, reqwest::Method::POST, &path, Some(&body), Retry::ConnectOnly(3), Auth::Checked).await?;
    if !r.is_success() {
        let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let text = String::from_utf8_lossy(&r.body).into_owned();
        let msg = if text.is_empty() { format!("Membridge returned {}", r.status) } else { text };
        return Err(ApiError::Upstream(status, msg));
    }
    let data = r.json().map_err(|e| ApiError::BadGateway(format!("Membridge sent invalid JSON: {e}")))?;
    let primary = body.get("primary_node_id").and_then(Value::as_str).unwrap_or("unknown");
    let detail = format!("Promoted primary to {primary} for project {cid}");
    audit::insert(
        &state.pool,
        &[NewAudit::new(AuditAction::LeadershipPromote, "membridge_project", cid.as_str(), "admin", detail)],
        state.clock.now_ms(),
    )
    .await?;
    Ok(Json(data))
}
