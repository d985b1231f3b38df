//! `POST /api/runtime/llm-tasks/:id/dispatch`: leases a queued task to an HTTP agent and
//! sends it there synchronously, as the upstream runtime does (the answer comes when the
//! agent has run the task; its callbacks have completed it by then). Built on the same
//! lease and abandon transitions as the reconcilers' automatic dispatch.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::Value;

use super::body::JsonBody;
use super::schemas::{Dispatched, ErrorBody, LeaseBody, RequestBody};
use super::{ApiError, AppState};
use crate::agent::{AgentError, ExecuteTask};
use crate::db::lifecycle::{self, Abandoned, FailedCall, LeaseRequest};
use crate::db::workers;
use crate::domain::{TaskId, TaskStatus, WorkerId};

/// Time a dispatched lease outlasts the task's own timeout when the caller names no TTL:
/// the agent sends one heartbeat, and its `complete` callback arrives before its answer.
const LEASE_MARGIN_SECS: i64 = 60;

/// The runtime's URL as the caller reached it (`x-forwarded-proto`/`x-forwarded-host`,
/// else `Host`), which the agent is given for its callbacks, as upstream derives it.
pub(super) fn caller_origin(headers: &HeaderMap) -> String {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty());
    let proto = header("x-forwarded-proto").and_then(|p| p.split(',').next()).unwrap_or("http").trim();
    let host = header("x-forwarded-host").or_else(|| header("host")).unwrap_or("localhost:5000");
    format!("{proto}://{host}")
}

/// `POST /api/runtime/llm-tasks/:id/dispatch` `{worker_id?, ttl_seconds?}` → 200
/// `{dispatched, task_id, worker_id, lease_id, execution}`, or 502 `{dispatched: false, ...}`.
#[utoipa::path(post, path = "/api/runtime/llm-tasks/{id}/dispatch", tag = "tasks", params(("id" = String, Path, description = "Task id")), request_body = LeaseBody, responses((status = 200, body = Dispatched), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 502, body = Dispatched), (status = 503, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn dispatch(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<impl IntoResponse, ApiError> {
    let task = lifecycle::current(&state.pool, &TaskId(id)).await?;
    if task.status != TaskStatus::Queued {
        return Err(ApiError::Conflict(format!("Task status is '{}', expected 'queued'", task.status)));
    }
    let body = LeaseBody::parse(&body)?;
    let ttl = body.ttl_seconds.unwrap_or(task.policy.timeout_sec.clamp(1, 3600) + LEASE_MARGIN_SECS);
    let req = LeaseRequest { worker_id: body.worker_id.map(WorkerId), ttl_seconds: ttl as i32, dispatch: true };
    let (lease, worker) = lifecycle::lease(&state.pool, &task.id, &req, state.clock.now_ms()).await?;
    let runtime_url = caller_origin(&headers);
    let answer = |dispatched, execution, error| Dispatched {
        dispatched,
        task_id: task.id.clone(),
        worker_id: worker.id.clone(),
        lease_id: dispatched.then(|| lease.id.clone()),
        execution,
        error,
    };
    let agents = super::agent_client(&state).await?;
    state.metrics.agent_dispatches_total.inc();
    let failure = match agents.execute(&worker.url, &ExecuteTask::new(&task, &runtime_url)).await {
        Ok(execution) => {
            workers::record_dispatch_success(&state.pool, &worker.id).await?;
            return Ok((StatusCode::OK, Json(answer(true, Some(execution), None))));
        }
        Err(e) => e,
    };
    // The agent did not take the task: the attempt is abandoned (requeued, or dead after
    // the last one), and an agent that is down takes no more. One that took it (its
    // heartbeat came) and lost the call keeps it: its callback or the lease's expiry
    // ends it, as upstream leaves it.
    state.metrics.agent_dispatch_failures_total.inc();
    tracing::warn!(task.id = %task.id, worker.id = %worker.id, error = %failure, "dispatch to an HTTP agent failed");
    let reason = failure.to_string();
    let call =
        FailedCall { reason: &reason, may_have_run: failure.may_have_run(), agent_down: failure.agent_is_down() };
    let now = state.clock.now_ms();
    if let Abandoned::Requeued(dispatch) =
        lifecycle::abandon(&state.pool, &task.id, &lease.id, &worker.id, &call, now).await?
    {
        state.dispatcher.send(vec![*dispatch]);
    }
    let not_dispatched =
        |e: &AgentError| (StatusCode::BAD_GATEWAY, Json(answer(false, None::<Value>, Some(e.to_string()))));
    Ok(match &failure {
        // The agent answered: its JSON answer is the execution, as upstream passes it on.
        // Another answer (a proxy's error page) is one upstream could not read: 502.
        AgentError::Refused { body, .. } => match serde_json::from_str(body) {
            Ok(execution) => (StatusCode::OK, Json(answer(true, Some(execution), None))),
            Err(_) => not_dispatched(&failure),
        },
        other => not_dispatched(other),
    })
}
