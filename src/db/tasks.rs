//! Reads of `llm_tasks`. Writes are state transitions and live in [`super::lifecycle`].

use sqlx::PgExecutor;

use super::page::RowKey;
use super::Page;
use crate::domain::{Task, TaskId, TaskStatus};

/// One task.
pub async fn get(db: impl PgExecutor<'_>, id: &TaskId) -> sqlx::Result<Option<Task>> {
    sqlx::query_as("SELECT * FROM llm_tasks WHERE id = $1").bind(id).fetch_optional(db).await
}

/// Tasks with the given ids, in no particular order.
pub async fn get_many(db: impl PgExecutor<'_>, ids: &[String]) -> sqlx::Result<Vec<Task>> {
    sqlx::query_as("SELECT * FROM llm_tasks WHERE id = ANY($1)").bind(ids).fetch_all(db).await
}

/// A page of tasks, newest first, optionally of one status, without their content:
/// key, id and size (read with [`get_many`]).
pub async fn list_keys(db: impl PgExecutor<'_>, status: Option<TaskStatus>, page: &Page) -> sqlx::Result<Vec<RowKey>> {
    let (key, id) = page.bounds();
    sqlx::query_as(
        "SELECT created_at AS key, id, (octet_length(prompt) + pg_column_size(context_hints))::bigint AS bytes
         FROM llm_tasks
         WHERE ($1::text IS NULL OR status = $1) AND (created_at, id) < ($2, $3)
         ORDER BY created_at DESC, id DESC LIMIT $4",
    )
    .bind(status)
    .bind(key)
    .bind(id)
    .bind(page.limit)
    .fetch_all(db)
    .await
}
