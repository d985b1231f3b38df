//! What LLM runs report: usage and cost recorded with each result and summed per agent
//! and context, and retries that follow the class of a failure.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{wait_for, Opts, TestApp};
use bloom::db::lifecycle::{self, Claim, ClaimOutcome};
use bloom::reconciler::due;
use bloom::worker::Executor;

/// The Claude CLI's `--output-format json` result of a successful run.
fn cli_result(text: &str, cost: f64, input: i64, output: i64, cache_read: i64) -> String {
    json!({"type": "result", "subtype": "success", "is_error": false, "result": text, "num_turns": 2,
           "duration_ms": 1200, "duration_api_ms": 900, "session_id": format!("session-{text}"),
           "total_cost_usd": cost,
           "usage": {"input_tokens": input, "output_tokens": output, "cache_read_input_tokens": cache_read,
                     "cache_creation_input_tokens": 3}})
    .to_string()
}

fn task(context: &str, agent: &str, prompt: &str) -> Value {
    json!({"context_id": context, "agent_slug": agent, "prompt": prompt})
}

#[tokio::test]
async fn a_run_records_its_cost_and_tokens_and_usage_sums_them_per_agent_and_context() {
    let app = TestApp::spawn().await;
    // The executor prints its stdin: each prompt is what the CLI would have printed.
    let mut settings = app.worker_settings("w1", 4);
    settings.executor = Executor::Command { command: "cat".into(), max_output_bytes: 1 << 20 };
    app.start_worker_with(settings).await;
    let (r, _) = app.start_reconciler().await;
    let stream = [
        json!({"type": "system", "subtype": "init", "session_id": "s-stream"}).to_string(),
        json!({"type": "assistant", "message": {"content": [{"type": "text", "text": "partial"}]}}).to_string(),
        cli_result("streamed", 0.5, 1000, 200, 0),
    ]
    .join("\n");
    let ids: Vec<String> = [
        task("c1", "writer", &cli_result("one", 0.25, 100, 20, 50)),
        task("c2", "writer", &cli_result("two", 0.125, 10, 2, 0)),
        task("c1", "critic", &stream),
    ]
    .into_iter()
    .map(|b| async { app.submit_with(b).await["id"].as_str().unwrap().to_owned() })
    .collect::<futures::future::JoinAll<_>>()
    .await;
    for id in &ids {
        wait_for("the run completed", Duration::from_secs(15), || async { app.status_of(id).await == "completed" })
            .await;
    }
    let (_, results) = app.get(&format!("/api/runtime/llm-tasks/{}/results", ids[0])).await;
    let res = &results[0];
    assert_eq!(res["output"], "one", "{res}");
    let m = &res["metrics"];
    assert_eq!(m["total_cost_usd"], 0.25, "{m}");
    assert_eq!((m["input_tokens"].as_i64(), m["output_tokens"].as_i64()), (Some(100), Some(20)));
    assert_eq!(m["tokens_used"], 120, "the seed's field: input plus output tokens");
    assert_eq!((m["cache_read_input_tokens"].as_i64(), m["cache_creation_input_tokens"].as_i64()), (Some(50), Some(3)));
    assert_eq!((m["num_turns"].as_i64(), m["duration_api_ms"].as_i64()), (Some(2), Some(900)));
    assert_eq!((m["session_id"].as_str(), m["subtype"].as_str()), (Some("session-one"), Some("success")));
    assert!(m["duration_ms"].as_i64().is_some(), "{m}");
    let (_, streamed) = app.get(&format!("/api/runtime/llm-tasks/{}/results", ids[2])).await;
    assert_eq!(streamed[0]["output"], "streamed", "stream-json: the result line's text");
    assert_eq!(streamed[0]["metrics"]["total_cost_usd"], 0.5);

    let (status, by_agent) = app.get("/api/runtime/usage").await;
    assert_eq!(status, StatusCode::OK, "{by_agent}");
    assert_eq!(by_agent["group_by"], "agent_slug");
    let groups = by_agent["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{by_agent}");
    assert_eq!((groups[0]["key"].as_str(), groups[0]["total_cost_usd"].as_f64()), (Some("critic"), Some(0.5)));
    assert_eq!((groups[1]["key"].as_str(), groups[1]["total_cost_usd"].as_f64()), (Some("writer"), Some(0.375)));
    assert_eq!(groups[1]["runs"], 2);
    assert_eq!(groups[1]["input_tokens"], 110);
    assert_eq!(groups[1]["cache_read_input_tokens"], 50);
    let total = &by_agent["total"];
    assert_eq!((total["runs"].as_i64(), total["total_cost_usd"].as_f64()), (Some(3), Some(0.875)), "{total}");
    assert_eq!(total["output_tokens"], 222);
    assert_eq!(total["key"], Value::Null);

    let (_, by_context) = app.get("/api/runtime/usage?group_by=context_id&limit=1").await;
    let groups = by_context["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "limit 1: {by_context}");
    assert_eq!((groups[0]["key"].as_str(), groups[0]["total_cost_usd"].as_f64()), (Some("c1"), Some(0.75)));
    assert_eq!(by_context["total"]["runs"], 3, "the total counts every group");
    // A range before any run: nothing.
    let (_, empty) = app.get("/api/runtime/usage?from=0&to=1000").await;
    assert_eq!((empty["groups"].as_array().map(Vec::len), empty["total"]["runs"].as_i64()), (Some(0), Some(0)));
    for bad in ["group_by=worker", "from=abc", "limit=0", "from=10&to=5"] {
        let (status, body) = app.get(&format!("/api/runtime/usage?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    // The reconciler that stored the results counted what they cost.
    assert!((r.metrics.llm_cost_usd_total.get() - 0.875).abs() < 1e-9);
    assert_eq!(r.metrics.llm_input_tokens_total.get(), 1110);
    assert_eq!(r.metrics.llm_cache_read_tokens_total.get(), 50);
    app.stop().await;
}

/// Completes the task's current lease over REST with `outcome` (merged into the body).
async fn complete(app: &TestApp, id: &str, outcome: Value) -> (StatusCode, Value) {
    let mut body = json!({"status": "error", "metrics": {"duration_ms": 5}, "error_message": "failed"});
    body.as_object_mut().unwrap().extend(outcome.as_object().unwrap().clone());
    app.post(&format!("/api/runtime/llm-tasks/{id}/complete"), body).await
}

async fn lease(app: &TestApp, id: &str) -> (StatusCode, Value) {
    app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({})).await
}

#[tokio::test]
async fn failures_are_retried_by_class_rate_limits_wait_without_an_attempt_and_the_rest_are_final() {
    let start = bloom::time::now_ms();
    let clock = bloom::time::Clock::manual(start);
    let app = TestApp::spawn_with(Opts { clock: Some(clock.clone()), ..Opts::default() }).await;
    let cancel = app.cancel.child_token();
    let mut r = app.reconciler_with(app.reconciler_settings(), &cancel).await;
    r.clock = clock.clone();
    app.register_worker("rest", 4).await;

    // A provider failure: tried again after a backoff of 1 s (half fixed, half random).
    let id = app.submit_with(task("c", "writer", "p")).await["id"].as_str().unwrap().to_owned();
    assert_eq!(lease(&app, &id).await.0, StatusCode::CREATED);
    let (status, done) = complete(&app, &id, json!({"error_kind": "provider", "error_message": "overloaded"})).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    let t = &done["task"];
    assert_eq!((t["status"].as_str(), t["attempts"].as_i64()), (Some("queued"), Some(1)), "{t}");
    let next = t["not_before"].as_i64().unwrap();
    assert!((start + 500..=start + 1000).contains(&next), "backoff {} ms", next - start);
    assert_eq!(t["last_error"], "provider: overloaded");
    assert!(t["wait_reason"].as_str().unwrap().starts_with("retry after a provider error at "), "{t}");
    assert_eq!(done["result"]["error_kind"], "provider", "the result keeps its class");
    assert_eq!(lease(&app, &id).await.0, StatusCode::CONFLICT, "not before its time");
    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 0);
    clock.advance(Duration::from_millis((next - start) as u64));
    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 1);
    let seq: i64 = sqlx::query_scalar("SELECT dispatch_seq FROM llm_tasks WHERE id = $1")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(seq, 2, "a dispatch number no earlier message carries");

    // A rate limit: waits for the provider's reset and gives the attempt back.
    assert_eq!(lease(&app, &id).await.0, StatusCode::CREATED);
    let reset = clock.now_ms() + 3_600_000;
    let (_, done) = complete(&app, &id, json!({"error_kind": "rate_limited", "retry_at": reset})).await;
    let t = &done["task"];
    assert_eq!((t["status"].as_str(), t["attempts"].as_i64()), (Some("queued"), Some(1)), "{t}");
    assert_eq!(t["not_before"], reset);
    assert!(t["wait_reason"].as_str().unwrap().starts_with("rate limited by the provider until "), "{t}");
    clock.advance(Duration::from_millis(3_600_000));
    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 1);

    // A turn limit is final: no blind retry, though attempts remain.
    assert_eq!(lease(&app, &id).await.0, StatusCode::CREATED);
    let (_, done) = complete(&app, &id, json!({"error_kind": "max_turns"})).await;
    let t = &done["task"];
    assert_eq!((t["status"].as_str(), t["attempts"].as_i64()), (Some("failed"), Some(2)), "{t}");
    assert_eq!(t["wait_reason"], Value::Null);
    let (_, results) = app.get(&format!("/api/runtime/llm-tasks/{id}/results")).await;
    let kinds: Vec<&str> = results.as_array().unwrap().iter().map(|r| r["error_kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["max_turns", "rate_limited", "provider"], "every attempt's result, newest first");
    let audit = app.count("SELECT count(*) FROM audit_logs WHERE action = 'task_retry_scheduled'").await;
    assert_eq!(audit, 2);

    // An error without a class is final, as in the seed; so is the last attempt's.
    let plain = app.submit_with(task("c", "writer", "p")).await["id"].as_str().unwrap().to_owned();
    lease(&app, &plain).await;
    let (_, done) = complete(&app, &plain, json!({})).await;
    assert_eq!(done["task"]["status"], "failed");
    let mut one = task("c", "writer", "p");
    one["max_attempts"] = json!(1);
    let last = app.submit_with(one).await["id"].as_str().unwrap().to_owned();
    lease(&app, &last).await;
    let (_, done) = complete(&app, &last, json!({"error_kind": "timeout"})).await;
    assert_eq!(done["task"]["status"], "failed", "no attempt left");

    // A task's own policy: execution errors tried again, after its own backoff.
    let mut own = task("c", "writer", "p");
    own["policy"] = json!({"retry": {"on": ["execution"], "backoff_ms": 60000, "max_backoff_ms": 60000}});
    let t = app.submit_with(own).await;
    assert_eq!(t["policy"]["retry"]["on"], json!(["execution"]), "{t}");
    let own = t["id"].as_str().unwrap().to_owned();
    lease(&app, &own).await;
    let now = clock.now_ms();
    let (_, done) = complete(&app, &own, json!({"error_kind": "execution"})).await;
    let next = done["task"]["not_before"].as_i64().unwrap();
    assert!((now + 30_000..=now + 60_000).contains(&next), "{done}");

    // A policy naming a class that is never tried blindly again is refused.
    for retry in
        [json!({"on": ["max_turns"]}), json!({"backoff_ms": -1}), json!({"backoff_ms": 10, "max_backoff_ms": 5})]
    {
        let mut bad = task("c", "writer", "p");
        bad["policy"] = json!({"retry": retry});
        let (status, body) = app.post("/api/runtime/llm-tasks", bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{retry}: {body}");
        assert!(body["error"]["fieldErrors"]["policy"].is_array(), "{body}");
    }
    let leased = app.submit_with(task("c", "writer", "p")).await["id"].as_str().unwrap().to_owned();
    lease(&app, &leased).await;
    for bad in [json!({"error_kind": "bogus"}), json!({"metrics": {"duration_ms": 1, "input_tokens": -1}})] {
        let (status, body) = complete(&app, &leased, bad.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
    }
    assert_eq!(app.status_of(&leased).await, "leased", "a refused body changes nothing");
    app.stop().await;
}

#[tokio::test]
async fn a_rate_limited_run_waits_for_the_reset_then_runs_again_on_the_same_attempt() {
    let app = TestApp::spawn().await;
    let marks = std::env::temp_dir().join(format!("bloom-it-marks-{}", bloom::domain::new_id()));
    std::fs::create_dir_all(&marks).unwrap();
    // The first run of the task `x` hits a rate limit that resets a second or two later
    // (the CLI's stream-json: a rejected rate_limit_event, then an error result); its
    // next run succeeds. Other prompts are echoed.
    let reset_secs = bloom::time::now_ms() / 1000 + 2;
    let limited = [
        json!({"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": reset_secs,
               "rateLimitType": "five_hour"}})
        .to_string(),
        json!({"type": "result", "subtype": "success", "is_error": true, "result": "rate limited",
               "total_cost_usd": 0})
        .to_string(),
    ]
    .join("\n");
    let command = format!(
        "p=$(cat); if [ \"$p\" != x ]; then echo \"$p\"; exit 0; fi; \
         m='{dir}'/\"$BLOOM_TASK_ID\"; if [ -e \"$m\" ]; then echo \"attempt $BLOOM_ATTEMPT\"; else touch \"$m\"; \
         printf '%s\\n' '{limited}'; exit 1; fi",
        dir = marks.display()
    );
    let mut settings = app.worker_settings("w1", 2);
    settings.executor = Executor::Command { command, max_output_bytes: 1 << 20 };
    app.start_worker_with(settings).await;
    app.start_reconciler().await;
    let id = app.submit("x").await["id"].as_str().unwrap().to_owned();
    // Not JSON where JSON was asked for: final at once, whatever attempts remain.
    let mut json_task = task("c", "writer", "not json");
    json_task["desired_format"] = json!("json");
    let invalid = app.submit_with(json_task).await["id"].as_str().unwrap().to_owned();
    wait_for("the task completed", Duration::from_secs(20), || async { app.status_of(&id).await == "completed" }).await;
    let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{id}")).await;
    assert_eq!(t["attempts"], 1, "the rate-limited run gave its attempt back: {t}");
    assert!(t["last_error"].as_str().unwrap().starts_with("rate_limited: rate limited"), "{t}");
    let (_, results) = app.get(&format!("/api/runtime/llm-tasks/{id}/results")).await;
    assert_eq!(results[0]["output"].as_str().map(str::trim), Some("attempt 1"), "{results}");
    assert_eq!(results[1]["error_kind"], "rate_limited");
    let started: Vec<i64> = sqlx::query_scalar("SELECT started_at FROM leases WHERE task_id = $1 ORDER BY started_at")
        .bind(&id)
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(started.len(), 2);
    assert!(started[1] >= reset_secs * 1000, "ran again {} ms before the reset", reset_secs * 1000 - started[1]);

    wait_for("the invalid output failed", Duration::from_secs(10), || async {
        app.status_of(&invalid).await == "failed"
    })
    .await;
    let (_, results) = app.get(&format!("/api/runtime/llm-tasks/{invalid}/results")).await;
    assert_eq!(results.as_array().unwrap().len(), 1, "not tried again");
    assert_eq!(results[0]["error_kind"], "invalid_output");
    let _ = std::fs::remove_dir_all(&marks);
    app.stop().await;
}

#[tokio::test]
async fn a_provider_rate_limit_holds_the_agents_other_tasks_until_its_reset() {
    let app = TestApp::spawn().await;
    app.register_worker("rest", 2).await;
    // A run of agent `writer` reports a rate limit that resets four seconds from now.
    let first = app.submit_with(task("c1", "writer", "first")).await["id"].as_str().unwrap().to_owned();
    assert_eq!(lease(&app, &first).await.0, StatusCode::CREATED);
    let reset = bloom::time::now_ms() + 4000;
    let (status, done) = complete(&app, &first, json!({"error_kind": "rate_limited", "retry_at": reset})).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    let (_, holds) = app.get("/api/runtime/agent-holds").await;
    assert_eq!(holds.as_array().map(Vec::len), Some(1), "{holds}");
    assert_eq!((holds[0]["agent_slug"].as_str(), holds[0]["until"].as_i64()), (Some("writer"), Some(reset)));
    assert_eq!(holds[0]["reason"], "rate_limited: failed");
    // Its other tasks are not leased before the reset, over REST or NATS.
    let second = app.submit_with(task("c2", "writer", "second")).await["id"].as_str().unwrap().to_owned();
    let (status, refused) = lease(&app, &second).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("rate limited by the provider until"), "{refused}");
    app.start_worker("w1", 4).await;
    app.start_reconciler().await;
    let other = app.submit_with(task("c3", "critic", "other agent")).await["id"].as_str().unwrap().to_owned();
    wait_for("the other agent's task completed", Duration::from_secs(10), || async {
        app.status_of(&other).await == "completed"
    })
    .await;
    wait_for("the held task waits for the reset", Duration::from_secs(10), || async {
        let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{second}")).await;
        t["wait_reason"].as_str().is_some_and(|r| r.starts_with("agent writer rate limited by the provider until"))
    })
    .await;
    assert!(bloom::time::now_ms() < reset, "the test ran too slowly to see the hold");
    for id in [&first, &second] {
        wait_for("the held tasks completed after the reset", Duration::from_secs(15), || async {
            app.status_of(id).await == "completed"
        })
        .await;
    }
    let started: i64 = sqlx::query_scalar("SELECT max(started_at) FROM leases WHERE task_id = $1")
        .bind(&second)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(started >= reset, "leased {} ms before the reset", reset - started);
    let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{second}")).await;
    assert_eq!(t["attempts"], 1, "waiting used no attempt: {t}");
    assert!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'task_deferred'").await >= 1);
    let (_, holds) = app.get("/api/runtime/agent-holds").await;
    assert_eq!(holds, json!([]), "the hold ended at the reset");
    app.stop().await;
}

#[tokio::test]
async fn a_rate_limit_holds_the_key_the_policy_names_and_no_other() {
    let start = bloom::time::now_ms();
    let clock = bloom::time::Clock::manual(start);
    let app = TestApp::spawn_with(Opts { clock: Some(clock.clone()), ..Opts::default() }).await;
    app.register_worker("rest", 10).await;
    let keyed = |context: &str, key: &str, hold: &str| {
        json!({"context_id": context, "agent_slug": "writer", "prompt": "p", "concurrency_key": key,
               "policy": {"timeout_sec": 60, "budget": 0, "retry": {"hold": hold}}})
    };
    let api = &app;
    let submit = move |body: Value| async move { api.submit_with(body).await["id"].as_str().unwrap().to_owned() };

    // A run of API key k1 is rate limited: k1's other tasks wait, k2's of the same agent run.
    let first = submit(keyed("c1", "k1", "concurrency_key")).await;
    let t = app.get(&format!("/api/runtime/llm-tasks/{first}")).await.1;
    assert_eq!(t["policy"]["retry"]["hold"], "concurrency_key", "{t}");
    assert_eq!(lease(&app, &first).await.0, StatusCode::CREATED);
    let reset = start + 60_000;
    let (status, done) = complete(&app, &first, json!({"error_kind": "rate_limited", "retry_at": reset})).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    let (_, holds) = app.get("/api/runtime/holds").await;
    assert_eq!(holds.as_array().map(Vec::len), Some(1), "{holds}");
    assert_eq!((holds[0]["scope"].as_str(), holds[0]["key"].as_str()), (Some("concurrency_key"), Some("k1")));
    assert_eq!(holds[0]["until"], reset);
    assert_eq!(app.get("/api/runtime/agent-holds").await.1, json!([]), "the agent is not held");

    let same_key = submit(keyed("c2", "k1", "agent_slug")).await;
    let (status, refused) = lease(&app, &same_key).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    let reason = format!("concurrency_key k1 rate limited by the provider until {}", bloom::time::iso8601(reset));
    assert!(refused["error"].as_str().unwrap().contains(&reason), "{refused}");
    // A claim of its dispatch puts it aside until the reset, without an attempt.
    let seq: i64 = sqlx::query_scalar("SELECT dispatch_seq FROM llm_tasks WHERE id = $1")
        .bind(&same_key)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let claim =
        Claim { task_id: same_key.clone().into(), dispatch_seq: seq, worker_id: "rest".into(), ttl_seconds: 30 };
    assert_eq!(lifecycle::claim(&app.pool, &[claim], clock.now_ms()).await.unwrap(), vec![ClaimOutcome::Refused]);
    let t = app.get(&format!("/api/runtime/llm-tasks/{same_key}")).await.1;
    assert_eq!((t["wait_reason"].as_str(), t["not_before"].as_i64()), (Some(reason.as_str()), Some(reset)), "{t}");
    assert_eq!(t["attempts"], 0, "{t}");
    let other_key = submit(keyed("c3", "k2", "agent_slug")).await;
    assert_eq!(lease(&app, &other_key).await.0, StatusCode::CREATED, "another key of the same agent runs");

    // `task`: only the limited task waits; a conversation's hold holds that conversation.
    let alone = submit(keyed("c4", "k2", "task")).await;
    assert_eq!(lease(&app, &alone).await.0, StatusCode::CREATED);
    let (status, _) = complete(&app, &alone, json!({"error_kind": "rate_limited", "retry_at": reset})).await;
    assert_eq!(status, StatusCode::OK);
    let t = app.get(&format!("/api/runtime/llm-tasks/{alone}")).await.1;
    assert_eq!((t["status"].as_str(), t["not_before"].as_i64()), (Some("queued"), Some(reset)), "{t}");
    let conversation = submit(keyed("c5", "k2", "context_id")).await;
    assert_eq!(lease(&app, &conversation).await.0, StatusCode::CREATED);
    let (status, _) = complete(&app, &conversation, json!({"error_kind": "rate_limited", "retry_at": reset})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, holds) = app.get("/api/runtime/holds").await;
    let held: Vec<(&str, &str)> =
        holds.as_array().unwrap().iter().map(|h| (h["scope"].as_str().unwrap(), h["key"].as_str().unwrap())).collect();
    assert_eq!(held, vec![("concurrency_key", "k1"), ("context_id", "c5")], "{holds}");
    let same_conversation = submit(keyed("c5", "k3", "agent_slug")).await;
    assert_eq!(lease(&app, &same_conversation).await.0, StatusCode::CONFLICT);
    assert_eq!(lease(&app, &submit(keyed("c6", "k2", "agent_slug")).await).await.0, StatusCode::CREATED);

    // After the reset nothing is held.
    clock.advance(Duration::from_secs(61));
    assert_eq!(app.get("/api/runtime/holds").await.1, json!([]));
    assert_eq!(lease(&app, &same_conversation).await.0, StatusCode::CREATED);

    let (status, err) = app.post("/api/runtime/llm-tasks", keyed("c7", "k1", "tenant")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err["error"]["fieldErrors"]["policy"].to_string().contains("'concurrency_key'"), "{err}");
    app.stop().await;
}
