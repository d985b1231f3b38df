//! `/api/runtime/llm-tasks`: list, show, and the REST worker protocol (lease,
//! heartbeat, complete) plus requeue and cancel (submissions are in [`super::submissions`]). The transitions are those of
//! [`crate::db::lifecycle`], shared with the NATS path.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

use super::body::JsonBody;
use super::reads::{stream_tasks, PageQuery};
use super::schemas::{
    CompleteBody, CompleteResponse, ErrorBody, HeartbeatResponse, HolderBody, LeaseBody, LeaseResponse, RequestBody,
};
use super::validate::{query_int, query_text, FieldErrors};
use super::{ApiError, AppState};
use crate::db::lifecycle::{self, Completion, CompletionOutcome, LeaseRequest};
use crate::db::page::KeyPage;
use crate::db::tasks::{self, TaskFilter};
use crate::domain::{ArtifactId, LeaseId, Priority, Task, TaskId, TaskStatus, WorkerId};
use crate::protocol::CancelNotice;

/// Longest prompt prefix a task filter takes.
pub const MAX_PROMPT_PREFIX: usize = 1000;

/// Query of `GET /api/runtime/llm-tasks`: the seed's `status`, and filters (additions).
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// One status, or several separated by commas.
    status: Option<String>,
    context_id: Option<String>,
    agent_slug: Option<String>,
    priority: Option<String>,
    created_from: Option<String>,
    created_to: Option<String>,
    prompt_prefix: Option<String>,
    #[serde(flatten)]
    page: PageQuery,
}

impl ListQuery {
    /// The filter; `None` when it can match nothing (as in the original, a status no
    /// task can have matches none). A malformed number is a 400 naming its parameter.
    fn filter(&self) -> Result<Option<TaskFilter>, ApiError> {
        let mut errors = FieldErrors::default();
        let mut int = |name: &str, v: &Option<String>, min: i64, max: i64| query_int(&mut errors, name, v, min, max);
        let priority = int("priority", &self.priority, Priority::MIN.into(), Priority::MAX.into());
        let created_from = int("created_from", &self.created_from, 0, i64::MAX);
        let created_to = int("created_to", &self.created_to, 0, i64::MAX);
        let mut statuses = Vec::new();
        let mut unknown = false;
        for s in self.status.as_deref().unwrap_or_default().split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match TaskStatus::parse(s) {
                Some(st) => statuses.push(st),
                None => unknown = true,
            }
        }
        let filter = TaskFilter {
            ids: None,
            statuses,
            context_id: query_text(&self.context_id),
            agent_slug: query_text(&self.agent_slug),
            priority: priority.map(|p| Priority(p as i16)),
            created_from,
            created_to,
            prompt_prefix: query_text(&self.prompt_prefix),
        };
        if filter.prompt_prefix.as_ref().is_some_and(|p| p.chars().count() > MAX_PROMPT_PREFIX) {
            errors.add("prompt_prefix", format!("Expected at most {MAX_PROMPT_PREFIX} characters"));
        }
        let matches_none = unknown && filter.statuses.is_empty();
        Ok(errors.finish((!matches_none).then_some(filter))?)
    }
}

/// `GET /api/runtime/llm-tasks[?status=&context_id=&agent_slug=&priority=&created_from=&created_to=&prompt_prefix=]`
/// → tasks, newest first.
#[utoipa::path(get, path = "/api/runtime/llm-tasks", tag = "tasks", params(
    ("status" = Option<String>, Query, description = "queued|leased|running|completed|failed|dead|cancelled; several separated by commas"),
    ("context_id" = Option<String>, Query, description = "only this context"),
    ("agent_slug" = Option<String>, Query, description = "only this agent"),
    ("priority" = Option<i64>, Query, description = "only this priority, -2..2", minimum = -2, maximum = 2),
    ("created_from" = Option<i64>, Query, description = "created at or after (epoch ms)", minimum = 0),
    ("created_to" = Option<i64>, Query, description = "created before (epoch ms)", minimum = 0),
    ("prompt_prefix" = Option<String>, Query, description = "the prompt starts with this text, ignoring case (at most 1000 characters)"),
    ("limit" = Option<i64>, Query, description = "page size, 1..1000, default 100", minimum = 1, maximum = 1000),
    ("cursor" = Option<String>, Query, description = "X-Next-Cursor of the previous page; with a filter on context, agent, priority or prompt a page reads at most 10,000 tasks and may be short yet go on")),
    responses((status = 200, body = Vec<Task>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, Query(q): Query<ListQuery>) -> Result<impl IntoResponse, ApiError> {
    let page = q.page.page()?;
    let keys = match q.filter()? {
        Some(filter) => tasks::list_keys(&state.pool, &filter, &page).await?,
        None => KeyPage::default(),
    };
    Ok(stream_tasks(state.pool.clone(), keys))
}

/// `GET /api/runtime/llm-tasks/:id`.
#[utoipa::path(get, path = "/api/runtime/llm-tasks/{id}", tag = "tasks", params(("id" = String, Path, description = "Task id")), responses((status = 200, body = Task), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Task>, ApiError> {
    Ok(Json(lifecycle::current(&state.pool, &TaskId(id)).await?))
}

