//! REST parity of `/api/runtime/llm-tasks` and the read endpoints with the seed.

use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

use crate::common::{Opts, TestApp};

#[tokio::test]
async fn create_fills_the_seed_defaults_and_returns_the_seed_shape() {
    let app = TestApp::spawn().await;
    let task = app.submit("hello").await;
    let keys: Vec<&str> = task.as_object().unwrap().keys().map(String::as_str).collect();
    let mut expected = vec![
        "id",
        "context_id",
        "agent_slug",
        "prompt",
        "context_hints",
        "policy",
        "desired_format",
        "status",
        "created_at",
        "updated_at",
        "lease_id",
        "worker_id",
        "attempts",
        "max_attempts",
    ];
    let mut got = keys.clone();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    assert_eq!(task["status"], "queued");
    assert_eq!(task["context_hints"], json!([]));
    assert_eq!(task["policy"]["timeout_sec"], 120);
    // Written as JavaScript writes it: 0, not 0.0.
    assert_eq!(task["policy"]["budget"], json!(0));
    assert_eq!(task["desired_format"], "text");
    assert_eq!(task["attempts"], 0);
    assert_eq!(task["max_attempts"], 3);
    assert_eq!(task["lease_id"], json!(null));
    assert_eq!(task["created_at"], task["updated_at"]);

    let (status, fetched) = app.get(&format!("/api/runtime/llm-tasks/{}", task["id"].as_str().unwrap())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fetched, task);
    // The creation is audited in the same transaction.
    let (_, audit) = app.get("/api/runtime/audit").await;
    assert_eq!(audit[0]["action"], "task_created");
    assert_eq!(audit[0]["entity_id"], task["id"]);
    app.stop().await;
}

#[tokio::test]
async fn create_validates_like_the_seed_and_names_each_field() {
    let app = TestApp::spawn().await;
    let (status, body) = app
        .post(
            "/api/runtime/llm-tasks",
            json!({"context_id": "", "prompt": 5, "policy": {"timeout_sec": 3601}, "desired_format": "xml",
                   "max_attempts": 11, "context_hints": ["ok", 1]}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let fields = &body["error"]["fieldErrors"];
    assert_eq!(fields["context_id"][0], "String must contain at least 1 character(s)");
    assert_eq!(fields["agent_slug"][0], "Required");
    assert_eq!(fields["prompt"][0], "Expected string, received number");
    // Failures inside nested values are filed under their top-level field, as zod's
    // flatten() files them.
    assert_eq!(fields["policy"][0], "Number must be less than or equal to 3600");
    assert_eq!(fields["desired_format"][0], "Invalid enum value. Expected 'json' | 'text', received 'xml'");
    assert_eq!(fields["max_attempts"][0], "Number must be less than or equal to 10");
    assert_eq!(fields["context_hints"][0], "Expected string, received number");
    assert_eq!(fields.as_object().unwrap().len(), 7, "{fields}");

    for (body, field) in [
        (json!({"context_id": "c", "agent_slug": "a", "prompt": "p", "policy": {"timeout_sec": 0}}), "policy"),
        (json!({"context_id": "c", "agent_slug": "a", "prompt": "p", "policy": {"timeout_sec": 1.5}}), "policy"),
        (json!({"context_id": "c", "agent_slug": "a", "prompt": "p", "policy": {"budget": -1}}), "policy"),
        (json!({"context_id": "c", "agent_slug": "a", "prompt": "p", "desired_format": null}), "desired_format"),
        (json!({"context_id": "c", "agent_slug": "a", "prompt": "p", "max_attempts": 0}), "max_attempts"),
    ] {
        let (status, resp) = app.post("/api/runtime/llm-tasks", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(resp["error"]["fieldErrors"][field].is_array(), "{field}: {resp}");
    }
    // Bodies that are not JSON objects are 400s, never 500s, and nothing is stored.
    let r = app.http.post(app.url("/api/runtime/llm-tasks")).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // The original's error handler answered unreadable bodies with `message`.
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().starts_with("Invalid JSON body"), "{body}");
    assert_eq!(body["error"], body["message"]);
    let (status, body) = app.post("/api/runtime/llm-tasks", json!([1, 2])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["formErrors"][0], "Expected object, received array");
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn unknown_task_is_404_and_lists_are_newest_first_with_filters_and_cursor() {
    let clock = bloom::time::Clock::manual(bloom::time::now_ms());
    let app = TestApp::spawn_with(Opts { clock: Some(clock.clone()), ..Opts::default() }).await;
    let (status, body) = app.get("/api/runtime/llm-tasks/nope").await;
    assert_eq!((status, body), (StatusCode::NOT_FOUND, json!({"error": "Task not found"})));

    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(app.submit(&format!("p{i}")).await["id"].as_str().unwrap().to_owned());
        clock.advance(std::time::Duration::from_millis(3));
    }
    let (_, all) = app.get("/api/runtime/llm-tasks").await;
    let listed: Vec<&str> = all.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);

    let (_, queued) = app.get("/api/runtime/llm-tasks?status=queued").await;
    assert_eq!(queued.as_array().unwrap().len(), 5);
    let (_, done) = app.get("/api/runtime/llm-tasks?status=completed").await;
    assert_eq!(done, json!([]));
    // A status no task can have matches none, as in the original.
    let (status, none) = app.get("/api/runtime/llm-tasks?status=bogus").await;
    assert_eq!((status, none), (StatusCode::OK, json!([])));

    // Pages of two, following X-Next-Cursor.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/runtime/llm-tasks?limit=2&cursor={c}"),
            None => "/api/runtime/llm-tasks?limit=2".to_owned(),
        };
        let r = app.http.get(app.url(&path)).send().await.unwrap();
        cursor = r.headers().get("x-next-cursor").map(|v| v.to_str().unwrap().to_owned());
        let page: Vec<serde_json::Value> = r.json().await.unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|t| t["id"].as_str().unwrap().to_owned()));
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen, ids.iter().rev().cloned().collect::<Vec<_>>());
    // `limit` reads as the original's parseInt(limit) || 100; only a negative one is refused.
    for (limit, expected) in [("0", 5), ("abc", 5), ("3abc", 3)] {
        let (status, page) = app.get(&format!("/api/runtime/llm-tasks?limit={limit}")).await;
        assert_eq!((status, page.as_array().unwrap().len()), (StatusCode::OK, expected), "limit={limit}");
    }
    let (status, bad) = app.get("/api/runtime/llm-tasks?limit=-1").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(bad["error"]["fieldErrors"]["limit"].is_array());
    let (_, runs) = app.get("/api/runtime/runs").await;
    assert_eq!(runs.as_array().unwrap().len(), 5);
    app.stop().await;
}

