//! Reads of `runtime_artifacts`. Artifacts are written by [`super::lifecycle::complete`].

use sqlx::PgExecutor;

use super::page::RowKey;
use super::Page;
use crate::domain::{Artifact, ArtifactId, TaskId};

/// One artifact.
pub async fn get(db: impl PgExecutor<'_>, id: &ArtifactId) -> sqlx::Result<Option<Artifact>> {
    sqlx::query_as("SELECT * FROM runtime_artifacts WHERE id = $1").bind(id).fetch_optional(db).await
}

/// A page of artifacts, newest first, optionally of one task, without their content:
/// key, id and size (read with [`heads`] and [`content_slice`]).
pub async fn list_keys(db: impl PgExecutor<'_>, task: Option<&TaskId>, page: &Page) -> sqlx::Result<Vec<RowKey>> {
    let (key, id) = page.bounds();
    sqlx::query_as(
        "SELECT created_at AS key, id, COALESCE(octet_length(content), 0)::bigint AS bytes FROM runtime_artifacts
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

/// An artifact whose content is left out when it is longer than a slice, and then the
/// content's length in characters (read it with [`content_slice`]).
#[derive(Debug, sqlx::FromRow)]
pub struct ArtifactHead {
    #[sqlx(flatten)]
    pub artifact: Artifact,
    pub content_chars: Option<i32>,
}

/// Artifacts with the given ids, in no particular order; contents longer than `slice`
/// characters are left out (see [`ArtifactHead`]).
pub async fn heads(db: impl PgExecutor<'_>, ids: &[String], slice: i32) -> sqlx::Result<Vec<ArtifactHead>> {
    sqlx::query_as(
        "SELECT id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags,
                CASE WHEN length(content) > $2 THEN NULL ELSE content END AS content,
                CASE WHEN length(content) > $2 THEN length(content) END AS content_chars
         FROM runtime_artifacts WHERE id = ANY($1)",
    )
    .bind(ids)
    .bind(slice)
    .fetch_all(db)
    .await
}

/// `chars` characters of an artifact's content from character `from` (1-based).
pub async fn content_slice(db: impl PgExecutor<'_>, id: &ArtifactId, from: i32, chars: i32) -> sqlx::Result<String> {
    sqlx::query_scalar("SELECT COALESCE(substr(content, $2, $3), '') FROM runtime_artifacts WHERE id = $1")
        .bind(id)
        .bind(from)
        .bind(chars)
        .fetch_optional(db)
        .await
        .map(Option::unwrap_or_default)
}
