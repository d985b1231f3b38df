//! `GET /api/runtime/usage`: what runs used and cost over a time range, per agent or per
//! context (the cost ledger, read from the results).

use axum::extract::{Query, State};
use axum::Json;
use serde::Deserialize;

use super::schemas::ErrorBody;
use super::validate::{query_int, query_range, FieldErrors};
use super::{ApiError, AppState};
use crate::db::usage::{self, UsageGroup, UsageReport};

/// The range a request names nothing of: the last day.
const DEFAULT_RANGE_MS: i64 = 24 * 3600 * 1000;
/// Groups listed by default, and at most.
const DEFAULT_GROUPS: i64 = 50;
const MAX_GROUPS: i64 = 1000;

/// Query of `GET /api/runtime/usage`.
#[derive(Debug, Deserialize)]
pub struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
    group_by: Option<String>,
    limit: Option<String>,
}

/// `GET /api/runtime/usage[?group_by=agent_slug|context_id&from=&to=&limit=]` → the
/// usage of the results completed in `[from, to)` (epoch ms; by default the last 24
/// hours), summed per agent (default) or per context, most expensive first.
#[utoipa::path(get, path = "/api/runtime/usage", tag = "stats", params(
    ("group_by" = Option<String>, Query, description = "agent_slug (default) or context_id"),
    ("from" = Option<i64>, Query, description = "completed at or after (epoch ms); default `to` minus 24 hours", minimum = 0),
    ("to" = Option<i64>, Query, description = "completed before (epoch ms); default now", minimum = 0),
    ("limit" = Option<i64>, Query, description = "groups listed, 1..1000, default 50", minimum = 1, maximum = 1000)),
    responses((status = 200, body = UsageReport), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn usage(State(state): State<AppState>, Query(q): Query<UsageQuery>) -> Result<Json<UsageReport>, ApiError> {
    let mut errors = FieldErrors::default();
    let (from, to) = query_range(&mut errors, &q.from, &q.to, state.clock.now_ms(), DEFAULT_RANGE_MS);
    let limit = query_int(&mut errors, "limit", &q.limit, 1, MAX_GROUPS).unwrap_or(DEFAULT_GROUPS);
    let group = match q.group_by.as_deref() {
        None | Some("") => UsageGroup::AgentSlug,
        Some(s) => UsageGroup::parse(s).unwrap_or_else(|| {
            errors.add("group_by", format!("Expected agent_slug or context_id, received '{s}'"));
            UsageGroup::AgentSlug
        }),
    };
    errors.finish(())?;
    Ok(Json(usage::report(&state.pool, group, from, to, limit).await?))
}