#[tokio::test]
async fn rest_worker_protocol_lease_heartbeat_complete() {
    let app = TestApp::spawn().await;
    let (status, body) = app.post("/api/runtime/llm-tasks/nope/lease", json!({})).await;
    assert_eq!((status, body["error"].clone()), (StatusCode::NOT_FOUND, json!("Task not found")));
    let task = app.submit("hi").await;
    let id = task["id"].as_str().unwrap();
    // No worker yet.
    let (status, body) = app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({})).await;
    assert_eq!(
        (status, body),
        (StatusCode::SERVICE_UNAVAILABLE, json!({"error": "No available worker with free capacity"}))
    );

    app.register_worker("w1", 2).await;
    let (status, leased) = app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({"ttl_seconds": 60})).await;
    assert_eq!(status, StatusCode::CREATED, "{leased}");
    let lease = &leased["lease"];
    assert_eq!(lease["worker_id"], "w1");
    assert_eq!(lease["status"], "active");
    assert_eq!(lease["ttl_seconds"], 60);
    assert_eq!(lease["context_id"], "ctx-1");
    assert_eq!(lease["expires_at"].as_i64().unwrap() - lease["started_at"].as_i64().unwrap(), 60_000);
    assert_eq!(leased["worker"]["id"], "w1");
    let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{id}")).await;
    assert_eq!(
        (t["status"].clone(), t["attempts"].clone(), t["lease_id"].clone()),
        (json!("leased"), json!(1), lease["id"].clone())
    );

    // A second lease of the same task conflicts.
    let (status, body) = app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({})).await;
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::CONFLICT, json!("Task status is 'leased', expected 'queued'"))
    );

    let (status, hb) = app.post(&format!("/api/runtime/llm-tasks/{id}/heartbeat"), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{hb}");
    assert_eq!(hb["expires_at"], hb["lease"]["expires_at"]);
    assert_eq!(app.status_of(id).await, "running");

    // Completion validates like the seed.
    let (status, body) = app.post(&format!("/api/runtime/llm-tasks/{id}/complete"), json!({"status": "done"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["fieldErrors"]["metrics"].is_array() && body["error"]["fieldErrors"]["status"].is_array());

    let (status, done) = app
        .post(
            &format!("/api/runtime/llm-tasks/{id}/complete"),
            json!({"status": "success", "output": "42", "metrics": {"duration_ms": 7, "tokens_used": 3},
                   "artifact_tags": ["t"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["task"]["status"], "completed");
    assert_eq!(done["artifact"]["type"], "LLM_RESULT");
    assert_eq!(done["artifact"]["content"], "42");
    assert_eq!(done["artifact"]["tags"], json!(["t"]));
    assert_eq!(done["artifact"]["finalized"], true);
    assert_eq!(done["result"]["status"], "success");
    assert_eq!(done["result"]["worker_id"], "w1");
    assert_eq!(done["result"]["artifact_id"], done["artifact"]["id"]);
    assert_eq!(done["result"]["metrics"], json!({"duration_ms": 7, "tokens_used": 3}));
    let (_, leases) = app.get("/api/runtime/leases?status=released").await;
    assert_eq!(leases[0]["id"], lease["id"]);
    assert_eq!(app.get("/api/runtime/leases?status=bogus").await, (StatusCode::OK, json!([])));

    // A completed task cannot be completed, heartbeated or requeued.
    let (status, _) = app
        .post(
            &format!("/api/runtime/llm-tasks/{id}/complete"),
            json!({"status": "success", "metrics": {"duration_ms": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, body) = app.post(&format!("/api/runtime/llm-tasks/{id}/heartbeat"), json!({})).await;
    assert_eq!((status, body["error"].clone()), (StatusCode::NOT_FOUND, json!("Lease not found or already expired")));
    let (status, body) = app.post(&format!("/api/runtime/llm-tasks/{id}/requeue"), json!({})).await;
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::CONFLICT, json!("Cannot requeue task with status 'completed'"))
    );

    let (_, artifacts) = app.get(&format!("/api/runtime/artifacts?task_id={id}")).await;
    assert_eq!(artifacts.as_array().unwrap().len(), 1);
    let content =
        app.get_text(&format!("/api/runtime/artifacts/{}/content", done["artifact"]["id"].as_str().unwrap())).await;
    assert_eq!(content, "42");

    let (_, stats) = app.get("/api/runtime/stats").await;
    assert_eq!(stats["tasks"], json!({"total": 1, "by_status": {"completed": 1}}));
    assert_eq!(stats["leases"], json!({"total": 1, "active": 0}));
    assert_eq!(stats["workers"], json!({"total": 1, "online": 1}));
    app.stop().await;
}

#[tokio::test]
async fn error_completion_fails_the_task_and_requeue_starts_over_with_history_kept() {
    let app = TestApp::spawn().await;
    app.register_worker("w1", 1).await;
    let (id, _) = app.leased_task("x").await;
    let (status, done) = app
        .post(
            &format!("/api/runtime/llm-tasks/{id}/complete"),
            json!({"status": "error", "error_message": "boom", "metrics": {"duration_ms": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(done["task"]["status"], "failed");
    assert_eq!(done["result"]["error_message"], "boom");

    let (status, requeued) = app.post(&format!("/api/runtime/llm-tasks/{id}/requeue"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (requeued["status"].clone(), requeued["attempts"].clone(), requeued["lease_id"].clone()),
        (json!("queued"), json!(0), json!(null))
    );
    let (_, audit) = app.get("/api/runtime/audit?limit=2").await;
    assert_eq!(
        (audit[0]["action"].clone(), audit[0]["detail"].clone()),
        (json!("task_requeued"), json!("Requeued from failed"))
    );
    assert_eq!(
        (audit[1]["action"].clone(), audit[1]["detail"].clone()),
        (json!("attempts_reset"), json!("Attempts reset to 0 from 1"))
    );
    // The earlier lease and result remain as history.
    assert_eq!(app.count("SELECT count(*) FROM leases").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM llm_results").await, 1);
    // The requeue went through the outbox: a dispatch row was written.
    assert_eq!(app.count("SELECT max(dispatch_seq) FROM llm_tasks").await, 2);
    let (status, _) = app.post("/api/runtime/llm-tasks/nope/requeue", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.stop().await;
}

#[tokio::test]
async fn lease_picks_sticky_then_most_free_worker_and_honours_explicit_worker() {
    let app = TestApp::spawn().await;
    app.register_worker("small", 2).await;
    app.register_worker("big", 4).await;
    let lease = |id: String, body: serde_json::Value| {
        let app = &app;
        async move { app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), body).await }
    };
    let id = |t: serde_json::Value| t["id"].as_str().unwrap().to_owned();
    let other = app.submit_with(json!({"context_id": "other", "agent_slug": "a", "prompt": "o"})).await;
    let (_, l) = lease(id(other), json!({})).await;
    assert_eq!(l["worker"]["id"], "big", "most free capacity");
    // Explicit worker.
    let (status, l) = lease(id(app.submit("a").await), json!({"worker_id": "small"})).await;
    assert_eq!((status, l["worker"]["id"].clone()), (StatusCode::CREATED, json!("small")));
    // Same context: sticky to the worker holding its active lease, though big has more room.
    let (_, l) = lease(id(app.submit("b").await), json!({})).await;
    assert_eq!(l["worker"]["id"], "small");
    // The worker as it was chosen, before this lease (as the original answered).
    assert_eq!(l["worker"]["active_leases"], 1);
    // The sticky worker is full: fall back to the most free one.
    let (_, l) = lease(id(app.submit("c").await), json!({})).await;
    assert_eq!(l["worker"]["id"], "big");
    let d = id(app.submit("d").await);
    let (status, _) = lease(d.clone(), json!({"worker_id": "ghost"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = lease(d.clone(), json!({"ttl_seconds": "long"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["fieldErrors"]["ttl_seconds"].is_array());
    // An empty worker id names no worker, as the seed reads it (falsy): one is picked.
    let (status, l) = lease(d, json!({"worker_id": ""})).await;
    assert_eq!((status, l["worker"]["id"].clone()), (StatusCode::CREATED, json!("big")));
    let (_, workers) = app.get("/api/runtime/workers").await;
    let small = workers.as_array().unwrap().iter().find(|w| w["id"] == "small").unwrap();
    assert_eq!(small["active_leases"], 2);
    app.stop().await;
}

/// While the server behind the database address refuses writes (a primary demoted during
/// a failover), submissions answer 503 and store nothing; once a writable server is back
/// behind the address, they are accepted again on fresh connections.
#[tokio::test]
async fn submissions_answer_503_while_postgres_is_read_only_and_succeed_after() {
    let app = TestApp::spawn().await;
    let db: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&app.pool).await.unwrap();
    let admin = sqlx::PgPool::connect(&crate::common::admin_db_url()).await.unwrap();
    // Every new session of the database is read-only, and the current ones are ended,
    // as when the address moves to another server.
    let switch = |read_only: bool| {
        let (admin, db) = (admin.clone(), db.clone());
        async move {
            let set = if read_only {
                "SET default_transaction_read_only = on"
            } else {
                "RESET default_transaction_read_only"
            };
            sqlx::query(&format!("ALTER DATABASE \"{db}\" {set}")).execute(&admin).await.unwrap();
            sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
                .bind(&db)
                .execute(&admin)
                .await
                .unwrap();
        }
    };
    let body = json!({"context_id": "c", "agent_slug": "a", "prompt": "during a failover"});
    switch(true).await;
    for _ in 0..3 {
        let (status, resp) = app.post("/api/runtime/llm-tasks", body.clone()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{resp}");
        assert!(resp["error"].as_str().unwrap().contains("retry"), "{resp}");
    }
    switch(false).await;
    let mut accepted = None;
    for _ in 0..20 {
        let (status, resp) = app.post("/api/runtime/llm-tasks", body.clone()).await;
        if status == StatusCode::CREATED {
            accepted = Some(resp);
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{resp}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted.is_some(), "accepted once the server is writable again");
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks").await, 1, "nothing stored by the refused ones");
    app.stop().await;
}

/// The upstream web client reads `/leases` unfiltered and keeps the active ones: a lease
/// older than the first page's leases is still in it while it is active.
#[tokio::test]
async fn the_first_page_of_leases_holds_every_active_lease() {
    let app = TestApp::spawn().await;
    app.register_worker("w1", 2).await;
    let (_, long_run) = app.leased_task("a long run").await;
    let long_id = long_run["lease"]["id"].clone();
    for i in 0..105 {
        let (id, _) = app.leased_task(&format!("short {i}")).await;
        let done = json!({"status": "success", "metrics": {"duration_ms": 1}});
        let (status, body) = app.post(&format!("/api/runtime/llm-tasks/{id}/complete"), done).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    let r = app.http.get(app.url("/api/runtime/leases")).send().await.unwrap();
    let cursor = r.headers().get("x-next-cursor").expect("more pages").to_str().unwrap().to_owned();
    let first: Vec<serde_json::Value> = r.json().await.unwrap();
    assert_eq!(first.len(), 101, "the newest 100 and the older active one");
    assert!(first[..100].iter().all(|l| l["status"] == "released"));
    assert_eq!((&first[100]["id"], &first[100]["status"]), (&long_id, &json!("active")));
    let started: Vec<i64> = first.iter().map(|l| l["started_at"].as_i64().unwrap()).collect();
    assert!(started.windows(2).all(|w| w[0] >= w[1]), "most recent first");

    // The next page goes on after the 100th, where the active lease shows again.
    let (_, rest) = app.get(&format!("/api/runtime/leases?cursor={cursor}")).await;
    let rest = rest.as_array().unwrap();
    assert_eq!(rest.len(), 6);
    assert_eq!(rest[5]["id"], long_id);
    // A status filter, a limit, or a page that is not full adds nothing.
    let (_, active) = app.get("/api/runtime/leases?status=active").await;
    assert_eq!(active.as_array().unwrap().len(), 1);
    let (_, limited) = app.get("/api/runtime/leases?limit=100").await;
    assert_eq!(limited.as_array().unwrap().len(), 100);
    let (_, all) = app.get("/api/runtime/leases?limit=1000").await;
    assert_eq!(all.as_array().unwrap().len(), 106);
}
