//! What runs used and cost over a time range, per agent or per context: the cost
//! ledger is the results' `metrics` (see [`crate::domain::Usage`]), summed here.

use serde::Serialize;
use sqlx::PgExecutor;

/// What the usage is summed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UsageGroup {
    AgentSlug,
    ContextId,
}

impl UsageGroup {
    /// The group named `s` (`agent_slug`, `context_id`).
    pub fn parse(s: &str) -> Option<UsageGroup> {
        match s {
            "agent_slug" => Some(UsageGroup::AgentSlug),
            "context_id" => Some(UsageGroup::ContextId),
            _ => None,
        }
    }
}

/// What the runs of one group (or of all) used.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct UsageTotals {
    /// The agent slug or context id; absent for the total.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Results recorded.
    pub runs: i64,
    /// Of which errors.
    pub errors: i64,
    pub total_cost_usd: f64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_input_tokens: i64,
    pub cache_creation_input_tokens: i64,
    pub num_turns: i64,
    /// Execution time of the runs.
    pub duration_ms: i64,
}

/// Usage of the results completed in `[from, to)`.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct UsageReport {
    pub from: i64,
    pub to: i64,
    pub group_by: UsageGroup,
    /// Most expensive first (then most runs), at most the limit asked for.
    pub groups: Vec<UsageTotals>,
    /// Every result of the range, in or out of the groups listed.
    pub total: UsageTotals,
}

/// Sums the usage of results completed in `[from, to)` by `group`: the `limit` most
/// expensive groups and the total, in one statement over the results' completion-time
/// index.
pub async fn report(
    db: impl PgExecutor<'_>,
    group: UsageGroup,
    from: i64,
    to: i64,
    limit: i64,
) -> sqlx::Result<UsageReport> {
    let rows = sqlx::query!(
        r#"WITH runs AS (
               SELECT CASE WHEN $3 THEN t.context_id ELSE t.agent_slug END AS key, r.status, r.metrics
               FROM llm_results r JOIN llm_tasks t ON t.id = r.task_id
               WHERE r.completed_at >= $1 AND r.completed_at < $2),
           sums AS (
               SELECT key, GROUPING(key) = 1 AS is_total, count(*) AS runs,
                      count(*) FILTER (WHERE status = 'error') AS errors,
                      COALESCE(sum((metrics->>'total_cost_usd')::float8), 0) AS cost,
                      LEAST(COALESCE(sum((metrics->>'input_tokens')::bigint), 0), 9223372036854775807)::bigint AS input,
                      LEAST(COALESCE(sum((metrics->>'output_tokens')::bigint), 0), 9223372036854775807)::bigint AS output,
                      LEAST(COALESCE(sum((metrics->>'cache_read_input_tokens')::bigint), 0), 9223372036854775807)::bigint AS cache_read,
                      LEAST(COALESCE(sum((metrics->>'cache_creation_input_tokens')::bigint), 0), 9223372036854775807)::bigint AS cache_creation,
                      LEAST(COALESCE(sum((metrics->>'num_turns')::bigint), 0), 9223372036854775807)::bigint AS turns,
                      LEAST(COALESCE(sum((metrics->>'duration_ms')::bigint), 0), 9223372036854775807)::bigint AS duration
               FROM runs GROUP BY GROUPING SETS ((key), ()))
           (SELECT * FROM sums WHERE is_total)
           UNION ALL
           (SELECT * FROM sums WHERE NOT is_total ORDER BY cost DESC, runs DESC, key LIMIT $4)"#,
        from,
        to,
        group == UsageGroup::ContextId,
        limit
    )
    .fetch_all(db)
    .await?;
    let mut total = UsageTotals::default();
    let mut groups = Vec::new();
    for r in rows {
        let sums = UsageTotals {
            key: r.key.filter(|_| r.is_total != Some(true)),
            runs: r.runs.unwrap_or(0),
            errors: r.errors.unwrap_or(0),
            total_cost_usd: r.cost.unwrap_or(0.0),
            input_tokens: r.input.unwrap_or(0),
            output_tokens: r.output.unwrap_or(0),
            cache_read_input_tokens: r.cache_read.unwrap_or(0),
            cache_creation_input_tokens: r.cache_creation.unwrap_or(0),
            num_turns: r.turns.unwrap_or(0),
            duration_ms: r.duration.unwrap_or(0),
        };
        if r.is_total == Some(true) {
            total = sums;
        } else {
            groups.push(sums);
        }
    }
    Ok(UsageReport { from, to, group_by: group, groups, total })
}
