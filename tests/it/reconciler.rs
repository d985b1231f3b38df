//! The reconciler as several replicas: leader-only membridge sync with failover, work
//! shared across replicas surviving a replica's death, and expiry racing redelivery.

use std::time::Duration;

use serde_json::json;

use crate::common::{wait_for, Opts, TestApp};
use crate::fake_membridge::{self, now_secs};

#[tokio::test]
async fn one_leader_syncs_membridge_and_another_takes_over_when_it_dies() {
    let fake = fake_membridge::start("k").await;
    fake.set_agents(vec![
        json!({"name": "agent-1", "url": "http://a1:8001", "status": "online", "registered_at": now_secs(), "last_seen": now_secs()}),
        json!({"name": "agent-2", "url": "http://a2:8001", "status": "unknown", "registered_at": now_secs(), "last_seen": null}),
    ]);
    let app = TestApp::spawn_with(Opts {
        membridge: Some(bloom::domain::Endpoint { url: fake.url(), admin_key: bloom::domain::Secret::new("k") }),
        ..Opts::default()
    })
    .await;
    // A REST worker that membridge does not know and that went silent: goes offline.
    app.register_worker("ghost", 1).await;
    sqlx::query("UPDATE workers SET last_heartbeat = 0 WHERE id = 'ghost'").execute(&app.pool).await.unwrap();

    let mut replicas = Vec::new();
    for _ in 0..3 {
        let cancel = app.cancel.child_token();
        let r = app.reconciler_with(app.reconciler_settings(), &cancel).await;
        let handle = tokio::spawn(r.clone().run(cancel));
        replicas.push((r, handle));
    }
    let leaders = |rs: &Vec<(bloom::reconciler::Reconciler, tokio::task::JoinHandle<anyhow::Result<()>>)>| {
        rs.iter().filter(|(r, h)| !h.is_finished() && r.metrics.is_leader.get() == 1).count()
    };
    wait_for("a leader", Duration::from_secs(10), || async { leaders(&replicas) == 1 }).await;
    wait_for("agents synced", Duration::from_secs(10), || async {
        app.count("SELECT count(*) FROM workers WHERE source = 'membridge'").await == 2
    })
    .await;
    let (_, w1) = app.get("/api/runtime/workers/agent-1").await;
    assert_eq!(w1["status"], "online");
    assert_eq!(w1["capabilities"], json!({"claude_cli": true, "max_concurrency": 1, "labels": []}));
    let last = w1["last_heartbeat"].as_i64().unwrap();
    assert!((last - bloom::time::now_ms()).abs() < 60_000, "last_seen converted from seconds: {last}");
    let (_, w2) = app.get("/api/runtime/workers/agent-2").await;
    assert_eq!(w2["status"], "unknown");
    wait_for("ghost offline", Duration::from_secs(15), || async {
        app.count("SELECT count(*) FROM workers WHERE id = 'ghost' AND status = 'offline'").await == 1
    })
    .await;
    let audited = "SELECT count(*) FROM audit_logs WHERE action = 'worker_offline' AND entity_id = 'ghost'
                   AND detail LIKE 'Not reported by membridge%'";
    assert_eq!(app.count(audited).await, 1);
    // Only the leader ever synced. A sync is counted once it has also rerouted the tasks of
    // the workers it marked offline, after its commit made them visible here.
    let syncs = || replicas.iter().map(|(r, _)| r.metrics.membridge_sync_runs_total.get()).collect::<Vec<u64>>();
    wait_for("the sync counted", Duration::from_secs(10), || async { syncs().iter().any(|n| *n > 0) }).await;
    let syncing = syncs();
    assert_eq!(syncing.iter().filter(|n| **n > 0).count(), 1, "{syncing:?}");

    // Kill the leader (its future and its connection are dropped).
    let idx = replicas.iter().position(|(r, _)| r.metrics.is_leader.get() == 1).unwrap();
    replicas[idx].1.abort();
    let _ = (&mut replicas[idx].1).await;
    let before = replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != idx)
        .map(|(_, (r, _))| r.metrics.membridge_sync_runs_total.get())
        .sum::<u64>();
    wait_for("failover", Duration::from_secs(10), || async {
        replicas.iter().enumerate().filter(|(i, (r, _))| *i != idx && r.metrics.is_leader.get() == 1).count() == 1
    })
    .await;
    wait_for("new leader syncs", Duration::from_secs(10), || async {
        replicas
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != idx)
            .map(|(_, (r, _))| r.metrics.membridge_sync_runs_total.get())
            .sum::<u64>()
            > before
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn all_tasks_complete_while_a_reconciler_dies_mid_load() {
    let app = TestApp::spawn().await;
    let mut handles = Vec::new();
    for _ in 0..3 {
        let cancel = app.cancel.child_token();
        let r = app.reconciler_with(app.reconciler_settings(), &cancel).await;
        handles.push(tokio::spawn(r.run(cancel)));
    }
    app.start_worker("w1", 16).await;
    app.start_worker("w2", 16).await;
    let submit = async {
        for i in 0..300 {
            app.submit(&format!("load {i}")).await;
        }
    };
    let kill = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        handles[0].abort();
    };
    tokio::join!(submit, kill);
    wait_for("all completed", Duration::from_secs(60), || async {
        app.count("SELECT count(*) FROM llm_tasks WHERE status = 'completed'").await == 300
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM llm_results WHERE status = 'success'").await, 300);
    assert_eq!(app.count("SELECT count(DISTINCT task_id) FROM llm_results").await, 300);
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'active'").await, 0);
    app.stop().await;
}

#[tokio::test]
async fn expiry_and_redelivery_racing_leave_one_lease_and_one_counted_attempt() {
    // TTL 1 s: the first worker's message is redelivered by JetStream at about the time
    // the sweeper expires its lease.
    let app = TestApp::spawn_with(Opts { lease_ttl_secs: 1, ..Opts::default() }).await;
    let (_r, _) = app.start_reconciler().await;
    let (_r2, _) = app.start_reconciler().await;
    let (_, doomed) = app.start_worker("doomed", 4).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(app.submit(&format!("sleep:{}", 800 + i * 100)).await["id"].as_str().unwrap().to_owned());
    }
    wait_for("all leased", Duration::from_secs(10), || async {
        app.count("SELECT count(*) FROM llm_tasks WHERE status IN ('leased', 'running')").await == 4
    })
    .await;
    doomed.abort();
    app.start_worker("w2", 4).await;
    app.start_worker("w3", 4).await;
    wait_for("all completed", Duration::from_secs(30), || async {
        app.count("SELECT count(*) FROM llm_tasks WHERE status = 'completed'").await == 4
    })
    .await;
    for id in &ids {
        let (_, t) = app.get(&format!("/api/runtime/llm-tasks/{id}")).await;
        assert_eq!(t["attempts"], 2, "{t}");
        assert_eq!(app.count(&format!("SELECT count(*) FROM leases WHERE task_id = '{id}'")).await, 2);
        assert_eq!(
            app.count(&format!("SELECT count(*) FROM leases WHERE task_id = '{id}' AND status = 'released'")).await,
            1
        );
    }
    assert_eq!(app.count("SELECT count(*) FROM llm_results WHERE status = 'success'").await, 4);
    app.stop().await;
}

/// The sweeper's duty one pass at a time, on a manual clock: a lease expires once its
/// TTL and the grace have passed, not before; a NATS worker silent past the worker
/// timeout goes offline, its leases end at once (their tasks requeued) and the task
/// routed to it goes back to the pool; a worker that keeps beating keeps its lease.
#[tokio::test]
async fn the_sweeper_acts_when_the_time_has_come_and_not_before() {
    use bloom::db::lifecycle::{self, Claim, ClaimOutcome};
    use bloom::db::workers;
    use bloom::reconciler::sweeper::{self, SweepReport};

    let app = TestApp::spawn().await;
    let settings = bloom::reconciler::ReconcilerSettings {
        expiry_grace: Duration::from_secs(2),
        worker_timeout: Duration::from_secs(30),
        ..app.reconciler_settings()
    };
    let mut r = app.reconciler_with(settings, &app.cancel).await;
    let start = bloom::time::now_ms();
    r.clock = bloom::time::Clock::manual(start);
    let beat = |id: &str| crate::common::online_beat(id, 4);
    workers::record_beats(&app.pool, &[beat("w"), beat("v")], start).await.unwrap();
    let claim = |task: &serde_json::Value, worker: &str| Claim {
        task_id: task["id"].as_str().unwrap().into(),
        dispatch_seq: 1,
        worker_id: worker.into(),
        ttl_seconds: 60,
    };
    let silent = app.submit_with(json!({"context_id": "c", "agent_slug": "a", "prompt": "claimed"})).await;
    let beating = app.submit_with(json!({"context_id": "d", "agent_slug": "a", "prompt": "claimed"})).await;
    let granted = lifecycle::claim(&app.pool, &[claim(&silent, "w"), claim(&beating, "v")], start).await.unwrap();
    assert!(granted.iter().all(|g| matches!(g, ClaimOutcome::Granted(_))), "{granted:?}");
    // The next task of the context is routed to `w` (it holds the context).
    let routed = app.submit_with(json!({"context_id": "c", "agent_slug": "a", "prompt": "routed"})).await;
    let routed = routed["id"].as_str().unwrap().to_owned();
    let routed_sql = format!("SELECT count(*) FROM llm_tasks WHERE id = '{routed}' AND routed_to = 'w'");
    let routed_to = || app.count(&routed_sql);
    assert_eq!(routed_to().await, 1);

    r.clock.advance(Duration::from_secs(10));
    assert_eq!(sweeper::run_once(&r).await.unwrap(), SweepReport::default());
    r.clock.advance(Duration::from_secs(25));
    workers::record_beats(&app.pool, &[beat("v")], r.clock.now_ms()).await.unwrap();
    let report = sweeper::run_once(&r).await.unwrap();
    assert_eq!(
        (report.workers_offline, report.tasks_rerouted, report.leases_expired, report.tasks_requeued),
        (1, 1, 1, 1),
        "{report:?}"
    );
    assert_eq!(routed_to().await, 0);
    assert_eq!(app.status_of(silent["id"].as_str().unwrap()).await, "queued");
    assert_eq!(app.status_of(beating["id"].as_str().unwrap()).await, "leased");
    let ended =
        "SELECT count(*) FROM audit_logs WHERE action = 'lease_expired' AND detail LIKE '%its worker went silent%'";
    assert_eq!(app.count(ended).await, 1);
    r.clock.advance(Duration::from_secs(26));
    workers::record_beats(&app.pool, &[beat("v")], r.clock.now_ms()).await.unwrap();
    assert_eq!(sweeper::run_once(&r).await.unwrap(), SweepReport::default(), "61 s: within the grace");
    r.clock.advance(Duration::from_secs(2));
    let expired = sweeper::run_once(&r).await.unwrap();
    assert_eq!((expired.leases_expired, expired.tasks_requeued, expired.workers_offline), (1, 1, 0), "{expired:?}");
    assert_eq!(app.status_of(beating["id"].as_str().unwrap()).await, "queued");
    app.stop().await;
}

/// After this replica saw the heartbeat path broken (recorded here as the sweep, the
/// heartbeat and the results paths record a failure), it expires nothing for a quiet
/// window, so that live workers can renew first; then overdue leases expire as usual.
#[tokio::test]
async fn lease_expiry_waits_a_quiet_window_after_the_heartbeat_path_broke() {
    use bloom::reconciler::expiry_pause::ExpiryPause;
    use bloom::reconciler::sweeper;

    let app = TestApp::spawn().await;
    let defaults = app.reconciler_settings();
    let settings = bloom::reconciler::ReconcilerSettings {
        streams: bloom::bus::provision::StreamLayout { lease_ttl: Duration::from_secs(2), ..defaults.streams },
        expiry_grace: Duration::from_millis(500),
        ..defaults
    };
    let mut r = app.reconciler_with(settings, &app.cancel).await;
    let start = bloom::time::now_ms();
    r.clock = bloom::time::Clock::manual(start);
    app.register_worker("w", 1).await;
    let (id, _) = app.leased_task("overdue").await;
    sqlx::query("UPDATE leases SET expires_at = $1").bind(start - 10_000).execute(&app.pool).await.unwrap();
    r.expiry_pause.broken(start);
    let quiet = ExpiryPause::quiet_window(Duration::from_secs(2), Duration::from_millis(500));
    assert_eq!(quiet, Duration::from_millis(2_500));

    r.clock.advance(Duration::from_millis(2_400));
    let paused = sweeper::run_once(&r).await.unwrap();
    assert!(paused.expiry_paused && paused.leases_expired == 0, "{paused:?}");
    assert_eq!(app.status_of(&id).await, "leased");
    assert_eq!(r.metrics.sweeps_paused_total.get(), 1);
    r.clock.advance(Duration::from_millis(100));
    let swept = sweeper::run_once(&r).await.unwrap();
    assert!(!swept.expiry_paused && swept.leases_expired == 1, "{swept:?}");
    assert_eq!(app.status_of(&id).await, "queued");
    app.stop().await;
}

/// A Postgres that stalls and then answers fails no statement, but the beats queued
/// behind the stall are written late, and their workers look silent meanwhile. A beat
/// batch that took more than a second to write breaks the path, as a failed one does:
/// the sweep takes no worker for silent until the path has been whole again.
#[tokio::test]
async fn a_beat_written_late_pauses_the_taking_of_silent_workers() {
    use bloom::db::workers;
    use bloom::reconciler::expiry_pause::ExpiryPause;
    use bloom::reconciler::sweeper;

    let app = TestApp::spawn().await;
    let mut r = app.reconciler_with(app.reconciler_settings(), &app.cancel).await;
    let start = bloom::time::now_ms();
    r.clock = bloom::time::Clock::manual(start);
    // Only the control subjects: beats are written; nothing sweeps but this test.
    tokio::spawn(bloom::reconciler::control::run(r.clone(), app.cancel.clone()));
    tokio::time::timeout(Duration::from_secs(10), r.serving()).await.expect("serving");
    let beat = |id: &str| crate::common::online_beat(id, 1);
    workers::record_beats(&app.pool, &[beat("late"), beat("silent")], start).await.unwrap();
    let timeout = r.settings.worker_timeout;
    r.clock.advance(timeout * 2);

    // `late` beats while its row is locked: the write waits for the lock longer than a
    // slow write (a stall, in real time).
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM workers WHERE id = 'late' FOR UPDATE").execute(&mut *lock).await.unwrap();
    let b = beat("late");
    let wire = bloom::protocol::WorkerBeat {
        worker_id: b.id,
        status: b.status,
        capabilities: b.capabilities,
        ip_addrs: vec![],
        in_flight: 0,
        draining: false,
    };
    let body = serde_json::to_vec(&wire).unwrap();
    r.client.publish(r.names.worker_beat_subject(), body.into()).await.unwrap();
    let waiting = "SELECT count(*) FROM pg_stat_activity
                   WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO workers%' AND datname = current_database()";
    wait_for("the beat waits for the lock", Duration::from_secs(10), || async { app.count(waiting).await == 1 }).await;
    let sent_at = r.clock.now_ms();
    tokio::time::sleep(bloom::reconciler::expiry_pause::SLOW_WRITE + Duration::from_millis(100)).await;
    lock.rollback().await.unwrap();
    let recorded = format!("SELECT count(*) FROM workers WHERE id = 'late' AND last_heartbeat = {sent_at}");
    wait_for("the beat recorded", Duration::from_secs(10), || async { app.count(&recorded).await == 1 }).await;

    // `silent` has not beaten for two worker timeouts, but the path was broken until
    // just now: nobody is taken.
    let report = sweeper::run_once(&r).await.unwrap();
    assert_eq!(report.workers_offline, 0, "{report:?}");
    assert_eq!(app.count("SELECT count(*) FROM workers WHERE status = 'offline'").await, 0);
    // Once the path has been whole for the worker timeout, `silent` is (`late` beats on).
    let quiet = ExpiryPause::quiet_window(r.settings.streams.lease_ttl, r.settings.expiry_grace);
    r.clock.advance(quiet.max(timeout));
    workers::record_beats(&app.pool, &[beat("late")], r.clock.now_ms()).await.unwrap();
    let report = sweeper::run_once(&r).await.unwrap();
    assert_eq!(report.workers_offline, 1, "{report:?}");
    let taken = "SELECT count(*) FROM audit_logs WHERE action = 'worker_offline' AND entity_id = 'silent'";
    assert_eq!(app.count(taken).await, 1);
    app.stop().await;
}

/// A replica that starts has seen none of the beats sent while no reconciler ran: its
/// sweeper expires no lease for a quiet window, in which the live workers retry their
/// heartbeats, and takes no worker for silent before a worker timeout, in which they beat
/// again; a worker that stays silent is taken after it.
#[tokio::test]
async fn a_starting_sweeper_waits_for_the_beats_it_missed() {
    use bloom::db::lifecycle::{self, Claim, ClaimOutcome};
    use bloom::db::workers;
    use bloom::reconciler::expiry_pause::ExpiryPause;
    use bloom::reconciler::sweeper;

    let app = TestApp::spawn().await;
    let settings = bloom::reconciler::ReconcilerSettings {
        worker_timeout: Duration::from_secs(30),
        expiry_grace: Duration::from_secs(2),
        sweep_interval: Duration::from_millis(20),
        ..app.reconciler_settings()
    };
    let mut r = app.reconciler_with(settings, &app.cancel).await;
    let start = bloom::time::now_ms();
    r.clock = bloom::time::Clock::manual(start);
    let beat = |id: &str| crate::common::online_beat(id, 1);
    // Both last beat a minute ago, as far as Postgres knows: no reconciler ran since.
    workers::record_beats(&app.pool, &[beat("alive"), beat("dead")], start - 60_000).await.unwrap();
    let mut tasks = Vec::new();
    for worker in ["alive", "dead"] {
        let task = app.submit_with(json!({"context_id": worker, "agent_slug": "a", "prompt": "p"})).await;
        let id = task["id"].as_str().unwrap().to_owned();
        let claim = Claim { task_id: id.as_str().into(), dispatch_seq: 1, worker_id: worker.into(), ttl_seconds: 300 };
        let granted = lifecycle::claim(&app.pool, &[claim], start - 60_000).await.unwrap();
        assert!(matches!(granted[0], ClaimOutcome::Granted(_)), "{granted:?}");
        tasks.push(id);
    }
    let shared = &app;
    let online = |id: &'static str| async move { shared.status_of_worker(id).await == "online" };

    let cancel = app.cancel.child_token();
    tokio::spawn(sweeper::run(r.clone(), cancel.clone()));
    wait_for("paused sweeps", Duration::from_secs(10), || async { r.metrics.sweeps_paused_total.get() >= 3 }).await;
    assert!(online("alive").await && online("dead").await, "no worker taken for silent at the start");
    assert_eq!(app.status_of(&tasks[0]).await, "leased");
    // The live worker beats within the window; the other does not.
    r.clock.advance(Duration::from_secs(5));
    workers::record_beats(&app.pool, &[beat("alive")], r.clock.now_ms()).await.unwrap();
    let quiet = ExpiryPause::quiet_window(r.settings.streams.lease_ttl, r.settings.expiry_grace);
    r.clock.advance(quiet - Duration::from_secs(5));
    let report = sweeper::run_once(&r).await.unwrap();
    assert!(!report.expiry_paused, "leases are expired once the quiet window passed");
    // A beat lost before the start is not sent again, and the next may come a beat
    // interval later: nobody is taken for silent before a worker timeout has passed.
    assert_eq!(report.workers_offline, 0, "{report:?}");
    assert!(online("dead").await);
    r.clock.advance(r.settings.worker_timeout - quiet);
    wait_for("the silent worker taken", Duration::from_secs(10), || async { !online("dead").await }).await;
    assert_eq!(app.status_of(&tasks[1]).await, "queued", "its lease ended");
    assert!(online("alive").await);
    assert_eq!(app.status_of(&tasks[0]).await, "leased", "the live worker keeps its lease");
    cancel.cancel();
    app.stop().await;
}

/// The relay leaves a dispatch to its writer while it is young, publishes it once it is
/// older than `relay_min_age`, and deletes its row once JetStream acknowledged it.
#[tokio::test]
async fn the_relay_publishes_what_its_writer_left_once_it_is_old_enough() {
    use bloom::db::lifecycle;
    use bloom::domain::NewTask;
    use bloom::reconciler::relay::{self, RelayReport};

    let app = TestApp::spawn().await;
    let settings =
        bloom::reconciler::ReconcilerSettings { relay_min_age: Duration::from_secs(2), ..app.reconciler_settings() };
    let mut r = app.reconciler_with(settings, &app.cancel).await;
    let start = bloom::time::now_ms();
    r.clock = bloom::time::Clock::manual(start);
    let new: NewTask =
        serde_json::from_value(json!({"context_id": "c", "agent_slug": "a", "prompt": "orphan"})).unwrap();
    // Committed, never handed to a dispatcher: as if the API died before publishing.
    lifecycle::create(
        &mut app.pool.acquire().await.unwrap(),
        vec![new.clone(), new],
        "test",
        start,
        lifecycle::KeyRules::default(),
    )
    .await
    .unwrap();

    r.clock.advance(Duration::from_millis(1_500));
    assert_eq!(relay::run_once(&r).await.unwrap(), RelayReport::default(), "1.5 s: the writer's");
    r.clock.advance(Duration::from_millis(1_000));
    assert_eq!(relay::run_once(&r).await.unwrap(), RelayReport { published: 2, failed: 0, stale: 0 });
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 0);
    assert_eq!(r.metrics.outbox_rows_relayed.get(), 2);
    assert_eq!(relay::run_once(&r).await.unwrap(), RelayReport::default());
    app.stop().await;
}

