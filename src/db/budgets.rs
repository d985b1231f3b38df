//! Budgets (`budget_limits`) and their counters (`budget_counters`): set, removed and
//! read here; reserved on by every way of leasing a task (see [`super::admission`]) and
//! settled by the lease-end trigger (migration 0023).

use serde::Serialize;
use sqlx::PgExecutor;

use crate::domain::{BudgetLimit, BudgetMetric, BudgetPeriod, BudgetRule, ConcurrencyScope};

/// A budget, with what its key used in the current window.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BudgetView {
    #[serde(flatten)]
    pub limit: BudgetLimit,
    /// `<metric>-per-<period>`, as paths name it.
    pub rule: String,
    pub updated_at: i64,
    /// Used (settled and reserved) in the current window; absent for `*` (see
    /// `GET /api/runtime/budget-usage` for each key).
    pub used: Option<f64>,
    /// What the window still allows (0 when used up); absent for `*`.
    pub remaining: Option<f64>,
    /// The current window (epoch ms): its start, and when the next one starts.
    pub window_start: i64,
    pub resets_at: i64,
    /// What a run of the key used on average (learned from settled runs); absent for `*`
    /// and before the first settled run.
    pub average: Option<f64>,
    /// Keys that used some of the budget in the current window.
    pub keys: i64,
    /// Tasks waiting for the window's end.
    pub waiting: i64,
}

/// What one key used of a budget in the current window.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct BudgetUsage {
    pub scope: ConcurrencyScope,
    pub key: String,
    pub metric: BudgetMetric,
    pub period: BudgetPeriod,
    /// The budget that applies (the key's own, else the scope's `*`); absent when it was
    /// removed since.
    pub max: Option<f64>,
    pub used: f64,
    pub remaining: Option<f64>,
    pub window_start: i64,
    pub resets_at: i64,
    pub average: Option<f64>,
    pub waiting: i64,
}

/// Sets a budget (or, with `only_if_absent`, only when the scope, key and rule have
/// none: configuration seeds budgets, the API changes them). Tasks waiting on it are made
/// due, to be admitted again against the new value. Returns whether it was written.
pub async fn set(db: &sqlx::PgPool, limit: &BudgetLimit, only_if_absent: bool, now: i64) -> sqlx::Result<bool> {
    let written = sqlx::query!(
        "INSERT INTO budget_limits (scope, key, metric, period, max_amount, estimate, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (scope, key, metric, period) DO UPDATE
         SET max_amount = EXCLUDED.max_amount, estimate = EXCLUDED.estimate, updated_at = EXCLUDED.updated_at
         WHERE NOT $8",
        limit.scope.as_str(),
        limit.key,
        limit.metric.as_str(),
        limit.period.as_str(),
        limit.max,
        limit.estimate,
        now,
        only_if_absent
    )
    .execute(db)
    .await?
    .rows_affected()
        == 1;
    if written {
        wake(db, limit.scope, &limit.key, limit.rule(), now).await?;
    }
    Ok(written)
}

/// Removes a budget; the tasks waiting on it are made due (another budget may still
/// hold them). Returns whether there was one.
pub async fn remove(
    db: &sqlx::PgPool,
    scope: ConcurrencyScope,
    key: &str,
    rule: BudgetRule,
    now: i64,
) -> sqlx::Result<bool> {
    let removed = sqlx::query!(
        "DELETE FROM budget_limits WHERE scope = $1 AND key = $2 AND metric = $3 AND period = $4",
        scope.as_str(),
        key,
        rule.metric.as_str(),
        rule.period.as_str()
    )
    .execute(db)
    .await?
    .rows_affected()
        == 1;
    if removed {
        wake(db, scope, key, rule, now).await?;
    }
    Ok(removed)
}

/// Makes the tasks waiting on the counters of a budget (of every key of the scope, for
/// `*`) due at `now`.
async fn wake(
    db: impl PgExecutor<'_>,
    scope: ConcurrencyScope,
    key: &str,
    rule: BudgetRule,
    now: i64,
) -> sqlx::Result<u64> {
    Ok(sqlx::query!(
        "UPDATE llm_tasks t SET not_before = $5
         WHERE t.blocked_on IN (SELECT c.counter FROM budget_counters c
                                WHERE c.scope = $1 AND ($2 = '*' OR c.key = $2) AND c.metric = $3 AND c.period = $4)
           AND t.status = 'queued' AND t.dispatch_seq <= 0 AND t.not_before > $5",
        scope.as_str(),
        key,
        rule.metric.as_str(),
        rule.period.as_str(),
        now
    )
    .execute(db)
    .await?
    .rows_affected())
}

