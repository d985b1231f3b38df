//! Budgets: requests, tokens and USD per minute, hour or day for a key, reserved at
//! admission, settled with what the run reported, and tasks over a budget waiting for the
//! window's end without using an attempt.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{wait_for, Opts, TestApp};
use bloom::db::lifecycle::{self, Claim, ClaimOutcome};
use bloom::domain::{BudgetLimit, BudgetPeriod, BudgetRule, ConcurrencyScope};
use bloom::reconciler::due;
use bloom::worker::Executor;

fn task(agent: &str, prompt: &str) -> Value {
    json!({"context_id": "c", "agent_slug": agent, "prompt": prompt})
}

async fn submit(app: &TestApp, body: Value) -> String {
    app.submit_with(body).await["id"].as_str().unwrap().to_owned()
}

async fn lease(app: &TestApp, id: &str) -> (StatusCode, Value) {
    app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({})).await
}

/// Completes the task's lease over REST, reporting `metrics`.
async fn complete(app: &TestApp, id: &str, metrics: Value) {
    let body = json!({"status": "success", "output": "done", "metrics": metrics});
    let (status, done) = app.post(&format!("/api/runtime/llm-tasks/{id}/complete"), body).await;
    assert_eq!(status, StatusCode::OK, "{done}");
}

/// The budget of `key` for `rule`, as `GET /api/runtime/budgets` shows it.
async fn budget(app: &TestApp, key: &str, rule: &str) -> Value {
    let (status, all) = app.get("/api/runtime/budgets").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    all.as_array().unwrap().iter().find(|b| b["key"] == key && b["rule"] == rule).cloned().unwrap_or(Value::Null)
}

fn close(a: &Value, b: f64) -> bool {
    a.as_f64().is_some_and(|a| (a - b).abs() < 1e-9)
}

