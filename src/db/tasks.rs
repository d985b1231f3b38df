//! Reads of `llm_tasks`. Writes are state transitions and live in [`super::lifecycle`].

use sqlx::types::Json;
use sqlx::PgExecutor;

use super::page::{Cursor, KeyPage, RowKey, SCAN_LIMIT};
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
    /// The prompt starts with this text, ignoring case.
    pub prompt_prefix: Option<String>,
}

impl TaskFilter {
    /// Whether the filter narrows by a column no index of `llm_tasks` orders (context,
    /// agent, priority, prompt): a listing then reads a bounded number of rows a page.
    fn reads_unindexed(&self) -> bool {
        self.context_id.is_some()
            || self.agent_slug.is_some()
            || self.priority.is_some()
            || self.prompt_prefix.is_some()
    }

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
/// and size (read with [`get_many`]). Selected by status, ids and time range only, the
/// page is read from an index; a filter on context, agent, priority or prompt keeps the
/// matches among at most [`SCAN_LIMIT`] of those rows, and the page may then be short and
/// go on where the reading stopped.
pub async fn list_keys(db: impl PgExecutor<'_>, filter: &TaskFilter, page: &Page) -> sqlx::Result<KeyPage> {
    let (key, id) = page.bounds();
    let statuses = filter.status_texts();
    if !filter.reads_unindexed() {
        let keys = sqlx::query_as!(
            RowKey,
            r#"SELECT created_at AS key, id, (octet_length(prompt) + pg_column_size(context_hints))::bigint AS "bytes!"
               FROM llm_tasks
               WHERE ($1::text[] IS NULL OR status = ANY($1)) AND ($2::text[] IS NULL OR id = ANY($2))
                 AND ($3::bigint IS NULL OR created_at >= $3) AND ($4::bigint IS NULL OR created_at < $4)
                 AND (created_at, id) < ($5, $6)
               ORDER BY created_at DESC, id DESC LIMIT $7"#,
            statuses.as_deref() as _,
            filter.ids.as_deref() as _,
            filter.created_from,
            filter.created_to,
            key,
            id,
            page.limit
        )
        .fetch_all(db)
        .await?;
        return Ok(KeyPage::full_or_last(keys, page));
    }
    // One statement, one snapshot: the matches among the rows read, and the oldest row
    // read (a row with only the latter when nothing matched).
    let rows = sqlx::query!(
        r#"WITH read AS MATERIALIZED (
               SELECT created_at, id, context_id, agent_slug, priority,
                      ($12::text IS NULL OR lower(left(prompt, char_length($12))) = lower($12)) AS prompt_matches,
                      (octet_length(prompt) + pg_column_size(context_hints))::bigint AS bytes
               FROM llm_tasks
               WHERE ($1::text[] IS NULL OR status = ANY($1)) AND ($2::text[] IS NULL OR id = ANY($2))
                 AND ($3::bigint IS NULL OR created_at >= $3) AND ($4::bigint IS NULL OR created_at < $4)
                 AND (created_at, id) < ($5, $6)
               ORDER BY created_at DESC, id DESC LIMIT $8),
           edge AS (SELECT r.created_at, r.id, (SELECT count(*) FROM read) AS n FROM read r
                    ORDER BY r.created_at, r.id LIMIT 1),
           hits AS (SELECT r.created_at, r.id, r.bytes FROM read r
                    WHERE ($9::text IS NULL OR r.context_id = $9) AND ($10::text IS NULL OR r.agent_slug = $10)
                      AND ($11::smallint IS NULL OR r.priority = $11) AND r.prompt_matches
                    ORDER BY r.created_at DESC, r.id DESC LIMIT $7)
           SELECT h.created_at AS "key?", h.id AS "id?", h.bytes AS "bytes?",
                  e.created_at AS "edge_key!", e.id AS "edge_id!", e.n AS "read!"
           FROM edge e LEFT JOIN hits h ON true
           ORDER BY h.created_at DESC, h.id DESC"#,
        statuses.as_deref() as _,
        filter.ids.as_deref() as _,
        filter.created_from,
        filter.created_to,
        key,
        id,
        page.limit,
        SCAN_LIMIT,
        filter.context_id.as_deref(),
        filter.agent_slug.as_deref(),
        filter.priority_value(),
        filter.prompt_prefix.as_deref(),
    )
    .fetch_all(db)
    .await?;
    let edge = rows.first().filter(|r| r.read == SCAN_LIMIT).map(|r| Cursor { key: r.edge_key, id: r.edge_id.clone() });
    let keys: Vec<RowKey> =
        rows.into_iter().filter_map(|r| Some(RowKey { key: r.key?, id: r.id?, bytes: r.bytes? })).collect();
    let KeyPage { keys, next } = KeyPage::full_or_last(keys, page);
    Ok(KeyPage { keys, next: next.or(edge) })
}

/// How many tasks `filter` selects now.
pub async fn count(db: impl PgExecutor<'_>, filter: &TaskFilter) -> sqlx::Result<i64> {
    let statuses = filter.status_texts();
    sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM llm_tasks
           WHERE ($1::text[] IS NULL OR status = ANY($1)) AND ($2::text[] IS NULL OR id = ANY($2))
             AND ($3::text IS NULL OR context_id = $3) AND ($4::text IS NULL OR agent_slug = $4)
             AND ($5::smallint IS NULL OR priority = $5) AND ($6::bigint IS NULL OR created_at >= $6)
             AND ($7::bigint IS NULL OR created_at < $7)
             AND ($8::text IS NULL OR lower(left(prompt, char_length($8))) = lower($8))"#,
        statuses.as_deref() as _,
        filter.ids.as_deref() as _,
        filter.context_id.as_deref(),
        filter.agent_slug.as_deref(),
        filter.priority_value(),
        filter.created_from,
        filter.created_to,
        filter.prompt_prefix.as_deref(),
    )
    .fetch_one(db)
    .await
}
