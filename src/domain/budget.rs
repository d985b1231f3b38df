//! Budgets: "at most this many requests, tokens or USD per minute, hour or day" for a key
//! (a task's `agent_slug`, `context_id` or `concurrency_key`, as concurrency limits name
//! keys, or [`ANY_KEY`] for each key of the scope without a budget of its own).
//!
//! Windows are fixed and aligned to UTC. Admission reserves an estimate on each counter
//! of a task (one per key, measure and period) and the run's reported usage settles it
//! (`bloom_admit`, `bloom_settle`, migration 0023); a task over a budget waits for the
//! window's end without using an attempt.

use serde::{Deserialize, Serialize};

use super::concurrency::{ConcurrencyScope, ANY_KEY, MAX_KEY_LEN};

/// The largest amount a budget may allow or estimate.
pub const MAX_BUDGET_AMOUNT: f64 = 1e15;

/// What a budget counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum BudgetMetric {
    /// Runs started (a lease is one request, whatever it then does).
    Requests,
    /// Tokens a run reported: input, output and cache creation (cache reads are not
    /// counted, as providers do not count them against their rate limits).
    Tokens,
    /// What a run reported it cost (`total_cost_usd`).
    Usd,
}

impl BudgetMetric {
    pub const ALL: [BudgetMetric; 3] = [BudgetMetric::Requests, BudgetMetric::Tokens, BudgetMetric::Usd];

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetMetric::Requests => "requests",
            BudgetMetric::Tokens => "tokens",
            BudgetMetric::Usd => "usd",
        }
    }
}

/// The length of a budget's windows, aligned to UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
#[sqlx(type_name = "text", rename_all = "snake_case")]
pub enum BudgetPeriod {
    Minute,
    Hour,
    Day,
}

impl BudgetPeriod {
    pub const ALL: [BudgetPeriod; 3] = [BudgetPeriod::Minute, BudgetPeriod::Hour, BudgetPeriod::Day];

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Minute => "minute",
            BudgetPeriod::Hour => "hour",
            BudgetPeriod::Day => "day",
        }
    }

    /// The window's length in milliseconds.
    pub fn millis(self) -> i64 {
        match self {
            BudgetPeriod::Minute => 60_000,
            BudgetPeriod::Hour => 3_600_000,
            BudgetPeriod::Day => 86_400_000,
        }
    }

    /// The start of the window holding `at` (epoch ms).
    pub fn window_start(self, at: i64) -> i64 {
        at - at.rem_euclid(self.millis())
    }
}

/// What a budget counts and per what window, named `<metric>-per-<period>` in paths and
/// configuration (`usd-per-day`, `requests-per-minute`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BudgetRule {
    pub metric: BudgetMetric,
    pub period: BudgetPeriod,
}

impl BudgetRule {
    pub fn parse(s: &str) -> Option<BudgetRule> {
        let (metric, period) = s.split_once("-per-")?;
        let metric = BudgetMetric::ALL.into_iter().find(|m| m.as_str() == metric)?;
        let period = BudgetPeriod::ALL.into_iter().find(|p| p.as_str() == period)?;
        Some(BudgetRule { metric, period })
    }

    pub fn name(self) -> String {
        format!("{}-per-{}", self.metric.as_str(), self.period.as_str())
    }
}

/// A budget: at most `max` of `metric` per `period` window for `key` (for each key of the
/// scope, for [`ANY_KEY`]). 0 holds the key's tasks. `estimate` is what each run
/// reserves (for tokens and USD; absent: the average the key's runs used so far).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BudgetLimit {
    pub scope: ConcurrencyScope,
    pub key: String,
    pub metric: BudgetMetric,
    pub period: BudgetPeriod,
    #[schema(minimum = 0)]
    pub max: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0)]
    pub estimate: Option<f64>,
}

/// Whether `x` is an amount a budget may hold.
fn amount_ok(x: f64) -> bool {
    x.is_finite() && (0.0..=MAX_BUDGET_AMOUNT).contains(&x)
}