/// Every budget, with what its keys used in the window current at `now`.
pub async fn list(db: impl PgExecutor<'_>, now: i64) -> sqlx::Result<Vec<BudgetView>> {
    let rows = sqlx::query!(
        r#"SELECT b.scope AS "scope!: ConcurrencyScope", b.key, b.metric AS "metric!: BudgetMetric",
                  b.period AS "period!: BudgetPeriod", b.max_amount, b.estimate, b.updated_at,
                  $1 - $1 % bloom_period_ms(b.period) AS "window_start!",
                  own.used AS "used?", own.average AS "average?",
                  COALESCE(u.keys, 0) AS "keys!", COALESCE(u.waiting, 0) AS "waiting!"
           FROM budget_limits b
           LEFT JOIN budget_counters own ON b.key <> '*'
               AND own.counter = b.scope || ':' || b.key || ':' || b.metric || '/' || b.period
           CROSS JOIN LATERAL (
               SELECT count(*) FILTER (WHERE c.window_start = $1 - $1 % bloom_period_ms(b.period) AND c.used > 0) AS keys,
                      sum((SELECT count(*) FROM llm_tasks t WHERE t.blocked_on = c.counter
                                                             AND (t.status || '') = 'queued'
                                                             AND t.dispatch_seq <= 0))::bigint AS waiting
               FROM budget_counters c
               WHERE c.scope = b.scope AND c.metric = b.metric AND c.period = b.period
                 AND (c.key = b.key OR (b.key = '*' AND NOT EXISTS (
                     SELECT 1 FROM budget_limits o WHERE o.scope = c.scope AND o.key = c.key
                                                     AND o.metric = c.metric AND o.period = c.period)))) u
           ORDER BY b.scope, b.key, b.metric, b.period"#,
        now
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let limit = BudgetLimit {
                scope: r.scope,
                key: r.key,
                metric: r.metric,
                period: r.period,
                max: r.max_amount,
                estimate: r.estimate,
            };
            let own = !limit.is_any_key();
            // A counter whose window is past used nothing of the current one.
            let used = own.then_some(match (r.used, r.keys) {
                (Some(used), 1..) => used,
                _ => 0.0,
            });
            BudgetView {
                rule: limit.rule().name(),
                updated_at: r.updated_at,
                remaining: used.map(|u| (limit.max - u).max(0.0)),
                used,
                window_start: r.window_start,
                resets_at: r.window_start + limit.period.millis(),
                average: if own { r.average } else { None },
                keys: r.keys,
                waiting: r.waiting,
                limit,
            }
        })
        .collect())
}

/// The keys that used most of their budget in the current window (or have tasks waiting
/// on it), of one scope or all, at most `limit`.
pub async fn usage(
    db: impl PgExecutor<'_>,
    scope: Option<ConcurrencyScope>,
    limit: i64,
    now: i64,
) -> sqlx::Result<Vec<BudgetUsage>> {
    let rows = sqlx::query!(
        r#"SELECT c.scope AS "scope!: ConcurrencyScope", c.key, c.metric AS "metric!: BudgetMetric",
                  c.period AS "period!: BudgetPeriod", COALESCE(own.max_amount, any_.max_amount) AS "max?",
                  CASE WHEN c.window_start = $1 - $1 % bloom_period_ms(c.period) THEN c.used ELSE 0 END AS "used!",
                  $1 - $1 % bloom_period_ms(c.period) AS "window_start!", c.average, w.n AS "waiting!"
           FROM budget_counters c
           LEFT JOIN budget_limits own ON own.scope = c.scope AND own.key = c.key
               AND own.metric = c.metric AND own.period = c.period
           LEFT JOIN budget_limits any_ ON any_.scope = c.scope AND any_.key = '*'
               AND any_.metric = c.metric AND any_.period = c.period
           CROSS JOIN LATERAL (SELECT count(*) AS n FROM llm_tasks t WHERE t.blocked_on = c.counter
                               AND (t.status || '') = 'queued' AND t.dispatch_seq <= 0) w
           WHERE ($2::text IS NULL OR c.scope = $2)
             AND ((c.window_start = $1 - $1 % bloom_period_ms(c.period) AND c.used > 0) OR w.n > 0)
           ORDER BY CASE WHEN COALESCE(own.max_amount, any_.max_amount) > 0
                         THEN c.used / COALESCE(own.max_amount, any_.max_amount) ELSE 1 END DESC,
                    w.n DESC, c.counter
           LIMIT $3"#,
        now,
        scope.map(ConcurrencyScope::as_str),
        limit
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| BudgetUsage {
            remaining: r.max.map(|m| (m - r.used).max(0.0)),
            scope: r.scope,
            key: r.key,
            metric: r.metric,
            period: r.period,
            max: r.max,
            used: r.used,
            window_start: r.window_start,
            resets_at: r.window_start + r.period.millis(),
            average: r.average,
            waiting: r.waiting,
        })
        .collect())
}
