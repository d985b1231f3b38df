//! A dead process costs seconds, not a lease TTL (300 s in these tests): a claim whose
//! reconciler committed it but never answered is sent again and gets the same lease;
//! claims follow the replica that answers them and leave it when it stops;
//! a worker restarting under the same id ends the leases its previous process held.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bloom::bus::names::RECONCILER_QUEUE;
use bloom::db::lifecycle::{self, Claim, ClaimOutcome};
use bloom::domain::TaskId;
use bloom::protocol::{ClaimDecision, ClaimReply, ClaimRequest, LeaseGrant};
use bloom::time::now_ms;
use futures::StreamExt;

use crate::common::{wait_for, TestApp};
use bloom::reconciler::Reconciler;

/// What a fake replica does with the claims after the first one it answers.
#[derive(Clone, Copy)]
enum Then {
    /// Decides them in Postgres and never answers: it died after committing.
    Silent,
    /// Answers that it cannot decide (its Postgres connections failing), deciding nothing.
    Unavailable,
}

/// A reconciler replica taking claims through the queue group and on its own subject: it
/// decides and answers the first one, naming itself so the worker sends it its next
/// claims, then does what `then` says. Returns the number of claims it received so far.
async fn fake_replica(
    app: &TestApp,
    replica: &'static str,
    then: Then,
) -> (Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let group = app.nats.queue_subscribe(app.names.claim_subject(), RECONCILER_QUEUE.into()).await.unwrap();
    let own = app.nats.subscribe(app.names.claim_replica_subject(replica)).await.unwrap();
    app.nats.flush().await.unwrap();
    let mut claims = futures::stream::select(group, own);
    let received = Arc::new(AtomicUsize::new(0));
    let (pool, nats, count) = (app.pool.clone(), app.nats.clone(), received.clone());
    let task = tokio::spawn(async move {
        while let Some(msg) = claims.next().await {
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            let answer = match then {
                Then::Unavailable if !first => ClaimReply::Unavailable { reason: "database unavailable".into() },
                _ => {
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
                    let outcomes = lifecycle::claim(&pool, &batch, now_ms()).await.unwrap();
                    if !first {
                        continue;
                    }
                    let items = outcomes
                        .into_iter()
                        .map(|o| match o {
                            ClaimOutcome::Granted(l) => ClaimDecision::Granted(LeaseGrant {
                                lease_id: l.id,
                                expires_at: l.expires_at,
                                attempts: 0,
                            }),
                            other => panic!("first claim not granted: {other:?}"),
                        })
                        .collect();
                    ClaimReply::Decided { items, replica: Some(replica.into()) }
                }
            };
            nats.publish(msg.reply.unwrap(), serde_json::to_vec(&answer).unwrap().into()).await.unwrap();
        }
    });
    (received, task)
}

/// Starts worker `w1` (4 slots, claims sent again after 500 ms) while `fake` is the only
/// replica, and waits until its first claim was answered by it; then starts a live one.
async fn worker_routed_to(app: &TestApp, received: &AtomicUsize) -> (Reconciler, tokio_util::sync::CancellationToken) {
    app.register_worker("w1", 4).await;
    // Claims sent again sooner than by default, so that a loaded machine still goes
    // through the rounds a claim answered by nobody takes well within the bounds below.
    let mut settings = app.worker_settings("w1", 4);
    settings.claim_timeout = Duration::from_millis(500);
    let _ = app.start_worker_with(settings).await;
    app.submit("first").await;
    wait_for("the first claim answered", Duration::from_secs(20), || async { received.load(Ordering::SeqCst) >= 1 })
        .await;
    app.start_reconciler().await
}

/// Submits twelve tasks after the first and waits until all thirteen completed; returns
/// how long that took.
async fn twelve_more_completed(app: &TestApp) -> Duration {
    let started = Instant::now();
    for i in 0..12 {
        app.submit(&format!("t{i}")).await;
    }
    wait_for("every task completed", Duration::from_secs(60), || async {
        app.count("SELECT count(*) FROM llm_tasks WHERE status = 'completed'").await == 13
    })
    .await;
    started.elapsed()
}

