//! Concurrency keys: limits per context, agent or free key, enforced in Postgres on
//! every way of leasing a task, changed at runtime through the API.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::common::{wait_for, TestApp};
use bloom::db::concurrency;
use bloom::db::lifecycle::{self, Claim, ClaimOutcome};
use bloom::domain::{ConcurrencyLimit, ConcurrencyScope};

fn task(context: &str, prompt: &str) -> Value {
    json!({"context_id": context, "agent_slug": "writer", "prompt": prompt})
}

/// The most active leases seen at once per context while `run` goes on (sampled every
/// 10 ms).
pub(crate) async fn watch_leases<F: std::future::Future<Output = ()>>(app: &TestApp, run: F) -> HashMap<String, i64> {
    let done = Arc::new(AtomicBool::new(false));
    let pool = app.pool.clone();
    let watching = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut most: HashMap<String, i64> = HashMap::new();
            while !done.load(Ordering::Relaxed) {
                let rows: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT context_id, count(*) FROM leases WHERE status = 'active' GROUP BY context_id",
                )
                .fetch_all(&pool)
                .await
                .unwrap();
                for (context, n) in rows {
                    let m = most.entry(context).or_default();
                    *m = (*m).max(n);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        })
    };
    run.await;
    done.store(true, Ordering::Relaxed);
    watching.await.unwrap()
}

#[tokio::test]
async fn a_context_limit_of_one_runs_each_conversation_one_task_at_a_time_without_using_attempts() {
    let app = TestApp::spawn().await;
    let (status, limit) = app.put("/api/runtime/concurrency-limits/context_id/*", json!({"max_running": 1})).await;
    assert_eq!(status, StatusCode::OK, "{limit}");
    assert_eq!(
        (limit["scope"].as_str(), limit["key"].as_str(), limit["max_running"].as_i64()),
        (Some("context_id"), Some("*"), Some(1))
    );
    app.start_worker("w1", 8).await;
    app.start_reconciler().await;

    // Six tasks of one conversation, then one of another: the other is not held back
    // behind the first one's queue.
    let mut busy = Vec::new();
    let mut other = String::new();
    let most = watch_leases(&app, async {
        for i in 0..6 {
            busy.push(app.submit_with(task("busy", &format!("sleep:{}", 150 + i))).await["id"].as_str().unwrap().to_owned());
        }
        other = app.submit_with(task("other", "sleep:10")).await["id"].as_str().unwrap().to_owned();
        wait_for("the other conversation's task completed", Duration::from_secs(10), || async {
            app.status_of(&other).await == "completed"
        })
        .await;
        let waiting = app.count("SELECT count(*) FROM llm_tasks WHERE context_id = 'busy' AND status = 'queued'").await;
        assert!(waiting >= 3, "the busy conversation still waits for its slot: {waiting} queued");
        // What waits says why, and the keys under the limit show it.
        let (_, keys) = app.get("/api/runtime/concurrency-keys?scope=context_id").await;
        let busy_key = keys.as_array().unwrap().iter().find(|k| k["key"] == "busy").cloned().unwrap_or_default();
        assert_eq!((busy_key["max_running"].as_i64(), busy_key["running"].as_i64()), (Some(1), Some(1)), "{keys}");
        assert!(busy_key["waiting"].as_i64().unwrap() >= 2, "{keys}");
        let reasons: Vec<String> = sqlx::query_scalar(
            "SELECT wait_reason FROM llm_tasks WHERE context_id = 'busy' AND status = 'queued' AND wait_reason IS NOT NULL",
        )
        .fetch_all(&app.pool)
        .await
        .unwrap();
        assert!(
            reasons.iter().any(|r| r == "concurrency limit of context_id busy reached (1 running)"),
            "{reasons:?}"
        );
        for id in &busy {
            wait_for("the busy conversation's tasks completed", Duration::from_secs(20), || async {
                app.status_of(id).await == "completed"
            })
            .await;
        }
    })
    .await;
    assert_eq!(most.get("busy"), Some(&1), "one task of the conversation at a time: {most:?}");
    assert_eq!(app.count("SELECT max(attempts)::bigint FROM llm_tasks").await, 1, "waiting used no attempt");
    assert!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'task_deferred'").await >= 3);
    // Everything given back: nothing runs or waits under the limit.
    let (_, limits) = app.get("/api/runtime/concurrency-limits").await;
    assert_eq!((limits[0]["running"].as_i64(), limits[0]["waiting"].as_i64()), (Some(0), Some(0)), "{limits}");
    assert_eq!(app.count("SELECT COALESCE(sum(running), 0)::bigint FROM concurrency_slot_counts").await, 0);

    // A key held at 0: its tasks wait aside once claimed; removing the limit lets them run
    // (the `*` limit of 1 still applies to them).
    assert_eq!(
        app.put("/api/runtime/concurrency-limits/context_id/held", json!({"max_running": 0})).await.0,
        StatusCode::OK
    );
    let held: Vec<String> = futures::future::join_all((0..2).map(|i| app.submit_with(task("held", &format!("h{i}")))))
        .await
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    wait_for("the held tasks were set aside", Duration::from_secs(10), || async {
        app.count("SELECT count(*) FROM llm_tasks WHERE blocked_on = 'context_id:held' AND dispatch_seq < 0").await == 2
    })
    .await;
    let (_, shown) = app.get(&format!("/api/runtime/llm-tasks/{}", held[0])).await;
    assert_eq!(
        (shown["status"].as_str(), shown["wait_reason"].as_str()),
        (Some("queued"), Some("concurrency limit of context_id held reached (0 running)"))
    );
    assert_eq!(app.delete("/api/runtime/concurrency-limits/context_id/held").await.0, StatusCode::OK);
    for id in &held {
        wait_for("a task released by the limit's removal completed", Duration::from_secs(15), || async {
            app.status_of(id).await == "completed"
        })
        .await;
    }
    app.stop().await;
}

