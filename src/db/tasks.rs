//! Reads of `llm_tasks`. Writes are state transitions and live in [`super::lifecycle`].

use sqlx::types::Json;
use sqlx::PgExecutor;

use super::page::RowKey;
use super::rows::TaskRow;
use super::Page;
use crate::domain::{DesiredFormat, Policy, Priority, Task, TaskId, TaskStatus};

/// One task.
pub async fn get(db: impl PgExecutor<'_>, id: &TaskId) -> sqlx::Result<Option<Task>> {
    let row = sqlx::query_as!(
        TaskRow,
        r#"SELECT id, context_id, agent_slug, prompt, context_hints AS "context_hints: Json<Vec<String>>",
                  policy AS "policy: Json<Policy>", desired_format AS "desired_format: DesiredFormat",
                  status AS "status: TaskStatus", created_at, updated_at, lease_id, worker_id, attempts,
                  max_attempts, priority, not_before, idempotency_key, concurrency_key, wait_reason, last_error, dispatch_seq, routed_to
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
                  max_attempts, priority, not_before, idempotency_key, concurrency_key, wait_reason, last_error, dispatch_seq, routed_to
           FROM llm_tasks WHERE id = ANY($1)"#,
        ids
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Task::from).collect())
}

/// Which tasks: each field narrows the selection, an empty one does not.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TaskFilter {
    pub ids: Option<Vec<String>>,
    /// Any of these statuses (none: every status).
    pub statuses: Vec<TaskStatus>,
    pub context_id: Option<String>,
    pub agent_slug: Option<String>,
    pub priority: Option<Priority>,
    /// Created at or after (epoch ms).
    pub created_from: Option<i64>,
    /// Created before (epoch ms).
    pub created_to: Option<i64>,
}

impl TaskFilter {
    /// The statuses as bound (`NULL`: any).
    pub(crate) fn status_texts(&self) -> Option<Vec<String>> {
        (!self.statuses.is_empty()).then(|| self.statuses.iter().map(|s| s.as_str().to_owned()).collect())
    }

    /// The priority as bound.
    pub(crate) fn priority_value(&self) -> Option<i16> {
        self.priority.map(|p| p.0)
    }
}

/// A page of the tasks `filter` selects, newest first, without their content: key, id
/// and size (read with [`get_many`]).
pub async fn list_keys(db: impl PgExecutor<'_>, filter: &TaskFilter, page: &Page) -> sqlx::Result<Vec<RowKey>> {
    let (key, id) = page.bounds();
    let statuses = filter.status_texts();
    sqlx::query_as!(
        RowKey,
        r#"SELECT created_at AS key, id, (octet_length(prompt) + pg_column_size(context_hints))::bigint AS "bytes!"
           FROM llm_tasks
           WHERE ($1::text[] IS NULL OR status = ANY($1)) AND ($2::text[] IS NULL OR id = ANY($2))
             AND ($3::text IS NULL OR context_id = $3) AND ($4::text IS NULL OR agent_slug = $4)
             AND ($5::smallint IS NULL OR priority = $5) AND ($6::bigint IS NULL OR created_at >= $6)
             AND ($7::bigint IS NULL OR created_at < $7)
             AND (created_at, id) < ($8, $9)
           ORDER BY created_at DESC, id DESC LIMIT $10"#,
        statuses.as_deref() as _,
        filter.ids.as_deref() as _,
        filter.context_id.as_deref(),
        filter.agent_slug.as_deref(),
        filter.priority_value(),
        filter.created_from,
        filter.created_to,
        key,
        id,
        page.limit
    )
    .fetch_all(db)
    .await
}

/// How many tasks `filter` selects now.
pub async fn count(db: impl PgExecutor<'_>, filter: &TaskFilter) -> sqlx::Result<i64> {
    let statuses = filter.status_texts();
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM llm_tasks
           WHERE ($1::text[] IS NULL OR status = ANY($1)) AND ($2::text[] IS NULL OR id = ANY($2))
             AND ($3::text IS NULL OR context_id = $3) AND ($4::text IS NULL OR agent_slug = $4)
             AND ($5::smallint IS NULL OR priority = $5) AND ($6::bigint IS NULL OR created_at >= $6)
             AND ($7::bigint IS NULL OR created_at < $7)"#,
        statuses.as_deref() as _,
        filter.ids.as_deref() as _,
        filter.context_id.as_deref(),
        filter.agent_slug.as_deref(),
        filter.priority_value(),
        filter.created_from,
        filter.created_to,
    )
    .fetch_one(db)
    .await
}
