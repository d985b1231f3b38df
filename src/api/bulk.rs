//! Bulk operations on a selection of tasks, by ids or by filter: cancel
//! (`POST /api/runtime/llm-tasks/cancel`) and requeue (`POST /api/runtime/llm-tasks/requeue`),
//! each with a dry run that only counts what it would take.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::body::JsonBody;
use super::schemas::ErrorBody;
use super::tasks::{notify_cancelled, MAX_PROMPT_PREFIX};
use super::validate::{FieldErrors, Fields};
use super::{ApiError, AppState};
use crate::db::lifecycle;
use crate::db::tasks::{self, TaskFilter};
use crate::domain::{Priority, TaskStatus};

/// Most tasks one bulk operation takes; repeat the request for more.
pub const MAX_BULK: i64 = 1000;

/// Body of the bulk operations: which tasks. At least one of `ids`, `context_id`,
/// `agent_slug`, `prompt_prefix` is required (nothing takes every task by accident); the other fields
/// narrow the selection.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct BulkSelection {
    /// Task ids (at most 1000).
    #[schema(min_items = 1, max_items = 1000)]
    pub ids: Option<Vec<String>>,
    #[schema(min_length = 1, max_length = 255)]
    pub context_id: Option<String>,
    #[schema(min_length = 1, max_length = 255)]
    pub agent_slug: Option<String>,
    /// Cancel: among `queued`, `leased`, `running` (default all three). Requeue: among
    /// `failed`, `dead`, `cancelled` (default all three).
    pub status: Option<Vec<String>>,
    /// Only this priority, -2..2.
    #[schema(minimum = -2, maximum = 2)]
    pub priority: Option<i64>,
    /// Created at or after (epoch ms).
    #[schema(minimum = 0)]
    pub created_from: Option<i64>,
    /// Created before (epoch ms).
    #[schema(minimum = 0)]
    pub created_to: Option<i64>,
    /// The prompt starts with this text, ignoring case.
    #[schema(min_length = 1, max_length = 1000)]
    pub prompt_prefix: Option<String>,
    /// Count what would be taken, change nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a bulk cancellation did (or, dry, would do).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CancelReport {
    pub dry_run: bool,
    /// Tasks the selection holds now.
    pub matched: i64,
    /// Ids of the tasks cancelled (empty on a dry run); at most 1000 per request.
    pub cancelled: Vec<String>,
}

/// What a bulk requeue did (or, dry, would do).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RequeueReport {
    pub dry_run: bool,
    /// Tasks the selection holds now.
    pub matched: i64,
    /// Ids of the tasks requeued (empty on a dry run); at most 1000 per request.
    pub requeued: Vec<String>,
}

/// Reads a selection whose statuses must be among `allowed` (all of them by default).
fn selection(body: &Value, allowed: &[TaskStatus]) -> Result<(TaskFilter, bool), ApiError> {
    let mut errors = FieldErrors::default();
    let (ids, context_id, agent_slug, status, priority, created_from, created_to, prompt_prefix, dry_run) = {
        let mut f = Fields::root(body, &mut errors);
        (
            f.opt_strings("ids").flatten(),
            f.opt_string("context_id", 1, Some(255), false).flatten(),
            f.opt_string("agent_slug", 1, Some(255), false).flatten(),
            f.opt_strings("status").flatten(),
            f.opt_int("priority", Priority::MIN.into(), Priority::MAX.into()).flatten(),
            f.opt_int("created_from", 0, i64::MAX).flatten(),
            f.opt_int("created_to", 0, i64::MAX).flatten(),
            f.opt_string("prompt_prefix", 1, Some(MAX_PROMPT_PREFIX), false).flatten(),
            f.boolean("dry_run", false).unwrap_or(false),
        )
    };
    if let Some(ids) = &ids {
        if ids.is_empty() || ids.len() > MAX_BULK as usize {
            errors.add("ids", format!("Expected between 1 and {MAX_BULK} ids"));
        }
    }
    let failed = !errors.form.is_empty() || !errors.fields.is_empty();
    if ids.is_none() && context_id.is_none() && agent_slug.is_none() && prompt_prefix.is_none() && !failed {
        errors.add("ids", "Required: ids, context_id, agent_slug or prompt_prefix");
    }
    let mut statuses = Vec::new();
    let expected = allowed.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(" | ");
    for s in status.unwrap_or_else(|| allowed.iter().map(|s| s.as_str().to_owned()).collect()) {
        match TaskStatus::parse(&s) {
            Some(st) if allowed.contains(&st) => statuses.push(st),
            _ => errors.add("status", format!("Invalid enum value. Expected {expected}, received '{s}'")),
        }
    }
    let filter = TaskFilter {
        ids,
        statuses,
        context_id,
        agent_slug,
        priority: priority.map(|p| Priority(p as i16)),
        created_from,
        created_to,
        prompt_prefix,
    };
    errors.finish((filter, dry_run)).map_err(ApiError::from)
}

/// `POST /api/runtime/llm-tasks/cancel`: cancels the unfinished tasks of a selection,
/// oldest first, at most 1000 per request; with `dry_run`, only counts them.
#[utoipa::path(post, path = "/api/runtime/llm-tasks/cancel", tag = "tasks", request_body = BulkSelection, responses((status = 200, body = CancelReport), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn cancel(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<Json<CancelReport>, ApiError> {
    let unfinished: Vec<TaskStatus> = TaskStatus::ALL.into_iter().filter(|s| !s.is_terminal()).collect();
    let (filter, dry_run) = selection(&body, &unfinished)?;
    let matched = tasks::count(&state.pool, &filter).await?;
    if dry_run {
        return Ok(Json(CancelReport { dry_run, matched, cancelled: Vec::new() }));
    }
    let done = lifecycle::cancel_many(&state.pool, &filter, MAX_BULK, "admin", state.clock.now_ms()).await?;
    state.metrics.tasks_cancelled_total.add(done.len() as u64);
    let mut cancelled = Vec::with_capacity(done.len());
    for (task_id, lease) in done {
        if let Some((lease_id, _)) = lease {
            notify_cancelled(&state, &task_id, lease_id).await;
        }
        cancelled.push(task_id.0);
    }
    Ok(Json(CancelReport { dry_run, matched, cancelled }))
}

/// `POST /api/runtime/llm-tasks/requeue`: requeues the finished, not completed tasks of a
/// selection (attempts from zero), oldest first, at most 1000 per request; with
/// `dry_run`, only counts them — check the count before requeueing many.
#[utoipa::path(post, path = "/api/runtime/llm-tasks/requeue", tag = "tasks", request_body = BulkSelection, responses((status = 200, body = RequeueReport), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn requeue(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<Json<RequeueReport>, ApiError> {
    let finished: Vec<TaskStatus> = TaskStatus::ALL.into_iter().filter(|s| s.is_requeueable()).collect();
    let (filter, dry_run) = selection(&body, &finished)?;
    let matched = tasks::count(&state.pool, &filter).await?;
    if dry_run {
        return Ok(Json(RequeueReport { dry_run, matched, requeued: Vec::new() }));
    }
    let dispatches = lifecycle::requeue_many(&state.pool, &filter, MAX_BULK, "admin", state.clock.now_ms()).await?;
    let requeued = dispatches.iter().map(|d| d.task.id.0.clone()).collect();
    state.dispatcher.send(dispatches);
    Ok(Json(RequeueReport { dry_run, matched, requeued }))
}