#[tokio::test]
async fn admission_reserves_settlement_corrects_and_windows_reset() {
    // An hour into a UTC day, a second into a minute.
    let start = BudgetPeriod::Day.window_start(bloom::time::now_ms()) + 3_600_000 + 1_000;
    let clock = bloom::time::Clock::manual(start);
    let app = TestApp::spawn_with(Opts { clock: Some(clock.clone()), ..Opts::default() }).await;
    app.register_worker("rest", 10).await;

    let (status, set) = app.put("/api/runtime/budgets/agent_slug/writer/requests-per-minute", json!({"max": 2})).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!((set["used"].as_f64(), set["remaining"].as_f64()), (Some(0.0), Some(2.0)), "{set}");
    assert_eq!(set["resets_at"], start - 1_000 + 60_000, "{set}");
    let (status, set) =
        app.put("/api/runtime/budgets/agent_slug/writer/usd-per-hour", json!({"max": 1.0, "estimate": 0.3})).await;
    assert_eq!((status, set["estimate"].as_f64()), (StatusCode::OK, Some(0.3)), "{set}");

    let ids = [submit(&app, task("writer", "a")).await, submit(&app, task("writer", "b")).await];
    let third = submit(&app, task("writer", "c")).await;
    for id in &ids {
        assert_eq!(lease(&app, id).await.0, StatusCode::CREATED);
    }
    let (status, refused) = lease(&app, &third).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    let until = bloom::time::iso8601(start - 1_000 + 60_000);
    assert_eq!(
        refused["error"].as_str().unwrap(),
        format!("Task is not leased: the budget of agent_slug writer for requests per minute used up (2 of 2) until {until}")
    );
    let other = submit(&app, task("critic", "d")).await;
    assert_eq!(lease(&app, &other).await.0, StatusCode::CREATED, "another agent's budget is its own");

    // Each lease reserved the estimate; a settled run replaces it with what it cost.
    assert!(close(&budget(&app, "writer", "usd-per-hour").await["used"], 0.6));
    complete(&app, &ids[0], json!({"duration_ms": 5, "total_cost_usd": 0.05, "input_tokens": 10})).await;
    let usd = budget(&app, "writer", "usd-per-hour").await;
    assert!(close(&usd["used"], 0.35), "{usd}");
    assert!(close(&usd["remaining"], 0.65), "{usd}");
    assert!(close(&usd["average"], 0.05), "the learned average per run: {usd}");
    complete(&app, &ids[1], json!({"duration_ms": 5, "total_cost_usd": 0.8})).await;
    assert!(close(&budget(&app, "writer", "usd-per-hour").await["used"], 0.85), "a run above its estimate adds");
    let requests = budget(&app, "writer", "requests-per-minute").await;
    assert_eq!(requests["used"], 2.0, "a request stays spent when it ends: {requests}");

    // The next minute allows two requests again; the hour's USD is what is left: 0.15,
    // less than the estimate, but a task whose own budget fits reserves that instead.
    clock.advance(Duration::from_secs(60));
    let (status, refused) = lease(&app, &third).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("usd per hour used up (0.85 of 1)"), "{refused}");
    let capped =
        submit(&app, json!({"context_id": "c", "agent_slug": "writer", "prompt": "e", "policy": {"budget": 0.1}}))
            .await;
    assert_eq!(lease(&app, &capped).await.0, StatusCode::CREATED, "reserves its policy.budget, 0.1");
    assert!(close(&budget(&app, "writer", "usd-per-hour").await["used"], 0.95));
    // A run reported cheaper than reserved gives the rest back within the window.
    complete(&app, &capped, json!({"duration_ms": 5, "total_cost_usd": 0.02})).await;
    assert!(close(&budget(&app, "writer", "usd-per-hour").await["used"], 0.87));

    // A run that reports no cost keeps its reservation; raising the budget lets the
    // third task run.
    assert_eq!(
        app.put("/api/runtime/budgets/agent_slug/writer/usd-per-hour", json!({"max": 2.0, "estimate": 0.3})).await.0,
        StatusCode::OK
    );
    assert_eq!(lease(&app, &third).await.0, StatusCode::CREATED);
    complete(&app, &third, json!({"duration_ms": 5})).await;
    assert!(close(&budget(&app, "writer", "usd-per-hour").await["used"], 1.17));

    // Tokens: input, output and cache creation count, cache reads do not.
    assert_eq!(
        app.put("/api/runtime/budgets/context_id/t/tokens-per-day", json!({"max": 1000})).await.0,
        StatusCode::OK
    );
    let tok = submit(&app, json!({"context_id": "t", "agent_slug": "critic", "prompt": "f"})).await;
    assert_eq!(lease(&app, &tok).await.0, StatusCode::CREATED);
    let usage = json!({"duration_ms": 5, "input_tokens": 100, "output_tokens": 50,
                       "cache_creation_input_tokens": 25, "cache_read_input_tokens": 5000});
    complete(&app, &tok, usage).await;
    let tokens = budget(&app, "t", "tokens-per-day").await;
    assert_eq!((tokens["used"].as_f64(), tokens["average"].as_f64()), (Some(175.0), Some(175.0)), "{tokens}");

    // Each key's usage, most used first.
    let (status, usage) = app.get("/api/runtime/budget-usage?scope=agent_slug").await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    let rows = usage.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{usage}");
    // Two of two requests this minute (all), 1.17 of 2 USD this hour.
    assert_eq!((rows[0]["key"].as_str(), rows[0]["metric"].as_str()), (Some("writer"), Some("requests")), "{usage}");
    assert_eq!((rows[1]["metric"].as_str(), rows[1]["period"].as_str()), (Some("usd"), Some("hour")), "{usage}");
    assert!(close(&rows[1]["remaining"], 0.83), "{usage}");

    // A window past: nothing used in the new one.
    clock.advance(Duration::from_secs(3600));
    let usd = budget(&app, "writer", "usd-per-hour").await;
    assert_eq!((usd["used"].as_f64(), usd["remaining"].as_f64()), (Some(0.0), Some(2.0)), "{usd}");
    app.stop().await;
}

/// The Claude CLI's result of a successful run that cost `cost`.
fn cli_result(cost: f64) -> String {
    json!({"type": "result", "subtype": "success", "is_error": false, "result": "ok", "total_cost_usd": cost,
           "usage": {"input_tokens": 40, "output_tokens": 10}})
    .to_string()
}