/// `GET /api/runtime/llm-tasks/:id/results`: the task's results, newest first, with
/// their outputs and error messages (an addition to the original's routes).
#[utoipa::path(get, path = "/api/runtime/llm-tasks/{id}/results", tag = "tasks", params(("id" = String, Path, description = "Task id")), responses((status = 200, body = Vec<crate::domain::LlmResult>), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn results(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<crate::domain::LlmResult>>, ApiError> {
    let task = lifecycle::current(&state.pool, &TaskId(id)).await?;
    Ok(Json(crate::db::results::for_task(&state.pool, &task.id).await?))
}

/// Most leases and audit entries a task's history lists.
const HISTORY_LEASES: i64 = 100;
const HISTORY_ENTRIES: i64 = 500;

/// A task's leases and audit trail.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct TaskHistory {
    /// Oldest first, at most 100.
    pub leases: Vec<crate::domain::Lease>,
    /// The entries about the task and its leases, oldest first, at most 500.
    pub audit: Vec<crate::domain::AuditEntry>,
}

/// `GET /api/runtime/llm-tasks/:id/history` → the task's leases (which worker ran it,
/// when, how each ended) and its audit trail (an addition).
#[utoipa::path(get, path = "/api/runtime/llm-tasks/{id}/history", tag = "tasks", params(("id" = String, Path, description = "Task id")), responses((status = 200, body = TaskHistory), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn history(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<TaskHistory>, ApiError> {
    let task = lifecycle::current(&state.pool, &TaskId(id)).await?;
    let leases = crate::db::leases::of_task(&state.pool, &task.id, HISTORY_LEASES).await?;
    let entities: Vec<&str> = std::iter::once(task.id.as_str()).chain(leases.iter().map(|l| l.id.as_str())).collect();
    let audit = crate::db::audit::of_entities(&state.pool, &entities, HISTORY_ENTRIES).await?;
    Ok(Json(TaskHistory { leases, audit }))
}

/// `POST /api/runtime/llm-tasks/:id/lease` `{worker_id?, ttl_seconds?}` → 201 `{lease, worker}`.
#[utoipa::path(post, path = "/api/runtime/llm-tasks/{id}/lease", tag = "tasks", params(("id" = String, Path, description = "Task id")), request_body = LeaseBody, responses((status = 201, body = LeaseResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn lease(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<impl IntoResponse, ApiError> {
    let body = LeaseBody::parse(&body)?;
    let ttl = body.ttl_seconds.unwrap_or(state.settings.streams.lease_ttl.as_secs() as i64);
    let req = LeaseRequest { worker_id: body.worker_id.map(WorkerId), ttl_seconds: ttl as i32, dispatch: false };
    let (lease, worker) = lifecycle::lease(&state.pool, &TaskId(id), &req, state.clock.now_ms()).await?;
    Ok((StatusCode::CREATED, Json(LeaseResponse { lease, worker })))
}

/// Refuses with 409 a call whose body names a lease or worker that does not hold the
/// task's current lease.
fn check_holder(task: &Task, holder: &HolderBody) -> Result<(), ApiError> {
    if let Some(l) = &holder.lease_id {
        if task.lease_id.as_ref().map(|x| x.as_str()) != Some(l.as_str()) {
            return Err(ApiError::Conflict(format!("Lease {l} is not the current lease of task {}", task.id)));
        }
    }
    if let Some(w) = &holder.worker_id {
        if task.worker_id.as_ref().map(|x| x.as_str()) != Some(w.as_str()) {
            return Err(ApiError::Conflict(format!("Worker {w} does not hold the lease of task {}", task.id)));
        }
    }
    Ok(())
}