impl BudgetLimit {
    /// A checked budget: a key of 1 to [`MAX_KEY_LEN`] characters, `max` and `estimate`
    /// from 0 to [`MAX_BUDGET_AMOUNT`]. The error starts with the field's name.
    pub fn new(
        scope: ConcurrencyScope,
        key: &str,
        rule: BudgetRule,
        max: f64,
        estimate: Option<f64>,
    ) -> Result<BudgetLimit, String> {
        if key.is_empty() || key.chars().count() > MAX_KEY_LEN {
            return Err(format!("key must be 1 to {MAX_KEY_LEN} characters"));
        }
        if !amount_ok(max) {
            return Err(format!("max must be a number from 0 to {MAX_BUDGET_AMOUNT}"));
        }
        if estimate.is_some_and(|e| !amount_ok(e)) {
            return Err(format!("estimate must be a number from 0 to {MAX_BUDGET_AMOUNT}"));
        }
        Ok(BudgetLimit { scope, key: key.to_owned(), metric: rule.metric, period: rule.period, max, estimate })
    }

    pub fn rule(&self) -> BudgetRule {
        BudgetRule { metric: self.metric, period: self.period }
    }

    /// Whether it applies to every key of its scope without a budget of its own.
    pub fn is_any_key(&self) -> bool {
        self.key == ANY_KEY
    }

    /// Budgets as configuration writes them: `scope:key:<metric>-per-<period>=N`, comma
    /// separated, e.g. `agent_slug:claude:usd-per-day=50,agent_slug:*:requests-per-minute=40`
    /// (a key may contain `:` and `=`).
    pub fn parse_list(s: &str) -> Result<Vec<BudgetLimit>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                let bad = || format!("'{item}' is not scope:key:<metric>-per-<period>=N");
                let (target, n) = item.rsplit_once('=').ok_or_else(bad)?;
                let (scoped, rule) = target.rsplit_once(':').ok_or_else(bad)?;
                let (scope, key) = scoped.split_once(':').ok_or_else(bad)?;
                let scope = ConcurrencyScope::parse(scope.trim())
                    .ok_or_else(|| format!("'{item}': the scope must be context_id, agent_slug or concurrency_key"))?;
                let rule = BudgetRule::parse(rule.trim()).ok_or_else(|| {
                    format!("'{item}': the rule must be requests, tokens or usd, -per-, minute, hour or day")
                })?;
                let n: f64 = n.trim().parse().map_err(|_| bad())?;
                BudgetLimit::new(scope, key.trim(), rule, n, None).map_err(|e| format!("'{item}': {e}"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_and_configuration_lists_parse_and_name_what_is_wrong() {
        assert_eq!(
            BudgetRule::parse("usd-per-day"),
            Some(BudgetRule { metric: BudgetMetric::Usd, period: BudgetPeriod::Day })
        );
        assert_eq!(BudgetRule::parse("tokens-per-minute").unwrap().name(), "tokens-per-minute");
        assert_eq!(BudgetRule::parse("usd-per-week"), None);
        assert_eq!(BudgetRule::parse("usd"), None);
        let budgets =
            BudgetLimit::parse_list(" agent_slug:claude:usd-per-day=50, concurrency_key:a:b:requests-per-minute=40 ")
                .unwrap();
        assert_eq!(budgets.len(), 2);
        assert_eq!(
            (budgets[0].scope, budgets[0].key.as_str(), budgets[0].max),
            (ConcurrencyScope::AgentSlug, "claude", 50.0)
        );
        assert_eq!((budgets[1].key.as_str(), budgets[1].metric), ("a:b", BudgetMetric::Requests));
        assert_eq!(BudgetLimit::parse_list("").unwrap(), vec![]);
        assert!(BudgetLimit::parse_list("model:x:usd-per-day=1").unwrap_err().contains("scope must be"));
        assert!(BudgetLimit::parse_list("agent_slug:x:usd-per-week=1").unwrap_err().contains("rule must be"));
        assert!(BudgetLimit::parse_list("agent_slug:x=1").unwrap_err().contains("is not scope:key"));
        assert!(BudgetLimit::parse_list("agent_slug:x:usd-per-day=-1").unwrap_err().contains("max must be"));
        assert!(BudgetLimit::parse_list("agent_slug::usd-per-day=1").unwrap_err().contains("key must be"));
    }

    #[test]
    fn windows_are_aligned_to_utc() {
        let at = 1_764_806_400_000 + 3 * 3_600_000 + 61_000; // 2025-12-04T03:01:01Z
        assert_eq!(BudgetPeriod::Day.window_start(at), 1_764_806_400_000);
        assert_eq!(BudgetPeriod::Hour.window_start(at), 1_764_806_400_000 + 3 * 3_600_000);
        assert_eq!(BudgetPeriod::Minute.window_start(at), at - 1_000);
    }
}