#[tokio::test]
async fn tasks_over_a_budget_wait_without_an_attempt_and_run_when_it_allows() {
    let app = TestApp::spawn().await;
    // The executor prints its stdin: each prompt is what the CLI would have printed.
    let mut settings = app.worker_settings("w1", 4);
    settings.executor = Executor::Command { command: "cat".into(), max_output_bytes: 1 << 20 };
    app.start_worker_with(settings).await;
    app.start_reconciler().await;
    let (status, _) = app.put("/api/runtime/budgets/agent_slug/metered/requests-per-day", json!({"max": 2})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = app.put("/api/runtime/budgets/agent_slug/metered/usd-per-day", json!({"max": 10})).await;
    assert_eq!(status, StatusCode::OK);

    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(submit(&app, task("metered", &cli_result(0.25))).await);
    }
    wait_for("two ran, two wait for the budget", Duration::from_secs(20), || async {
        let mut done = 0;
        let mut waiting = 0;
        for id in &ids {
            let t = app.get(&format!("/api/runtime/llm-tasks/{id}")).await.1;
            done += i32::from(t["status"] == "completed");
            waiting += i32::from(t["status"] == "queued" && t["wait_reason"].as_str().is_some());
        }
        done == 2 && waiting == 2
    })
    .await;
    let tomorrow = BudgetPeriod::Day.window_start(bloom::time::now_ms()) + 86_400_000;
    let mut waiting = Vec::new();
    for id in &ids {
        let t = app.get(&format!("/api/runtime/llm-tasks/{id}")).await.1;
        if t["status"] == "queued" {
            assert_eq!(t["attempts"], 0, "no attempt used: {t}");
            assert_eq!(t["not_before"], tomorrow, "until the window ends: {t}");
            let reason = t["wait_reason"].as_str().unwrap();
            assert!(reason.starts_with("budget of agent_slug metered for requests per day used up (2 of 2)"), "{t}");
            waiting.push(id.clone());
        }
    }
    let (_, audit) = app.get(&format!("/api/runtime/audit?entity_id={}", waiting[0])).await;
    assert!(audit.to_string().contains("task_deferred"), "{audit}");
    // The runs' reported cost settled the USD budget (nothing was estimated up front).
    let usd = budget(&app, "metered", "usd-per-day").await;
    assert!(close(&usd["used"], 0.5), "{usd}");
    assert!(close(&usd["average"], 0.25), "{usd}");
    let requests = budget(&app, "metered", "requests-per-day").await;
    assert_eq!((requests["waiting"].as_i64(), requests["remaining"].as_f64()), (Some(2), Some(0.0)), "{requests}");
    let (_, usage) = app.get("/api/runtime/budget-usage").await;
    let row = usage.as_array().unwrap().iter().find(|u| u["metric"] == "requests").cloned().unwrap();
    assert_eq!((row["key"].as_str(), row["waiting"].as_i64()), (Some("metered"), Some(2)), "{usage}");

    // Raising the budget admits the waiting tasks at once, through the bus.
    assert_eq!(
        app.put("/api/runtime/budgets/agent_slug/metered/requests-per-day", json!({"max": 4})).await.0,
        StatusCode::OK
    );
    for id in &waiting {
        wait_for("the waiting task ran", Duration::from_secs(15), || async { app.status_of(id).await == "completed" })
            .await;
        let t = app.get(&format!("/api/runtime/llm-tasks/{id}")).await.1;
        assert_eq!(t["attempts"], 1, "one attempt: the run's; {t}");
    }
    assert!(close(&budget(&app, "metered", "usd-per-day").await["used"], 1.0));
    app.stop().await;
}

#[tokio::test]
async fn a_run_above_its_own_budget_is_stopped_and_fails_without_a_retry() {
    let app = TestApp::spawn().await;
    let mut settings = app.worker_settings("w1", 2);
    // A wrapper that reports its cost as it goes, then would run for a minute.
    let script =
        r#"echo '{"type":"progress","total_cost_usd":0.1}'; echo '{"type":"progress","total_cost_usd":0.9}'; sleep 60"#;
    settings.executor = Executor::Command { command: script.into(), max_output_bytes: 1 << 20 };
    app.start_worker_with(settings).await;
    app.start_reconciler().await;
    let started = std::time::Instant::now();
    let id =
        submit(&app, json!({"context_id": "c", "agent_slug": "a", "prompt": "p", "policy": {"budget": 0.5}})).await;
    wait_for("the run failed", Duration::from_secs(20), || async { app.status_of(&id).await == "failed" }).await;
    assert!(started.elapsed() < Duration::from_secs(30), "stopped, not waited for");
    let (_, results) = app.get(&format!("/api/runtime/llm-tasks/{id}/results")).await;
    let r = &results[0];
    assert_eq!(r["error_kind"], "max_budget", "{r}");
    assert_eq!(r["metrics"]["total_cost_usd"], 0.9, "the cost is recorded: {r}");
    let t = app.get(&format!("/api/runtime/llm-tasks/{id}")).await.1;
    assert_eq!(t["attempts"], 1, "no blind retry: {t}");
    app.stop().await;
}