/// Dispatches JetStream did not acknowledge (here: no stream takes them, as while a
/// NATS cluster elects a stream leader) are taken again a second later, not after the
/// relay's 30 s ownership.
#[tokio::test]
async fn the_relay_retries_what_jetstream_refused_a_second_later() {
    use bloom::bus::provision::{self, ReplicaChange};
    use bloom::db::lifecycle;
    use bloom::domain::NewTask;
    use bloom::reconciler::relay::{self, RelayReport};

    let app = TestApp::spawn().await;
    let settings =
        bloom::reconciler::ReconcilerSettings { relay_min_age: Duration::from_secs(1), ..app.reconciler_settings() };
    let mut r = app.reconciler_with(settings.clone(), &app.cancel).await;
    let start = bloom::time::now_ms();
    r.clock = bloom::time::Clock::manual(start);
    let new: NewTask =
        serde_json::from_value(json!({"context_id": "c", "agent_slug": "a", "prompt": "refused"})).unwrap();
    lifecycle::create(
        &mut app.pool.acquire().await.unwrap(),
        vec![new.clone(), new],
        "test",
        start,
        lifecycle::KeyRules::default(),
    )
    .await
    .unwrap();
    let js = bloom::bus::jetstream(app.nats.clone(), Duration::from_secs(2));
    provision::delete(&js, &app.names).await.unwrap();

    r.clock.advance(Duration::from_millis(1_500));
    assert_eq!(relay::run_once(&r).await.unwrap(), RelayReport { published: 0, failed: 2, stale: 0 });
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 2, "kept for the next try");
    provision::apply(&js, &app.names, &settings.streams, ReplicaChange::Change).await.unwrap();
    r.clock.advance(Duration::from_millis(500));
    assert_eq!(relay::run_once(&r).await.unwrap(), RelayReport::default(), "not before the retry time");
    r.clock.advance(Duration::from_millis(600));
    assert_eq!(relay::run_once(&r).await.unwrap(), RelayReport { published: 2, failed: 0, stale: 0 });
    assert_eq!(app.count("SELECT count(*) FROM outbox").await, 0);
    app.stop().await;
}

