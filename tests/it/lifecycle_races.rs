//! The guarded transitions under races: the seed's holes, each with a test.

use bloom::db::lifecycle::{self, Claim, ClaimOutcome};
use bloom::db::workers::Beat;
use bloom::domain::{TaskId, WorkerId, WorkerStatus};
use bloom::time::now_ms;
use reqwest::StatusCode;
use serde_json::json;

use crate::common::TestApp;

#[tokio::test]
async fn two_concurrent_leases_of_one_task_exactly_one_wins() {
    let app = TestApp::spawn().await;
    app.register_worker("w1", 32).await;
    app.register_worker("w2", 32).await;
    for round in 0..20 {
        let id = app.submit(&format!("race {round}")).await["id"].as_str().unwrap().to_owned();
        let path = format!("/api/runtime/llm-tasks/{id}/lease");
        let calls: Vec<_> = (0..50).map(|_| app.post(&path, json!({}))).collect();
        let results = futures::future::join_all(calls).await;
        let won = results.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
        let conflicts = results.iter().filter(|(s, _)| *s == StatusCode::CONFLICT).count();
        assert_eq!((won, conflicts), (1, 49), "{results:?}");
        assert_eq!(app.count(&format!("SELECT count(*) FROM leases WHERE task_id = '{id}'")).await, 1);
        assert_eq!(app.count(&format!("SELECT attempts::bigint FROM llm_tasks WHERE id = '{id}'")).await, 1);
    }
    app.stop().await;
}

#[tokio::test]
async fn concurrent_claims_of_one_dispatch_grant_one_lease() {
    let app = TestApp::spawn().await;
    for w in ["w0", "w1", "w2", "w3", "w4", "w5", "w9", "a", "b"] {
        app.register_worker(w, 4).await;
    }
    let task = app.submit("claim me").await;
    let id = TaskId::from(task["id"].as_str().unwrap());
    let claims: Vec<_> = (0..6)
        .map(|i| {
            let pool = app.pool.clone();
            let c = Claim {
                task_id: id.clone(),
                dispatch_seq: 1,
                worker_id: WorkerId::from(format!("w{i}")),
                ttl_seconds: 30,
            };
            tokio::spawn(async move { lifecycle::claim(&pool, &[c], now_ms()).await.unwrap() })
        })
        .collect();
    let mut granted = 0;
    for c in claims {
        if matches!(c.await.unwrap()[0], ClaimOutcome::Granted(_)) {
            granted += 1;
        }
    }
    assert_eq!(granted, 1);
    // A claim of a stale dispatch is refused even if the task were queued.
    let stale = Claim { task_id: id.clone(), dispatch_seq: 0, worker_id: "w9".into(), ttl_seconds: 30 };
    assert_eq!(lifecycle::claim(&app.pool, &[stale], now_ms()).await.unwrap(), vec![ClaimOutcome::Refused]);
    // Two claims in one batch for the same task: one lease.
    let t2 = TaskId::from(app.submit("batch").await["id"].as_str().unwrap());
    let both = [
        Claim { task_id: t2.clone(), dispatch_seq: 1, worker_id: "a".into(), ttl_seconds: 30 },
        Claim { task_id: t2.clone(), dispatch_seq: 1, worker_id: "b".into(), ttl_seconds: 30 },
    ];
    let out = lifecycle::claim(&app.pool, &both, now_ms()).await.unwrap();
    assert_eq!(out.iter().filter(|o| matches!(o, ClaimOutcome::Granted(_))).count(), 1);
    assert_eq!(app.count(&format!("SELECT count(*) FROM leases WHERE task_id = '{t2}'")).await, 1);
    app.stop().await;
}