#[tokio::test]
async fn a_claim_committed_but_never_answered_is_sent_again_and_granted_the_same_lease() {
    let app = TestApp::spawn().await;
    let (received, silent) = fake_replica(&app, "silent", Then::Silent).await;
    let _live = worker_routed_to(&app, &received).await;
    let took = twelve_more_completed(&app).await;
    // The next claim went to the silent replica: it was decided, unanswered, sent again
    // through the group and (from the live replica, sooner or later) granted the lease
    // already held; no lease expired and each task has one.
    assert!(received.load(Ordering::SeqCst) >= 2, "the silent replica got no unanswered claim");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(app.count("SELECT count(*) FROM leases").await, 13);
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'expired'").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks WHERE attempts <> 1").await, 0);
    silent.abort();
    app.stop().await;
}

#[tokio::test]
async fn a_replica_that_cannot_decide_claims_loses_the_worker_to_another() {
    let app = TestApp::spawn().await;
    let (received, sick) = fake_replica(&app, "sick", Then::Unavailable).await;
    let _live = worker_routed_to(&app, &received).await;
    let took = twelve_more_completed(&app).await;
    // The sick replica answered the next claim `unavailable`; the messages came back a
    // second later and their claims went through the group. Had the worker stayed with
    // it, every claim for a minute would have been answered so.
    let after_first = received.load(Ordering::SeqCst) - 1;
    assert!(after_first >= 1, "the sick replica got no claim after the first");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks WHERE attempts <> 1").await, 0);
    sick.abort();
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

#[tokio::test]
async fn a_worker_claims_from_the_replica_that_answered_it_and_from_another_once_that_one_stops() {
    let app = TestApp::spawn().await;
    let (r1, r1_cancel) = app.start_reconciler().await;
    let (r2, r2_cancel) = app.start_reconciler().await;
    // Sees every claim sent to a replica's own subject (and, being a subscriber, turns
    // a stopped replica's "no responders" into a claim timeout, the slower path).
    let mut direct = app.nats.subscribe(format!("{}.ctl.claim.replica.>", app.names.namespace())).await.unwrap();
    app.nats.flush().await.unwrap();
    let mut settings = app.worker_settings("w1", 4);
    settings.claim_timeout = Duration::from_millis(500);
    let (_w, _) = app.start_worker_with(settings).await;
    let subjects = [app.names.claim_replica_subject(&r1.replica), app.names.claim_replica_subject(&r2.replica)];
    let mut completed = 0;
    // One task at a time: the first claim goes through the group, the next ones to the
    // replica that answered it.
    for i in 0..3 {
        let id = app.submit(&format!("a{i}")).await["id"].as_str().unwrap().to_owned();
        wait_for("task completed", Duration::from_secs(20), || async { app.status_of(&id).await == "completed" }).await;
        completed += 1;
    }
    let first = next_subject(&mut direct).await;
    assert!(subjects.contains(&first), "{first} is not a replica's subject");
    assert_eq!(next_subject(&mut direct).await, first, "claims left their replica while it answered");
    // That replica stops: the worker's claims go through the group to the other one.
    let (stopped, other) = if first == subjects[0] { (r1_cancel, &subjects[1]) } else { (r2_cancel, &subjects[0]) };
    stopped.cancel();
    let started = Instant::now();
    for i in 0..3 {
        let id = app.submit(&format!("b{i}")).await["id"].as_str().unwrap().to_owned();
        wait_for("task completed", Duration::from_secs(20), || async { app.status_of(&id).await == "completed" }).await;
        completed += 1;
    }
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    loop {
        let subject = next_subject(&mut direct).await;
        if &subject == other {
            break;
        }
        assert_eq!(subject, first, "a claim went to neither replica");
    }
    assert_eq!(
        app.count("SELECT count(*) FROM llm_tasks WHERE status = 'completed' AND attempts = 1").await,
        completed
    );
    app.stop().await;
}

async fn next_subject(sub: &mut async_nats::Subscriber) -> String {
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("a message in time").unwrap();
    msg.subject.to_string()
}