async fn lease(app: &TestApp, id: &str) -> (StatusCode, Value) {
    app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({})).await
}

async fn complete(app: &TestApp, id: &str) {
    let (status, body) = app
        .post(
            &format!("/api/runtime/llm-tasks/{id}/complete"),
            json!({"status": "success", "output": "ok", "metrics": {"duration_ms": 5}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn limits_change_at_runtime_count_what_already_runs_and_hold_rest_leases() {
    let app = TestApp::spawn().await;
    app.register_worker("rest-1", 10).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(app.submit_with(task("x", &format!("t{i}"))).await["id"].as_str().unwrap().to_owned());
        }
        ids
    };
    for id in &ids[..2] {
        assert_eq!(lease(&app, id).await.0, StatusCode::CREATED);
    }
    // A limit set while two tasks of its key run counts them.
    let (status, set) = app.put("/api/runtime/concurrency-limits/context_id/x", json!({"max_running": 1})).await;
    assert_eq!(status, StatusCode::OK, "{set}");
    assert_eq!(set["running"], 2, "{set}");
    let (status, refused) = lease(&app, &ids[2]).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(refused["error"], "Task is not leased: the concurrency limit of context_id x reached (1 running)");
    complete(&app, &ids[0]).await;
    assert_eq!(lease(&app, &ids[2]).await.0, StatusCode::CONFLICT, "one still runs: the limit is 1");
    complete(&app, &ids[1]).await;
    assert_eq!(lease(&app, &ids[2]).await.0, StatusCode::CREATED, "a slot freed");
    complete(&app, &ids[2]).await;

    // 0 holds a key; raising it lets its tasks run; removing it lets everything run.
    assert_eq!(
        app.put("/api/runtime/concurrency-limits/concurrency_key/tenant-a", json!({"max_running": 0})).await.0,
        StatusCode::OK
    );
    let keyed = app
        .submit_with(json!({"context_id": "y", "agent_slug": "writer", "prompt": "k", "concurrency_key": "tenant-a"}))
        .await;
    assert_eq!(keyed["concurrency_key"], "tenant-a", "{keyed}");
    let keyed = keyed["id"].as_str().unwrap().to_owned();
    let (status, held) = lease(&app, &keyed).await;
    assert_eq!(
        (status, held["error"].as_str()),
        (
            StatusCode::CONFLICT,
            Some("Task is not leased: the concurrency limit of concurrency_key tenant-a reached (0 running)")
        )
    );
    let unkeyed = app.submit_with(task("y", "free")).await["id"].as_str().unwrap().to_owned();
    assert_eq!(lease(&app, &unkeyed).await.0, StatusCode::CREATED, "tasks without the key are not counted");
    assert_eq!(
        app.put("/api/runtime/concurrency-limits/concurrency_key/tenant-a", json!({"max_running": 2})).await.0,
        StatusCode::OK
    );
    assert_eq!(lease(&app, &keyed).await.0, StatusCode::CREATED);
    let (_, limits) = app.get("/api/runtime/concurrency-limits").await;
    let tenant = limits.as_array().unwrap().iter().find(|l| l["key"] == "tenant-a").cloned().unwrap();
    assert_eq!((tenant["max_running"].as_i64(), tenant["running"].as_i64()), (Some(2), Some(1)), "{limits}");
    let (status, removed) = app.delete("/api/runtime/concurrency-limits/concurrency_key/tenant-a").await;
    assert_eq!((status, removed["removed"].as_bool()), (StatusCode::OK, Some(true)));
    assert_eq!(app.delete("/api/runtime/concurrency-limits/concurrency_key/tenant-a").await.0, StatusCode::NOT_FOUND);

    // Configuration sets a limit only where none is set: the API's value stays.
    let configured = ConcurrencyLimit::new(ConcurrencyScope::ContextId, "x", 5).unwrap();
    let now = bloom::time::now_ms();
    assert!(!bloom::db::concurrency::set(&app.pool, &configured, true, now).await.unwrap());
    let fresh = ConcurrencyLimit::new(ConcurrencyScope::AgentSlug, "critic", 3).unwrap();
    assert!(bloom::db::concurrency::set(&app.pool, &fresh, true, now).await.unwrap());
    let (_, limits) = app.get("/api/runtime/concurrency-limits").await;
    let by_key: Vec<(String, String, i64)> = limits
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (l["scope"].as_str().unwrap().into(), l["key"].as_str().unwrap().into(), l["max_running"].as_i64().unwrap())
        })
        .collect();
    assert_eq!(by_key, vec![("agent_slug".into(), "critic".into(), 3), ("context_id".into(), "x".into(), 1)]);
    app.stop().await;
}

