//! `/api/runtime/projects`: git projects managed across the nodes, as the upstream
//! runtime manages them (create, list, show, delete; clone on a node, propagate to every
//! node, memory sync through membridge; the state on each node).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::body::JsonBody;
use super::schemas::{ErrorBody, RequestBody};
use super::validate::Fields;
use super::{ApiError, AppState};
use crate::agent::AgentClient;
use crate::db::projects::{self, NodeChange, Target};
use crate::db::{audit, workers};
use crate::domain::{AuditAction, CloneStatus, NewAudit, NewProject, Project, ProjectNode, WorkerId};
use crate::membridge::{Auth, Retry};

/// `POST /api/runtime/projects` (upstream's `insertManagedProjectSchema`).
impl RequestBody for NewProject {
    fn read(f: &mut Fields<'_>) -> Option<NewProject> {
        let name = f.string("name", 1, Some(256));
        if name.as_deref().is_some_and(|n| !n.chars().all(|c| c.is_ascii_alphanumeric() || "_-. ".contains(c))) {
            f.errors.add("name", "Name must be alphanumeric with dashes/underscores/dots/spaces");
        }
        let repo_url = f.string("repo_url", 1, Some(1024));
        let url_ok = |u: &str| {
            let rest = u.strip_prefix("https://").or_else(|| u.strip_prefix("http://"));
            rest.is_some_and(|r| !r.is_empty()) || u.strip_prefix("git@").is_some_and(|r| !r.is_empty())
        };
        if repo_url.as_deref().is_some_and(|u| !url_ok(u)) {
            f.errors.add("repo_url", "Must be a valid HTTP(S) or git@ URL");
        }
        let target_path = f.opt_string("target_path", 1, Some(512), false);
        if let Some(Some(p)) = &target_path {
            if !p.chars().all(|c| c.is_ascii_alphanumeric() || "_-./~".contains(c)) {
                f.errors.add("target_path", "Path contains invalid characters");
            }
            if p.contains("..") {
                f.errors.add("target_path", "Path must not contain '..' for security");
            }
        }
        let primary_node_id = f.opt_string("primary_node_id", 1, Some(128), false);
        Some(NewProject {
            name: name?,
            repo_url: repo_url?,
            target_path: target_path?,
            primary_node_id: primary_node_id?,
        })
    }
}

fn not_found() -> ApiError {
    ApiError::NotFound("Project not found".into())
}

async fn project(state: &AppState, id: &str) -> Result<Project, ApiError> {
    projects::get(&state.pool, id).await?.ok_or_else(not_found)
}

/// `GET /api/runtime/projects` → every project, newest first.
#[utoipa::path(get, path = "/api/runtime/projects", tag = "projects", responses((status = 200, body = Vec<Project>), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Project>>, ApiError> {
    Ok(Json(projects::list(&state.pool).await?))
}

/// `POST /api/runtime/projects` → 201 the project (`pending`).
#[utoipa::path(post, path = "/api/runtime/projects", tag = "projects", request_body = NewProject, responses((status = 201, body = Project), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn create(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<impl IntoResponse, ApiError> {
    let new = NewProject::parse(&body)?;
    let mut tx = state.pool.begin().await?;
    let created = projects::create(&mut tx, &new, state.clock.now_ms()).await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// A project with its state on every node.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProjectDetail {
    #[serde(flatten)]
    pub project: Project,
    pub nodes: Vec<ProjectNode>,
}

/// `GET /api/runtime/projects/:id` → the project and its nodes.
#[utoipa::path(get, path = "/api/runtime/projects/{id}", tag = "projects", params(("id" = String, Path, description = "Project id")), responses((status = 200, body = ProjectDetail), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<ProjectDetail>, ApiError> {
    let project = project(&state, &id).await?;
    let nodes = projects::nodes(&state.pool, &id).await?;
    Ok(Json(ProjectDetail { project, nodes }))
}

/// `DELETE /api/runtime/projects/:id` → `{removed: true, id}` (nothing is sent to nodes).
#[utoipa::path(delete, path = "/api/runtime/projects/{id}", tag = "projects", params(("id" = String, Path, description = "Project id")), responses((status = 200, body = super::schemas::Removed), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn remove(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<super::schemas::Removed>, ApiError> {
    let mut tx = state.pool.begin().await?;
    projects::delete(&mut tx, &id, state.clock.now_ms()).await?.ok_or_else(not_found)?;
    tx.commit().await?;
    Ok(Json(super::schemas::Removed { removed: true, id }))
}

