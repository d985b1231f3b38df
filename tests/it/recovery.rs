//! A dead process costs seconds, not a lease TTL (300 s in these tests): a claim whose
//! reconciler committed it but never answered is sent again and gets the same lease;
//! a worker restarting under the same id ends the leases its previous process held.

use std::time::{Duration, Instant};

use bloom::bus::names::RECONCILER_QUEUE;
use bloom::db::lifecycle::{self, Claim, ClaimOutcome};
use bloom::domain::TaskId;
use bloom::protocol::ClaimRequest;
use bloom::time::now_ms;
use futures::StreamExt;

use crate::common::{wait_for, TestApp};

/// A reconciler that dies after committing: it decides every claim it receives in
/// Postgres and never answers.
async fn silent_claimer(app: &TestApp) -> tokio::task::JoinHandle<()> {
    let mut claims = app.nats.queue_subscribe(app.names.claim_subject(), RECONCILER_QUEUE.into()).await.unwrap();
    app.nats.flush().await.unwrap();
    let pool = app.pool.clone();
    tokio::spawn(async move {
        while let Some(msg) = claims.next().await {
            let req: ClaimRequest = serde_json::from_slice(&msg.payload).unwrap();
            let batch: Vec<Claim> = req
                .items
                .iter()
                .map(|i| Claim {
                    task_id: i.task_id.clone(),
                    dispatch_seq: i.dispatch_seq,
                    worker_id: req.worker_id.clone(),
                    ttl_seconds: req.ttl_seconds,
                })
                .collect();
            let _ = lifecycle::claim(&pool, &batch, now_ms()).await;
        }
    })
}

#[tokio::test]
async fn a_claim_committed_but_never_answered_is_sent_again_and_granted_the_same_lease() {
    let app = TestApp::spawn().await;
    let (_r, _rc) = app.start_reconciler().await;
    let silent = silent_claimer(&app).await;
    // Claims sent again sooner than by default, so that a loaded machine still goes
    // through the rounds a claim answered by nobody takes well within the bound below.
    let mut settings = app.worker_settings("w1", 4);
    settings.claim_timeout = Duration::from_millis(500);
    let (_w, _) = app.start_worker_with(settings).await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for i in 0..12 {
        ids.push(app.submit(&format!("t{i}")).await["id"].as_str().unwrap().to_owned());
    }
    wait_for("every task completed", Duration::from_secs(60), || async {
        app.count("SELECT count(*) FROM llm_tasks WHERE status = 'completed'").await == 12
    })
    .await;
    // Half the claims went to the silent member: they were decided, unanswered, sent
    // again and granted the lease already held; no lease expired and each task has one.
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert_eq!(app.count("SELECT count(*) FROM leases").await, 12);
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'expired'").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks WHERE attempts <> 1").await, 0);
    silent.abort();
    app.stop().await;
}

#[tokio::test]
async fn a_restarted_worker_ends_the_leases_of_its_previous_process() {
    let app = TestApp::spawn().await;
    let (_r, _rc) = app.start_reconciler().await;
    app.register_worker("w1", 1).await;
    let id = TaskId::from(app.submit("held by a dead process").await["id"].as_str().unwrap());
    // The previous process of `w1` claimed it and died.
    let claim = Claim { task_id: id.clone(), dispatch_seq: 1, worker_id: "w1".into(), ttl_seconds: 300 };
    assert!(matches!(lifecycle::claim(&app.pool, &[claim], now_ms()).await.unwrap()[0], ClaimOutcome::Granted(_)));
    let (_w, _) = app.start_worker("w1", 1).await;
    wait_for("task completed", Duration::from_secs(20), || async { app.status_of(id.as_str()).await == "completed" })
        .await;
    let (_, audit) = app.get("/api/runtime/audit?limit=100").await;
    let ended = audit.as_array().unwrap().iter().any(|e| {
        e["action"] == "lease_expired" && e["detail"].as_str().unwrap().contains("ended: its worker restarted")
    });
    assert!(ended, "{audit}");
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'active'").await, 0);
    app.stop().await;
}