/// A dispatch JetStream accepted and then lost (no outbox row, no message anyone will
/// deliver before the lease TTL) is sent again once it has gone unclaimed for
/// `redispatch_after` while a NATS worker has room, under a new dispatch sequence; a task
/// waiting because every worker is busy is left alone.
#[tokio::test]
async fn a_dispatch_unclaimed_while_workers_have_room_is_sent_again() {
    use bloom::db::lifecycle;
    use bloom::domain::NewTask;
    use bloom::reconciler::redispatch;

    let app = TestApp::spawn().await;
    let mut r = app.reconciler_with(app.reconciler_settings(), &app.cancel).await;
    let start = bloom::time::now_ms();
    r.clock = bloom::time::Clock::manual(start);
    let new: NewTask = serde_json::from_value(json!({"context_id": "c", "agent_slug": "a", "prompt": "lost"})).unwrap();
    lifecycle::create(&mut app.pool.acquire().await.unwrap(), vec![new], "test", start, lifecycle::KeyRules::default())
        .await
        .unwrap();
    sqlx::query("DELETE FROM outbox").execute(&app.pool).await.unwrap();
    sqlx::query(
        "INSERT INTO workers (id, node_id, status, capabilities, registered_at, source)
         VALUES ('busy', 'n', 'online', '{\"max_concurrency\": 2}', $1, 'nats')",
    )
    .bind(start)
    .execute(&app.pool)
    .await
    .unwrap();
    // Both its slots taken by active leases of other tasks.
    sqlx::query(
        "INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat)
         SELECT 'l' || i, 'other' || i, 'busy', $1, $1 + 600000, 600, 'active', $1 FROM generate_series(1, 2) i",
    )
    .bind(start)
    .execute(&app.pool)
    .await
    .unwrap();
    let after = Duration::from_secs(15);

    r.clock.advance(Duration::from_secs(16));
    assert_eq!(redispatch::run_once(&r, after).await.unwrap(), 0, "every worker busy: a backlog, not a loss");
    sqlx::query("UPDATE leases SET status = 'released' WHERE id = 'l1'").execute(&app.pool).await.unwrap();
    r.clock.advance(Duration::from_secs(1));
    assert_eq!(redispatch::run_once(&r, after).await.unwrap(), 1);
    let seq: i64 = sqlx::query_scalar("SELECT dispatch_seq FROM llm_tasks").fetch_one(&app.pool).await.unwrap();
    assert_eq!(seq, 2, "a new dispatch: the lost one, should it turn up, is stale");
    assert_eq!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'task_redispatched'").await, 1);
    assert_eq!(r.metrics.tasks_redispatched_total.get(), 1);
    assert_eq!(redispatch::run_once(&r, after).await.unwrap(), 0, "the new dispatch is young");
    // It is on the bus again: the dispatcher published it and removed its outbox row.
    wait_for("the new dispatch published", Duration::from_secs(10), || async {
        app.count("SELECT count(*) FROM outbox").await == 0
    })
    .await;
    app.stop().await;
}