#[tokio::test]
async fn budgets_are_validated_naming_the_field_and_configuration_does_not_override() {
    let app = TestApp::spawn().await;
    let cases = [
        ("model/x/usd-per-day", json!({"max": 1}), "scope"),
        ("agent_slug/x/usd-per-week", json!({"max": 1}), "rule"),
        ("agent_slug/x/usd-per-day", json!({"max": -1}), "max"),
        ("agent_slug/x/usd-per-day", json!({}), "max"),
        ("agent_slug/x/usd-per-day", json!({"max": "1"}), "max"),
        ("agent_slug/x/usd-per-day", json!({"max": 1, "estimate": -2}), "estimate"),
    ];
    for (path, body, field) in cases {
        let (status, err) = app.put(&format!("/api/runtime/budgets/{path}"), body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {err}");
        assert!(err.to_string().contains(field), "{path} {body} names {field}: {err}");
    }
    let long = "k".repeat(256);
    let (status, err) =
        app.put(&format!("/api/runtime/budgets/agent_slug/{long}/usd-per-day"), json!({"max": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err.to_string().contains("key"), "{err}");
    assert_eq!(app.delete("/api/runtime/budgets/agent_slug/x/usd-per-day").await.0, StatusCode::NOT_FOUND);
    assert_eq!(app.get("/api/runtime/budget-usage?scope=model").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(app.get("/api/runtime/budget-usage?limit=0").await.0, StatusCode::BAD_REQUEST);

    // Configuration sets a budget only where none is set: the API's value stays.
    assert_eq!(app.put("/api/runtime/budgets/agent_slug/x/usd-per-day", json!({"max": 7})).await.0, StatusCode::OK);
    let rule = BudgetRule::parse("usd-per-day").unwrap();
    let configured = BudgetLimit::new(ConcurrencyScope::AgentSlug, "x", rule, 50.0, None).unwrap();
    let now = bloom::time::now_ms();
    assert!(!bloom::db::budgets::set(&app.pool, &configured, true, now).await.unwrap());
    assert_eq!(budget(&app, "x", "usd-per-day").await["max"], 7.0);
    let (status, removed) = app.delete("/api/runtime/budgets/agent_slug/x/usd-per-day").await;
    assert_eq!((status, removed["removed"].as_bool()), (StatusCode::OK, Some(true)));
    assert!(bloom::db::budgets::set(&app.pool, &configured, true, now).await.unwrap());
    assert_eq!(budget(&app, "x", "usd-per-day").await["max"], 50.0);
    app.stop().await;
}

#[tokio::test]
async fn the_due_duty_admits_waiting_tasks_again_when_the_window_ends() {
    let start = BudgetPeriod::Day.window_start(bloom::time::now_ms()) + 1_000;
    let clock = bloom::time::Clock::manual(start);
    let app = TestApp::spawn_with(Opts { clock: Some(clock.clone()), ..Opts::default() }).await;
    let cancel = app.cancel.child_token();
    let mut r = app.reconciler_with(app.reconciler_settings(), &cancel).await;
    r.clock = clock.clone();
    app.register_worker("rest", 4).await;
    assert_eq!(
        app.put("/api/runtime/budgets/agent_slug/*/requests-per-minute", json!({"max": 1})).await.0,
        StatusCode::OK
    );
    let first = submit(&app, task("writer", "a")).await;
    let second = submit(&app, task("writer", "b")).await;
    assert_eq!(lease(&app, &first).await.0, StatusCode::CREATED);
    // The claim of the second task's dispatch is refused and puts it aside.
    let outcome = claim_all(&app, std::slice::from_ref(&second), start).await;
    assert_eq!(outcome, vec![ClaimOutcome::Refused], "over the budget");
    let t = app.get(&format!("/api/runtime/llm-tasks/{second}")).await.1;
    assert_eq!((t["status"].as_str(), t["not_before"].as_i64()), (Some("queued"), Some(start - 1_000 + 60_000)), "{t}");
    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 0, "not before the window ends");
    clock.advance(Duration::from_secs(60));
    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 1);
    assert_eq!(lease(&app, &second).await.0, StatusCode::CREATED, "the new window allows it");
    let all = budget(&app, "*", "requests-per-minute").await;
    assert_eq!((all["used"].as_f64(), all["keys"].as_i64()), (None, Some(1)), "{all}");
    app.stop().await;
}

/// Claims each task's current dispatch for the worker `rest`, at `now`.
async fn claim_all(app: &TestApp, ids: &[String], now: i64) -> Vec<ClaimOutcome> {
    let mut claims = Vec::new();
    for id in ids {
        let seq: i64 = sqlx::query_scalar("SELECT dispatch_seq FROM llm_tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        claims.push(Claim { task_id: id.clone().into(), dispatch_seq: seq, worker_id: "rest".into(), ttl_seconds: 30 });
    }
    lifecycle::claim(&app.pool, &claims, now).await.unwrap()
}

#[tokio::test]
async fn a_window_that_ends_dispatches_only_the_waiters_its_budget_admits() {
    let start = BudgetPeriod::Day.window_start(bloom::time::now_ms()) + 1_000;
    let minute = |n: i64| start - 1_000 + n * 60_000;
    let clock = bloom::time::Clock::manual(start);
    let app = TestApp::spawn_with(Opts { clock: Some(clock.clone()), ..Opts::default() }).await;
    let cancel = app.cancel.child_token();
    let mut r = app.reconciler_with(app.reconciler_settings(), &cancel).await;
    r.clock = clock.clone();
    app.register_worker("rest", 20).await;
    let rule = "/api/runtime/budgets/agent_slug/writer/requests-per-minute";
    assert_eq!(app.put(rule, json!({"max": 2})).await.0, StatusCode::OK);
    for prompt in ["a", "b"] {
        let id = submit(&app, task("writer", prompt)).await;
        assert_eq!(lease(&app, &id).await.0, StatusCode::CREATED);
    }
    // Five more wait for the next minute; the last submitted is the most urgent.
    let mut waiting = Vec::new();
    for i in 0..5 {
        let mut body = task("writer", &format!("w{i}"));
        if i == 4 {
            body["priority"] = json!(2);
        }
        waiting.push(submit(&app, body).await);
    }
    assert!(claim_all(&app, &waiting, start).await.iter().all(|o| *o == ClaimOutcome::Refused));

    // The minute ends: the budget admits two, the most urgent and then the oldest.
    clock.advance(Duration::from_secs(60));
    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 2);
    let dispatched = |ids: Vec<String>| async {
        let mut out = Vec::new();
        for id in ids {
            let t = app.get(&format!("/api/runtime/llm-tasks/{id}")).await.1;
            if t["not_before"].as_i64() == Some(minute(1)) {
                out.push(id);
            }
        }
        out
    };
    assert_eq!(dispatched(waiting.clone()).await, vec![waiting[0].clone(), waiting[4].clone()]);
    for id in &waiting[1..4] {
        let t = app.get(&format!("/api/runtime/llm-tasks/{id}")).await.1;
        assert_eq!(t["not_before"], minute(2), "the next window's end: {t}");
        assert_eq!(
            t["wait_reason"].as_str().unwrap(),
            format!(
                "budget of agent_slug writer for requests per minute taken by tasks ahead (2 of 2 left) until {}",
                bloom::time::iso8601(minute(2))
            ),
            "{t}"
        );
        assert_eq!(t["attempts"], 0, "{t}");
    }
    let (_, audit) = app.get(&format!("/api/runtime/audit?entity_id={}", waiting[1])).await;
    assert!(audit.to_string().contains("Still waiting: budget of agent_slug writer"), "{audit}");
    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 0, "the others wait: nothing dispatched twice");
    for id in [&waiting[0], &waiting[4]] {
        assert_eq!(lease(&app, id).await.0, StatusCode::CREATED, "admitted");
    }

    // The next minute, a new task takes one request first: one waiter is dispatched.
    clock.advance(Duration::from_secs(60));
    let early = submit(&app, task("writer", "early")).await;
    assert_eq!(lease(&app, &early).await.0, StatusCode::CREATED);
    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 1);
    assert_eq!(lease(&app, &waiting[1]).await.0, StatusCode::CREATED, "the oldest of the three");
    for id in &waiting[2..4] {
        let t = app.get(&format!("/api/runtime/llm-tasks/{id}")).await.1;
        assert_eq!(t["not_before"], minute(3), "{t}");
        assert!(t["wait_reason"].as_str().unwrap().contains("(1 of 2 left)"), "{t}");
    }

    // Without the budget, every waiter is dispatched when due.
    assert_eq!(app.delete(rule).await.0, StatusCode::OK);
    clock.advance(Duration::from_secs(60));
    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 2);
    app.stop().await;
}