#[tokio::test]
async fn heartbeat_and_complete_by_a_caller_without_the_lease_are_409() {
    let app = TestApp::spawn().await;
    app.register_worker("w1", 1).await;
    let (id, leased) = app.leased_task("x").await;
    let lease_id = leased["lease"]["id"].as_str().unwrap();
    for body in [json!({"lease_id": "not-mine"}), json!({"worker_id": "w2"})] {
        let (status, _) = app.post(&format!("/api/runtime/llm-tasks/{id}/heartbeat"), body.clone()).await;
        assert_eq!(status, StatusCode::CONFLICT);
        let mut complete = body.clone();
        complete["status"] = json!("success");
        complete["metrics"] = json!({"duration_ms": 1});
        let (status, _) = app.post(&format!("/api/runtime/llm-tasks/{id}/complete"), complete).await;
        assert_eq!(status, StatusCode::CONFLICT);
    }
    assert_eq!(app.status_of(&id).await, "leased");
    let (status, _) = app
        .post(
            &format!("/api/runtime/llm-tasks/{id}/complete"),
            json!({"lease_id": lease_id, "worker_id": "w1", "status": "success", "metrics": {"duration_ms": 1}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn expiry_requeues_running_tasks_counts_attempts_and_kills_at_the_limit() {
    let app = TestApp::spawn().await;
    app.register_worker("w1", 4).await;
    let id = app.submit_with(json!({"context_id": "c", "agent_slug": "a", "prompt": "p", "max_attempts": 2})).await
        ["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for attempt in 1..=2 {
        let (status, leased) = app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({"ttl_seconds": 1})).await;
        assert_eq!(status, StatusCode::CREATED, "{leased}");
        // The seed only expired `leased` tasks: a heartbeat made it `running`.
        app.post(&format!("/api/runtime/llm-tasks/{id}/heartbeat"), json!({})).await;
        assert_eq!(app.status_of(&id).await, "running");
        // The sweep as it runs once the 1 s TTL has passed.
        let later = now_ms() + 1_100;
        let expiry = lifecycle::expire(&app.pool, lifecycle::Expiring::Before(later), 100, later).await.unwrap();
        assert_eq!(expiry.expired, 1);
        let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{id}")).await;
        assert_eq!(t["attempts"], attempt);
        if attempt < 2 {
            assert_eq!(t["status"], "queued");
            assert_eq!(t["lease_id"], json!(null));
            assert_eq!(expiry.requeued.len(), 1);
            assert_eq!(expiry.requeued[0].task.dispatch_seq, 2);
            // The late completion of the expired lease changes nothing.
            let (status, _) = app
                .post(
                    &format!("/api/runtime/llm-tasks/{id}/complete"),
                    json!({"status": "success", "metrics": {"duration_ms": 1}}),
                )
                .await;
            assert_eq!(status, StatusCode::CONFLICT);
        } else {
            assert_eq!(t["status"], "dead");
            assert_eq!(expiry.dead, 1);
        }
    }
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'expired'").await, 2);
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'active'").await, 0);
    // A second sweep finds nothing.
    assert_eq!(
        lifecycle::expire(&app.pool, lifecycle::Expiring::Before(bloom::time::now_ms()), 100, now_ms())
            .await
            .unwrap()
            .expired,
        0
    );
    app.stop().await;
}

#[tokio::test]
async fn stats_count_in_sql() {
    let app = TestApp::spawn().await;
    for _ in 0..3 {
        app.submit("s").await;
    }
    let (_, stats) = app.get("/api/runtime/stats").await;
    assert_eq!(stats["tasks"], json!({"total": 3, "by_status": {"queued": 3}}));
    app.stop().await;
}

/// Concurrent leases of a context whose sticky worker has one slot left: the worker's
/// active leases are counted after its row is locked, so it never exceeds its
/// `max_concurrency`; the leases it cannot take go to the other worker.
#[tokio::test]
async fn concurrent_leases_never_overfill_a_worker() {
    let app = TestApp::spawn().await;
    for round in 0..50 {
        let (small, big, context) = (format!("small-{round}"), format!("big-{round}"), format!("ctx-{round}"));
        app.register_worker(&small, 2).await;
        app.register_worker(&big, 32).await;
        let task = |n: usize| {
            let app = &app;
            let context = context.clone();
            async move {
                app.submit_with(json!({"context_id": context, "agent_slug": "a", "prompt": format!("p{n}")})).await
                    ["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }
        };
        let first = task(0).await;
        let (status, _) = app.post(&format!("/api/runtime/llm-tasks/{first}/lease"), json!({"worker_id": small})).await;
        assert_eq!(status, StatusCode::CREATED);
        let ids = futures::future::join_all((1..=24).map(task)).await;
        let paths: Vec<String> = ids.iter().map(|id| format!("/api/runtime/llm-tasks/{id}/lease")).collect();
        let answers = futures::future::join_all(paths.iter().map(|p| app.post(p, json!({})))).await;
        assert!(answers.iter().all(|(s, _)| *s == StatusCode::CREATED), "{answers:?}");
        let active = |w: String| {
            let app = &app;
            async move {
                app.count(&format!("SELECT count(*) FROM leases WHERE worker_id = '{w}' AND status = 'active'")).await
            }
        };
        assert_eq!(active(small.clone()).await, 2, "round {round}");
        assert_eq!(active(big.clone()).await, 23, "round {round}");
        for w in [&small, &big] {
            app.delete(&format!("/api/runtime/workers/{w}")).await;
        }
    }
    app.stop().await;
}

/// A lease naming its worker is refused like one finding no worker (503) when that
/// worker is offline, lacks the Claude CLI or has no free slot.
#[tokio::test]
async fn an_explicit_worker_must_be_eligible() {
    let app = TestApp::spawn().await;
    let register = |body: serde_json::Value| {
        let app = &app;
        async move {
            let (status, w) = app.post("/api/runtime/workers", body).await;
            assert!(status.is_success(), "{w}");
        }
    };
    register(json!({"name": "off", "status": "offline"})).await;
    register(json!({"name": "no-cli", "capabilities": {"claude_cli": false}})).await;
    register(json!({"name": "one", "capabilities": {"max_concurrency": 1}})).await;
    let lease_to = |worker: &'static str| {
        let app = &app;
        async move {
            let id = app.submit(worker).await["id"].as_str().unwrap().to_owned();
            app.post(&format!("/api/runtime/llm-tasks/{id}/lease"), json!({"worker_id": worker})).await
        }
    };
    for worker in ["off", "no-cli", "ghost"] {
        let (status, body) = lease_to(worker).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{worker}: {body}");
        assert_eq!(body["error"], "No available worker with free capacity");
    }
    assert_eq!(lease_to("one").await.0, StatusCode::CREATED);
    let (status, body) = lease_to("one").await;
    assert_eq!(
        (status, body["error"].clone()),
        (StatusCode::SERVICE_UNAVAILABLE, json!("No available worker with free capacity"))
    );
    assert_eq!(app.count("SELECT count(*) FROM leases").await, 1);
    app.stop().await;
}

/// A claim sent again (its answer was lost, or its reconciler died after committing)
/// gets the lease it already holds; another worker's claim of that dispatch is refused.
#[tokio::test]
async fn a_repeated_claim_gets_the_same_lease() {
    let app = TestApp::spawn().await;
    app.register_worker("w", 1).await;
    app.register_worker("x", 1).await;
    let id = TaskId::from(app.submit("again").await["id"].as_str().unwrap());
    let claim = |w: &str| Claim { task_id: id.clone(), dispatch_seq: 1, worker_id: w.into(), ttl_seconds: 30 };
    let ClaimOutcome::Granted(first) = lifecycle::claim(&app.pool, &[claim("w")], now_ms()).await.unwrap().remove(0)
    else {
        panic!("first claim refused");
    };
    let ClaimOutcome::Granted(again) = lifecycle::claim(&app.pool, &[claim("w")], now_ms()).await.unwrap().remove(0)
    else {
        panic!("repeated claim refused");
    };
    assert_eq!((again.id, again.expires_at), (first.id, first.expires_at));
    assert_eq!(lifecycle::claim(&app.pool, &[claim("x")], now_ms()).await.unwrap(), vec![ClaimOutcome::Refused]);
    assert_eq!(app.count("SELECT count(*) FROM leases").await, 1);
    assert_eq!(app.count(&format!("SELECT attempts::bigint FROM llm_tasks WHERE id = '{id}'")).await, 1);
    app.stop().await;
}

/// The workers holding more active leases than their `max_concurrency`.
async fn overfilled_workers(app: &TestApp) -> i64 {
    app.count(
        "SELECT count(*) FROM workers w
         WHERE (SELECT count(*) FROM leases l WHERE l.worker_id = w.id AND l.status = 'active')
               > COALESCE((w.capabilities->>'max_concurrency')::int, 1)",
    )
    .await
}

/// NATS claims beyond a worker's `max_concurrency` in Postgres are answered `Full`
/// (claim again later), whether they arrive in one batch or in many concurrent ones,
/// even from a worker that claims more than it has slots for. Ending leases frees
/// their slots. A worker Postgres does not know is full.
#[tokio::test]
async fn claims_never_take_a_worker_beyond_its_capacity() {
    let app = TestApp::spawn().await;
    app.register_worker("w", 3).await;
    let claim = |id: &TaskId| Claim { task_id: id.clone(), dispatch_seq: 1, worker_id: "w".into(), ttl_seconds: 30 };
    for round in 0..20 {
        let mut ids = Vec::new();
        for i in 0..12 {
            ids.push(TaskId::from(app.submit(&format!("r{round} t{i}")).await["id"].as_str().unwrap()));
        }
        // Eight single claims and one batch of four, all at once.
        let singles = ids[..8].iter().map(|id| {
            let (pool, c) = (app.pool.clone(), claim(id));
            tokio::spawn(async move { lifecycle::claim(&pool, &[c], now_ms()).await.unwrap() })
        });
        let batch: Vec<Claim> = ids[8..].iter().map(claim).collect();
        let pool = app.pool.clone();
        let batch = tokio::spawn(async move { lifecycle::claim(&pool, &batch, now_ms()).await.unwrap() });
        let mut outcomes: Vec<ClaimOutcome> = Vec::new();
        for single in singles.collect::<Vec<_>>() {
            outcomes.extend(single.await.unwrap());
        }
        outcomes.extend(batch.await.unwrap());
        let granted = outcomes.iter().filter(|o| matches!(o, ClaimOutcome::Granted(_))).count();
        let full = outcomes.iter().filter(|o| **o == ClaimOutcome::Full).count();
        assert_eq!((granted, full), (3, 9), "round {round}: {outcomes:?}");
        assert_eq!(app.count("SELECT count(*) FROM leases WHERE worker_id = 'w' AND status = 'active'").await, 3);
        assert_eq!(app.count("SELECT bloom_worker_leases(id)::bigint FROM workers WHERE id = 'w'").await, 3);
        // The worker's previous process ends: its slots are free again.
        let ended = lifecycle::expire(&app.pool, lifecycle::Expiring::HeldBy(&WorkerId::from("w")), 100, now_ms())
            .await
            .unwrap();
        assert_eq!(ended.expired, 3);
        assert_eq!(app.count("SELECT bloom_worker_leases(id)::bigint FROM workers WHERE id = 'w'").await, 0);
    }
    // A batch larger than the free slots gets them in task id order.
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(TaskId::from(app.submit(&format!("batch {i}")).await["id"].as_str().unwrap()));
    }
    ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let outcomes = lifecycle::claim(&app.pool, &ids.iter().map(claim).collect::<Vec<_>>(), now_ms()).await.unwrap();
    let granted: Vec<bool> = outcomes.iter().map(|o| matches!(o, ClaimOutcome::Granted(_))).collect();
    assert_eq!(granted, [true, true, true, false, false]);
    assert_eq!(outcomes[3..], [ClaimOutcome::Full, ClaimOutcome::Full]);
    // A held lease is granted again even when the worker is full.
    let again = lifecycle::claim(&app.pool, &[claim(&ids[0])], now_ms()).await.unwrap();
    assert!(matches!(again[0], ClaimOutcome::Granted(_)), "{again:?}");
    let unknown = Claim { task_id: ids[4].clone(), dispatch_seq: 1, worker_id: "nobody".into(), ttl_seconds: 30 };
    assert_eq!(lifecycle::claim(&app.pool, &[unknown], now_ms()).await.unwrap(), [ClaimOutcome::Full]);
    assert_eq!(overfilled_workers(&app).await, 0);
    app.stop().await;
}

/// A worker's active leases (`bloom_worker_leases`) follow every way a lease starts and ends: REST lease, heartbeat,
/// complete, hand-back, expiry, and a worker removed and registered again while its
/// leases are active.
#[tokio::test]
async fn active_leases_follow_every_transition() {
    let app = TestApp::spawn().await;
    app.register_worker("r", 8).await;
    let mut leased = Vec::new();
    for i in 0..4 {
        let (id, answer) = app.leased_task(&format!("t{i}")).await;
        leased.push((id, answer["lease"]["id"].as_str().unwrap().to_owned()));
    }
    let active = || app.count("SELECT bloom_worker_leases(id)::bigint FROM workers WHERE id = 'r'");
    assert_eq!(active().await, 4);
    let (id, lease) = &leased[0];
    app.post(&format!("/api/runtime/llm-tasks/{id}/heartbeat"), json!({"lease_id": lease})).await;
    assert_eq!(active().await, 4);
    let done = json!({"lease_id": lease, "status": "success", "output": "ok", "metrics": {"duration_ms": 1}});
    assert_eq!(app.post(&format!("/api/runtime/llm-tasks/{id}/complete"), done).await.0, StatusCode::OK);
    assert_eq!(active().await, 3);
    let (id, lease) = &leased[1];
    assert!(lifecycle::release(&app.pool, &TaskId::from(id.as_str()), &lease.as_str().into(), now_ms()).await.unwrap());
    assert_eq!(active().await, 2);
    app.delete("/api/runtime/workers/r").await;
    app.register_worker("r", 8).await;
    assert_eq!(active().await, 2);
    let ended =
        lifecycle::expire(&app.pool, lifecycle::Expiring::HeldBy(&WorkerId::from("r")), 100, now_ms()).await.unwrap();
    assert_eq!(ended.expired, 2);
    assert_eq!(active().await, 0);
    assert_eq!(overfilled_workers(&app).await, 0);
    app.stop().await;
}

/// A worker's start ends the leases its earlier processes held, once per process: the
/// same start handled again after the worker began claiming (its first answer came
/// late), or a start of an earlier process, ends nothing; a later process's does, and of
/// two copies of one start handled at once, one ends them.
#[tokio::test]
async fn a_start_ends_the_leases_of_earlier_processes_once() {
    let app = TestApp::spawn().await;
    app.register_worker("w", 4).await;
    let claimed = |text: &'static str| {
        let app = &app;
        async move {
            let id = TaskId::from(app.submit(text).await["id"].as_str().unwrap());
            let claim = Claim { task_id: id.clone(), dispatch_seq: 1, worker_id: "w".into(), ttl_seconds: 30 };
            let granted = lifecycle::claim(&app.pool, &[claim], now_ms()).await.unwrap();
            assert!(matches!(granted[..], [ClaimOutcome::Granted(_)]), "{granted:?}");
            id
        }
    };
    let beat = Beat {
        id: "w".into(),
        status: WorkerStatus::Online,
        capabilities: serde_json::from_value(json!({"max_concurrency": 4})).unwrap(),
        ip_addrs: Vec::new(),
    };
    let [earlier, boot, later, latest] =
        ["1", "2", "3", "4"].map(|n| format!("019ae000-0000-7000-8000-00000000000{n}"));
    let restart = |boot: &String| {
        let (pool, beat, boot) = (app.pool.clone(), beat.clone(), boot.clone());
        async move { lifecycle::restart(&pool, &beat.id, Some(&beat), Some(&boot), now_ms()).await }
    };
    claimed("a").await;
    claimed("b").await;
    let start = restart(&boot).await.unwrap();
    assert_eq!((start.expiry.expired, start.expiry.requeued.len()), (2, 2));
    let c = claimed("c").await;
    for again in [&boot, &earlier] {
        assert_eq!(restart(again).await.unwrap().expiry.expired, 0, "start of {again}");
    }
    assert_eq!(app.status_of(c.as_str()).await, "leased");
    assert_eq!(restart(&later).await.unwrap().expiry.expired, 1);
    assert_eq!(app.status_of(c.as_str()).await, "queued");
    claimed("d").await;
    claimed("e").await;
    let (x, y) = tokio::join!(restart(&latest), restart(&latest));
    let mut ended = [x.unwrap().expiry.expired, y.unwrap().expiry.expired];
    ended.sort();
    assert_eq!(ended, [0, 2]);
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'active'").await, 0);
    assert_eq!(overfilled_workers(&app).await, 0);
    app.stop().await;
}

/// The lease-update trigger counts each end once, and nothing else, whatever the sizes
/// of the statements a connection runs after its first (whose single row its cached plan
/// was made for): one lease ended, 40 active leases updated without ending (heartbeats),
/// 39 of them ended, then the last one ended while the ended ones change again. Each end
/// gives its worker slot back once (the count of a worker's active leases is a number,
/// not checked against its capacity here), and the concurrency slot's count, read from
/// the active leases, follows.
#[tokio::test]
async fn lease_ends_are_counted_once_by_statements_of_any_size() {
    let app = TestApp::spawn().await;
    app.register_worker("w", 32).await;
    let mut conn = app.pool.acquire().await.unwrap().detach();
    let leases = |prefix: &str, n: usize| {
        format!(
            "INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat,
                                 context_id, slots)
             SELECT '{prefix}' || i, 't-{prefix}' || i, 'w', 0, 60000, 60, 'active', 0, 'c',
                    CASE WHEN i % 2 = 0 THEN '{{concurrency_key:k}}'::text[] ELSE '{{}}' END
             FROM generate_series(1, {n}) i"
        )
    };
    let active = || app.count("SELECT bloom_worker_leases(id)::bigint FROM workers WHERE id = 'w'");
    let keyed = || app.count("SELECT bloom_slot_running('concurrency_key:k')::bigint");
    for sql in [leases("one", 1), "UPDATE leases SET status = 'released' WHERE id = 'one1'".into(), leases("many", 40)]
    {
        sqlx::raw_sql(&sql).execute(&mut conn).await.unwrap();
    }
    assert_eq!((active().await, keyed().await), (40, 20));
    sqlx::raw_sql("UPDATE leases SET last_heartbeat = 5 WHERE id LIKE 'many%'").execute(&mut conn).await.unwrap();
    assert_eq!((active().await, keyed().await), (40, 20));
    sqlx::raw_sql("UPDATE leases SET status = 'released' WHERE id LIKE 'many%' AND id <> 'many40'")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!((active().await, keyed().await), (1, 1));
    sqlx::raw_sql("UPDATE leases SET status = 'expired' WHERE id LIKE 'many%'").execute(&mut conn).await.unwrap();
    assert_eq!((active().await, keyed().await), (0, 0));
    assert_eq!(overfilled_workers(&app).await, 0);
    app.stop().await;
}

/// A batch of worker beats takes the workers' rows in id order, as claims lock them: a
/// batch that took `b` and then waited for `a`, locked by a claim about to lock `b`, was
/// a deadlock (Postgres cancels one side after a second).
#[tokio::test]
async fn worker_beats_take_their_rows_in_the_order_claims_lock_them() {
    use bloom::db::workers;
    use std::time::Duration;

    let (pool, _) = crate::common::fresh_db().await;
    let beat = |id: &str| crate::common::online_beat(id, 4);
    workers::record_beats(&pool, &[beat("a"), beat("b")], now_ms()).await.unwrap();
    let mut claim = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM workers WHERE id = 'a' FOR UPDATE").execute(&mut *claim).await.unwrap();
    let beats = {
        let pool = pool.clone();
        tokio::spawn(async move { workers::record_beats(&pool, &[beat("b"), beat("a")], now_ms()).await })
    };
    crate::common::wait_for("the beats to wait for worker a's row", Duration::from_secs(10), || async {
        let waiting =
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'";
        sqlx::query_scalar::<_, i64>(waiting).fetch_one(&pool).await.unwrap() > 0
    })
    .await;
    let b = sqlx::query("SELECT 1 FROM workers WHERE id = 'b' FOR UPDATE NOWAIT").execute(&mut *claim).await;
    assert!(b.is_ok(), "the beats took b's row before waiting for a's: {b:?}");
    claim.commit().await.unwrap();
    let stored = beats.await.unwrap().unwrap();
    assert_eq!(stored.len(), 2);
}

/// A worker's free slots are counted after its row's lock is taken: a claim that waited
/// for another's lock counts the lease that one committed. As do the statements of the
/// previous release, which read `bloom_active_leases` on the worker's row as they lock it.
#[tokio::test]
async fn a_workers_room_counts_the_leases_committed_while_it_waited_for_the_lock() {
    use std::time::Duration;

    let (pool, _) = crate::common::fresh_db().await;
    sqlx::query(
        "INSERT INTO workers (id, node_id, status, capabilities, registered_at, source)
         VALUES ('w', 'n', 'online', '{\"max_concurrency\": 2}', 0, 'nats')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let readers = [
        "SELECT free FROM bloom_worker_room(ARRAY['w'])",
        // A claim's room in the previous release.
        "SELECT COALESCE((w.capabilities->>'max_concurrency')::int, 1)
                - bloom_active_leases(w.id, w.active_leases, w.ends_folded)
         FROM workers w WHERE w.id = ANY(ARRAY['w']) ORDER BY w.id FOR UPDATE",
    ];
    for (i, reader) in readers.into_iter().enumerate() {
        let mut first = pool.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM workers WHERE id = 'w' FOR UPDATE").execute(&mut *first).await.unwrap();
        sqlx::query(
            "INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat)
             VALUES ($1, $1, 'w', 0, 60000, 60, 'active', 0)",
        )
        .bind(format!("l{i}"))
        .execute(&mut *first)
        .await
        .unwrap();
        let second = tokio::spawn({
            let pool = pool.clone();
            async move {
                let mut tx = pool.begin().await.unwrap();
                let free: i32 = sqlx::query_scalar(reader).fetch_one(&mut *tx).await.unwrap();
                tx.rollback().await.unwrap();
                free
            }
        });
        let waiting = || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
                == 1
        };
        crate::common::wait_for("the second reader to wait for the worker's row", Duration::from_secs(5), waiting)
            .await;
        assert!(!second.is_finished(), "the second reader waits for the first's transaction");
        first.commit().await.unwrap();
        // The leases committed so far (one per round), of 2 slots.
        assert_eq!(second.await.unwrap(), 1 - i as i32, "reader {i}");
    }
    // A snapshot taken once per transaction would not see the leases committed while
    // waiting for the lock: refused.
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await.unwrap();
    let refused = sqlx::query("SELECT * FROM bloom_worker_room(ARRAY['w'])").execute(&mut *tx).await.unwrap_err();
    assert!(refused.to_string().contains("READ COMMITTED"), "{refused}");
}