/// Key `k` limited to 1, its first task leased over REST, and a claim of its second
/// task that found the slot full and put the task aside, not committed yet.
async fn second_put_aside_uncommitted() -> (TestApp, String, String, sqlx::Transaction<'static, sqlx::Postgres>) {
    let app = TestApp::spawn().await;
    let worker = app.register_worker("w", 8).await["id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.put("/api/runtime/concurrency-limits/concurrency_key/k", json!({"max_running": 1})).await.0,
        StatusCode::OK
    );
    let first = app.submit_with(keyed("k", "first")).await["id"].as_str().unwrap().to_owned();
    let second = app.submit_with(keyed("k", "second")).await["id"].as_str().unwrap().to_owned();
    assert_eq!(lease(&app, &first).await.0, StatusCode::CREATED);
    let seq: i64 = sqlx::query_scalar("SELECT dispatch_seq FROM llm_tasks WHERE id = $1")
        .bind(&second)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let mut tx = app.pool.begin().await.unwrap();
    let claim = Claim { task_id: second.as_str().into(), dispatch_seq: seq, worker_id: worker.into(), ttl_seconds: 30 };
    let out = lifecycle::claim(&mut *tx, &[claim], bloom::time::now_ms()).await.unwrap();
    assert_eq!(out, vec![ClaimOutcome::SetAside { slot: "concurrency_key:k".into() }]);
    (app, first, second, tx)
}

