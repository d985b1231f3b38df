//! Draining a worker: it takes no new task, finishes what it runs, and takes tasks again
//! once resumed; a `bloom-worker` learns it from a notice, or from its start and beats.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{wait_for, TestApp};

/// The worker a task's lease went to.
async fn worker_of(app: &TestApp, task: &str) -> String {
    sqlx::query_scalar("SELECT worker_id FROM leases WHERE task_id = $1 ORDER BY started_at DESC LIMIT 1")
        .bind(task)
        .fetch_one(&app.pool)
        .await
        .unwrap()
}

fn id_of(task: Value) -> String {
    task["id"].as_str().unwrap().to_owned()
}

async fn completed(app: &TestApp, id: &str) {
    wait_for("task completed", Duration::from_secs(30), || async { app.status_of(id).await == "completed" }).await;
}

#[tokio::test]
async fn a_drained_worker_finishes_its_runs_takes_nothing_new_and_resumes() {
    let app = TestApp::spawn().await;
    let (_r, _) = app.start_reconciler().await;
    let (w1, _) = app.start_worker("w1", 2).await;
    let running = id_of(app.submit("sleep:1500").await);
    wait_for("leased", Duration::from_secs(20), || async { app.status_of(&running).await != "queued" }).await;

    let (status, w) = app.post("/api/runtime/workers/w1/drain", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{w}");
    assert!(w["draining_since"].as_i64().is_some(), "{w}");
    // Drained while a task was queued behind: that task waits, the running one finishes.
    let waiting = id_of(app.submit("after the drain").await);
    completed(&app, &running).await;
    assert_eq!(worker_of(&app, &running).await, "w1");
    // Another worker takes it: the drained one never leased it.
    let (w2, _) = app.start_worker("w2", 2).await;
    completed(&app, &waiting).await;
    assert_eq!(worker_of(&app, &waiting).await, "w2");
    assert_eq!(app.count(&format!("SELECT count(*) FROM leases WHERE task_id = '{waiting}'")).await, 1);

    // Draining twice changes nothing; each change is audited once.
    let (status, _) = app.post("/api/runtime/workers/w1/drain", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, entries) = app.get("/api/runtime/audit?entity_id=w1&action=worker_draining").await;
    assert_eq!(entries.as_array().unwrap().len(), 1, "{entries}");

    // w1 resumed and w2 drained: the next task goes to w1.
    let (status, w) = app.post("/api/runtime/workers/w1/resume", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(w.get("draining_since").is_none(), "shown only while draining: {w}");
    let (status, _) = app.post("/api/runtime/workers/w2/drain", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let next = id_of(app.submit("after the resume").await);
    completed(&app, &next).await;
    assert_eq!(worker_of(&app, &next).await, "w1");
    let (_, entries) = app.get("/api/runtime/audit?entity_id=w1&action=worker_resumed").await;
    assert_eq!(entries.as_array().unwrap().len(), 1, "{entries}");

    // A drained worker that restarts stays drained: it learns it when it starts.
    w2.cancel();
    let (_w2, _) = app.start_worker("w2", 2).await;
    w1.cancel();
    wait_for("w1 offline", Duration::from_secs(20), || async {
        app.count("SELECT count(*) FROM workers WHERE id = 'w1' AND status = 'offline'").await == 1
    })
    .await;
    let stranded = id_of(app.submit("while only a drained worker runs").await);
    let (_w1, _) = app.start_worker("w1", 2).await;
    completed(&app, &stranded).await;
    assert_eq!(worker_of(&app, &stranded).await, "w1", "w2 restarted drained and took nothing");
    app.stop().await;
}

#[tokio::test]
async fn a_worker_that_missed_its_notice_is_told_again_when_it_beats() {
    let app = TestApp::spawn().await;
    let (_r, _) = app.start_reconciler().await;
    let (_w1, _) = app.start_worker("w1", 1).await;
    wait_for("w1 online", Duration::from_secs(20), || async {
        app.count("SELECT count(*) FROM workers WHERE id = 'w1' AND status = 'online'").await == 1
    })
    .await;
    let mut notices = app.nats.subscribe(app.names.drain_subject()).await.unwrap();
    app.nats.flush().await.unwrap();
    // Drained in Postgres only, as if the notice had been lost.
    sqlx::query("UPDATE workers SET draining_since = 1 WHERE id = 'w1'").execute(&app.pool).await.unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut notices))
        .await
        .expect("a notice after the next beat")
        .unwrap();
    let notice: Value = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(notice, json!({"worker_id": "w1", "draining": true}));
    // Its claims meanwhile find it full: a task submitted now waits for a resume.
    let id = id_of(app.submit("held").await);
    let (_w2, _) = app.start_worker("w2", 1).await;
    completed(&app, &id).await;
    assert_eq!(worker_of(&app, &id).await, "w2");
    app.stop().await;
}

#[tokio::test]
async fn drained_rest_workers_are_refused_leases_and_unknown_workers_are_404() {
    let app = TestApp::spawn().await;
    let (status, _) = app.post("/api/runtime/workers", json!({"name": "rest-1"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, w) = app.post("/api/runtime/workers/rest-1/drain", json!({})).await;
    assert_eq!((status, w["transport"].clone()), (StatusCode::OK, json!("rest")), "{w}");
    let id = id_of(app.submit("for a REST worker").await);
    let (status, body) = app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({"worker_id": "rest-1"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(app.status_of(&id).await, "queued");
    let (status, _) = app.post("/api/runtime/workers/rest-1/resume", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({"worker_id": "rest-1"})).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    for action in ["drain", "resume"] {
        let (status, body) = app.post(&format!("/api/runtime/workers/nobody/{action}"), json!({})).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
}
