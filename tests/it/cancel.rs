//! Cancellation: queued tasks stop at once, running ones have their executor's process
//! group killed by the worker; a cancelled task keeps its history and can be requeued.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{wait_for, TestApp};

#[tokio::test]
async fn a_queued_task_is_cancelled_at_once_never_runs_and_can_be_requeued() {
    let app = TestApp::spawn().await;
    app.start_reconciler().await;
    let task = app.submit("never run").await;
    let id = task["id"].as_str().unwrap().to_owned();

    let (status, cancelled) = app.post(&format!("/api/runtime/llm-tasks/{id}/cancel"), json!({})).await;
    assert_eq!((status, cancelled["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
    // Its dispatch is still on the bus: a worker now gets it, and its claim is refused.
    app.start_worker("w1", 2).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(app.status_of(&id).await, "cancelled");
    assert_eq!(app.count("SELECT count(*) FROM leases").await, 0, "never leased");
    let (status, again) = app.post(&format!("/api/runtime/llm-tasks/{id}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    assert!(again["error"].as_str().unwrap().contains("'cancelled'"), "{again}");
    let (status, missing) = app.post("/api/runtime/llm-tasks/nope/cancel", json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
    assert_eq!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'task_cancelled'").await, 1);
    let (_, stats) = app.get("/api/runtime/stats").await;
    assert_eq!(stats["tasks"]["by_status"]["cancelled"], 1, "{stats}");

    let (status, requeued) = app.post(&format!("/api/runtime/llm-tasks/{id}/requeue"), json!({})).await;
    assert_eq!((status, requeued["status"].as_str()), (StatusCode::OK, Some("queued")), "{requeued}");
    wait_for("the requeued task completed", Duration::from_secs(15), || async {
        app.status_of(&id).await == "completed"
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_running_task_is_cancelled_and_its_executor_process_group_killed_within_two_seconds() {
    let app = TestApp::spawn().await;
    app.start_reconciler().await;
    let pid_file = std::env::temp_dir().join(format!("bloom-cancel-{}.pids", bloom::domain::new_id()));
    let pids = pid_file.clone();
    // The shell and a child of its own: both are in the executor's process group.
    let command = format!("sleep 60 & echo $! >> {p}; echo $$ >> {p}; wait", p = pids.display());
    let mut settings = app.worker_settings("w1", 1);
    settings.executor = bloom::worker::executor::Executor::Command { command, max_output_bytes: 1 << 16 };
    app.start_worker_with(settings).await;
    let id = app.submit("long").await["id"].as_str().unwrap().to_owned();
    wait_for("both processes started", Duration::from_secs(15), || async {
        std::fs::read_to_string(&pids).map(|s| s.lines().count() == 2).unwrap_or(false)
    })
    .await;
    let pids: Vec<i32> = std::fs::read_to_string(&pids).unwrap().lines().map(|l| l.trim().parse().unwrap()).collect();
    // Running: listed in /proc and not a zombie (a killed process stays listed until its
    // parent, or init for the orphaned child, reaps it).
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
            .unwrap_or(false)
    };
    assert!(pids.iter().all(|p| alive(*p)));

    let asked = Instant::now();
    let (status, cancelled) = app.post(&format!("/api/runtime/llm-tasks/{id}/cancel"), json!({})).await;
    assert_eq!((status, cancelled["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
    wait_for("the executor's processes gone", Duration::from_secs(2), || async { !pids.iter().any(|p| alive(*p)) })
        .await;
    let gone_after = asked.elapsed();
    assert!(gone_after < Duration::from_secs(2), "{gone_after:?}");
    eprintln!("cancel: the executor's processes were gone {gone_after:?} after the request");
    let lease: String = sqlx::query_scalar("SELECT status FROM leases").fetch_one(&app.pool).await.unwrap();
    assert_eq!(lease, "cancelled");
    // The lease reads as it is stored, in the lease list and in the task's history.
    let (status, leases) = app.get("/api/runtime/leases?status=cancelled").await;
    assert_eq!((status, leases.as_array().map(Vec::len)), (StatusCode::OK, Some(1)), "{leases}");
    let (status, history) = app.get(&format!("/api/runtime/llm-tasks/{id}/history")).await;
    assert_eq!((status, history["leases"][0]["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{history}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = std::fs::remove_file(&pid_file);
    assert_eq!(app.status_of(&id).await, "cancelled", "never completed");
    assert_eq!(app.count(&format!("SELECT count(*) FROM llm_results WHERE task_id = '{id}'")).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn tasks_are_cancelled_in_bulk_by_context_after_a_dry_run_count() {
    let app = TestApp::spawn().await;
    for i in 0..3 {
        app.submit_with(json!({"context_id": "sweep", "agent_slug": "a", "prompt": format!("p{i}")})).await;
    }
    let keep = app.submit_with(json!({"context_id": "other", "agent_slug": "a", "prompt": "keep"})).await;
    let (status, refused) = app.post("/api/runtime/llm-tasks/cancel", json!({"dry_run": true})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "nothing selected: {refused}");
    assert!(refused["error"]["fieldErrors"]["ids"].is_array(), "{refused}");
    let (status, refused) =
        app.post("/api/runtime/llm-tasks/cancel", json!({"context_id": "sweep", "status": ["completed"]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(refused["error"]["fieldErrors"]["status"].is_array(), "{refused}");

    let (status, dry) =
        app.post("/api/runtime/llm-tasks/cancel", json!({"context_id": "sweep", "dry_run": true})).await;
    assert_eq!(status, StatusCode::OK, "{dry}");
    assert_eq!((dry["matched"].as_i64(), dry["cancelled"].as_array().map(Vec::len)), (Some(3), Some(0)), "{dry}");
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks WHERE status = 'cancelled'").await, 0, "a dry run");

    let (status, done) = app.post("/api/runtime/llm-tasks/cancel", json!({"context_id": "sweep"})).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!((done["matched"].as_i64(), done["cancelled"].as_array().map(Vec::len)), (Some(3), Some(3)), "{done}");
    assert_eq!(
        app.count("SELECT count(*) FROM llm_tasks WHERE status = 'cancelled' AND context_id = 'sweep'").await,
        3
    );
    assert_eq!(app.status_of(keep["id"].as_str().unwrap()).await, "queued");
    assert_eq!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'task_cancelled'").await, 3);
    let (_, again) = app.post("/api/runtime/llm-tasks/cancel", json!({"context_id": "sweep"})).await;
    assert_eq!(again["matched"], 0, "{again}");
    app.stop().await;
}