fn keyed(key: &str, prompt: &str) -> Value {
    json!({"context_id": prompt, "agent_slug": "writer", "prompt": prompt, "concurrency_key": key})
}

/// Lease ends give their slot back without the slot's admission lock that claims hold
/// to their commit. A claim that saw the slot full and put a task aside, and an end whose
/// own wake ran before that claim committed, would leave the task waiting with room in
/// its slot: the claim's recheck after its commit makes it due.
#[tokio::test]
async fn an_end_racing_a_claim_waits_for_nothing_and_the_claims_recheck_wakes_the_task() {
    let (app, first, second, tx) = second_put_aside_uncommitted().await;
    // The first task completes while the claim holds the slot's lock: it does not wait.
    tokio::time::timeout(Duration::from_secs(10), complete(&app, &first))
        .await
        .expect("a completion waited for a claim of its slot");
    tx.commit().await.unwrap();
    let waiting = "SELECT count(*) FROM llm_tasks WHERE blocked_on = 'concurrency_key:k' AND not_before IS NULL";
    assert_eq!(app.count(waiting).await, 1, "the end's wake ran before the task was put aside");
    assert_eq!(app.count("SELECT running::bigint FROM concurrency_slot_counts").await, 0);
    let slots = ["concurrency_key:k".to_owned()];
    assert_eq!(concurrency::recheck(&app.pool, &slots, concurrency::RECHECK_PATIENCE).await.unwrap(), 1);
    assert_eq!(app.count(waiting).await, 0);
    assert_eq!(app.status_of(&second).await, "queued");
    assert_eq!(app.count(&format!("SELECT not_before FROM llm_tasks WHERE id = '{second}'")).await, 0, "made due");
    app.stop().await;
}

/// A recheck waits for the ends of its slots still in flight, so it sees the room they
/// make once they commit; meanwhile it holds no later end of the slot back (it only
/// tries the slot's lock: a waiting exclusive request would queue every later end's
/// shared one behind it).
#[tokio::test]
async fn a_recheck_waits_for_an_end_in_flight_and_sees_its_room_without_holding_later_ends() {
    let (app, first, second, tx) = second_put_aside_uncommitted().await;
    // The first task's lease ends (its wake does not see the task put aside) and has not
    // committed when the claim has, and rechecks.
    let mut ending = app.pool.begin().await.unwrap();
    sqlx::query("UPDATE leases SET status = 'released' WHERE task_id = $1")
        .bind(&first)
        .execute(&mut *ending)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let try_recheck = "SELECT woken, busy FROM bloom_slots_try_recheck(ARRAY['concurrency_key:k'])";
    let (woken, busy): (i64, Vec<String>) = sqlx::query_as(try_recheck).fetch_one(&app.pool).await.unwrap();
    assert_eq!((woken, busy), (0, vec!["concurrency_key:k".to_owned()]), "the end in flight keeps the slot busy");
    let recheck = {
        let pool = app.pool.clone();
        tokio::spawn(async move {
            concurrency::recheck(&pool, &["concurrency_key:k".to_owned()], Duration::from_secs(30)).await
        })
    };
    // The recheck has tried the slot (its statement is its connection's last one) ...
    wait_for("the recheck tried the busy slot", Duration::from_secs(10), || async {
        app.count(
            // The pattern split, so that this statement's own text does not match it.
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND query LIKE '%bloom_slots_try_' || 'recheck($1)%'",
        )
        .await
            > 0
    })
    .await;
    assert!(!recheck.is_finished(), "the recheck did not wait for the end in flight");
    // ... and another end of the slot takes its shared lock at once: nothing waits for it
    // exclusively.
    let mut later = app.pool.begin().await.unwrap();
    sqlx::raw_sql(
        "SET LOCAL lock_timeout = '2s';
         SELECT pg_advisory_xact_lock_shared(1651273583, bloom_slot_lock('concurrency_key:k'))",
    )
    .execute(&mut *later)
    .await
    .expect("a later end queued behind the recheck");
    later.rollback().await.unwrap();
    ending.commit().await.unwrap();
    assert_eq!(recheck.await.unwrap().unwrap(), 1, "the recheck saw the end committed");
    assert_eq!(app.count(&format!("SELECT not_before FROM llm_tasks WHERE id = '{second}'")).await, 0);
    app.stop().await;
}

