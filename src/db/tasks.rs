//! Reads of `llm_tasks`. Writes are state transitions and live in [`super::lifecycle`].

use sqlx::types::Json;
use sqlx::PgExecutor;

use super::page::RowKey;
use super::rows::TaskRow;
use super::Page;
use crate::domain::{DesiredFormat, Policy, Task, TaskId, TaskStatus};

/// One task.
pub async fn get(db: impl PgExecutor<'_>, id: &TaskId) -> sqlx::Result<Option<Task>> {
    let row = sqlx::query_as!(
        TaskRow,
        r#"SELECT id, context_id, agent_slug, prompt, context_hints AS "context_hints: Json<Vec<String>>",
                  policy AS "policy: Json<Policy>", desired_format AS "desired_format: DesiredFormat",
                  status AS "status: TaskStatus", created_at, updated_at, lease_id, worker_id, attempts,
                  max_attempts, dispatch_seq, routed_to
           FROM llm_tasks WHERE id = $1"#,
        id.as_str()
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(Task::from))
}

/// Tasks with the given ids, in no particular order.
pub async fn get_many(db: impl PgExecutor<'_>, ids: &[String]) -> sqlx::Result<Vec<Task>> {
    let rows = sqlx::query_as!(
        TaskRow,
        r#"SELECT id, context_id, agent_slug, prompt, context_hints AS "context_hints: Json<Vec<String>>",
                  policy AS "policy: Json<Policy>", desired_format AS "desired_format: DesiredFormat",
                  status AS "status: TaskStatus", created_at, updated_at, lease_id, worker_id, attempts,
                  max_attempts, dispatch_seq, routed_to
           FROM llm_tasks WHERE id = ANY($1)"#,
        ids
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Task::from).collect())
}

/// A page of tasks, newest first, optionally of one status, without their content:
/// key, id and size (read with [`get_many`]).
pub async fn list_keys(db: impl PgExecutor<'_>, status: Option<TaskStatus>, page: &Page) -> sqlx::Result<Vec<RowKey>> {
    let (key, id) = page.bounds();
    sqlx::query_as!(
        RowKey,
        r#"SELECT created_at AS key, id, (octet_length(prompt) + pg_column_size(context_hints))::bigint AS "bytes!"
           FROM llm_tasks
           WHERE ($1::text IS NULL OR status = $1) AND (created_at, id) < ($2, $3)
           ORDER BY created_at DESC, id DESC LIMIT $4"#,
        status.map(TaskStatus::as_str),
        key,
        id,
        page.limit
    )
    .fetch_all(db)
    .await
}
