//! Sticky tasks of a worker that goes silent are rerouted to the shared pool, and the
//! tasks it held are run again.

use std::time::Duration;

use bloom::db::lifecycle::{self, Claim, ClaimOutcome};
use bloom::db::workers;
use bloom::domain::{TaskId, WorkerId};
use bloom::time::now_ms;
use serde_json::json;

use crate::common::{wait_for, TestApp};

#[tokio::test]
async fn queued_tasks_routed_to_a_silent_worker_go_to_the_pool() {
    let app = TestApp::spawn().await;
    // A NATS worker `ghost`, online with two slots, holding a lease of context "ctx".
    let ghost = WorkerId::from("ghost");
    let beat = crate::common::online_beat(ghost.as_str(), 2);
    workers::record_beats(&app.pool, &[beat], bloom::time::now_ms()).await.unwrap();
    let first = app.submit_with(json!({"context_id": "ctx", "agent_slug": "a", "prompt": "first"})).await;
    let claim = Claim {
        task_id: TaskId::from(first["id"].as_str().unwrap()),
        dispatch_seq: 1,
        worker_id: ghost.clone(),
        ttl_seconds: 300,
    };
    assert!(matches!(lifecycle::claim(&app.pool, &[claim], now_ms()).await.unwrap()[0], ClaimOutcome::Granted(_)));

    // The next task of the context is routed to ghost's direct subject.
    let next = app.submit_with(json!({"context_id": "ctx", "agent_slug": "a", "prompt": "next"})).await;
    let next_id = next["id"].as_str().unwrap().to_owned();
    let routed: Option<String> = sqlx::query_scalar("SELECT routed_to FROM llm_tasks WHERE id = $1")
        .bind(&next_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(routed.as_deref(), Some("ghost"));

    // Ghost goes silent; the reconciler marks it offline and moves the task to the pool,
    // where another worker takes it.
    sqlx::query("UPDATE workers SET last_heartbeat = 0 WHERE id = 'ghost'").execute(&app.pool).await.unwrap();
    let (r, _) = app.start_reconciler().await;
    app.start_worker("pool-worker", 2).await;
    wait_for("rerouted task completed", Duration::from_secs(30), || async {
        app.status_of(&next_id).await == "completed"
    })
    .await;
    let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{next_id}")).await;
    assert_eq!(t["worker_id"], "pool-worker");
    // The task ghost held is run again too, without waiting for its lease's TTL.
    let first_id = first["id"].as_str().unwrap().to_owned();
    wait_for("the silent worker's task completed", Duration::from_secs(30), || async {
        app.status_of(&first_id).await == "completed"
    })
    .await;
    let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{first_id}")).await;
    assert_eq!((t["worker_id"].as_str(), t["attempts"].as_i64()), (Some("pool-worker"), Some(2)), "{t}");
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE worker_id = 'ghost' AND status = 'expired'").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM workers WHERE id = 'ghost' AND status = 'offline'").await, 1);
    assert_eq!(r.metrics.tasks_rerouted_total.get(), 1);
    // Ghost was taken for silent once, audited; the metric counts every worker marked
    // offline (the pool worker too, had the machine stalled past the worker timeout).
    let offline =
        |id: &str| format!("SELECT count(*) FROM audit_logs WHERE action = 'worker_offline' AND entity_id LIKE '{id}'");
    assert_eq!(app.count(&offline("ghost")).await, 1);
    assert_eq!(r.metrics.workers_marked_offline_total.get() as i64, app.count(&offline("%")).await);
    let dispatch_seq: i64 = sqlx::query_scalar("SELECT dispatch_seq FROM llm_tasks WHERE id = $1")
        .bind(&next_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // At least one: a task left queued long enough (a stalled machine) is dispatched
    // again besides.
    assert!(dispatch_seq >= 2, "rerouting made a new dispatch");
    let (_, audit) = app.get("/api/runtime/audit?limit=1000").await;
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["action"] == "task_rerouted" && a["entity_id"] == next_id.as_str()));
    app.stop().await;
}
