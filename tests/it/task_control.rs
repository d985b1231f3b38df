//! Task control beyond cancellation: delayed tasks, idempotency keys and batch submit.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{wait_for, TestApp};
use bloom::reconciler::due;

fn body(prompt: &str) -> Value {
    json!({"context_id": "ctx-1", "agent_slug": "writer", "prompt": prompt})
}

/// POSTs `body` with an `Idempotency-Key` header: status, the `Idempotent-Replayed` header, JSON.
async fn post_keyed(app: &TestApp, path: &str, key: &str, body: Value) -> (StatusCode, bool, Value) {
    let r = app.http.post(app.url(path)).header("Idempotency-Key", key).json(&body).send().await.unwrap();
    let replayed = r.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    (r.status(), replayed, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_delayed_task_is_not_dispatched_before_its_time_then_runs_once() {
    let app = TestApp::spawn().await;
    let task =
        app.submit_with(json!({"context_id": "c", "agent_slug": "a", "prompt": "later", "delay_ms": 1500})).await;
    let id = task["id"].as_str().unwrap().to_owned();
    let created = task["created_at"].as_i64().unwrap();
    let not_before = task["not_before"].as_i64().unwrap();
    assert_eq!(not_before, created + 1500, "{task}");
    assert_eq!(task["status"], "queued");
    assert_eq!(task["priority"], Value::Null, "priority 0 is not shown: the seed's shape");
    // No dispatch yet: nothing on the bus, nothing a REST lease may take.
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 0);
    app.register_worker("rest", 1).await;
    let (status, refused) = app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("not_before"), "{refused}");

    app.start_worker("w1", 2).await;
    app.start_reconciler().await;
    wait_for("the delayed task completed", Duration::from_secs(15), || async {
        app.status_of(&id).await == "completed"
    })
    .await;
    let started: i64 = sqlx::query_scalar("SELECT started_at FROM leases WHERE task_id = $1")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(started >= not_before, "leased {} ms early", not_before - started);
    assert!(started - not_before < 1000, "dispatched {} ms after its time", started - not_before);
    assert_eq!(app.count("SELECT count(*) FROM leases").await, 1, "one execution");
    assert_eq!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'task_due'").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn delayed_tasks_are_dispatched_by_any_reconciler_when_due_and_only_then() {
    let app = TestApp::spawn().await;
    let cancel = app.cancel.child_token();
    let mut r = app.reconciler_with(app.reconciler_settings(), &cancel).await;
    let start = bloom::time::now_ms();
    r.clock = bloom::time::Clock::manual(start);
    let at = start + 3_600_000;
    for prompt in ["a", "b"] {
        let mut b = body(prompt);
        b["not_before"] = json!(at);
        app.submit_with(b).await;
    }
    // A time already past is no delay.
    let mut past = body("now");
    past["not_before"] = json!(start - 1);
    let now_task = app.submit_with(past).await;
    assert_eq!(now_task["not_before"], Value::Null, "{now_task}");

    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 0);
    r.clock.advance(Duration::from_millis(3_599_999));
    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 0, "a millisecond early");
    // Another replica (here: a fresh one, as after a restart) finds them in Postgres.
    let mut other = app.reconciler_with(app.reconciler_settings(), &cancel).await;
    other.clock = bloom::time::Clock::manual(at);
    assert_eq!(due::run_once(&other).await.unwrap().dispatched, 2);
    assert_eq!(due::run_once(&r).await.unwrap().dispatched, 0, "dispatched once");
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks WHERE dispatch_seq = 1").await, 3);
    app.stop().await;
}