/// `GET /api/runtime/projects/:id/node-status` → the project's state on every node.
#[utoipa::path(get, path = "/api/runtime/projects/{id}/node-status", tag = "projects", params(("id" = String, Path, description = "Project id")), responses((status = 200, body = Vec<ProjectNode>), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn node_status(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Vec<ProjectNode>>, ApiError> {
    project(&state, &id).await?;
    Ok(Json(projects::nodes(&state.pool, &id).await?))
}

/// Body of `clone` and `sync-memory`: the node to act on (default: the project's primary).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct NodeBody {
    #[serde(default)]
    pub node_id: Option<String>,
    /// `sync-memory` only: `push` (default) or `pull`.
    #[serde(default)]
    #[schema(pattern = "^(push|pull)$")]
    pub direction: Option<String>,
}

impl RequestBody for NodeBody {
    fn read(f: &mut Fields<'_>) -> Option<NodeBody> {
        let node_id = f.opt_string("node_id", 0, None, true).map(|n| n.filter(|n| !n.is_empty()));
        let direction = f.one_of("direction", &["push", "pull"], Some("push")).map(|d| Some(d.to_owned()));
        Some(NodeBody { node_id: node_id?, direction: direction? })
    }
}

/// Clones the project on one node through its agent's `/clone` (60 s). An agent that
/// answers `ok: false` (git failed) failed too. Returns the agent's answer.
async fn clone_on(agents: &AgentClient, project: &Project, target: &Target) -> Result<Value, String> {
    let mut body = json!({ "repo_url": project.repo_url, "project_name": project.name });
    if let Some(path) = &project.target_path {
        body["target_path"] = json!(path);
    }
    let reply =
        agents.post(&target.url, "/clone", Some(&body), Duration::from_secs(60)).await.map_err(|e| e.to_string())?;
    if reply.get("ok") == Some(&Value::Bool(false)) {
        let why = ["detail", "stderr", "error"].iter().find_map(|k| reply.get(*k).and_then(Value::as_str));
        return Err(format!("Agent could not clone: {}", why.unwrap_or("ok: false")));
    }
    Ok(reply)
}

/// Records a clone's outcome on its node; the path the agent reports, else the project's.
async fn record_clone(
    state: &AppState,
    project: &Project,
    node: &str,
    outcome: &Result<Value, String>,
) -> Result<(), ApiError> {
    let now = state.clock.now_ms();
    match outcome {
        Ok(reply) => {
            let path = reply.get("path").and_then(Value::as_str).or(project.target_path.as_deref());
            let change = NodeChange { last_sync_at: Some(now), repo_path: path, ..NodeChange::default() };
            projects::set_node_status(&state.pool, &project.id, node, CloneStatus::Cloned, &change).await?;
        }
        Err(e) => {
            let change = NodeChange { error_message: Some(e), ..NodeChange::default() };
            projects::set_node_status(&state.pool, &project.id, node, CloneStatus::Failed, &change).await?;
        }
    }
    Ok(())
}

/// `POST /api/runtime/projects/:id/clone` `{node_id?}` → `{status: "cloned", node, result}`
/// or 502 `{error}`; the node becomes the project's primary.
#[utoipa::path(post, path = "/api/runtime/projects/{id}/clone", tag = "projects", params(("id" = String, Path, description = "Project id")), request_body = NodeBody, responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn clone(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let project = project(&state, &id).await?;
    let body = NodeBody::parse(&body)?;
    let Some(node) = body.node_id.or_else(|| project.primary_node_id.clone()) else {
        return Err(ApiError::Invalid(
            "No target node specified. Provide node_id in body or set primary_node_id on project.".into(),
        ));
    };
    let now = state.clock.now_ms();
    projects::set_status(&state.pool, &id, CloneStatus::Cloning, None, Some(&node), now).await?;
    projects::set_node_status(&state.pool, &id, &node, CloneStatus::Cloning, &NodeChange::default()).await?;
    let worker = workers::get(&state.pool, &WorkerId(node.clone())).await?.filter(|w| !w.url.is_empty());
    let agents = super::agent_client(&state).await?;
    let outcome = match worker {
        Some(w) => clone_on(&agents, &project, &Target { node_id: node.clone(), url: w.url }).await,
        None => Err(format!("Worker \"{node}\" not found or has no URL")),
    };
    record_clone(&state, &project, &node, &outcome).await?;
    let now = state.clock.now_ms();
    match outcome {
        Ok(result) => {
            projects::set_status(&state.pool, &id, CloneStatus::Cloned, None, None, now).await?;
            let detail = format!("Cloned \"{}\" on node {node}", project.repo_url);
            let entry = NewAudit::new(AuditAction::ProjectCloned, "managed_project", id.as_str(), "admin", detail);
            audit::insert(&state.pool, &[entry], now).await?;
            Ok(Json(json!({ "status": "cloned", "node": node, "result": result })))
        }
        Err(e) => {
            projects::set_status(&state.pool, &id, CloneStatus::Failed, Some(&e), None, now).await?;
            Err(ApiError::BadGateway(e))
        }
    }
}

