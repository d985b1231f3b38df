//! What the runtime did minute by minute: runs completed and failed with their end-to-end
//! latency, leases started with their dispatch latency (the dashboard's charts).

use serde::Serialize;
use sqlx::PgExecutor;

/// The length of one point of the series.
pub const MINUTE_MS: i64 = 60_000;

/// One minute of activity (latencies in ms; absent when nothing happened).
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct MinuteActivity {
    /// Start of the minute (epoch ms).
    pub minute: i64,
    /// Results recorded: successes and errors.
    pub completed: i64,
    pub failed: i64,
    /// Task creation to result, of the results recorded in the minute.
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
    /// Leases started in the minute, and task creation to lease.
    pub dispatched: i64,
    pub dispatch_p50_ms: Option<f64>,
    pub dispatch_p99_ms: Option<f64>,
}

/// The minutes starting in `[from, to)` (`from` a minute's start), every one of them,
/// oldest first. Served by `llm_results (completed_at)` and `leases (started_at)`, then
/// the tasks by primary key.
pub async fn minutes(db: impl PgExecutor<'_>, from: i64, to: i64) -> sqlx::Result<Vec<MinuteActivity>> {
    sqlx::query_as!(
        MinuteActivity,
        r#"WITH res AS (
              SELECT r.completed_at - r.completed_at % 60000 AS minute, r.status,
                     (r.completed_at - t.created_at)::float8 AS ms
              FROM llm_results r JOIN llm_tasks t ON t.id = r.task_id
              WHERE r.completed_at >= $1 AND r.completed_at < $2),
           res_m AS (
              SELECT minute, count(*) FILTER (WHERE status = 'success') AS completed,
                     count(*) FILTER (WHERE status = 'error') AS failed,
                     percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                     percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99
              FROM res GROUP BY minute),
           disp AS (
              SELECT l.started_at - l.started_at % 60000 AS minute, (l.started_at - t.created_at)::float8 AS ms
              FROM leases l JOIN llm_tasks t ON t.id = l.task_id
              WHERE l.started_at >= $1 AND l.started_at < $2),
           disp_m AS (
              SELECT minute, count(*) AS n, percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                     percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99
              FROM disp GROUP BY minute)
           SELECT m.minute AS "minute!", COALESCE(res_m.completed, 0) AS "completed!",
                  COALESCE(res_m.failed, 0) AS "failed!", res_m.p50 AS e2e_p50_ms, res_m.p99 AS e2e_p99_ms,
                  COALESCE(disp_m.n, 0) AS "dispatched!", disp_m.p50 AS dispatch_p50_ms, disp_m.p99 AS dispatch_p99_ms
           FROM generate_series($1::bigint, $2::bigint - 1, 60000::bigint) AS m(minute)
           LEFT JOIN res_m ON res_m.minute = m.minute
           LEFT JOIN disp_m ON disp_m.minute = m.minute
           ORDER BY m.minute"#,
        from,
        to
    )
    .fetch_all(db)
    .await
}
