//! `/api/runtime/workers`: registration and listing of worker nodes.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;

use super::body::JsonBody;
use super::reads::PageQuery;
use super::schemas::{ErrorBody, Removed, RequestBody, WorkerDetail};
use super::{ApiError, AppState};
use crate::db::page::MAX_LIMIT;
use crate::db::{leases, lifecycle, workers};
use crate::domain::{Registration, Worker, WorkerId, WorkerTransport};

/// `GET /api/runtime/workers`: every worker with its active lease count, by id. A fleet
/// comes in one answer, as the original gave every worker: the page holds up to 1,000
/// by default (the other lists, whose rows carry prompts and outputs, 100).
#[utoipa::path(get, path = "/api/runtime/workers", tag = "workers", params(("limit" = Option<i64>, Query, description = "page size, 1..1000, default 1000", minimum = 1, maximum = 1000), ("cursor" = Option<String>, Query, description = "X-Next-Cursor of the previous page")), responses((status = 200, body = Vec<Worker>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>, Query(q): Query<PageQuery>) -> Result<impl IntoResponse, ApiError> {
    let page = q.page_with_default(MAX_LIMIT)?;
    let after = page.after.as_ref().map(|c| c.id.as_str());
    let rows = workers::list(&state.pool, page.limit, after).await?;
    let mut headers = axum::http::HeaderMap::new();
    if rows.len() as i64 == page.limit {
        if let Some(last) = rows.last() {
            let cursor = crate::db::Cursor { key: 0, id: last.id.0.clone() }.encode();
            if let Ok(v) = cursor.parse() {
                headers.insert("x-next-cursor", v);
            }
        }
    }
    Ok((headers, Json(rows)))
}

/// `GET /api/runtime/workers/:id`: the worker and its active leases.
#[utoipa::path(get, path = "/api/runtime/workers/{id}", tag = "workers", params(("id" = String, Path, description = "Worker id")), responses((status = 200, body = WorkerDetail), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<WorkerDetail>, ApiError> {
    let id = WorkerId(id);
    let worker = workers::get(&state.pool, &id).await?.ok_or_else(|| ApiError::NotFound("Worker not found".into()))?;
    let leases = leases::active_for_worker(&state.pool, &id).await?;
    Ok(Json(WorkerDetail { worker, leases }))
}

/// `POST /api/runtime/workers` → 201 when new, 200 when updated.
#[utoipa::path(post, path = "/api/runtime/workers", tag = "workers", request_body = Registration, responses((status = 201, body = Worker), (status = 200, body = Worker), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn register(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<impl IntoResponse, ApiError> {
    let reg = Registration::parse(&body)?;
    let mut tx = state.pool.begin().await?;
    let (worker, created) = workers::register(&mut tx, &reg, state.clock.now_ms()).await?;
    tx.commit().await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(worker)))
}

/// `DELETE /api/runtime/workers/:id` → `{removed: true, id}`.
#[utoipa::path(delete, path = "/api/runtime/workers/{id}", tag = "workers", params(("id" = String, Path, description = "Worker id")), responses((status = 200, body = Removed), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn remove(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Removed>, ApiError> {
    let wid = WorkerId(id.clone());
    let mut tx = state.pool.begin().await?;
    if !workers::remove(&mut tx, &wid, state.clock.now_ms()).await? {
        return Err(ApiError::NotFound("Worker not found".into()));
    }
    tx.commit().await?;
    Ok(Json(Removed { removed: true, id }))
}

/// `POST /api/runtime/workers/:id/drain`: the worker takes no new lease and finishes
/// those it holds (a `bloom-worker` stops pulling, an HTTP agent is assigned nothing, a
/// REST worker's leases are refused); it stays registered. Idempotent.
#[utoipa::path(post, path = "/api/runtime/workers/{id}/drain", tag = "workers", params(("id" = String, Path, description = "Worker id")), responses((status = 200, body = Worker), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn drain(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Worker>, ApiError> {
    set_draining(&state, WorkerId(id), true).await
}

/// `POST /api/runtime/workers/:id/resume`: a drained worker takes leases again.
#[utoipa::path(post, path = "/api/runtime/workers/{id}/resume", tag = "workers", params(("id" = String, Path, description = "Worker id")), responses((status = 200, body = Worker), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn resume(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Worker>, ApiError> {
    set_draining(&state, WorkerId(id), false).await
}

async fn set_draining(state: &AppState, id: WorkerId, draining: bool) -> Result<Json<Worker>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let worker = workers::set_draining(&mut tx, &id, draining, "admin", state.clock.now_ms())
        .await?
        .ok_or_else(|| ApiError::NotFound("Worker not found".into()))?;
    tx.commit().await?;
    if worker.transport == WorkerTransport::Nats {
        if draining {
            // Tasks routed to it (its conversations' next turns) go to the shared pool.
            let why = "Routed worker is draining: rerouted to the shared pool";
            let moved =
                lifecycle::reroute(&state.pool, std::slice::from_ref(&id), why, "admin", state.clock.now_ms()).await?;
            state.dispatcher.send(moved);
        }
        crate::bus::tell_draining(&state.nats, &state.names, id, draining).await;
    }
    Ok(Json(worker))
}
