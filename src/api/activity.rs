//! `GET /api/runtime/activity`: the last minutes of runs and dispatches, for charts.
//! Minutes that have ended are kept in memory once read, so a dashboard polling it costs
//! the database the current minute only.

use std::collections::BTreeMap;
use std::sync::Mutex;

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::schemas::ErrorBody;
use super::validate::{query_int, FieldErrors};
use super::{ApiError, AppState};
use crate::db::activity::{self, MinuteActivity, MINUTE_MS};

const DEFAULT_MINUTES: i64 = 60;
const MAX_MINUTES: i64 = 180;
/// A minute is kept once it ended this long ago (results of runs that ended in it may
/// still be on their way to Postgres just after).
const SETTLED_MS: i64 = 10_000;

/// Minutes that have ended, by start.
#[derive(Default)]
pub struct ActivityCache(Mutex<BTreeMap<i64, MinuteActivity>>);

/// Query of `GET /api/runtime/activity`.
#[derive(Debug, Deserialize)]
pub struct ActivityQuery {
    minutes: Option<String>,
}

/// The series.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Activity {
    pub minutes: Vec<MinuteActivity>,
}

/// `GET /api/runtime/activity[?minutes=60]` → one point per minute, the oldest first, up
/// to the current one: results recorded (successes, errors) with the end-to-end latency
/// (creation to result) and leases started with the dispatch latency (creation to
/// lease), p50 and p99 in ms.
#[utoipa::path(get, path = "/api/runtime/activity", tag = "stats", params(
    ("minutes" = Option<i64>, Query, description = "how many minutes, 1..180, default 60", minimum = 1, maximum = 180)),
    responses((status = 200, body = Activity), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn activity(
    State(state): State<AppState>,
    Query(q): Query<ActivityQuery>,
) -> Result<Json<Activity>, ApiError> {
    let mut errors = FieldErrors::default();
    let n = query_int(&mut errors, "minutes", &q.minutes, 1, MAX_MINUTES).unwrap_or(DEFAULT_MINUTES);
    errors.finish(())?;
    let now = state.clock.now_ms();
    let to = now - now % MINUTE_MS + MINUTE_MS;
    let from = to - n * MINUTE_MS;
    let settled = |minute: i64| minute + MINUTE_MS + SETTLED_MS <= now;
    // Read from the first minute not kept.
    let first_missing = {
        let cache = state.activity.0.lock().expect("activity cache");
        (from..to).step_by(MINUTE_MS as usize).find(|m| !cache.contains_key(m)).unwrap_or(to)
    };
    let fresh = if first_missing < to { activity::minutes(&state.pool, first_missing, to).await? } else { Vec::new() };
    let mut cache = state.activity.0.lock().expect("activity cache");
    for m in fresh.iter().filter(|m| settled(m.minute)) {
        cache.insert(m.minute, m.clone());
    }
    // Only the minutes a request can still ask for are kept.
    cache.retain(|&m, _| m >= to - MAX_MINUTES * MINUTE_MS);
    let mut minutes: Vec<MinuteActivity> = cache.range(from..first_missing).map(|(_, m)| m.clone()).collect();
    minutes.extend(fresh);
    Ok(Json(Activity { minutes }))
}
