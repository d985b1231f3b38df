//! Concurrency limits, changed at runtime and persisted: `GET /api/runtime/concurrency-limits`,
//! `PUT`/`DELETE /api/runtime/concurrency-limits/{scope}/{key}`, and the keys under
//! them, `GET /api/runtime/concurrency-keys`.

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::body::JsonBody;
use super::schemas::{ErrorBody, RequestBody};
use super::validate::{query_int, FieldErrors, Fields};
use super::{ApiError, AppState};
use crate::db::concurrency::{self, KeyView, LimitView};
use crate::domain::concurrency::MAX_RUNNING_LIMIT;
use crate::domain::{ConcurrencyLimit, ConcurrencyScope};

/// Keys listed by default, and at most.
const DEFAULT_KEYS: i64 = 100;
const MAX_KEYS: i64 = 1000;

/// Body of `PUT /api/runtime/concurrency-limits/{scope}/{key}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LimitBody {
    /// Tasks of the key leased or running at once; 0 holds them all.
    #[schema(minimum = 0, maximum = 1000000)]
    pub max_running: i64,
}

impl RequestBody for LimitBody {
    fn read(f: &mut Fields<'_>) -> Option<LimitBody> {
        let max_running = f.int("max_running", 0, i64::from(MAX_RUNNING_LIMIT), None);
        Some(LimitBody { max_running: max_running? })
    }
}

/// Answer of `DELETE /api/runtime/concurrency-limits/{scope}/{key}` and
/// `DELETE /api/runtime/budgets/{scope}/{key}/{rule}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RuleRemoved {
    pub removed: bool,
}

/// The scope `s` names; a failure of `scope` when it names none.
pub(super) fn scope_of(errors: &mut FieldErrors, s: &str) -> Option<ConcurrencyScope> {
    let scope = ConcurrencyScope::parse(s);
    if scope.is_none() {
        errors.add("scope", format!("Expected context_id, agent_slug or concurrency_key, received '{s}'"));
    }
    scope
}

/// The limit a path names, checked: a 400 naming `scope` or `key`.
fn limit_of(scope: &str, key: &str, max_running: i64) -> Result<ConcurrencyLimit, ApiError> {
    let mut errors = FieldErrors::default();
    let parsed = scope_of(&mut errors, scope);
    let limit = parsed.map(|scope| ConcurrencyLimit::new(scope, key, max_running));
    if let Some(Err(e)) = &limit {
        let field = if e.starts_with("key") { "key" } else { "max_running" };
        errors.add(field, e.clone());
    }
    errors.finish(())?;
    Ok(limit.and_then(Result::ok).expect("checked above"))
}

/// `GET /api/runtime/concurrency-limits` → every limit, with the tasks of its keys
/// running and waiting now.
#[utoipa::path(get, path = "/api/runtime/concurrency-limits", tag = "concurrency",
    responses((status = 200, body = Vec<LimitView>), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<LimitView>>, ApiError> {
    Ok(Json(concurrency::limits(&state.pool).await?))
}

/// `PUT /api/runtime/concurrency-limits/{scope}/{key}` `{max_running}` → the limit, set
/// now for every worker and reconciler (persisted; it wins over configuration). `key`
/// `*` applies to every key of the scope without a limit of its own. Tasks already
/// running count against it; waiting tasks it has room for are dispatched.
#[utoipa::path(put, path = "/api/runtime/concurrency-limits/{scope}/{key}", tag = "concurrency", params(
    ("scope" = ConcurrencyScope, Path, description = "context_id, agent_slug or concurrency_key"),
    ("key" = String, Path, description = "the key, or * for every key of the scope", min_length = 1, max_length = 255)),
    request_body = LimitBody,
    responses((status = 200, body = LimitView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn set(
    State(state): State<AppState>,
    Path((scope, key)): Path<(String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<LimitView>, ApiError> {
    let body = LimitBody::parse(&body)?;
    let limit = limit_of(&scope, &key, body.max_running)?;
    concurrency::set(&state.pool, &limit, false, state.clock.now_ms()).await?;
    let view = concurrency::limits(&state.pool)
        .await?
        .into_iter()
        .find(|v| v.limit.scope == limit.scope && v.limit.key == limit.key);
    // Removed again by a concurrent call: answered as set.
    Ok(Json(view.unwrap_or(LimitView { limit, updated_at: state.clock.now_ms(), running: 0, waiting: 0 })))
}

/// `DELETE /api/runtime/concurrency-limits/{scope}/{key}` → `{removed}`; 404 when there
/// is no such limit. Its waiting tasks are dispatched (unless another limit holds them).
#[utoipa::path(delete, path = "/api/runtime/concurrency-limits/{scope}/{key}", tag = "concurrency", params(
    ("scope" = ConcurrencyScope, Path, description = "context_id, agent_slug or concurrency_key"),
    ("key" = String, Path, description = "the key, or *", min_length = 1, max_length = 255)),
    responses((status = 200, body = RuleRemoved), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn remove(
    State(state): State<AppState>,
    Path((scope, key)): Path<(String, String)>,
) -> Result<Json<RuleRemoved>, ApiError> {
    let limit = limit_of(&scope, &key, 0)?;
    if !concurrency::remove(&state.pool, limit.scope, &limit.key).await? {
        return Err(ApiError::NotFound("Concurrency limit not found".into()));
    }
    Ok(Json(RuleRemoved { removed: true }))
}

/// Query of `GET /api/runtime/concurrency-keys`.
#[derive(Debug, Deserialize)]
pub struct KeysQuery {
    scope: Option<String>,
    limit: Option<String>,
}

impl KeysQuery {
    /// The scope asked for (all when absent) and how many keys, checked: a 400 naming
    /// `scope` or `limit`.
    pub(super) fn read(&self) -> Result<(Option<ConcurrencyScope>, i64), ApiError> {
        let mut errors = FieldErrors::default();
        let limit = query_int(&mut errors, "limit", &self.limit, 1, MAX_KEYS).unwrap_or(DEFAULT_KEYS);
        let scope = match self.scope.as_deref() {
            None | Some("") => None,
            Some(s) => scope_of(&mut errors, s),
        };
        errors.finish(())?;
        Ok((scope, limit))
    }
}

/// `GET /api/runtime/concurrency-keys[?scope=&limit=]` → the busiest keys under limits
/// (running plus waiting, most first), with their limit.
#[utoipa::path(get, path = "/api/runtime/concurrency-keys", tag = "concurrency", params(
    ("scope" = Option<ConcurrencyScope>, Query, description = "context_id, agent_slug or concurrency_key; default all"),
    ("limit" = Option<i64>, Query, description = "keys listed, 1..1000, default 100", minimum = 1, maximum = 1000)),
    responses((status = 200, body = Vec<KeyView>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn keys(State(state): State<AppState>, Query(q): Query<KeysQuery>) -> Result<Json<Vec<KeyView>>, ApiError> {
    let (scope, limit) = q.read()?;
    Ok(Json(concurrency::keys(&state.pool, scope, limit).await?))
}