/// `POST /api/runtime/llm-tasks/:id/heartbeat` → `{lease, expires_at}`.
#[utoipa::path(post, path = "/api/runtime/llm-tasks/{id}/heartbeat", tag = "tasks", params(("id" = String, Path, description = "Task id")), request_body = HolderBody, responses((status = 200, body = HeartbeatResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn heartbeat(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<impl IntoResponse, ApiError> {
    let task = tasks::get(&state.pool, &TaskId(id)).await?;
    let Some((task, lease_id)) = task.and_then(|t| t.lease_id.clone().map(|l| (t, l))) else {
        return Err(ApiError::NotFound("Task or lease not found".into()));
    };
    check_holder(&task, &HolderBody::parse(&body)?)?;
    let renewed = lifecycle::heartbeat(&state.pool, &[(task.id.clone(), lease_id)], state.clock.now_ms()).await?;
    match renewed.into_iter().next() {
        Some(lease) => {
            let expires_at = lease.expires_at;
            Ok(Json(HeartbeatResponse { lease, expires_at }))
        }
        None => Err(ApiError::NotFound("Lease not found or already expired".into())),
    }
}

/// `POST /api/runtime/llm-tasks/:id/complete` → `{task, artifact, result}`.
#[utoipa::path(post, path = "/api/runtime/llm-tasks/{id}/complete", tag = "tasks", params(("id" = String, Path, description = "Task id")), request_body = CompleteBody, responses((status = 200, body = CompleteResponse), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn complete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<impl IntoResponse, ApiError> {
    let task = lifecycle::current(&state.pool, &TaskId(id)).await?;
    if !task.status.is_leased() {
        return Err(ApiError::Conflict(format!("Task status is '{}', expected 'leased' or 'running'", task.status)));
    }
    let CompleteBody { outcome, artifact_type, artifact_tags, holder } = CompleteBody::parse(&body)?;
    check_holder(&task, &holder)?;
    // The output was copied out of the body: the body need not stay in memory.
    drop(body);
    let lease_id: LeaseId = task.lease_id.clone().ok_or_else(|| ApiError::Conflict("Task has no lease".into()))?;
    let artifact = state.artifacts.store(&task.id, &lease_id, outcome.output.as_deref()).await;
    let completion = Completion {
        task_id: task.id.clone(),
        lease_id: lease_id.clone(),
        outcome,
        artifact_type,
        artifact_tags,
        artifact_id: ArtifactId::generate(),
        artifact,
    };
    match lifecycle::complete(&state.pool, std::slice::from_ref(&completion), state.clock.now_ms()).await?.pop() {
        Some(CompletionOutcome::Completed { task, result_id, completed_at }) => {
            state.metrics.record_run(&completion.outcome.metrics, task.status == TaskStatus::Queued);
            let (artifact, result) = completion.into_records(&task, result_id, completed_at);
            // The original's shape: the output appears in the result and, when kept in
            // Postgres, as the artifact's content.
            Ok(Json(CompleteResponse { task: *task, artifact, result }))
        }
        _ => Err(ApiError::Conflict(format!("Lease {lease_id} is no longer the current lease of task {}", task.id))),
    }
}

/// `POST /api/runtime/llm-tasks/:id/cancel` → the cancelled task. A queued task is
/// cancelled at once; a leased or running one also has its worker told to stop it (a
/// NATS worker kills the executor's process group); its lease ends `cancelled`.
/// 409 when the task already finished.
#[utoipa::path(post, path = "/api/runtime/llm-tasks/{id}/cancel", tag = "tasks", params(("id" = String, Path, description = "Task id")), responses((status = 200, body = Task), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Task>, ApiError> {
    let cancelled = lifecycle::cancel(&state.pool, &TaskId(id), "admin", state.clock.now_ms()).await?;
    state.metrics.tasks_cancelled_total.inc();
    if let Some((lease_id, _)) = cancelled.lease {
        notify_cancelled(&state, &cancelled.task.id, lease_id).await;
    }
    Ok(Json(cancelled.task))
}

/// Tells the worker running `lease_id` to stop. Fire and forget: a worker that misses it
/// finds the lease gone at its next heartbeat; an HTTP agent's late result is recorded
/// and ignored.
pub(super) async fn notify_cancelled(state: &AppState, task_id: &TaskId, lease_id: LeaseId) {
    let notice = CancelNotice { task_id: task_id.clone(), lease_id };
    let body = serde_json::to_vec(&notice).expect("notice serializes");
    if let Err(e) = state.nats.publish(state.names.cancel_subject(), body.into()).await {
        tracing::warn!(task.id = %notice.task_id, error = %e, "cancel notice not sent");
    }
}

/// `POST /api/runtime/llm-tasks/:id/requeue` → the requeued task.
#[utoipa::path(post, path = "/api/runtime/llm-tasks/{id}/requeue", tag = "tasks", params(("id" = String, Path, description = "Task id")), responses((status = 200, body = Task), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn requeue(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Task>, ApiError> {
    let dispatch = lifecycle::requeue(&state.pool, &TaskId(id), "admin", state.clock.now_ms()).await?;
    let task = dispatch.task.clone();
    state.dispatcher.send(vec![dispatch]);
    Ok(Json(task))
}
