//! `GET /api/runtime/agent-holds`: agents whose work waits for a provider's rate limit to
//! reset.

use axum::extract::State;
use axum::Json;

use super::schemas::ErrorBody;
use super::{ApiError, AppState};
use crate::db::holds::{self, Hold};

/// `GET /api/runtime/agent-holds` → the agents held now, the longest hold first: no task
/// of theirs is leased or claimed before `until` (their claims wait without using an
/// attempt).
#[utoipa::path(get, path = "/api/runtime/agent-holds", tag = "stats",
    responses((status = 200, body = Vec<Hold>), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Hold>>, ApiError> {
    Ok(Json(holds::active(&state.pool, state.clock.now_ms()).await?))
}
