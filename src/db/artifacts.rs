//! Reads of `runtime_artifacts`. Artifacts are written by [`super::lifecycle::complete`].

use sqlx::PgExecutor;

use super::Page;
use crate::domain::{Artifact, ArtifactId, TaskId};

/// One artifact.
pub async fn get(db: impl PgExecutor<'_>, id: &ArtifactId) -> sqlx::Result<Option<Artifact>> {
    sqlx::query_as("SELECT * FROM runtime_artifacts WHERE id = $1").bind(id).fetch_optional(db).await
}

/// Newest first, optionally of one task.
pub async fn list(db: impl PgExecutor<'_>, task: Option<&TaskId>, page: &Page) -> sqlx::Result<Vec<Artifact>> {
    let (key, id) = page.bounds();
    sqlx::query_as(
        "SELECT * FROM runtime_artifacts
         WHERE ($1::text IS NULL OR task_id = $1) AND (created_at, id) < ($2, $3)
         ORDER BY created_at DESC, id DESC LIMIT $4",
    )
    .bind(task)
    .bind(key)
    .bind(id)
    .bind(page.limit)
    .fetch_all(db)
    .await
}
