//! Reads of `runtime_artifacts`. Artifacts are written by [`super::lifecycle::complete`].

use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor};

use super::page::RowKey;
use super::rows::ArtifactRow;
use super::Page;
use crate::domain::{Artifact, ArtifactId, TaskId};

/// One artifact.
pub async fn get(db: impl PgExecutor<'_>, id: &ArtifactId) -> sqlx::Result<Option<Artifact>> {
    let row = sqlx::query_as!(
        ArtifactRow,
        r#"SELECT id, task_id, job_id, type AS kind, created_at, finalized, url,
                  entity_refs AS "entity_refs: Json<Vec<String>>", tags AS "tags: Json<Vec<String>>", content
           FROM runtime_artifacts WHERE id = $1"#,
        id.as_str()
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(Artifact::from))
}

/// A page of artifacts, newest first, optionally of one task, without their content:
/// key, id and size (read with [`heads`] and [`content_slice`]).
pub async fn list_keys(db: impl PgExecutor<'_>, task: Option<&TaskId>, page: &Page) -> sqlx::Result<Vec<RowKey>> {
    let (key, id) = page.bounds();
    sqlx::query_as!(
        RowKey,
        r#"SELECT created_at AS key, id, COALESCE(octet_length(content), 0)::bigint AS "bytes!" FROM runtime_artifacts
           WHERE ($1::text IS NULL OR task_id = $1) AND (created_at, id) < ($2, $3)
           ORDER BY created_at DESC, id DESC LIMIT $4"#,
        task.map(TaskId::as_str),
        key,
        id,
        page.limit
    )
    .fetch_all(db)
    .await
}

/// An artifact whose content is left out when it is longer than a slice, and then the
/// content's length in characters (read it with [`content_slice`]).
#[derive(Debug)]
pub struct ArtifactHead {
    pub artifact: Artifact,
    pub content_chars: Option<i32>,
}

/// An [`ArtifactHead`] as [`heads`] reads it.
struct HeadRow {
    id: String,
    task_id: String,
    job_id: Option<String>,
    kind: String,
    created_at: i64,
    finalized: bool,
    url: Option<String>,
    entity_refs: Json<Vec<String>>,
    tags: Json<Vec<String>>,
    content: Option<String>,
    content_chars: Option<i32>,
}

/// Artifacts with the given ids, in no particular order; contents longer than `slice`
/// characters are left out (see [`ArtifactHead`]).
pub async fn heads(db: impl PgExecutor<'_>, ids: &[String], slice: i32) -> sqlx::Result<Vec<ArtifactHead>> {
    let rows = sqlx::query_as!(
        HeadRow,
        r#"SELECT id, task_id, job_id, type AS kind, created_at, finalized, url,
                  entity_refs AS "entity_refs: Json<Vec<String>>", tags AS "tags: Json<Vec<String>>",
                  CASE WHEN length(content) > $2 THEN NULL ELSE content END AS content,
                  CASE WHEN length(content) > $2 THEN length(content) END AS content_chars
           FROM runtime_artifacts WHERE id = ANY($1)"#,
        ids,
        slice
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ArtifactHead {
            content_chars: r.content_chars,
            artifact: ArtifactRow {
                id: r.id,
                task_id: r.task_id,
                job_id: r.job_id,
                kind: r.kind,
                created_at: r.created_at,
                finalized: r.finalized,
                url: r.url,
                entity_refs: r.entity_refs,
                tags: r.tags,
                content: r.content,
            }
            .into(),
        })
        .collect())
}

/// `chars` characters of an artifact's content from character `from` (1-based).
pub async fn content_slice(db: impl PgExecutor<'_>, id: &ArtifactId, from: i32, chars: i32) -> sqlx::Result<String> {
    sqlx::query_scalar!(
        r#"SELECT COALESCE(substr(content, $2, $3), '') AS "slice!" FROM runtime_artifacts WHERE id = $1"#,
        id.as_str(),
        from,
        chars
    )
    .fetch_optional(db)
    .await
    .map(Option::unwrap_or_default)
}

/// An artifact whose content is in Postgres, without the content.
#[derive(Debug)]
pub struct InlineArtifact {
    pub id: ArtifactId,
    pub task_id: TaskId,
    pub bytes: i64,
}

/// Up to `limit` artifacts whose content is in Postgres, oldest first, locked until the
/// caller's transaction ends (`SKIP LOCKED`: concurrent movers take other rows).
pub async fn lock_inline(db: &mut PgConnection, limit: i64) -> sqlx::Result<Vec<InlineArtifact>> {
    let rows = sqlx::query!(
        r#"SELECT id, task_id, octet_length(content)::bigint AS "bytes!" FROM runtime_artifacts
           WHERE url IS NULL AND content IS NOT NULL
           ORDER BY created_at LIMIT $1 FOR UPDATE SKIP LOCKED"#,
        limit
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| InlineArtifact { id: r.id.into(), task_id: r.task_id.into(), bytes: r.bytes })
        .collect())
}

/// The content of an artifact kept in Postgres (`None` once it is not).
pub async fn inline_content(db: impl PgExecutor<'_>, id: &ArtifactId) -> sqlx::Result<Option<String>> {
    Ok(sqlx::query_scalar!("SELECT content FROM runtime_artifacts WHERE id = $1", id.as_str())
        .fetch_optional(db)
        .await?
        .flatten())
}

/// Points an artifact kept in Postgres at its copy in S3 and drops the inline content,
/// in one statement guarded by the artifact still being inline. Returns whether it moved.
pub async fn moved_to_s3(db: impl PgExecutor<'_>, id: &ArtifactId, url: &str) -> sqlx::Result<bool> {
    let moved = sqlx::query!(
        "UPDATE runtime_artifacts SET url = $2, content = NULL WHERE id = $1 AND url IS NULL AND content IS NOT NULL",
        id.as_str(),
        url
    )
    .execute(db)
    .await?
    .rows_affected();
    Ok(moved == 1)
}

/// How many artifacts keep their content in Postgres.
pub async fn inline_backlog(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "n!" FROM runtime_artifacts WHERE url IS NULL AND content IS NOT NULL"#)
        .fetch_one(db)
        .await
}