/// `POST /api/runtime/projects/:id/propagate` → clones the project, one node after the
/// other, on every node with a URL that does not have it: `{status: synced|partial,
/// results}`, or `nothing_to_propagate`.
#[utoipa::path(post, path = "/api/runtime/projects/{id}/propagate", tag = "projects", params(("id" = String, Path, description = "Project id")), responses((status = 200, body = Object), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn propagate(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let project = project(&state, &id).await?;
    let targets = projects::propagation_targets(&state.pool, &id).await?;
    if targets.is_empty() {
        return Ok(Json(json!({ "status": "nothing_to_propagate", "message": "All nodes already have this project" })));
    }
    let agents = super::agent_client(&state).await?;
    projects::set_status_only(&state.pool, &id, CloneStatus::Propagating, state.clock.now_ms()).await?;
    let mut results = Vec::with_capacity(targets.len());
    for target in &targets {
        let node = target.node_id.as_str();
        projects::set_node_status(&state.pool, &id, node, CloneStatus::Cloning, &NodeChange::default()).await?;
        let outcome = clone_on(&agents, &project, target).await;
        record_clone(&state, &project, node, &outcome).await?;
        results.push(match outcome {
            Ok(_) => json!({ "node_id": node, "status": "cloned" }),
            Err(e) => json!({ "node_id": node, "status": "failed", "error": e }),
        });
    }
    let cloned = results.iter().filter(|r| r["status"] == "cloned").count();
    let all = cloned == targets.len();
    let now = state.clock.now_ms();
    projects::set_status_only(&state.pool, &id, if all { CloneStatus::Synced } else { CloneStatus::Failed }, now)
        .await?;
    let detail = format!("Propagated to {cloned}/{} nodes", targets.len());
    let entry = NewAudit::new(AuditAction::ProjectPropagated, "managed_project", id.as_str(), "admin", detail);
    audit::insert(&state.pool, &[entry], now).await?;
    Ok(Json(json!({ "status": if all { "synced" } else { "partial" }, "results": results })))
}

/// `POST /api/runtime/projects/:id/sync-memory` `{direction?: push|pull, node_id?}`:
/// membridge's `/sync/<direction>` for the project on the node.
#[utoipa::path(post, path = "/api/runtime/projects/{id}/sync-memory", tag = "projects", params(("id" = String, Path, description = "Project id")), request_body = NodeBody, responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 502, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn sync_memory(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let project = project(&state, &id).await?;
    let body = NodeBody::parse(&body)?;
    let direction = if body.direction.as_deref() == Some("pull") { "pull" } else { "push" };
    let Some(node) = body.node_id.or_else(|| project.primary_node_id.clone()) else {
        return Err(ApiError::Invalid("No target node specified".into()));
    };
    // Membridge's own fields (`project`, `agent`) and upstream's (`project_name`, `agent_name`).
    let sent = json!({ "project": project.name, "agent": node, "project_name": project.name, "agent_name": node });
    let path = format!("/sync/{direction}");
    let r = super::membridge_proxy::call(
        &state,
        reqwest::Method::POST,
        &path,
        Some(&sent),
        Retry::ConnectOnly(3),
        Auth::Checked,
    )
    .await?;
    if !r.is_success() {
        let text = String::from_utf8_lossy(&r.body).into_owned();
        return Err(ApiError::BadGateway(format!("Membridge returned {}: {text}", r.status)));
    }
    let result = r.json().map_err(|e| ApiError::BadGateway(format!("Membridge sent invalid JSON: {e}")))?;
    let action = if direction == "pull" { AuditAction::MemorySyncPull } else { AuditAction::MemorySyncPush };
    let detail = format!("{direction} memory sync for \"{}\" via node {node}", project.name);
    audit::insert(
        &state.pool,
        &[NewAudit::new(action, "managed_project", id.as_str(), "admin", detail)],
        state.clock.now_ms(),
    )
    .await?;
    Ok(Json(json!({ "status": "ok", "direction": direction, "node": node, "result": result })))
}