#[tokio::test]
async fn limits_and_concurrency_keys_are_validated_naming_the_field() {
    let app = TestApp::spawn().await;
    let cases = [
        ("/api/runtime/concurrency-limits/model/x", json!({"max_running": 1}), "scope"),
        ("/api/runtime/concurrency-limits/context_id/x", json!({"max_running": -1}), "max_running"),
        ("/api/runtime/concurrency-limits/context_id/x", json!({"max_running": 1.5}), "max_running"),
        ("/api/runtime/concurrency-limits/context_id/x", json!({}), "max_running"),
    ];
    for (path, body, field) in cases {
        let (status, answer) = app.put(path, body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body}: {answer}");
        assert!(answer.to_string().contains(field), "{path} {body}: {answer}");
    }
    let long = "k".repeat(256);
    let (status, answer) =
        app.put(&format!("/api/runtime/concurrency-limits/context_id/{long}"), json!({"max_running": 1})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer.to_string().contains("key"), "{answer}");
    for key in [json!(""), json!(5), json!(long)] {
        let (status, answer) = app
            .post(
                "/api/runtime/llm-tasks",
                json!({"context_id": "c", "agent_slug": "a", "prompt": "p", "concurrency_key": key}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{key}: {answer}");
        assert!(answer.to_string().contains("concurrency_key"), "{answer}");
    }
    let (status, answer) = app.get("/api/runtime/concurrency-keys?scope=tenant").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert_eq!(app.get("/api/runtime/concurrency-keys?limit=0").await.0, StatusCode::BAD_REQUEST);
    assert_eq!(app.delete("/api/runtime/concurrency-limits/context_id/none").await.0, StatusCode::NOT_FOUND);
    app.stop().await;
}

/// A new task is routed to the worker running its context only when no concurrency limit
/// governs it (its own key's limit or its scope's `*`, in any scope): the context's
/// running task holds the slot it needs, so routed it would be claimed at once and put
/// aside. Without a limit, routing is as before.
#[tokio::test]
async fn tasks_a_limit_governs_are_not_routed_to_their_contexts_worker() {
    use bloom::db::workers;

    let app = TestApp::spawn().await;
    let now = bloom::time::now_ms();
    let beat = crate::common::online_beat("w", 8);
    workers::record_beats(&app.pool, &[beat], now).await.unwrap();
    let running = app.submit_with(task("c", "running")).await;
    let claim = Claim {
        task_id: running["id"].as_str().unwrap().into(),
        dispatch_seq: 1,
        worker_id: "w".into(),
        ttl_seconds: 60,
    };
    assert!(matches!(lifecycle::claim(&app.pool, &[claim], now).await.unwrap()[0], ClaimOutcome::Granted(_)));
    let owner = app;
    let app = &owner;
    let routed = |body: Value| async move {
        let id = app.submit_with(body).await["id"].as_str().unwrap().to_owned();
        sqlx::query_scalar::<_, Option<String>>("SELECT routed_to FROM llm_tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&app.pool)
            .await
            .unwrap()
    };
    let keyed = |key: &str| json!({"context_id": "c", "agent_slug": "writer", "prompt": "p", "concurrency_key": key});
    assert_eq!(routed(task("c", "no limit anywhere")).await.as_deref(), Some("w"));

    let put = |path: &'static str| async move {
        assert_eq!(app.put(path, json!({"max_running": 2})).await.0, StatusCode::OK);
    };
    put("/api/runtime/concurrency-limits/concurrency_key/k").await;
    assert_eq!(routed(keyed("k")).await, None, "its key has a limit");
    assert_eq!(routed(keyed("other")).await.as_deref(), Some("w"), "another key's limit");
    assert_eq!(routed(task("c", "no key")).await.as_deref(), Some("w"));
    put("/api/runtime/concurrency-limits/concurrency_key/*").await;
    assert_eq!(routed(keyed("other")).await, None, "every key has a limit");
    assert_eq!(routed(task("c", "no key")).await.as_deref(), Some("w"), "`*` governs tasks with a key");
    put("/api/runtime/concurrency-limits/agent_slug/writer").await;
    assert_eq!(routed(task("c", "its agent")).await, None, "its agent has a limit");
    assert_eq!(app.delete("/api/runtime/concurrency-limits/agent_slug/writer").await.0, StatusCode::OK);
    put("/api/runtime/concurrency-limits/context_id/*").await;
    assert_eq!(routed(task("c", "its context")).await, None, "every context has a limit");
    owner.stop().await;
}

/// One admission of several tasks decides them in the order given, each counting the
/// slots and budget those before it took: a slot limited in one scope, a `*` limit in
/// another, a budget in a scope without concurrency limits; an id given twice is decided
/// once. Slots exist only where a limit applies, and count the leases that took them.
#[tokio::test]
async fn a_batch_is_admitted_in_order_each_task_counting_those_before_it() {
    use bloom::db::admission::{self, Admission};
    use bloom::domain::TaskId;

    let app = TestApp::spawn().await;
    for (path, body) in [
        ("/api/runtime/concurrency-limits/concurrency_key/k", json!({"max_running": 1})),
        ("/api/runtime/concurrency-limits/agent_slug/*", json!({"max_running": 3})),
        ("/api/runtime/budgets/context_id/b/requests-per-minute", json!({"max": 1})),
    ] {
        let (status, body) = app.put(path, body).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    let submit = |context: &'static str, agent: &'static str, key: Option<&'static str>| {
        let app = &app;
        async move {
            let body = json!({"context_id": context, "agent_slug": agent, "prompt": "p", "concurrency_key": key});
            TaskId::from(app.submit_with(body).await["id"].as_str().unwrap())
        }
    };
    let a = submit("x", "writer", Some("k")).await;
    let b = submit("x", "writer", Some("k")).await;
    let c = submit("b", "writer", None).await;
    let d = submit("b", "critic", None).await;
    let e = submit("y", "writer", None).await;
    let f = submit("z", "writer", None).await;
    let g = submit("z", "critic", None).await;

    let now = 1_800_000_030_000;
    let window = now - now % 60_000;
    let order = [a.clone(), b.clone(), c.clone(), d.clone(), e.clone(), f.clone(), g.clone(), a.clone()];
    let mut tx = app.pool.begin().await.unwrap();
    let decided = admission::admit(&mut tx, &order, now).await.unwrap();
    lease_admitted(&mut tx, &decided).await;
    tx.commit().await.unwrap();

    let ids: Vec<&TaskId> = decided.iter().map(|(id, _)| id).collect();
    assert_eq!(ids, [&a, &b, &c, &d, &e, &f, &g], "each once, in the order given");
    let slots = |i: usize| match &decided[i].1 {
        Admission::Admitted { slots, .. } => slots.clone(),
        other => panic!("task {i} not admitted: {other:?}"),
    };
    let blocked = |i: usize| match &decided[i].1 {
        Admission::Blocked { on, until, reason } => (on.clone(), *until, reason.clone()),
        other => panic!("task {i} admitted: {other:?}"),
    };
    assert_eq!(slots(0), ["agent_slug:writer", "concurrency_key:k"]);
    assert_eq!(
        blocked(1),
        ("concurrency_key:k".into(), None, "concurrency limit of concurrency_key k reached (1 running)".into())
    );
    assert_eq!(slots(2), ["agent_slug:writer"]);
    match &decided[2].1 {
        Admission::Admitted { charges, .. } => {
            assert_eq!(charges.as_array().map(Vec::len), Some(1), "{charges}");
            assert_eq!(charges[0]["counter"], "context_id:b:requests/minute", "{charges}");
            assert_eq!(charges[0]["window"], window, "{charges}");
        }
        other => panic!("{other:?}"),
    }
    let (on, until, reason) = blocked(3);
    assert_eq!((on.as_str(), until), ("context_id:b:requests/minute", Some(window + 60_000)));
    assert!(reason.starts_with("budget of context_id b for requests per minute used up"), "{reason}");
    assert_eq!(slots(4), ["agent_slug:writer"], "the third of the agent's three");
    assert_eq!(
        blocked(5),
        ("agent_slug:writer".into(), None, "concurrency limit of agent_slug writer reached (3 running)".into())
    );
    assert_eq!(slots(6), ["agent_slug:critic"], "the `*` limit counts each agent apart");

    let counts: Vec<(String, i32)> = sqlx::query_as("SELECT slot, running FROM concurrency_slot_counts ORDER BY slot")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    let expected = [("agent_slug:critic", 1), ("agent_slug:writer", 3), ("concurrency_key:k", 1)];
    assert_eq!(counts, expected.map(|(s, n)| (s.to_owned(), n)), "no slot of the context scope, which has no limit");
    app.stop().await;
}

/// Slot names compare byte by byte (their columns are `COLLATE "C"`) whatever the
/// database's collation. An admission that ordered its batch's slots under the
/// database's collation (`en-US` puts `alpha` before `Zed`, byte order the other way)
/// while it locked and read the slot rows in byte order wrote each slot's count to the
/// other slot, and the next admission went over the limit (when slots had rows counting
/// their running tasks, before migration 0044).
#[tokio::test]
async fn slots_are_counted_apart_under_a_languages_collation() {
    use bloom::db::admission::{self, Admission};
    use bloom::domain::TaskId;

    let (pool, _) = crate::common::fresh_db_with("TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'").await;
    let now = bloom::time::now_ms();
    let limit = ConcurrencyLimit::new(ConcurrencyScope::AgentSlug, "*", 3).unwrap();
    concurrency::set(&pool, &limit, false, now).await.unwrap();
    for (id, agent) in [("z1", "Zed"), ("z2", "Zed"), ("z3", "Zed"), ("z4", "Zed"), ("a1", "alpha"), ("a2", "alpha")] {
        sqlx::query(
            "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, created_at, updated_at)
             VALUES ($1, $1, $2, 'p', $3, $3)",
        )
        .bind(id)
        .bind(agent)
        .bind(now)
        .execute(&pool)
        .await
        .unwrap();
    }
    let admit = |ids: &'static [&'static str]| {
        let pool = pool.clone();
        async move {
            let ids: Vec<TaskId> = ids.iter().map(|&id| TaskId::from(id)).collect();
            let mut tx = pool.begin().await.unwrap();
            let decided = admission::admit(&mut tx, &ids, now).await.unwrap();
            lease_admitted(&mut tx, &decided).await;
            tx.commit().await.unwrap();
            decided.into_iter().map(|(id, a)| (id.0, matches!(a, Admission::Admitted { .. }))).collect::<Vec<_>>()
        }
    };
    let counts = || async {
        sqlx::query_as::<_, (String, i32)>("SELECT slot, running FROM concurrency_slot_counts ORDER BY slot")
            .fetch_all(&pool)
            .await
            .unwrap()
    };
    let admitted = admit(&["z1", "z2", "z3", "a1"]).await;
    assert!(admitted.iter().all(|(_, admitted)| *admitted), "{admitted:?}");
    assert_eq!(counts().await, [("agent_slug:Zed".to_owned(), 3), ("agent_slug:alpha".to_owned(), 1)]);
    assert_eq!(admit(&["z4", "a2"]).await, [("z4".to_owned(), false), ("a2".to_owned(), true)], "Zed has 3 running");
    assert_eq!(counts().await, [("agent_slug:Zed".to_owned(), 3), ("agent_slug:alpha".to_owned(), 2)]);
}

/// Admissions of one slot wait for each other: a second admission waits on the slot's
/// lock until the first's transaction ends, then counts the lease it committed (the slot
/// full: put aside), or, when it rolled back, the room it left. And a slot is counted only
/// in a statement's own snapshot: admission refuses a REPEATABLE READ transaction, whose
/// snapshot could predate a lease committed since.
#[tokio::test]
async fn admissions_of_a_slot_wait_for_each_other_and_count_what_committed() {
    use bloom::db::admission::{self, Admission};
    use bloom::domain::TaskId;

    let (pool, _) = crate::common::fresh_db().await;
    let now = bloom::time::now_ms();
    let limit = ConcurrencyLimit::new(ConcurrencyScope::ConcurrencyKey, "k", 1).unwrap();
    concurrency::set(&pool, &limit, false, now).await.unwrap();
    for id in ["a", "b", "c"] {
        sqlx::query(
            "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, created_at, updated_at, concurrency_key)
             VALUES ($1, $1, 'writer', 'p', $2, $2, 'k')",
        )
        .bind(id)
        .bind(now)
        .execute(&pool)
        .await
        .unwrap();
    }
    // The slot's row (the list of slots ever used), as its first admission leaves it:
    // that admission's insert would make the second wait for the row instead.
    sqlx::query(
        "INSERT INTO concurrency_slots (slot, scope, key) VALUES ('concurrency_key:k', 'concurrency_key', 'k')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let admitted = |decided: &[(TaskId, Admission)]| matches!(decided[0].1, Admission::Admitted { .. });
    for commit_first in [false, true] {
        let mut first = pool.begin().await.unwrap();
        let decided = admission::admit(&mut first, &[TaskId::from("a")], now).await.unwrap();
        assert!(admitted(&decided), "{decided:?}");
        lease_admitted(&mut first, &decided).await;
        let second = tokio::spawn({
            let pool = pool.clone();
            async move {
                let mut tx = pool.begin().await.unwrap();
                let decided = admission::admit(&mut tx, &[TaskId::from("b")], now).await.unwrap();
                tx.rollback().await.unwrap();
                decided
            }
        });
        let waiting = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1651273584 AND NOT granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
                == 1
        };
        wait_for("the second admission to wait for the slot's lock", Duration::from_secs(5), waiting).await;
        assert!(!second.is_finished(), "the second admission waits for the first's transaction");
        if commit_first {
            first.commit().await.unwrap();
        } else {
            first.rollback().await.unwrap();
        }
        let decided = second.await.unwrap();
        assert_eq!(admitted(&decided), !commit_first, "first committed: {commit_first}; {decided:?}");
    }
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await.unwrap();
    let refused = admission::admit(&mut tx, &[TaskId::from("c")], now).await.unwrap_err();
    assert!(refused.to_string().contains("READ COMMITTED"), "{refused}");
}

/// Leases the tasks an admission admitted, with the slots they took, in its transaction:
/// what every caller of the admission does, and what a slot's running tasks are counted from.
async fn lease_admitted(
    tx: &mut sqlx::PgConnection,
    decided: &[(bloom::domain::TaskId, bloom::db::admission::Admission)],
) {
    for (id, admission) in decided {
        if let bloom::db::admission::Admission::Admitted { slots, .. } = admission {
            sqlx::query(
                "INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, slots)
                 VALUES ('lease-' || $1, $1, 'w', 0, 60000, 60, 'active', 0, $2)",
            )
            .bind(id.as_str())
            .bind(slots)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
    }
}
