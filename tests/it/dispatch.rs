//! JetStream dispatch end to end: API → outbox → JetStream → worker → claim →
//! executor → results request (or the results stream) → reconciler → Postgres.

use std::time::Duration;

use bloom::db::lifecycle;
use bloom::domain::NewTask;
use bloom::reconciler::ReconcilerSettings;
use bloom::time::now_ms;
use reqwest::StatusCode;
use serde_json::json;

use crate::common::{wait_for, Opts, TestApp};

async fn all_final(app: &TestApp, n: i64) -> bool {
    app.count("SELECT count(*) FROM llm_tasks WHERE status IN ('completed', 'failed', 'dead')").await == n
}

async fn assert_invariants(app: &TestApp) {
    assert_eq!(
        app.count("SELECT count(*) FROM (SELECT task_id FROM llm_results WHERE status = 'success' GROUP BY task_id HAVING count(*) > 1) d").await,
        0,
        "a task has two successful results"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM llm_tasks t WHERE status = 'completed' AND NOT EXISTS (SELECT 1 FROM llm_results r WHERE r.task_id = t.id AND r.status = 'success')").await,
        0,
        "a completed task has no successful result"
    );
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'active'").await, 0, "an active lease is left");
}

#[tokio::test]
async fn submitted_tasks_complete_through_jetstream_exactly_once() {
    let app = TestApp::spawn().await;
    let (_r, _) = app.start_reconciler().await;
    let (_w, _) = app.start_worker("w1", 8).await;
    let (_w2, _) = app.start_worker("w2", 8).await;
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(app.submit(&format!("task {i}")).await["id"].as_str().unwrap().to_owned());
    }
    wait_for("all tasks completed", Duration::from_secs(30), || all_final(&app, 60)).await;
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks WHERE status = 'completed'").await, 60);
    assert_eq!(app.metrics.tasks_submitted_total.get(), 60);
    assert_invariants(&app).await;
    let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{}", ids[7])).await;
    assert_eq!(t["attempts"], 1);
    let (_, arts) = app.get(&format!("/api/runtime/artifacts?task_id={}", ids[7])).await;
    assert_eq!(arts[0]["content"], "task 7", "the builtin executor echoes the prompt");
    wait_for("outbox drained", Duration::from_secs(15), || async {
        app.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    // Both NATS workers registered themselves.
    let (_, workers) = app.get("/api/runtime/workers").await;
    assert_eq!(workers.as_array().unwrap().len(), 2);
    assert_eq!(workers[0]["status"], "online");
    app.stop().await;
}

#[tokio::test]
async fn executor_errors_fail_the_task_with_the_reason() {
    let app = TestApp::spawn().await;
    app.start_reconciler().await;
    app.start_worker("w1", 2).await;
    let id = app.submit("fail: the model refused").await["id"].as_str().unwrap().to_owned();
    let bad_json = app
        .submit_with(json!({"context_id": "c", "agent_slug": "a", "prompt": "not json", "desired_format": "json"}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for("tasks final", Duration::from_secs(20), || all_final(&app, 2)).await;
    assert_eq!(app.status_of(&id).await, "failed");
    let msg: String = sqlx::query_scalar("SELECT error_message FROM llm_results WHERE task_id = $1")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(msg, "the model refused");
    assert_eq!(app.status_of(&bad_json).await, "failed");
    app.stop().await;
}

/// A successful result of the REST worker "rest" for the task its `lease` grant leased.
fn rest_result(task: &str, lease: &serde_json::Value, output: &str) -> serde_json::Value {
    json!({"task_id": task, "lease_id": lease["lease"]["id"], "worker_id": "rest", "status": "success",
           "output": output, "error_message": null, "metrics": {"duration_ms": 1}})
}

/// Makes Postgres refuse results with this output (nothing checked before the statement does).
async fn refuse_output(app: &TestApp, output: &str) {
    let check = format!("ALTER TABLE llm_results ADD CONSTRAINT refuse_me CHECK (output IS DISTINCT FROM '{output}')");
    sqlx::query(&check).execute(&app.pool).await.unwrap();
}

/// Messages the results stream has ever stored.
async fn results_streamed(app: &TestApp) -> u64 {
    stream_state(app, app.names.results_stream()).await.last_sequence
}

/// The state of one of the test's streams.
async fn stream_state(app: &TestApp, name: String) -> async_nats::jetstream::stream::State {
    let js = async_nats::jetstream::new(app.nats.clone());
    let mut stream = js.get_stream(name).await.unwrap();
    stream.info().await.unwrap().state.clone()
}

#[tokio::test]
async fn results_are_stored_by_request_and_the_results_stream_stays_empty() {
    let app = TestApp::spawn().await;
    let (r, _) = app.start_reconciler().await;
    app.start_worker("w1", 4).await;
    for i in 0..20 {
        app.submit(&format!("task {i}")).await;
    }
    wait_for("all tasks completed", Duration::from_secs(30), || all_final(&app, 20)).await;
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks WHERE status = 'completed'").await, 20);
    assert_eq!(r.metrics.results_completed_total.get(), 20);
    assert_eq!(results_streamed(&app).await, 0, "every result was answered by a reconciler");
    assert_invariants(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn a_result_no_reconciler_answers_goes_to_the_stream_and_is_stored_from_there() {
    let app = TestApp::spawn().await;
    let (_, stop_first) = app.start_reconciler().await;
    app.start_worker("w1", 1).await;
    let id = app.submit("sleep:1500").await["id"].as_str().unwrap().to_owned();
    wait_for("task leased", Duration::from_secs(10), || async { app.status_of(&id).await != "queued" }).await;
    // The only reconciler stops while the task runs: the result's request finds no one.
    stop_first.cancel();
    wait_for("result in the stream", Duration::from_secs(15), || async { results_streamed(&app).await == 1 }).await;
    assert_eq!(app.status_of(&id).await, "leased", "nothing stored it yet");
    let (r, _) = app.start_reconciler().await;
    wait_for("task completed", Duration::from_secs(15), || all_final(&app, 1)).await;
    assert_eq!(app.status_of(&id).await, "completed");
    assert_eq!(r.metrics.results_completed_total.get(), 1);
    assert_invariants(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn a_result_request_is_answered_stored_only_once_committed() {
    let app = TestApp::spawn().await;
    app.register_worker("rest", 4).await;
    let (good, a) = app.leased_task("good").await;
    let (bad, b) = app.leased_task("bad").await;
    refuse_output(&app, "refuse me").await;
    app.start_reconciler().await;
    let ask = |task: &str, lease: &serde_json::Value, output: &str| {
        let body = json!([rest_result(task, lease, output)]);
        let (nats, subject) = (app.nats.clone(), app.names.results_request_subject());
        async move {
            let reply = nats.request(subject, serde_json::to_vec(&body).unwrap().into()).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap()
        }
    };
    assert_eq!(ask(&bad, &b, "refuse me").await, json!({"stored": false}), "the worker streams it then");
    assert_eq!(app.status_of(&bad).await, "leased");
    assert_eq!(ask(&good, &a, "fine").await, json!({"stored": true}));
    assert_eq!(app.status_of(&good).await, "completed", "answered once committed");
    let garbage = app.nats.request(app.names.results_request_subject(), "not a result".into()).await.unwrap();
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&garbage.payload).unwrap(), json!({"stored": false}));
    app.stop().await;
}

#[tokio::test]
async fn a_crashed_workers_task_is_redelivered_and_completed_once() {
    let app = TestApp::spawn_with(Opts { lease_ttl_secs: 1, ..Opts::default() }).await;
    let (r, _) = app.start_reconciler().await;
    let (_, crashing) = app.start_worker("doomed", 1).await;
    let id = app.submit("sleep:1500").await["id"].as_str().unwrap().to_owned();
    wait_for("task leased", Duration::from_secs(10), || async { app.status_of(&id).await != "queued" }).await;
    // Crash: the worker's future is dropped with no nak, no hand-back, no result.
    crashing.abort();
    let (_, _) = app.start_worker("rescuer", 1).await;
    wait_for("task completed", Duration::from_secs(30), || all_final(&app, 1)).await;
    assert_eq!(app.status_of(&id).await, "completed");
    let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{id}")).await;
    assert_eq!(t["worker_id"], "rescuer");
    assert_eq!(t["attempts"], 2, "one counted attempt per lease");
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'expired'").await, 1);
    assert_invariants(&app).await;
    assert!(r.metrics.leases_expired_total.get() >= 1);
    app.stop().await;
}

#[tokio::test]
async fn tasks_of_a_context_stick_to_the_worker_holding_it() {
    let app = TestApp::spawn().await;
    app.start_reconciler().await;
    // Room for all five tasks: a task is routed to its context's worker only while that
    // worker has a free slot when the task is created.
    app.start_worker("a", 8).await;
    let first = app.submit_with(json!({"context_id": "sticky", "agent_slug": "x", "prompt": "sleep:3000"})).await;
    let first_id = first["id"].as_str().unwrap().to_owned();
    wait_for("first leased", Duration::from_secs(10), || async { app.status_of(&first_id).await != "queued" }).await;
    let holder: String = sqlx::query_scalar("SELECT worker_id FROM llm_tasks WHERE id = $1")
        .bind(&first_id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(holder, "a");
    // A second worker joins; the next task of the same context must still go to `a`.
    app.start_worker("b", 4).await;
    wait_for("b online", Duration::from_secs(15), || async {
        app.count("SELECT count(*) FROM workers WHERE status = 'online'").await == 2
    })
    .await;
    let ids: Vec<String> = futures::future::join_all(
        (0..4).map(|i| app.submit_with(json!({"context_id": "sticky", "agent_slug": "x", "prompt": format!("s{i}")}))),
    )
    .await
    .iter()
    .map(|t| t["id"].as_str().unwrap().to_owned())
    .collect();
    // Routed at submit time to a's direct subject (the audit keeps no trace of routing,
    // the lease does).
    wait_for("all done", Duration::from_secs(20), || all_final(&app, 5)).await;
    for id in &ids {
        let w: String = sqlx::query_scalar("SELECT worker_id FROM llm_tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
        assert_eq!(w, "a", "task {id} left its context's worker");
    }
    app.stop().await;
}

#[tokio::test]
async fn the_relay_publishes_dispatches_nobody_published() {
    let app = TestApp::spawn().await;
    // Commit tasks without handing them to the dispatcher: as if NATS were down at
    // submit time or the API died between commit and publish.
    let new = NewTask::new("c", "a", "orphan");
    lifecycle::create(
        &mut app.pool.acquire().await.unwrap(),
        vec![new.clone(), new.clone(), new],
        "test",
        now_ms(),
        lifecycle::KeyRules::default(),
    )
    .await
    .unwrap();
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 3);
    app.start_worker("w", 4).await;
    app.start_reconciler().await;
    wait_for("orphans completed", Duration::from_secs(20), || all_final(&app, 3)).await;
    wait_for("outbox drained", Duration::from_secs(15), || async {
        app.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    assert_invariants(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn a_task_leased_over_rest_is_refused_to_nats_workers() {
    let app = TestApp::spawn().await;
    app.register_worker("rest-worker", 1).await;
    let id = app.submit("mine").await["id"].as_str().unwrap().to_owned();
    let (status, _) =
        app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({"worker_id": "rest-worker"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (r, _) = app.start_reconciler().await;
    app.start_worker("nats-worker", 1).await;
    wait_for("claim refused", Duration::from_secs(10), || async { r.metrics.claims_refused_total.get() >= 1 }).await;
    assert_eq!(app.status_of(&id).await, "leased");
    let (status, done) = app
        .post(
            &format!("/api/runtime/llm-tasks/{id}/complete"),
            json!({"status": "success", "output": "rest", "metrics": {"duration_ms": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(done["result"]["worker_id"], "rest-worker");
    assert_eq!(app.count("SELECT count(*) FROM llm_results").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn shutdown_hands_in_flight_tasks_back_to_another_worker() {
    let app = TestApp::spawn().await;
    app.start_reconciler().await;
    let mut s = app.worker_settings("leaving", 1);
    s.shutdown_grace = Duration::from_millis(200);
    let (stop, handle) = app.start_worker_with(s).await;
    let id = app.submit("sleep:2000").await["id"].as_str().unwrap().to_owned();
    wait_for("leased", Duration::from_secs(10), || async { app.status_of(&id).await != "queued" }).await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    wait_for("handed back", Duration::from_secs(15), || async { app.status_of(&id).await == "queued" }).await;
    // The message was nak'ed: the next worker claims the same dispatch at once.
    app.start_worker("staying", 1).await;
    wait_for("completed elsewhere", Duration::from_secs(20), || all_final(&app, 1)).await;
    let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{id}")).await;
    assert_eq!(t["worker_id"], "staying");
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'released'").await, 2);
    assert_invariants(&app).await;
    app.stop().await;
}

/// A worker keeps beating, offline, while its runs finish after SIGTERM, so no
/// reconciler takes its lease during the grace; killed in the middle of it, it goes
/// silent, and once the worker timeout has passed its task runs again elsewhere instead
/// of waiting out the lease's TTL (300 s here).
#[tokio::test]
async fn a_worker_killed_during_its_shutdown_grace_gives_its_task_back_once_silent() {
    let app = TestApp::spawn().await;
    let timeout = Duration::from_secs(3);
    app.start_reconciler_with(ReconcilerSettings { worker_timeout: timeout, ..app.reconciler_settings() }).await;
    let mut s = app.worker_settings("leaving", 1);
    s.shutdown_grace = Duration::from_secs(60);
    let (stop, handle) = app.start_worker_with(s).await;
    // It runs well past the worker timeout (3 s), so it is still leased when checked.
    let id = app.submit("sleep:8000").await["id"].as_str().unwrap().to_owned();
    wait_for("leased", Duration::from_secs(10), || async { app.status_of(&id).await == "leased" }).await;
    stop.cancel();
    wait_for("offline", Duration::from_secs(10), || async { app.status_of_worker("leaving").await == "offline" }).await;
    let last_beat = || app.count("SELECT last_heartbeat FROM workers WHERE id = 'leaving'");
    let offline_at = last_beat().await;
    let past_timeout = offline_at + timeout.as_millis() as i64 + 500;
    wait_for("beats through the grace", Duration::from_secs(10), || async { last_beat().await >= past_timeout }).await;
    assert_eq!(app.status_of(&id).await, "leased", "a worker beating in its grace keeps its lease");
    handle.abort();
    let _ = handle.await;
    let ended = "SELECT count(*) FROM leases WHERE worker_id = 'leaving' AND status = 'expired'";
    // Within the worker timeout, or a quiet window after a stall of the machine.
    wait_for("lease ended", Duration::from_secs(30), || async { app.count(ended).await == 1 }).await;
    app.start_worker("staying", 1).await;
    wait_for("completed elsewhere", Duration::from_secs(30), || all_final(&app, 1)).await;
    let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{id}")).await;
    assert_eq!((t["worker_id"].as_str(), t["attempts"].as_i64()), (Some("staying"), Some(2)), "{t}");
    assert_invariants(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn malformed_messages_on_every_subject_are_rejected_without_harm() {
    let app = TestApp::spawn().await;
    let (r, _) = app.start_reconciler().await;
    app.start_worker("w", 2).await;
    let n = &app.names;
    for subject in [n.claim_subject(), n.heartbeat_subject(), n.release_subject(), n.worker_beat_subject()] {
        let _ = app.nats.request(subject.clone(), "garbage{".into()).await;
        app.nats.publish(subject, vec![0xff, 0x00].into()).await.unwrap();
    }
    let js = async_nats::jetstream::new(app.nats.clone());
    js.publish(n.results_subject(), "not a result".into()).await.unwrap().await.unwrap();
    js.publish(n.pool_subject(), "not a task".into()).await.unwrap().await.unwrap();
    wait_for("rejections counted", Duration::from_secs(10), || async {
        r.metrics.malformed_messages_total.get() >= 4 && r.metrics.results_rejected_total.get() >= 1
    })
    .await;
    // Everything still works.
    let id = app.submit("still alive").await["id"].as_str().unwrap().to_owned();
    wait_for("task completed", Duration::from_secs(15), || all_final(&app, 1)).await;
    assert_eq!(app.status_of(&id).await, "completed");
    app.stop().await;
}

#[tokio::test]
async fn one_results_message_completes_each_of_its_tasks_and_records_stale_ones_as_late() {
    let app = TestApp::spawn().await;
    app.register_worker("rest", 4).await;
    let (first, a) = app.leased_task("a").await;
    let (second, b) = app.leased_task("b").await;
    let result = |task: &str, lease: &str, output: &str| {
        json!({"task_id": task, "lease_id": lease, "worker_id": "rest", "status": "success", "output": output,
               "error_message": null, "metrics": {"duration_ms": 3}})
    };
    let batch = json!([
        result(&first, a["lease"]["id"].as_str().unwrap(), "out-a"),
        result(&second, b["lease"]["id"].as_str().unwrap(), "out-b"),
        result(&first, "not-the-lease", "stale"),
    ]);
    let js = async_nats::jetstream::new(app.nats.clone());
    js.publish(app.names.results_subject(), serde_json::to_vec(&batch).unwrap().into()).await.unwrap().await.unwrap();
    let (r, _) = app.start_reconciler().await;
    wait_for("both completed", Duration::from_secs(15), || all_final(&app, 2)).await;
    for (id, output) in [(&first, "out-a"), (&second, "out-b")] {
        let sql = format!("SELECT count(*) FROM llm_results WHERE task_id = '{id}' AND output = '{output}'");
        assert_eq!(app.count(&sql).await, 1, "one result {output} for {id}");
    }
    assert_eq!(app.count("SELECT count(*) FROM llm_results").await, 2);
    wait_for("late result counted", Duration::from_secs(15), || async { r.metrics.results_late_total.get() == 1 })
        .await;
    assert_eq!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'result_late'").await, 1);
    assert_invariants(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn a_result_postgres_refuses_is_redelivered_then_terminated_and_holds_up_no_other() {
    let app = TestApp::spawn().await;
    app.register_worker("rest", 4).await;
    let (good, a) = app.leased_task("good").await;
    let (bad, b) = app.leased_task("bad").await;
    let (beside, c) = app.leased_task("beside").await;
    // Postgres refuses this output; nothing checked before the statement does.
    refuse_output(&app, "refuse me").await;
    let js = async_nats::jetstream::new(app.nats.clone());
    // The refused result shares its message with a good one.
    for body in [
        json!([rest_result(&bad, &b, "refuse me"), rest_result(&beside, &c, "fine too")]),
        json!([rest_result(&good, &a, "fine")]),
    ] {
        js.publish(app.names.results_subject(), serde_json::to_vec(&body).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut settings = app.reconciler_settings();
    settings.result_max_deliveries = 3;
    let r = app.reconciler_with(settings, &app.cancel).await;
    tokio::spawn(r.clone().run(app.cancel.clone()));
    wait_for("the good results stored", Duration::from_secs(15), || async {
        app.status_of(&good).await == "completed" && app.status_of(&beside).await == "completed"
    })
    .await;
    wait_for("the refused message terminated", Duration::from_secs(15), || async {
        r.metrics.results_refused_total.get() == 1
    })
    .await;
    assert_eq!(r.metrics.results_completed_total.get(), 2);
    // The refused result completed nothing; its lease is left to expire, like a lost result.
    assert_eq!(app.status_of(&bad).await, "leased");
    assert_eq!(app.count(&format!("SELECT count(*) FROM llm_results WHERE task_id = '{bad}'")).await, 0);
    wait_for("nothing left to redeliver", Duration::from_secs(10), || async {
        let stream = js.get_stream(app.names.results_stream()).await.unwrap();
        let info = stream.consumer_info(app.names.results_consumer()).await.unwrap();
        (info.num_pending, info.num_ack_pending) == (0, 0)
    })
    .await;
    // The good result redelivered with the refused one was recorded as late, not stored twice.
    assert_eq!(app.count(&format!("SELECT count(*) FROM llm_results WHERE task_id = '{beside}'")).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn messages_with_nul_ids_are_rejected_and_do_not_hold_up_the_others() {
    let app = TestApp::spawn().await;
    app.register_worker("rest", 4).await;
    let (id, leased) = app.leased_task("good").await;
    let lease = leased["lease"]["id"].as_str().unwrap();
    let js = async_nats::jetstream::new(app.nats.clone());
    let result = |task: &str, lease: &str| {
        json!({"task_id": task, "lease_id": lease, "worker_id": "rest", "status": "success", "output": "ok",
               "error_message": null, "metrics": {"duration_ms": 1}})
    };
    // Postgres cannot store these ids: without the check they would fail every batch
    // they are in, over and over.
    for poison in [json!([result("bad\u{0}id", lease)]), result(&id, "bad\u{0}lease")] {
        js.publish(app.names.results_subject(), serde_json::to_vec(&poison).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let bad_task = json!({"task_id": "t\u{0}", "dispatch_seq": 1, "context_id": "c", "agent_slug": "a", "prompt": "p",
                          "context_hints": [], "policy": {}, "desired_format": "text", "attempts": 0,
                          "max_attempts": 3, "created_at": 0});
    js.publish(app.names.pool_subject(), serde_json::to_vec(&bad_task).unwrap().into()).await.unwrap().await.unwrap();
    js.publish(app.names.results_subject(), serde_json::to_vec(&json!([result(&id, lease)])).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let (r, _) = app.start_reconciler().await;
    app.start_worker("w", 2).await;
    wait_for("the good result stored", Duration::from_secs(15), || all_final(&app, 1)).await;
    let claim = json!({"worker_id": "w\u{0}", "ttl_seconds": 5, "items": [{"task_id": "x", "dispatch_seq": 1}]});
    let reply = app.nats.request(app.names.claim_subject(), serde_json::to_vec(&claim).unwrap().into()).await.unwrap();
    assert!(String::from_utf8_lossy(&reply.payload).contains("malformed"), "{:?}", reply.payload);
    wait_for("poison rejected", Duration::from_secs(10), || async { r.metrics.results_rejected_total.get() == 2 })
        .await;
    // The worker terminated the bad task message; new work still flows.
    app.submit("after").await;
    wait_for("new task completed", Duration::from_secs(15), || all_final(&app, 2)).await;
    assert_invariants(&app).await;
    app.stop().await;
}

/// The decisions on a claim sent over NATS as a worker sends it.
async fn claim_over_nats(app: &TestApp, req: &bloom::protocol::ClaimRequest) -> Vec<bloom::protocol::ClaimDecision> {
    let answer = app.nats.request(app.names.claim_subject(), serde_json::to_vec(req).unwrap().into()).await.unwrap();
    match serde_json::from_slice(&answer.payload).unwrap() {
        bloom::protocol::ClaimReply::Decided { items, .. } => items,
        other => panic!("undecided: {other:?}"),
    }
}

/// Over NATS, claims beyond the worker's capacity in Postgres are answered `full`
/// (in the same reply as the granted ones), and counted.
#[tokio::test]
async fn claims_beyond_a_workers_capacity_are_answered_full() {
    use bloom::protocol::{ClaimDecision, ClaimItem, ClaimRequest};
    let app = TestApp::spawn().await;
    let (r, _rc) = app.start_reconciler().await;
    app.register_worker("two-slots", 2).await;
    let mut items = Vec::new();
    for i in 0..5 {
        let id = app.submit(&format!("t{i}")).await["id"].as_str().unwrap().to_owned();
        items.push(ClaimItem { task_id: id.as_str().into(), dispatch_seq: 1, created_at: 0 });
    }
    let req = ClaimRequest { worker_id: "two-slots".into(), ttl_seconds: 30, items };
    let items = claim_over_nats(&app, &req).await;
    let granted = items.iter().filter(|d| matches!(d, ClaimDecision::Granted(_))).count();
    let full = items.iter().filter(|d| **d == ClaimDecision::Full).count();
    assert_eq!((granted, full), (2, 3), "{items:?}");
    assert_eq!(r.metrics.claims_full_total.get(), 3);
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'active'").await, 2);

    // Drained, the worker is told so: it hands the messages back at once instead of
    // claiming them again.
    assert_eq!(app.post("/api/runtime/workers/two-slots/drain", json!({})).await.0, StatusCode::OK);
    let items = claim_over_nats(&app, &req).await;
    let granted = items.iter().filter(|d| matches!(d, ClaimDecision::Granted(_))).count();
    let draining = items.iter().filter(|d| **d == ClaimDecision::Draining).count();
    assert_eq!((granted, draining), (2, 3), "the leases held are granted again: {items:?}");
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'active'").await, 2);
    app.stop().await;
}

/// A worker whose slots Postgres sees taken (here by a lease row of another task)
/// keeps a message answered `full` and claims it again, handing it back between rounds,
/// until a slot frees: the task then runs, and the worker never held more leases than
/// its capacity.
#[tokio::test]
async fn a_worker_postgres_sees_full_claims_again_once_a_slot_frees() {
    let app = TestApp::spawn().await;
    let (r, _rc) = app.start_reconciler().await;
    // The worker's start announcement ends the leases its id holds before it registers the
    // worker online; one sent again after an answer slower than the claim timeout (the
    // whole suite's load) would end the lease below too.
    let mut settings = app.worker_settings("busy", 1);
    settings.claim_timeout = Duration::from_secs(60);
    let (_w, _) = app.start_worker_with(settings).await;
    wait_for("worker registered", Duration::from_secs(10), || async {
        app.count("SELECT count(*) FROM workers WHERE id = 'busy' AND status = 'online'").await == 1
    })
    .await;
    let now = bloom::time::now_ms();
    sqlx::query(
        "INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat)
         VALUES ('other', 'another-task', 'busy', $1, $1 + 300000, 300, 'active', $1)",
    )
    .bind(now)
    .execute(&app.pool)
    .await
    .unwrap();
    let id = app.submit("waits for the slot").await["id"].as_str().unwrap().to_owned();
    // Within a second and a half alone; the other tests running beside it can delay the
    // delivery and the claims many times over.
    wait_for("claims answered full", Duration::from_secs(30), || async { r.metrics.claims_full_total.get() >= 3 })
        .await;
    assert_eq!(app.status_of(&id).await, "queued");
    sqlx::query("UPDATE leases SET status = 'released' WHERE id = 'other'").execute(&app.pool).await.unwrap();
    wait_for("task completed", Duration::from_secs(15), || async { app.status_of(&id).await == "completed" }).await;
    assert_eq!(app.count(&format!("SELECT count(*) FROM leases WHERE task_id = '{id}'")).await, 1);
    assert_eq!(app.count("SELECT bloom_worker_leases(id)::bigint FROM workers WHERE id = 'busy'").await, 0);
    app.stop().await;
}

/// Without a NATS worker (tasks leased over REST, or waiting for one), nothing consumes
/// the dispatches: the tasks stream drops them after `BLOOM_NATS_TASK_MAX_AGE_SECS`
/// instead of keeping every one for good. A task still queued when its dispatch went is
/// dispatched again once a NATS worker has room, and runs.
#[tokio::test]
async fn a_dispatch_nobody_consumed_leaves_the_stream_and_its_queued_task_is_dispatched_again() {
    let app = TestApp::spawn_with(Opts { task_max_age_secs: 1, ..Default::default() }).await;
    app.register_worker("rest", 1).await;
    let (leased, _) = app.leased_task("leased over REST").await;
    let waiting = app.submit("waits for a NATS worker").await["id"].as_str().unwrap().to_owned();
    wait_for("both dispatches on the bus", Duration::from_secs(10), || async {
        app.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    wait_for("the dispatches nobody consumed gone from the stream", Duration::from_secs(10), || async {
        stream_state(&app, app.names.tasks_stream()).await.messages == 0
    })
    .await;
    assert_eq!(app.status_of(&waiting).await, "queued");

    let settings = ReconcilerSettings { redispatch_after: Some(Duration::from_secs(2)), ..app.reconciler_settings() };
    app.start_reconciler_with(settings).await;
    app.start_worker("nats-worker", 2).await;
    wait_for("the waiting task run by the NATS worker", Duration::from_secs(20), || async {
        app.status_of(&waiting).await == "completed"
    })
    .await;
    let redispatched =
        format!("SELECT count(*) FROM audit_logs WHERE action = 'task_redispatched' AND entity_id = '{waiting}'");
    assert_eq!(app.count(&redispatched).await, 1, "its dispatch had gone: dispatched again");
    let worker: String = sqlx::query_scalar("SELECT worker_id FROM llm_tasks WHERE id = $1")
        .bind(&waiting)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(worker, "nats-worker");
    assert_eq!(app.status_of(&leased).await, "leased", "the REST client's lease is left alone");
    app.stop().await;
}

/// A NATS worker's claim of a task leased over REST is refused, and the worker
/// terminates the message: a work-queue stream deletes it as it does an acknowledged
/// one, long before the stream's maximum age (a day here).
#[tokio::test]
async fn a_refused_claims_message_leaves_the_stream() {
    let app = TestApp::spawn().await;
    app.register_worker("rest", 1).await;
    let (leased, _) = app.leased_task("leased over REST").await;
    wait_for("the dispatch on the bus", Duration::from_secs(10), || async {
        stream_state(&app, app.names.tasks_stream()).await.messages == 1
    })
    .await;
    app.start_reconciler().await;
    app.start_worker("nats-worker", 2).await;
    wait_for("the refused claim's message gone from the stream", Duration::from_secs(15), || async {
        stream_state(&app, app.names.tasks_stream()).await.messages == 0
    })
    .await;
    let leases = format!("SELECT count(*) FROM leases WHERE task_id = '{leased}'");
    assert_eq!(app.count(&leases).await, 1, "leased once, over REST");
    assert_eq!(app.status_of(&leased).await, "leased", "the REST client's lease is left alone");
    app.stop().await;
}