#[tokio::test]
async fn a_repeated_idempotency_key_returns_the_first_task_and_a_different_request_conflicts() {
    let app = TestApp::spawn().await;
    let path = "/api/runtime/llm-tasks";
    let (status, replayed, first) = post_keyed(&app, path, "order-42", body("summarize")).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{first}");
    assert_eq!(first["idempotency_key"], "order-42");
    let (status, replayed, again) = post_keyed(&app, path, "order-42", body("summarize")).await;
    assert_eq!((status, replayed), (StatusCode::OK, true), "{again}");
    assert_eq!(again["id"], first["id"]);
    // The body's field is the same key.
    let mut with_field = body("summarize");
    with_field["idempotency_key"] = json!("order-42");
    let (status, same) = app.post(path, with_field).await;
    assert_eq!((status, &same["id"]), (StatusCode::OK, &first["id"]), "{same}");

    let (status, _, conflict) = post_keyed(&app, path, "order-42", body("something else")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    let msg = conflict["error"].as_str().unwrap();
    assert!(msg.contains("idempotency_key") && msg.contains(first["id"].as_str().unwrap()), "{msg}");

    let mut other_field = body("summarize");
    other_field["idempotency_key"] = json!("another");
    let (status, _, bad) = post_keyed(&app, path, "order-42", other_field).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    assert!(bad["error"]["fieldErrors"]["idempotency_key"].is_array(), "{bad}");
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks").await, 1);

    // Past the retention window the key is free again, and the reconcilers forget it.
    sqlx::query("UPDATE idempotency_keys SET created_at = created_at - 90000000").execute(&app.pool).await.unwrap();
    let (status, _, fresh) = post_keyed(&app, path, "order-42", body("summarize")).await;
    assert_eq!(status, StatusCode::CREATED, "{fresh}");
    assert_ne!(fresh["id"], first["id"]);
    sqlx::query("UPDATE idempotency_keys SET created_at = created_at - 90000000").execute(&app.pool).await.unwrap();
    let (r, _) = app.start_reconciler().await;
    assert_eq!(due::forget_keys(&r).await.unwrap(), 1);
    assert_eq!(app.count("SELECT count(*) FROM idempotency_keys").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn concurrent_submissions_with_one_key_create_exactly_one_task() {
    let app = TestApp::spawn().await;
    let mut calls = Vec::new();
    for _ in 0..24 {
        let (http, url) = (app.http.clone(), app.url("/api/runtime/llm-tasks"));
        calls.push(tokio::spawn(async move {
            let r = http.post(url).header("Idempotency-Key", "once").json(&body("race")).send().await.unwrap();
            let status = r.status();
            (status, r.json::<Value>().await.unwrap())
        }));
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for c in calls {
        let (status, task) = c.await.unwrap();
        assert!(status == StatusCode::CREATED || status == StatusCode::OK, "{status} {task}");
        created += usize::from(status == StatusCode::CREATED);
        ids.insert(task["id"].as_str().unwrap().to_owned());
    }
    assert_eq!((created, ids.len()), (1, 1));
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn a_batch_is_validated_whole_committed_at_once_and_honours_keys() {
    let app = TestApp::spawn().await;
    let path = "/api/runtime/llm-tasks/batch";
    let (status, bad) = app.post(path, json!({"tasks": [body("ok"), {"context_id": "c", "prompt": ""}]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    assert!(bad["error"]["fieldErrors"]["tasks[1].agent_slug"].is_array(), "{bad}");
    assert!(bad["error"]["fieldErrors"]["tasks[1].prompt"].is_array(), "{bad}");
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks").await, 0, "nothing of an invalid batch");

    let mut urgent = body("urgent");
    urgent["priority"] = json!(2);
    urgent["idempotency_key"] = json!("k1");
    let mut later = body("later");
    later["delay_ms"] = json!(600_000);
    let (status, batch) = app.post(path, json!({"tasks": [urgent.clone(), later, body("plain")]})).await;
    assert_eq!(status, StatusCode::CREATED, "{batch}");
    assert_eq!((batch["created"].as_u64(), batch["existing"].as_u64()), (Some(3), Some(0)));
    let tasks = batch["tasks"].as_array().unwrap();
    assert_eq!(tasks.iter().map(|t| t["prompt"].as_str().unwrap()).collect::<Vec<_>>(), ["urgent", "later", "plain"]);
    assert_eq!(tasks[0]["priority"], 2);
    assert!(tasks[1]["not_before"].is_i64());
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks WHERE dispatch_seq = 1").await, 2, "two dispatched");
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks WHERE dispatch_seq = 0").await, 1, "one delayed");

    // The same key and request: its task again; a different request under a used key
    // fails the whole batch.
    let mut k2 = body("second");
    k2["idempotency_key"] = json!("k2");
    let (status, again) = app.post(path, json!({"tasks": [urgent.clone(), k2.clone()]})).await;
    assert_eq!(status, StatusCode::CREATED, "{again}");
    assert_eq!((again["created"].as_u64(), again["existing"].as_u64()), (Some(1), Some(1)));
    assert_eq!(again["tasks"][0]["id"], tasks[0]["id"]);
    let mut changed = urgent.clone();
    changed["prompt"] = json!("changed");
    let mut k3 = body("third");
    k3["idempotency_key"] = json!("k3");
    let (status, conflict) = app.post(path, json!({"tasks": [k3, changed]})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{conflict}");
    assert!(conflict["error"].as_str().unwrap().contains("tasks[1]"), "{conflict}");
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks").await, 4, "nothing of the conflicting batch");
    assert_eq!(app.count("SELECT count(*) FROM idempotency_keys WHERE key = 'k3'").await, 0);
    let (status, all_known) = app.post(path, json!({"tasks": [urgent, k2]})).await;
    assert_eq!((status, all_known["created"].as_u64()), (StatusCode::OK, Some(0)), "{all_known}");

    // Dispatched tasks of a batch run like any other.
    app.start_worker("w1", 4).await;
    app.start_reconciler().await;
    wait_for("the batch's undelayed tasks completed", Duration::from_secs(15), || async {
        app.count("SELECT count(*) FROM llm_tasks WHERE status = 'completed'").await == 3
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn operators_filter_the_task_list_and_requeue_by_filter_after_a_dry_run() {
    let app = TestApp::spawn().await;
    app.start_worker("w1", 4).await;
    app.start_reconciler().await;
    let task = |agent: &str, prompt: &str, priority: i64| json!({"context_id": "ctx", "agent_slug": agent, "prompt": prompt, "priority": priority, "max_attempts": 1});
    for t in [task("a1", "fail: x", 0), task("a1", "fail: y", 0), task("a2", "fail: z", 0), task("a1", "ok", 2)] {
        app.submit_with(t).await;
    }
    wait_for("four tasks finished", Duration::from_secs(15), || async {
        app.count("SELECT count(*) FROM llm_tasks WHERE status IN ('failed', 'completed')").await == 4
    })
    .await;
    let ids = |v: &Value| v.as_array().unwrap().len();
    let (_, a1) = app.get("/api/runtime/llm-tasks?status=failed,completed&agent_slug=a1").await;
    assert_eq!(ids(&a1), 3, "{a1}");
    let (_, urgent) = app.get("/api/runtime/llm-tasks?priority=2").await;
    assert_eq!((ids(&urgent), urgent[0]["prompt"].as_str()), (1, Some("ok")));
    let (_, none) = app.get("/api/runtime/llm-tasks?status=bogus").await;
    assert_eq!(ids(&none), 0);
    let created = urgent[0]["created_at"].as_i64().unwrap();
    let (_, since) =
        app.get(&format!("/api/runtime/llm-tasks?created_from={created}&created_to={}", created + 1)).await;
    assert!(since.as_array().unwrap().iter().all(|t| t["created_at"] == created), "{since}");
    let (status, bad) = app.get("/api/runtime/llm-tasks?priority=9").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    assert!(bad["error"]["fieldErrors"]["priority"].is_array(), "{bad}");

    let path = "/api/runtime/llm-tasks/requeue";
    let (status, dry) = app.post(path, json!({"agent_slug": "a1", "dry_run": true})).await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert_eq!((dry["matched"].as_i64(), dry["requeued"].as_array().map(Vec::len)), (Some(2), Some(0)), "{dry}");
    assert_eq!(
        app.count("SELECT count(*) FROM llm_tasks WHERE status = 'failed'").await,
        3,
        "a dry run changes nothing"
    );
    let (status, none) = app.post(path, json!({"status": ["failed"]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{none}");
    assert!(none["error"]["fieldErrors"]["ids"].is_array(), "nothing requeues everything by accident: {none}");
    let (status, wrong) = app.post(path, json!({"agent_slug": "a1", "status": ["completed"]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{wrong}");

    let (status, done) = app.post(path, json!({"agent_slug": "a1", "status": ["failed"]})).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["requeued"].as_array().map(Vec::len), Some(2), "{done}");
    assert_eq!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'task_requeued'").await, 2);
    wait_for("the requeued tasks ran again", Duration::from_secs(15), || async {
        app.count("SELECT count(*) FROM leases").await == 6
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn an_urgent_task_overtakes_a_flood_of_background_tasks() {
    let app = TestApp::spawn().await;
    app.start_reconciler().await;
    app.start_worker("w1", 1).await;
    let task = |prompt: &str, priority: i64| json!({"context_id": format!("ctx-{prompt}"), "agent_slug": "a", "prompt": prompt, "priority": priority});
    // One slot, busy; then a flood of background tasks, then an urgent one.
    let busy = app.submit_with(task("sleep:500", -2)).await;
    wait_for("the first task running", Duration::from_secs(10), || async {
        app.status_of(busy["id"].as_str().unwrap()).await != "queued"
    })
    .await;
    let mut flood = Vec::new();
    for i in 0..20 {
        flood.push(app.submit_with(task(&format!("sleep:{}", 50 + i), -2)).await["id"].as_str().unwrap().to_owned());
    }
    let urgent = app.submit_with(task("urgent", 2)).await["id"].as_str().unwrap().to_owned();
    wait_for("the urgent task completed", Duration::from_secs(20), || async {
        app.status_of(&urgent).await == "completed"
    })
    .await;
    let started_before: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM leases l WHERE l.task_id = ANY($1)
           AND l.started_at < (SELECT started_at FROM leases WHERE task_id = $2)",
    )
    .bind(&flood)
    .bind(&urgent)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    // The slot it waited for, and at most one round in ten that starts at another priority.
    assert!(started_before <= 1, "{started_before} background tasks started before the urgent one");
    app.stop().await;
}
