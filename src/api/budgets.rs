//! Budgets, changed at runtime and persisted: `GET /api/runtime/budgets`,
//! `PUT`/`DELETE /api/runtime/budgets/{scope}/{key}/{rule}`, and what each key used,
//! `GET /api/runtime/budget-usage`.

use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::body::JsonBody;
use super::concurrency::{scope_of, KeysQuery, RuleRemoved};
use super::schemas::{ErrorBody, RequestBody};
use super::validate::{FieldErrors, Fields};
use super::{ApiError, AppState};
use crate::db::budgets::{self, BudgetUsage, BudgetView};
use crate::domain::budget::MAX_BUDGET_AMOUNT;
use crate::domain::{BudgetLimit, BudgetRule, ConcurrencyScope};

/// Body of `PUT /api/runtime/budgets/{scope}/{key}/{rule}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BudgetBody {
    /// What one window allows; 0 holds the key's tasks.
    #[schema(minimum = 0, maximum = 1e15)]
    pub max: f64,
    /// What each run reserves at admission (tokens and USD); absent: the key's average
    /// per run so far (USD: the task's `policy.budget` when it has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 1e15)]
    pub estimate: Option<f64>,
}

impl RequestBody for BudgetBody {
    fn read(f: &mut Fields<'_>) -> Option<BudgetBody> {
        let max = f.number_in("max", 0.0, MAX_BUDGET_AMOUNT);
        let estimate = f.opt_number_in("estimate", 0.0, MAX_BUDGET_AMOUNT);
        Some(BudgetBody { max: max?, estimate: estimate? })
    }
}

/// The budget a path names, checked: a 400 naming `scope`, `key` or `rule`.
fn budget_of(scope: &str, key: &str, rule: &str, body: &BudgetBody) -> Result<BudgetLimit, ApiError> {
    let mut errors = FieldErrors::default();
    let parsed_scope = scope_of(&mut errors, scope);
    let parsed_rule = BudgetRule::parse(rule);
    if parsed_rule.is_none() {
        errors.add(
            "rule",
            format!("Expected <requests|tokens|usd>-per-<minute|hour|day> (e.g. usd-per-day), received '{rule}'"),
        );
    }
    let budget =
        parsed_scope.zip(parsed_rule).map(|(scope, rule)| BudgetLimit::new(scope, key, rule, body.max, body.estimate));
    if let Some(Err(e)) = &budget {
        let field = e.split_whitespace().next().unwrap_or("key");
        errors.add(field, e.clone());
    }
    errors.finish(())?;
    Ok(budget.and_then(Result::ok).expect("checked above"))
}

/// `GET /api/runtime/budgets` → every budget, with what its key used in the current
/// window, what remains, when the window resets and how many tasks wait for it.
#[utoipa::path(get, path = "/api/runtime/budgets", tag = "concurrency",
    responses((status = 200, body = Vec<BudgetView>), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<BudgetView>>, ApiError> {
    Ok(Json(budgets::list(&state.pool, state.clock.now_ms()).await?))
}

/// `PUT /api/runtime/budgets/{scope}/{key}/{rule}` `{max, estimate?}` → the budget, set
/// now for every worker and reconciler (persisted; it wins over configuration). `rule`
/// is `<metric>-per-<period>`: `requests`, `tokens` or `usd` per `minute`, `hour` or
/// `day` (windows aligned to UTC). `key` `*` applies to each key of the scope without a
/// budget of its own on that rule. Tasks waiting on it are admitted again.
#[utoipa::path(put, path = "/api/runtime/budgets/{scope}/{key}/{rule}", tag = "concurrency", params(
    ("scope" = ConcurrencyScope, Path, description = "context_id, agent_slug or concurrency_key"),
    ("key" = String, Path, description = "the key, or * for each key of the scope", min_length = 1, max_length = 255),
    ("rule" = String, Path, description = "<requests|tokens|usd>-per-<minute|hour|day>", pattern = "^(requests|tokens|usd)-per-(minute|hour|day)$")),
    request_body = BudgetBody,
    responses((status = 200, body = BudgetView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn set(
    State(state): State<AppState>,
    Path((scope, key, rule)): Path<(String, String, String)>,
    JsonBody(body): JsonBody,
) -> Result<Json<BudgetView>, ApiError> {
    let body = BudgetBody::parse(&body)?;
    let budget = budget_of(&scope, &key, &rule, &body)?;
    let now = state.clock.now_ms();
    budgets::set(&state.pool, &budget, false, now).await?;
    let view = budgets::list(&state.pool, now)
        .await?
        .into_iter()
        .find(|v| v.limit.scope == budget.scope && v.limit.key == budget.key && v.limit.rule() == budget.rule());
    view.map(Json).ok_or_else(|| ApiError::NotFound("Budget removed by a concurrent request".into()))
}

/// `DELETE /api/runtime/budgets/{scope}/{key}/{rule}` → `{removed}`; 404 when there is
/// no such budget. Tasks waiting on it are admitted again.
#[utoipa::path(delete, path = "/api/runtime/budgets/{scope}/{key}/{rule}", tag = "concurrency", params(
    ("scope" = ConcurrencyScope, Path, description = "context_id, agent_slug or concurrency_key"),
    ("key" = String, Path, description = "the key, or *", min_length = 1, max_length = 255),
    ("rule" = String, Path, description = "<requests|tokens|usd>-per-<minute|hour|day>", pattern = "^(requests|tokens|usd)-per-(minute|hour|day)$")),
    responses((status = 200, body = RuleRemoved), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn remove(
    State(state): State<AppState>,
    Path((scope, key, rule)): Path<(String, String, String)>,
) -> Result<Json<RuleRemoved>, ApiError> {
    let budget = budget_of(&scope, &key, &rule, &BudgetBody { max: 0.0, estimate: None })?;
    if !budgets::remove(&state.pool, budget.scope, &budget.key, budget.rule(), state.clock.now_ms()).await? {
        return Err(ApiError::NotFound("Budget not found".into()));
    }
    Ok(Json(RuleRemoved { removed: true }))
}

/// `GET /api/runtime/budget-usage[?scope=&limit=]` → the keys that used most of their
/// budget in the current window (or have tasks waiting on it), most used first.
#[utoipa::path(get, path = "/api/runtime/budget-usage", tag = "concurrency", params(
    ("scope" = Option<ConcurrencyScope>, Query, description = "context_id, agent_slug or concurrency_key; default all"),
    ("limit" = Option<i64>, Query, description = "keys listed, 1..1000, default 100", minimum = 1, maximum = 1000)),
    responses((status = 200, body = Vec<BudgetUsage>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn usage(
    State(state): State<AppState>,
    Query(q): Query<KeysQuery>,
) -> Result<Json<Vec<BudgetUsage>>, ApiError> {
    let (scope, limit) = q.read()?;
    Ok(Json(budgets::usage(&state.pool, scope, limit, state.clock.now_ms()).await?))
}
