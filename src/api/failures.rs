//! `GET /api/runtime/failures`: failed and dead tasks grouped by why they failed, with
//! what their runs cost; each group's ids feed a bulk requeue.

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::schemas::ErrorBody;
use super::validate::{query_int, query_range, FieldErrors};
use super::{ApiError, AppState};
use crate::db::failures::{self, FailureGroup};

/// The range a request names nothing of: the last day.
const DEFAULT_RANGE_MS: i64 = 24 * 3600 * 1000;
const DEFAULT_GROUPS: i64 = 50;
const MAX_GROUPS: i64 = 500;

/// Query of `GET /api/runtime/failures`.
#[derive(Debug, Deserialize)]
pub struct FailuresQuery {
    from: Option<String>,
    to: Option<String>,
    limit: Option<String>,
}

/// The failure groups of a range.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FailureReport {
    pub from: i64,
    pub to: i64,
    pub groups: Vec<FailureGroup>,
}

/// `GET /api/runtime/failures[?from=&to=&limit=]` → the tasks `failed` or `dead` created
/// in `[from, to)` (epoch ms; by default the last 24 hours), grouped by agent, the class
/// of their last run's error and its message, the largest groups first.
#[utoipa::path(get, path = "/api/runtime/failures", tag = "tasks", params(
    ("from" = Option<i64>, Query, description = "created at or after (epoch ms); default `to` minus 24 hours", minimum = 0),
    ("to" = Option<i64>, Query, description = "created before (epoch ms); default now", minimum = 0),
    ("limit" = Option<i64>, Query, description = "groups listed, 1..500, default 50", minimum = 1, maximum = 500)),
    responses((status = 200, body = FailureReport), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn failures(
    State(state): State<AppState>,
    Query(q): Query<FailuresQuery>,
) -> Result<Json<FailureReport>, ApiError> {
    let mut errors = FieldErrors::default();
    let (from, to) = query_range(&mut errors, &q.from, &q.to, state.clock.now_ms(), DEFAULT_RANGE_MS);
    let limit = query_int(&mut errors, "limit", &q.limit, 1, MAX_GROUPS).unwrap_or(DEFAULT_GROUPS);
    errors.finish(())?;
    let groups = failures::groups(&state.pool, from, to, limit).await?;
    Ok(Json(FailureReport { from, to, groups }))
}
