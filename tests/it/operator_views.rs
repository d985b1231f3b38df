//! What the dashboard reads beyond the task API: `GET /api/runtime/failures` (failed
//! and dead tasks grouped by why they failed, with what their runs cost, and the ids a
//! bulk requeue takes) and `GET /api/runtime/activity` (runs and dispatches per minute).

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::TestApp;

/// Submits a task of `agent`, leases it over REST and completes it with `outcome`.
async fn run(app: &TestApp, agent: &str, outcome: Value) -> String {
    let id = app.submit_with(json!({"context_id": "c", "agent_slug": agent, "prompt": "p", "max_attempts": 1})).await
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, _) = app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = app.post(&format!("/api/runtime/llm-tasks/{id}/complete"), outcome).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    id
}

fn error(kind: &str, message: &str, cost: f64) -> Value {
    json!({"status": "error", "error_kind": kind, "error_message": message,
           "metrics": {"duration_ms": 5, "total_cost_usd": cost}})
}

#[tokio::test]
async fn failed_tasks_are_grouped_by_agent_class_and_message_with_their_cost() {
    let app = TestApp::spawn().await;
    app.register_worker("rest", 10).await;
    let turns = [
        run(&app, "writer", error("max_turns", "the agent reached its turn limit", 0.5)).await,
        run(&app, "writer", error("max_turns", "the agent reached its turn limit", 0.25)).await,
    ];
    let invalid = run(&app, "writer", error("invalid_output", "output is not valid JSON", 0.125)).await;
    let critic = run(&app, "critic", error("max_turns", "the agent reached its turn limit", 1.0)).await;
    run(&app, "writer", json!({"status": "success", "output": "fine", "metrics": {"duration_ms": 5}})).await;

    let (status, report) = app.get("/api/runtime/failures").await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let groups = report["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 3, "{report}");
    let first = &groups[0];
    assert_eq!(
        (first["agent_slug"].as_str(), first["error_kind"].as_str(), first["tasks"].as_i64(), first["runs"].as_i64()),
        (Some("writer"), Some("max_turns"), Some(2), Some(2)),
        "the largest group first: {report}"
    );
    assert_eq!(first["reason"], "the agent reached its turn limit");
    assert_eq!(first["cost_usd"], 0.75);
    let mut ids: Vec<String> = serde_json::from_value(first["task_ids"].clone()).unwrap();
    ids.sort();
    let mut expected = turns.to_vec();
    expected.sort();
    assert_eq!(ids, expected);
    let of = |agent: &str, kind: &str| {
        groups.iter().find(|g| g["agent_slug"] == agent && g["error_kind"] == kind).cloned().unwrap_or(Value::Null)
    };
    assert_eq!(of("writer", "invalid_output")["task_ids"], json!([invalid]));
    assert_eq!(of("critic", "max_turns")["task_ids"], json!([critic]));

    // The group's ids requeue it in bulk.
    let (status, dry) =
        app.post("/api/runtime/llm-tasks/requeue", json!({"ids": first["task_ids"], "dry_run": true})).await;
    assert_eq!((status, dry["matched"].as_i64()), (StatusCode::OK, Some(2)), "{dry}");

    // A range before them: nothing; bad ranges and limits are 400s naming the parameter.
    let (_, empty) = app.get("/api/runtime/failures?from=0&to=1").await;
    assert_eq!(empty["groups"], json!([]));
    for (query, field) in [("from=x", "from"), ("limit=0", "limit"), ("from=10&to=5", "from"), ("limit=501", "limit")] {
        let (status, body) = app.get(&format!("/api/runtime/failures?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(body.to_string().contains(field), "{query}: {body}");
    }
    app.stop().await;
}

#[tokio::test]
async fn activity_counts_runs_and_dispatches_per_minute_with_their_latencies() {
    let app = TestApp::spawn().await;
    app.register_worker("rest", 10).await;
    run(&app, "writer", json!({"status": "success", "output": "ok", "metrics": {"duration_ms": 5}})).await;
    run(&app, "writer", error("provider", "overloaded", 0.1)).await;
    let (status, body) = app.get("/api/runtime/activity?minutes=5").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let minutes = body["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), 5, "one point per minute: {body}");
    let starts: Vec<i64> = minutes.iter().map(|m| m["minute"].as_i64().unwrap()).collect();
    assert!(starts.windows(2).all(|w| w[1] - w[0] == 60_000), "{starts:?}");
    let sum = |k: &str| minutes.iter().map(|m| m[k].as_i64().unwrap()).sum::<i64>();
    assert_eq!((sum("completed"), sum("failed"), sum("dispatched")), (1, 1, 2), "{body}");
    let busy = minutes.iter().find(|m| m["dispatched"].as_i64() > Some(0)).unwrap();
    assert!(busy["dispatch_p50_ms"].as_f64().is_some_and(|v| v >= 0.0), "{busy}");
    assert!(busy["dispatch_p99_ms"].as_f64() >= busy["dispatch_p50_ms"].as_f64(), "{busy}");
    // Asked again: the same (ended minutes come from memory, the current one is read).
    let (_, again) = app.get("/api/runtime/activity?minutes=5").await;
    assert_eq!(again["minutes"].as_array().map(Vec::len), Some(5));
    for bad in ["minutes=0", "minutes=181", "minutes=x"] {
        let (status, body) = app.get(&format!("/api/runtime/activity?{bad}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(body.to_string().contains("minutes"), "{body}");
    }
    app.stop().await;
}

#[tokio::test]
async fn a_tasks_history_lists_its_leases_and_audit_trail() {
    let app = TestApp::spawn().await;
    app.register_worker("rest", 10).await;
    let id = run(&app, "writer", error("provider", "overloaded", 0.1)).await;
    let (status, history) = app.get(&format!("/api/runtime/llm-tasks/{id}/history")).await;
    assert_eq!(status, StatusCode::OK, "{history}");
    let leases = history["leases"].as_array().unwrap();
    assert_eq!(leases.len(), 1, "{history}");
    assert_eq!((leases[0]["worker_id"].as_str(), leases[0]["status"].as_str()), (Some("rest"), Some("released")));
    let actions: Vec<&str> =
        history["audit"].as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["task_created", "task_leased", "task_completed"], "the task's and its lease's, oldest first");
    let (status, _) = app.get("/api/runtime/llm-tasks/missing/history").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.stop().await;
}

/// Every page of `path` (a query string ends it), following `X-Next-Cursor`: the entries
/// of each page in order.
async fn all_pages(app: &TestApp, path: &str) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            Some(c) => format!("{path}&cursor={c}"),
            None => path.to_owned(),
        };
        let r = app.http.get(app.url(&url)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        cursor = r.headers().get("x-next-cursor").map(|v| v.to_str().unwrap().to_owned());
        pages.push(r.json::<Vec<Value>>().await.unwrap());
        if cursor.is_none() {
            return pages;
        }
    }
}

#[tokio::test]
async fn the_audit_log_filters_by_action_entity_and_actor_and_pages_past_long_gaps() {
    let app = TestApp::spawn().await;
    let ids: Vec<String> = submitted(&app, 3).await;
    let (status, _) = app.post(&format!("/api/runtime/llm-tasks/{}/cancel", ids[1]), json!({})).await;
    assert_eq!(status, StatusCode::OK);

    // By action: the one cancellation.
    let (status, cancelled) = app.get("/api/runtime/audit?action=task_cancelled").await;
    assert_eq!(status, StatusCode::OK, "{cancelled}");
    let cancelled = cancelled.as_array().unwrap();
    assert_eq!(cancelled.len(), 1, "{cancelled:?}");
    assert_eq!(cancelled[0]["entity_id"], ids[1].as_str());

    // By entity: the task's own entries, newest first; with an action too.
    let (_, trail) = app.get(&format!("/api/runtime/audit?entity_id={}", ids[1])).await;
    let actions: Vec<&str> = trail.as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["task_cancelled", "task_created"], "{trail}");
    let (_, created) = app.get(&format!("/api/runtime/audit?entity_id={}&action=task_created", ids[1])).await;
    assert_eq!(created.as_array().unwrap().len(), 1, "{created}");

    // By type and actor, in pages of one.
    let pages = all_pages(&app, "/api/runtime/audit?entity_type=llm_task&action=task_created&limit=1").await;
    let found: Vec<&str> = pages.iter().flatten().map(|a| a["entity_id"].as_str().unwrap()).collect();
    assert_eq!(found, [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()]);
    let actor = cancelled[0]["actor"].as_str().unwrap().to_owned();
    let by_actor: Vec<Value> = app
        .http
        .get(app.url("/api/runtime/audit"))
        .query(&[("actor", actor.as_str()), ("action", "task_cancelled")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(by_actor.len(), 1, "{by_actor:?}");
    let (_, nobody) = app.get("/api/runtime/audit?actor=nobody-at-all").await;
    assert_eq!(nobody, json!([]));

    // A filter without an entity reads at most SCAN_LIMIT entries a page: below 10,050
    // newer entries of another action, the cancellation is found on a later page, and
    // the pages before it say where they stopped reading.
    sqlx::query(
        "INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
         SELECT 'filler-' || lpad(i::text, 6, '0'), 4102444800000 + i, 'worker_updated', 'worker', 'w', 'test', ''
         FROM generate_series(1, 10050) AS i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let pages = all_pages(&app, "/api/runtime/audit?action=task_cancelled&limit=5").await;
    assert!(pages.len() >= 2, "the first page stops after 10,000 entries: {}", pages.len());
    assert_eq!(pages[0], Vec::<Value>::new(), "none of the newest 10,000 matches");
    let found: Vec<&Value> = pages.iter().flatten().collect();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["entity_id"], ids[1].as_str());
    // Unfiltered pages are full until the end.
    let (_, newest) = app.get("/api/runtime/audit?limit=3").await;
    assert_eq!(newest.as_array().unwrap()[0]["id"], "filler-010050");
}

#[tokio::test]
async fn the_task_list_finds_prompts_by_prefix_and_pages_past_long_gaps() {
    let app = TestApp::spawn().await;
    let mut ids = Vec::new();
    for (context, prompt) in [("a", "Summarise the report"), ("b", "summarise the logs"), ("a", "Translate this")] {
        let t = app.submit_with(json!({"context_id": context, "agent_slug": "x", "prompt": prompt})).await;
        ids.push(t["id"].as_str().unwrap().to_owned());
    }

    // Ignoring case, newest first; with the other filters.
    let (status, found) = app.get("/api/runtime/llm-tasks?prompt_prefix=SUMMARISE%20the").await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(listed(&found), [ids[1].clone(), ids[0].clone()]);
    let (_, found) = app.get("/api/runtime/llm-tasks?prompt_prefix=summarise&context_id=a").await;
    assert_eq!(listed(&found), [ids[0].clone()]);
    let (_, found) = app.get("/api/runtime/llm-tasks?prompt_prefix=the%20report").await;
    assert_eq!(found, json!([]), "a prefix, not a substring");
    let (status, bad) = app.get(&format!("/api/runtime/llm-tasks?prompt_prefix={}", "x".repeat(1001))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(bad.to_string().contains("prompt_prefix"), "{bad}");

    // Below 10,050 newer tasks of another context, a filter by context or prompt reads
    // at most 10,000 tasks a page: the first pages are empty and say where they stopped.
    sqlx::query(
        "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at)
         SELECT 'filler-' || lpad(i::text, 6, '0'), 'filler', 'x', 'filler', 'completed', 4102444800000 + i, 0
         FROM generate_series(1, 10050) AS i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let pages = all_pages(&app, "/api/runtime/llm-tasks?context_id=a&limit=5").await;
    assert!(pages.len() >= 2, "the first page stops after 10,000 tasks: {}", pages.len());
    assert_eq!(pages[0], Vec::<Value>::new(), "none of the newest 10,000 matches");
    assert_eq!(listed(&json!(pages.concat())), [ids[2].clone(), ids[0].clone()]);
    let pages = all_pages(&app, "/api/runtime/llm-tasks?prompt_prefix=summarise&limit=1").await;
    assert_eq!(listed(&json!(pages.concat())), [ids[1].clone(), ids[0].clone()]);
    // Filtered by status only, pages are read from an index and full until the end.
    let (_, newest) = app.get("/api/runtime/llm-tasks?status=completed&limit=3").await;
    assert_eq!(listed(&newest), ["filler-010050", "filler-010049", "filler-010048"]);

    // A bulk cancellation takes the same filter: counted first, then done.
    let (status, dry) =
        app.post("/api/runtime/llm-tasks/cancel", json!({"prompt_prefix": "summarise", "dry_run": true})).await;
    assert_eq!((status, dry["matched"].clone()), (StatusCode::OK, json!(2)), "{dry}");
    let (_, done) = app.post("/api/runtime/llm-tasks/cancel", json!({"prompt_prefix": "Summarise"})).await;
    let mut cancelled: Vec<String> = serde_json::from_value(done["cancelled"].clone()).unwrap();
    cancelled.sort();
    let mut expected = vec![ids[0].clone(), ids[1].clone()];
    expected.sort();
    assert_eq!(cancelled, expected);
    assert_eq!(app.status_of(&ids[2]).await, "queued");
    let (status, bad) = app.post("/api/runtime/llm-tasks/cancel", json!({"prompt_prefix": ""})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(bad.to_string().contains("prompt_prefix"), "{bad}");
}

/// The ids of a listing, in its order.
fn listed(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_owned()).collect()
}

async fn submitted(app: &TestApp, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let t = app.submit_with(json!({"context_id": "audit", "agent_slug": "a", "prompt": format!("p{i}")})).await;
        ids.push(t["id"].as_str().unwrap().to_owned());
    }
    ids
}

#[tokio::test]
async fn stats_counted_up_to_a_limit_stop_there_and_say_so() {
    let app = TestApp::spawn().await;
    submitted(&app, 3).await;
    let (status, exact) = app.get("/api/runtime/stats").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((exact["tasks"]["by_status"]["queued"].as_i64(), exact["tasks"]["total"].as_i64()), (Some(3), Some(3)));
    assert!(exact.get("counted_up_to").is_none(), "the seed's shape: {exact}");

    let (status, capped) = app.get("/api/runtime/stats?count_limit=2").await;
    assert_eq!(status, StatusCode::OK, "{capped}");
    assert_eq!(capped["counted_up_to"], 2);
    assert_eq!(capped["tasks"]["by_status"], json!({"queued": 2}), "{capped}");
    assert_eq!(capped["tasks"]["total"], 2);
    let (_, roomy) = app.get("/api/runtime/stats?count_limit=100000").await;
    assert_eq!(roomy["tasks"], exact["tasks"], "under the limit the counts are exact");
    assert_eq!(roomy["workers"], exact["workers"]);

    let (status, bad) = app.get("/api/runtime/stats?count_limit=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(bad.to_string().contains("count_limit"), "{bad}");
}
