//! `managed_projects` and `project_node_status`: git projects managed across the nodes.

use sqlx::{PgConnection, PgExecutor};

use super::audit;
use crate::domain::{canonical_id, new_id, AuditAction, CloneStatus, NewAudit, NewProject, Project, ProjectNode};

/// Every project, newest first.
pub async fn list(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<Project>> {
    sqlx::query_as!(
        Project,
        r#"SELECT id, name, repo_url, canonical_id, target_path, clone_status AS "clone_status: CloneStatus",
                  primary_node_id, created_at, updated_at, error_message
           FROM managed_projects ORDER BY created_at DESC, id DESC"#
    )
    .fetch_all(db)
    .await
}

/// One project.
pub async fn get(db: impl PgExecutor<'_>, id: &str) -> sqlx::Result<Option<Project>> {
    sqlx::query_as!(
        Project,
        r#"SELECT id, name, repo_url, canonical_id, target_path, clone_status AS "clone_status: CloneStatus",
                  primary_node_id, created_at, updated_at, error_message
           FROM managed_projects WHERE id = $1"#,
        id
    )
    .fetch_optional(db)
    .await
}

/// Creates a project (`pending`) and its audit entry, in one transaction.
pub async fn create(db: &mut PgConnection, new: &NewProject, now: i64) -> sqlx::Result<Project> {
    let project = sqlx::query_as!(
        Project,
        r#"INSERT INTO managed_projects (id, name, repo_url, canonical_id, target_path, clone_status, primary_node_id,
                                        created_at, updated_at)
           VALUES ($1, $2, $3, $4, $5, 'pending', $6, $7, $7)
           RETURNING id, name, repo_url, canonical_id, target_path, clone_status AS "clone_status: CloneStatus",
                     primary_node_id, created_at, updated_at, error_message"#,
        uuid::Uuid::new_v4().to_string(),
        new.name,
        new.repo_url,
        canonical_id(&new.name),
        new.target_path,
        new.primary_node_id,
        now
    )
    .fetch_one(&mut *db)
    .await?;
    let detail = format!("Created project \"{}\" with repo {}", project.name, project.repo_url);
    audit::insert(
        &mut *db,
        &[NewAudit::new(AuditAction::ProjectCreated, "managed_project", &project.id, "admin", detail)],
        now,
    )
    .await?;
    Ok(project)
}

/// Deletes a project and its node rows, with its audit entry. `None` when it did not exist.
pub async fn delete(db: &mut PgConnection, id: &str, now: i64) -> sqlx::Result<Option<Project>> {
    let Some(project) = get(&mut *db, id).await? else { return Ok(None) };
    sqlx::query!("DELETE FROM project_node_status WHERE project_id = $1", id).execute(&mut *db).await?;
    sqlx::query!("DELETE FROM managed_projects WHERE id = $1", id).execute(&mut *db).await?;
    let detail = format!("Deleted project \"{}\"", project.name);
    audit::insert(&mut *db, &[NewAudit::new(AuditAction::ProjectDeleted, "managed_project", id, "admin", detail)], now)
        .await?;
    Ok(Some(project))
}

/// A change of a project's status; `error_message` is set as given (`None` clears it),
/// the primary node only when given.
pub async fn set_status(
    db: impl PgExecutor<'_>,
    id: &str,
    status: CloneStatus,
    error_message: Option<&str>,
    primary_node_id: Option<&str>,
    now: i64,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE managed_projects SET clone_status = $2, error_message = $3,
                primary_node_id = COALESCE($4, primary_node_id), updated_at = $5
         WHERE id = $1",
        id,
        status.as_str(),
        error_message,
        primary_node_id,
        now
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Sets only a project's status, keeping its error message (a propagation's end).
pub async fn set_status_only(db: impl PgExecutor<'_>, id: &str, status: CloneStatus, now: i64) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE managed_projects SET clone_status = $2, updated_at = $3 WHERE id = $1",
        id,
        status.as_str(),
        now
    )
    .execute(db)
    .await?;
    Ok(())
}

/// What changed on one node: the status always; the other fields only when given.
#[derive(Clone, Debug, Default)]
pub struct NodeChange<'a> {
    pub last_sync_at: Option<i64>,
    pub error_message: Option<&'a str>,
    pub repo_path: Option<&'a str>,
}

/// Records a project's status on a node, in one statement (one row per project and node).
pub async fn set_node_status(
    db: impl PgExecutor<'_>,
    project_id: &str,
    node_id: &str,
    status: CloneStatus,
    change: &NodeChange<'_>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO project_node_status (id, project_id, node_id, clone_status, last_sync_at, error_message, repo_path)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (project_id, node_id) DO UPDATE SET
            clone_status = EXCLUDED.clone_status,
            last_sync_at = COALESCE(EXCLUDED.last_sync_at, project_node_status.last_sync_at),
            error_message = COALESCE(EXCLUDED.error_message, project_node_status.error_message),
            repo_path = COALESCE(EXCLUDED.repo_path, project_node_status.repo_path)",
        new_id(),
        project_id,
        node_id,
        status.as_str(),
        change.last_sync_at,
        change.error_message,
        change.repo_path
    )
    .execute(db)
    .await?;
    Ok(())
}

/// A project's state on every node it was sent to.
pub async fn nodes(db: impl PgExecutor<'_>, project_id: &str) -> sqlx::Result<Vec<ProjectNode>> {
    sqlx::query_as!(
        ProjectNode,
        r#"SELECT id, project_id, node_id, clone_status AS "clone_status: CloneStatus", last_sync_at, error_message,
                  repo_path
           FROM project_node_status WHERE project_id = $1 ORDER BY node_id"#,
        project_id
    )
    .fetch_all(db)
    .await
}

/// A node a project can be sent to.
#[derive(Clone, Debug)]
pub struct Target {
    pub node_id: String,
    pub url: String,
}

/// Every worker with a URL that does not have the project yet (no node row `cloned` or
/// `synced`), whatever its status, by id.
pub async fn propagation_targets(db: impl PgExecutor<'_>, project_id: &str) -> sqlx::Result<Vec<Target>> {
    let rows = sqlx::query!(
        "SELECT w.id, w.url FROM workers w
         WHERE w.url <> '' AND NOT EXISTS (
            SELECT 1 FROM project_node_status n
            WHERE n.project_id = $1 AND n.node_id = w.id AND n.clone_status IN ('cloned', 'synced'))
         ORDER BY w.id",
        project_id
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| Target { node_id: r.id, url: r.url }).collect())
}
