//! `GET /api/runtime/holds` and `GET /api/runtime/agent-holds`: keys (agents, concurrency
//! keys, conversations) whose work waits for a provider's rate limit to reset.

use axum::extract::State;
use axum::Json;

use super::schemas::ErrorBody;
use super::{ApiError, AppState};
use crate::db::holds::{self, AgentHold, Hold};

/// `GET /api/runtime/holds` → the holds in force now, the longest first: no task of a
/// held key (its agent, conversation or concurrency key) is leased or claimed before
/// `until` (its claims wait without using an attempt).
#[utoipa::path(get, path = "/api/runtime/holds", tag = "stats",
    responses((status = 200, body = Vec<Hold>), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Hold>>, ApiError> {
    Ok(Json(holds::active(&state.pool, state.clock.now_ms()).await?))
}

/// `GET /api/runtime/agent-holds` → the agents held now, the longest hold first (the
/// holds of scope `agent_slug`).
#[utoipa::path(get, path = "/api/runtime/agent-holds", tag = "stats",
    responses((status = 200, body = Vec<AgentHold>), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn agents(State(state): State<AppState>) -> Result<Json<Vec<AgentHold>>, ApiError> {
    let all = holds::active(&state.pool, state.clock.now_ms()).await?;
    Ok(Json(all.into_iter().filter_map(Hold::of_agent).collect()))
}
