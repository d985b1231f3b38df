//! Failed and dead tasks grouped by why they failed: the agent, the class of the last
//! run's error and its message, with what their runs cost and the tasks' ids (to requeue
//! or inspect them).

use serde::Serialize;
use sqlx::PgExecutor;

/// Ids listed per group at most (the most a bulk requeue takes at once).
pub const MAX_IDS: i64 = 1000;

/// Failed or dead tasks that failed the same way.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct FailureGroup {
    pub agent_slug: String,
    /// The last run's `error_kind`, `unclassified` when it had none, `no_result` for a
    /// task that died without one (its leases expired).
    pub error_kind: String,
    /// The last run's error message (or the task's last error), at most 160 characters.
    pub reason: String,
    pub tasks: i64,
    /// What all runs of these tasks cost.
    pub cost_usd: f64,
    /// Runs recorded for these tasks.
    pub runs: i64,
    /// The most recent first, at most 1000.
    pub task_ids: Vec<String>,
    /// When the most recent of them was created (epoch ms).
    pub latest_created_at: i64,
}

/// The groups of the tasks `failed` or `dead` created in `[from, to)`, the largest
/// first, at most `limit`. Served by `llm_tasks (status, created_at)` and the results'
/// `(task_id, completed_at)` index.
pub async fn groups(db: impl PgExecutor<'_>, from: i64, to: i64, limit: i64) -> sqlx::Result<Vec<FailureGroup>> {
    sqlx::query_as!(
        FailureGroup,
        r#"SELECT t.agent_slug AS "agent_slug!",
                  COALESCE(last.error_kind, CASE WHEN last.task_id IS NULL THEN 'no_result' ELSE 'unclassified' END)
                      AS "error_kind!",
                  left(COALESCE(last.error_message, t.last_error, ''), 160) AS "reason!",
                  count(*) AS "tasks!",
                  COALESCE(sum(spent.cost), 0)::float8 AS "cost_usd!",
                  COALESCE(sum(spent.runs), 0)::bigint AS "runs!",
                  (array_agg(t.id::text ORDER BY t.created_at DESC, t.id))[1:$4] AS "task_ids!",
                  max(t.created_at) AS "latest_created_at!"
           FROM llm_tasks t
           LEFT JOIN LATERAL (
               SELECT r.task_id, r.error_kind, r.error_message FROM llm_results r
               WHERE r.task_id = t.id ORDER BY r.completed_at DESC LIMIT 1) last ON true
           CROSS JOIN LATERAL (
               SELECT sum((r.metrics->>'total_cost_usd')::float8) AS cost, count(*) AS runs
               FROM llm_results r WHERE r.task_id = t.id) spent
           WHERE t.status IN ('failed', 'dead') AND t.created_at >= $1 AND t.created_at < $2
           GROUP BY 1, 2, 3
           ORDER BY count(*) DESC, max(t.created_at) DESC
           LIMIT $3"#,
        from,
        to,
        limit,
        MAX_IDS as i32
    )
    .fetch_all(db)
    .await
}
