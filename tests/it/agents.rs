//! HTTP agents (membridge agents) as workers: tasks submitted over REST reach them with
//! no manual step, their callbacks complete the tasks, and failed dispatches are retried
//! or dead-lettered.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{wait_for, TestApp};
use crate::fake_agent::{self, Mode};

const AGENT_KEY: &str = "agent-secret";

/// A reconciler whose agent calls carry `AGENT_KEY` and name this app's URL for callbacks.
async fn start_reconciler(app: &TestApp) -> bloom::reconciler::Reconciler {
    let settings = bloom::reconciler::ReconcilerSettings {
        runtime_url: app.url(""),
        agent_key: bloom::domain::Secret::new(AGENT_KEY),
        agent_dispatch_interval: Duration::from_millis(50),
        ..app.reconciler_settings()
    };
    let cancel = app.cancel.child_token();
    let r = app.reconciler_with(settings, &cancel).await;
    tokio::spawn(r.clone().run(cancel));
    r
}

#[tokio::test]
async fn tasks_submitted_over_rest_run_on_an_http_agent_without_a_manual_step() {
    let app = TestApp::spawn().await;
    let agent = fake_agent::start(AGENT_KEY, Mode::Run).await;
    // The agent registers itself as the real one does at start-up.
    let (status, worker) = app
        .post(
            "/api/runtime/workers",
            json!({"name": "agent-1", "url": agent.url(), "status": "online",
                   "capabilities": {"claude_cli": true, "max_concurrency": 2, "labels": ["systemd", "x86_64"]},
                   "ip_addrs": ["10.0.0.7"], "agent_version": "0.4.0", "os_info": "node / Debian 12",
                   "install_method": "script"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{worker}");
    assert_eq!(
        (&worker["transport"], &worker["agent_version"], &worker["os_info"], &worker["install_method"]),
        (&json!("http"), &json!("0.4.0"), &json!("node / Debian 12"), &json!("script"))
    );
    let r = start_reconciler(&app).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(app.submit(&format!("question {i}")).await["id"].as_str().unwrap().to_owned());
    }
    wait_for("completed by the agent", Duration::from_secs(20), || async {
        app.count("SELECT count(*) FROM llm_tasks WHERE status = 'completed'").await == 3
    })
    .await;
    for id in &ids {
        let (_, results) = app.get(&format!("/api/runtime/llm-tasks/{id}/results")).await;
        assert_eq!(results[0]["worker_id"], "agent-1");
        assert!(results[0]["output"].as_str().unwrap().starts_with("agent: question"), "{results}");
        assert_eq!(results[0]["metrics"], json!({"duration_ms": 5}));
    }
    let executed = agent.executed.lock().unwrap().clone();
    assert_eq!(executed.len(), 3);
    for (body, key_ok) in &executed {
        assert!(key_ok, "the agent key was sent");
        assert_eq!(body["runtime_url"], app.url(""));
        assert_eq!(body["policy"], json!({"timeout_sec": 120, "budget": 0}));
        assert_eq!(body["desired_format"], "text");
        assert!(ids.contains(&body["task_id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'task_dispatched'").await, 3);
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'released' AND ttl_seconds = 180").await, 3);
    assert_eq!(app.count("SELECT bloom_worker_leases(id)::bigint FROM workers WHERE id = 'agent-1'").await, 0);
    assert_eq!(r.metrics.agent_dispatches_total.get(), 3);
    assert_eq!(r.metrics.agent_dispatch_failures_total.get(), 0);
    app.stop().await;
}

#[tokio::test]
async fn a_refusing_or_unreachable_agent_fails_the_attempt_and_takes_no_more_tasks() {
    let app = TestApp::spawn().await;
    let agent = fake_agent::start(AGENT_KEY, Mode::NoCli).await;
    let register = |name: &str, url: String| {
        let body = json!({"name": name, "url": url, "capabilities": {"max_concurrency": 4}, "agent_version": "0.4.0"});
        app.post("/api/runtime/workers", body)
    };
    assert_eq!(register("no-cli", agent.url()).await.0, StatusCode::CREATED);
    let last =
        app.submit_with(json!({"context_id": "c", "agent_slug": "a", "prompt": "once", "max_attempts": 1})).await;
    let last = last["id"].as_str().unwrap().to_owned();
    let r = start_reconciler(&app).await;
    wait_for("refused", Duration::from_secs(10), || async { app.status_of(&last).await == "dead" }).await;
    let detail: String = sqlx::query_scalar("SELECT detail FROM audit_logs WHERE action = 'dispatch_failed'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(detail.contains("Dispatch to no-cli failed: Agent returned 503"), "{detail}");
    assert!(detail.contains("Claude CLI is not installed"), "{detail}");
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'failed'").await, 1);
    assert_eq!(app.status_of_worker("no-cli").await, "offline");

    // Nothing listens on port 9: the attempt fails, attempts remain, the task is queued
    // again and the agent offline.
    assert_eq!(register("gone", "http://127.0.0.1:9".into()).await.0, StatusCode::CREATED);
    let retried = app.submit("retried").await["id"].as_str().unwrap().to_owned();
    wait_for("unreachable agent offline", Duration::from_secs(10), || async {
        app.status_of_worker("gone").await == "offline"
    })
    .await;
    wait_for("requeued", Duration::from_secs(10), || async {
        let sql =
            format!("SELECT count(*) FROM llm_tasks WHERE id = '{retried}' AND status = 'queued' AND attempts = 1");
        app.count(&sql).await == 1
    })
    .await;
    assert_eq!(r.metrics.agent_dispatch_failures_total.get(), 2);
    assert_eq!(agent.executed.lock().unwrap().len(), 1, "an agent marked offline gets no more tasks");
    app.stop().await;
}

/// An agent known only from membridge's `/agents` runs tasks submitted over REST: the
/// sync imports it with its URL, and dispatch finds it.
#[tokio::test]
async fn an_agent_synced_from_membridge_runs_tasks_submitted_over_rest() {
    use crate::common::Opts;
    use crate::fake_membridge::{self, now_secs};

    let membridge = fake_membridge::start("admin").await;
    let agent = fake_agent::start(AGENT_KEY, Mode::Run).await;
    membridge.set_agents(vec![json!({"name": "synced-1", "url": agent.url(), "status": "online",
                                     "max_concurrency": 2, "last_seen": now_secs()})]);
    let app = TestApp::spawn_with(Opts {
        membridge: Some(bloom::domain::Endpoint {
            url: membridge.url(),
            admin_key: bloom::domain::Secret::new("admin"),
        }),
        ..Opts::default()
    })
    .await;
    let r = start_reconciler(&app).await;
    bloom::reconciler::membridge_sync::run_once(&r).await.unwrap();
    let (_, w) = app.get("/api/runtime/workers/synced-1").await;
    assert_eq!((&w["transport"], &w["status"]), (&json!("http"), &json!("online")), "{w}");
    let id = app.submit("from the queue").await["id"].as_str().unwrap().to_owned();
    wait_for("completed by the synced agent", Duration::from_secs(20), || async {
        app.status_of(&id).await == "completed"
    })
    .await;
    let (_, results) = app.get(&format!("/api/runtime/llm-tasks/{id}/results")).await;
    assert_eq!(
        (&results[0]["worker_id"], &results[0]["output"]),
        (&json!("synced-1"), &json!("agent: from the queue"))
    );
    app.stop().await;
}

/// `POST .../dispatch` as the upstream web client sends it (no body, no content type):
/// the agent runs the task before the answer; the error cases answer as upstream's.
#[tokio::test]
async fn dispatch_sends_a_task_to_an_agent_and_answers_with_its_execution() {
    use crate::common::Opts;

    let app = TestApp::spawn_with(Opts::default()).await;
    let agent = fake_agent::start("", Mode::Run).await;
    let post_empty = |path: String| app.http.post(app.url(&path)).send();
    let (status, body) = app.post("/api/runtime/llm-tasks/nope/dispatch", json!({})).await;
    assert_eq!((status, body), (StatusCode::NOT_FOUND, json!({"error": "Task not found"})));
    let id = app.submit("sent by hand").await["id"].as_str().unwrap().to_owned();
    let resp = post_empty(format!("/api/runtime/llm-tasks/{id}/dispatch")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE, "no agent yet");

    app.register_worker("rest-only", 2).await;
    let (status, body) =
        app.post(&format!("/api/runtime/llm-tasks/{id}/dispatch"), json!({"worker_id": "rest-only"})).await;
    assert_eq!(
        (status, body),
        (StatusCode::BAD_REQUEST, json!({"error": "Worker \"rest-only\" has no URL configured"}))
    );
    assert_eq!(app.status_of(&id).await, "queued", "no lease without a URL");

    let (status, _) = app
        .post(
            "/api/runtime/workers",
            json!({"name": "agent-1", "url": agent.url(), "capabilities": {"max_concurrency": 2}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let resp = post_empty(format!("/api/runtime/llm-tasks/{id}/dispatch")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        (&answer["dispatched"], &answer["task_id"], &answer["worker_id"]),
        (&json!(true), &json!(id), &json!("agent-1"))
    );
    assert_eq!(answer["execution"]["ok"], true, "{answer}");
    assert_eq!(answer["execution"]["heartbeat_status"], 200, "an empty JSON heartbeat is accepted");
    assert_eq!(answer["execution"]["complete_status"], 200, "tokens_used: null is accepted");
    assert_eq!(app.status_of(&id).await, "completed");
    let lease: String = sqlx::query_scalar("SELECT lease_id FROM llm_tasks WHERE id = $1")
        .bind(&id)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(answer["lease_id"], lease);
    assert_eq!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'task_dispatched'").await, 1);
    let (status, body) = app.post(&format!("/api/runtime/llm-tasks/{id}/dispatch"), json!({})).await;
    assert_eq!(
        (status, body),
        (StatusCode::CONFLICT, json!({"error": "Task status is 'completed', expected 'queued'"}))
    );

    // An agent that refuses: 200, its answer as the execution, the attempt abandoned.
    *agent.mode.lock().unwrap() = Mode::NoCli;
    let refused = app.submit("refused").await["id"].as_str().unwrap().to_owned();
    let (status, answer) = app.post(&format!("/api/runtime/llm-tasks/{refused}/dispatch"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["execution"]["detail"], "Claude CLI is not installed on this node");
    assert_eq!(app.status_of(&refused).await, "queued", "attempts remain: queued again");
    assert_eq!(app.status_of_worker("agent-1").await, "offline");

    // An answer that is not JSON (a proxy's error page): 502, not dispatched, as upstream
    // answers when it cannot read the agent's reply.
    *agent.mode.lock().unwrap() = Mode::BehindFailingProxy;
    app.post("/api/runtime/workers", json!({"name": "agent-1", "url": agent.url()})).await;
    let proxied = app.submit("behind a proxy").await["id"].as_str().unwrap().to_owned();
    let (status, answer) = app.post(&format!("/api/runtime/llm-tasks/{proxied}/dispatch"), json!({})).await;
    assert_eq!((status, &answer["dispatched"]), (StatusCode::BAD_GATEWAY, &json!(false)), "{answer}");
    assert_eq!(answer["error"], "Agent returned 502: Bad Gateway");
    assert!(answer.get("execution").is_none() && answer.get("lease_id").is_none(), "{answer}");
    assert_eq!(app.status_of(&proxied).await, "queued", "the agent did not take it: queued again");

    // No agent answers: 502, not dispatched.
    app.post("/api/runtime/workers", json!({"name": "gone", "url": "http://127.0.0.1:9"})).await;
    let (status, answer) =
        app.post(&format!("/api/runtime/llm-tasks/{refused}/dispatch"), json!({"worker_id": "gone"})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!((&answer["dispatched"], &answer["worker_id"]), (&json!(false), &json!("gone")));
    assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{answer}");
    assert!(answer.get("lease_id").is_none());
    // Four calls to agents, three of them failed, as the reconcilers count theirs.
    let m = &app.state.metrics;
    assert_eq!((m.agent_dispatches_total.get(), m.agent_dispatch_failures_total.get()), (4, 3));
    app.stop().await;
}

/// Health check, self-update, restart and uninstall of an agent, with upstream's
/// answers, the worker fields they change and their audit entries.
#[tokio::test]
async fn agent_operations_reach_the_agent_and_record_what_it_says() {
    let app = TestApp::spawn().await;
    let agent = fake_agent::start("", Mode::Run).await;
    let (status, body) = app.get("/api/runtime/workers/nope/agent-health").await;
    assert_eq!((status, body), (StatusCode::NOT_FOUND, json!({"error": "Worker not found"})));
    app.register_worker("no-url", 1).await;
    let (status, body) = app.post("/api/runtime/workers/no-url/agent-restart", json!({})).await;
    assert_eq!((status, body), (StatusCode::BAD_REQUEST, json!({"error": "Worker has no URL configured"})));

    app.post("/api/runtime/workers", json!({"name": "a1", "url": agent.url(), "status": "unknown"})).await;
    let (status, health) = app.get("/api/runtime/workers/a1/agent-health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&health["reachable"], &health["version"], &health["hostname"]),
        (&json!(true), &json!("0.4.0"), &json!("fake"))
    );
    let (_, w) = app.get("/api/runtime/workers/a1").await;
    assert_eq!(
        (&w["status"], &w["agent_version"], &w["os_info"], &w["capabilities"]["max_concurrency"]),
        (&json!("online"), &json!("0.4.0"), &json!("fake / Test Linux"), &json!(1))
    );

    // No body and no content type, as the web client sends them.
    let resp = app.http.post(app.url("/api/runtime/workers/a1/agent-update")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let updated: serde_json::Value = resp.json().await.unwrap();
    assert_eq!((&updated["status"], &updated["version"]), (&json!("updated"), &json!("0.4.1")));
    let (_, restarted) = app.post("/api/runtime/workers/a1/agent-restart", json!({})).await;
    assert_eq!((&restarted["status"], &restarted["detail"]), (&json!("restarted"), &json!("restarting")));
    let (_, gone) = app.post("/api/runtime/workers/a1/agent-uninstall", json!({})).await;
    assert_eq!(gone["status"], "uninstalled");
    let (_, w) = app.get("/api/runtime/workers/a1").await;
    assert_eq!((&w["status"], &w["agent_version"]), (&json!("offline"), &json!("uninstalled")), "the row is kept");
    for action in ["agent_updated", "agent_restarted", "agent_uninstalled"] {
        let sql = format!("SELECT count(*) FROM audit_logs WHERE action = '{action}' AND entity_id = 'a1'");
        assert_eq!(app.count(&sql).await, 1, "{action}");
    }

    // A key the agent refuses, and an agent that does not answer.
    let picky = fake_agent::start("other-key", Mode::Run).await;
    app.post("/api/runtime/workers", json!({"name": "a2", "url": picky.url()})).await;
    let (status, body) = app.post("/api/runtime/workers/a2/agent-restart", json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body["error"].as_str().unwrap().starts_with("Agent returned 401"), "{body}");
    app.post("/api/runtime/workers", json!({"name": "a3", "url": "http://127.0.0.1:9"})).await;
    let (status, health) = app.get("/api/runtime/workers/a3/agent-health").await;
    assert_eq!((status, &health["reachable"]), (StatusCode::OK, &json!(false)));
    assert!(health["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(app.status_of_worker("a3").await, "offline");
    app.stop().await;
}

/// An agent's health check merges its flags into the worker's capabilities, where the
/// worker listings show them, and a value of the wrong type for a key the runtime reads
/// leaves the stored one in force: the listings, the agent dispatch pass's choice of
/// agents and a REST lease keep working. A NUL character the agent sends is stored as
/// U+FFFD. Migration 0047 removes wrongly typed values stored before and keeps the rest.
#[tokio::test]
async fn an_agents_capabilities_are_merged_only_with_values_of_their_types() {
    let app = TestApp::spawn().await;
    let agent = fake_agent::start("", Mode::Run).await;
    let caps = json!({"claude_cli": true, "max_concurrency": 2, "labels": ["gpu"]});
    let (status, _) =
        app.post("/api/runtime/workers", json!({"name": "a1", "url": agent.url(), "capabilities": caps})).await;
    assert_eq!(status, StatusCode::CREATED);
    app.get("/api/runtime/workers/a1/agent-health").await;
    let (status, w) = app.get("/api/runtime/workers/a1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        w["capabilities"],
        json!({"claude_cli": true, "max_concurrency": 2, "labels": ["gpu"], "self_update": true, "restart": true,
               "uninstall": true, "clone": true, "sync": true, "process_control": false})
    );

    agent.health.lock().unwrap()["capabilities"] =
        json!({"claude_cli": "yes", "max_concurrency": "lots", "labels": "gpu", "clone": false});
    let (status, health) = app.get("/api/runtime/workers/a1/agent-health").await;
    assert_eq!((status, &health["reachable"]), (StatusCode::OK, &json!(true)));
    for path in ["/api/runtime/workers", "/api/runtime/workers/a1"] {
        let (status, body) = app.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
    }
    let (_, w) = app.get("/api/runtime/workers/a1").await;
    assert_eq!(
        (&w["capabilities"]["claude_cli"], &w["capabilities"]["max_concurrency"], &w["capabilities"]["labels"]),
        (&json!(true), &json!(2), &json!(["gpu"])),
        "the stored values stay"
    );
    assert_eq!(w["capabilities"]["clone"], json!(false), "a flag is taken as reported");
    for caps in [json!({"max_concurrency": 4.0, "labels": ["a", 1]}), json!({"max_concurrency": 100})] {
        agent.health.lock().unwrap()["capabilities"] = caps;
        let (status, health) = app.get("/api/runtime/workers/a1/agent-health").await;
        assert_eq!((status, &health["reachable"]), (StatusCode::OK, &json!(true)));
    }
    let (_, w) = app.get("/api/runtime/workers/a1").await;
    assert_eq!(
        (&w["capabilities"]["max_concurrency"], &w["capabilities"]["labels"]),
        (&json!(32), &json!(["gpu"])),
        "an integer above 32 is taken as 32, as from membridge"
    );
    // The worker still takes tasks.
    let task = app.submit("p").await;
    let path = format!("/api/runtime/llm-tasks/{}/lease", task["id"].as_str().unwrap());
    let (status, lease) = app.post(&path, json!({"worker_id": "a1"})).await;
    assert_eq!(status, StatusCode::CREATED, "{lease}");
    // NUL characters, which Postgres cannot store.
    *agent.health.lock().unwrap() = json!({"version": "0.4.0", "os_info": "fa\u{0}ke",
                                           "capabilities": {"sync": "a\u{0}b"}});
    let (status, health) = app.get("/api/runtime/workers/a1/agent-health").await;
    assert_eq!((status, &health["reachable"]), (StatusCode::OK, &json!(true)), "{health}");
    let (_, w) = app.get("/api/runtime/workers/a1").await;
    assert_eq!((&w["os_info"], &w["capabilities"]["sync"]), (&json!("fa\u{FFFD}ke"), &json!("a\u{FFFD}b")));
    let now = app.state.clock.now_ms();
    assert!(bloom::db::workers::http_agents_with_room(&app.pool, now).await.is_ok());
    let (_, before) = app.get("/api/runtime/workers/a1").await;

    // Values stored before the API checked them.
    sqlx::query(
        r#"INSERT INTO workers (id, node_id, url, status, capabilities, registered_at, source) VALUES
           ('old', 'old', 'http://127.0.0.1:9', 'online',
            '{"claude_cli": "yes", "max_concurrency": "lots", "labels": "gpu", "clone": true}', 0, 'api'),
           ('old2', 'old2', '', 'online', '{"max_concurrency": 4.0, "labels": ["a", 1], "claude_cli": false}', 0, 'api'),
           ('old3', 'old3', '', 'online', '[]', 0, 'api'),
           ('old4', 'old4', 'http://127.0.0.1:9', 'online',
            '{"claude_cli": null, "max_concurrency": -3, "labels": ["ok"], "x": {"nested": 1}}', 0, 'api'),
           ('old5', 'old5', '', 'online', '{"max_concurrency": 1e400, "claude_cli": false}', 0, 'api'),
           ('old6', 'old6', '', 'online', '{"max_concurrency": 7, "labels": []}', 0, 'api')"#,
    )
    .execute(&app.pool)
    .await
    .unwrap();
    // The two with a URL are agents (they gave a version), which the dispatch pass reads.
    sqlx::query("UPDATE workers SET agent_version = '0.3.0' WHERE id IN ('old', 'old4')")
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, _) = app.get("/api/runtime/workers").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "what the migration repairs");
    assert!(bloom::db::workers::http_agents_with_room(&app.pool, now).await.is_err());
    for _ in 0..2 {
        sqlx::raw_sql(include_str!("../../migrations/0047_agent_capabilities_of_their_types.sql"))
            .execute(&app.pool)
            .await
            .unwrap();
    }
    let (status, workers) = app.get("/api/runtime/workers").await;
    assert_eq!(status, StatusCode::OK, "{workers}");
    let caps = |id: &str| workers.as_array().unwrap().iter().find(|w| w["id"] == id).unwrap()["capabilities"].clone();
    assert_eq!(caps("old"), json!({"claude_cli": true, "max_concurrency": 1, "labels": [], "clone": true}));
    assert_eq!(caps("old2"), json!({"claude_cli": false, "max_concurrency": 1, "labels": []}));
    assert_eq!(caps("old3"), json!({"claude_cli": true, "max_concurrency": 1, "labels": []}));
    assert_eq!(caps("old4"), json!({"claude_cli": true, "max_concurrency": 1, "labels": ["ok"], "x": {"nested": 1}}));
    assert_eq!(caps("old5"), json!({"claude_cli": false, "max_concurrency": 1, "labels": []}));
    assert_eq!(caps("old6"), json!({"claude_cli": true, "max_concurrency": 7, "labels": []}), "valid values stay");
    assert_eq!(caps("a1"), before["capabilities"], "valid values stay");
    assert!(bloom::db::workers::http_agents_with_room(&app.pool, now).await.is_ok());
    app.stop().await;
}

/// The install script quotes every value it is given (nothing in a query parameter can
/// run on the node) and carries the real agent key only when asked for it.
#[tokio::test]
async fn the_install_script_quotes_what_it_is_given_and_keeps_the_key_back() {
    let app = TestApp::spawn().await;
    let evil = "n1'; touch /tmp/bloom-pwned; echo '";
    let url = app.url(&format!(
        "/api/runtime/agent-install-script?node_id={}&port=8002&server_url={}",
        percent_encode(evil),
        percent_encode("http://runtime:3002")
    ));
    let resp = app.http.get(url).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let script = resp.text().await.unwrap();
    assert!(script.starts_with("#!/usr/bin/env bash"));
    assert!(script.contains("AGENT_KEY='YOUR_AGENT_KEY'"), "no real key unless asked");
    // The assignments, run by bash, give back exactly the values sent.
    let assignments: String = script
        .lines()
        .filter(|l| l.starts_with("NODE_ID=") || l.starts_with("SERVER_URL=") || l.starts_with("AGENT_PORT="))
        .map(|l| format!("{l}\n"))
        .collect();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("{assignments}printf '%s|%s|%s' \"$NODE_ID\" \"$SERVER_URL\" \"$AGENT_PORT\""))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{evil}|http://runtime:3002|8002"));
    assert!(!std::path::Path::new("/tmp/bloom-pwned").exists());
    let check = std::process::Command::new("bash").arg("-n").arg("-c").arg(&script).status().unwrap();
    assert!(check.success(), "the script parses");
    let (status, body) = app.get("/api/runtime/agent-install-script?port=http").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    app.stop().await;
}

fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The agent key can be saved with `POST /config` (it then replaces
/// `MEMBRIDGE_AGENT_KEY`) and is never returned.
#[tokio::test]
async fn the_agent_key_saved_in_the_config_is_used_and_never_shown() {
    let app = TestApp::spawn().await;
    let agent = fake_agent::start("saved-key", Mode::Run).await;
    app.post("/api/runtime/workers", json!({"name": "a1", "url": agent.url()})).await;
    let (status, cfg) = app
        .post(
            "/api/runtime/config",
            json!({"membridge_server_url": "http://127.0.0.1:9", "admin_key": "admin", "agent_key": "saved-key"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{cfg}");
    let (_, shown) = app.get("/api/runtime/config").await;
    for view in [&cfg, &shown] {
        assert!(!view.to_string().contains("saved-key"), "{view}");
    }
    let id = app.submit("with the saved key").await["id"].as_str().unwrap().to_owned();
    let (status, answer) = app.post(&format!("/api/runtime/llm-tasks/{id}/dispatch"), json!({})).await;
    assert_eq!((status, &answer["execution"]["ok"]), (StatusCode::OK, &json!(true)), "{answer}");
    assert!(agent.executed.lock().unwrap().iter().all(|(_, key_ok)| *key_ok));
    // Every call to agents takes it: a clone, and the install script when asked for it.
    let (status, project) =
        app.post("/api/runtime/projects", json!({"name": "p1", "repo_url": "https://example.com/p1.git"})).await;
    assert_eq!(status, StatusCode::CREATED, "{project}");
    let pid = project["id"].as_str().unwrap();
    let (status, cloned) = app.post(&format!("/api/runtime/projects/{pid}/clone"), json!({"node_id": "a1"})).await;
    assert_eq!((status, &cloned["status"]), (StatusCode::OK, &json!("cloned")), "{cloned}");
    let script = app.http.get(app.url("/api/runtime/agent-install-script?include_agent_key=true")).send().await;
    assert!(script.unwrap().text().await.unwrap().contains("AGENT_KEY='saved-key'"));
    app.stop().await;
}

/// A reconciler that does nothing on its own: the test runs its duties on its clock.
async fn manual_reconciler(app: &TestApp) -> bloom::reconciler::Reconciler {
    manual_reconciler_with(app, Duration::ZERO).await
}

/// A manual reconciler that leaves tasks to their clients for `client_window`.
async fn manual_reconciler_with(app: &TestApp, client_window: Duration) -> bloom::reconciler::Reconciler {
    let settings = bloom::reconciler::ReconcilerSettings {
        runtime_url: app.url(""),
        agent_key: bloom::domain::Secret::new(AGENT_KEY),
        agent_dispatch_client_window: client_window,
        ..app.reconciler_settings()
    };
    let mut r = app.reconciler_with(settings, &app.cancel.child_token()).await;
    r.clock = bloom::time::Clock::manual(bloom::time::now_ms());
    r
}

/// Registers an agent as the membridge agent registers itself (with its version, so the
/// reconcilers send it tasks).
async fn register(app: &TestApp, name: &str, url: &str) {
    let body = json!({"name": name, "url": url, "status": "online", "capabilities": {"max_concurrency": 1},
                      "agent_version": "0.4.0"});
    let (status, answer) = app.post("/api/runtime/workers", body).await;
    assert!([StatusCode::CREATED, StatusCode::OK].contains(&status), "{answer}");
}

/// A reconciler that died between granting an agent a lease and sending the task leaves
/// a lease no agent knows of: it expires after the pickup window, not the task's TTL,
/// unless the agent's heartbeat (sent on receipt) extended it.
#[tokio::test]
async fn an_agent_lease_expires_after_the_pickup_window_unless_the_agent_took_the_task() {
    use bloom::reconciler::{agent_dispatch, sweeper};
    let app = TestApp::spawn().await;
    let agent = fake_agent::start(AGENT_KEY, Mode::DryRun).await;
    register(&app, "agent-1", &agent.url()).await;
    let id = app.submit("never picked up").await["id"].as_str().unwrap().to_owned();
    let r = manual_reconciler(&app).await;
    let t0 = r.clock.now_ms();
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    wait_for("sent", Duration::from_secs(10), || async { agent.executed.lock().unwrap().len() == 1 }).await;
    let window = agent_dispatch::PICKUP_WINDOW.as_millis() as i64;
    assert_eq!(app.count("SELECT (expires_at - started_at) FROM leases").await, window);
    assert_eq!(app.count("SELECT ttl_seconds::bigint FROM leases").await, 180, "the TTL after the heartbeat");

    r.clock.advance(agent_dispatch::PICKUP_WINDOW - Duration::from_secs(1));
    assert_eq!(sweeper::run_once(&r).await.unwrap().leases_expired, 0);
    assert_eq!(app.status_of(&id).await, "leased");
    r.clock.advance(Duration::from_secs(2));
    let swept = sweeper::run_once(&r).await.unwrap();
    assert_eq!((swept.leases_expired, swept.tasks_requeued), (1, 1));
    assert_eq!(app.status_of(&id).await, "queued");
    assert_eq!(app.count("SELECT bloom_worker_leases(id)::bigint FROM workers WHERE id = 'agent-1'").await, 0);

    // An agent that takes the task heartbeats it at once: the lease then lasts its TTL.
    *agent.mode.lock().unwrap() = Mode::RunFor(Duration::from_millis(300));
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    wait_for("completed", Duration::from_secs(10), || async { app.status_of(&id).await == "completed" }).await;
    let renewed = app
        .count(&format!(
            "SELECT (expires_at - {t0})::bigint FROM leases WHERE status = 'released' AND task_id = '{id}'"
        ))
        .await;
    assert!(renewed > 170_000, "the heartbeat extended the lease to its TTL: {renewed} ms");
    assert_eq!(app.count("SELECT attempts::bigint FROM llm_tasks").await, 2);
    app.stop().await;
}

/// How long after `t` (ms) the agent `flaky` is paused.
async fn paused_for(app: &TestApp, t: i64) -> i64 {
    app.count(&format!("SELECT dispatch_paused_until - {t} FROM workers WHERE id = 'flaky'")).await
}

/// An agent that is down is paused, doubling, whatever membridge's sync says of its
/// status; its own registration ends the pause.
#[tokio::test]
async fn a_failing_agent_is_paused_with_backoff_until_it_registers_again() {
    use bloom::reconciler::agent_dispatch;
    let app = TestApp::spawn().await;
    let agent = fake_agent::start(AGENT_KEY, Mode::NoCli).await;
    register(&app, "flaky", &agent.url()).await;
    for i in 0..3 {
        app.submit(&format!("task {i}")).await;
    }
    let r = manual_reconciler(&app).await;
    let t0 = r.clock.now_ms();
    let failures = || async { app.count("SELECT dispatch_failures::bigint FROM workers WHERE id = 'flaky'").await };
    // The failure is recorded (the pause), then the attempt abandoned in its own
    // transaction: both are waited for before the next pass.
    let settled = |n: i64| {
        let app = &app;
        async move {
            failures().await == n
                && app.count("SELECT count(*) FROM leases WHERE worker_id = 'flaky' AND status = 'active'").await == 0
        }
    };
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    wait_for("first failure", Duration::from_secs(10), || settled(1)).await;
    assert_eq!(paused_for(&app, t0).await, 10_000);
    assert_eq!(app.status_of_worker("flaky").await, "offline");

    // Membridge's sync says the agent is online again: it stays paused.
    let online = || sqlx::query("UPDATE workers SET status = 'online' WHERE id = 'flaky'").execute(&app.pool);
    online().await.unwrap();
    r.clock.advance(Duration::from_secs(9));
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0, "paused");
    r.clock.advance(Duration::from_secs(2));
    let t1 = r.clock.now_ms();
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1, "the pause is over");
    wait_for("second failure", Duration::from_secs(10), || settled(2)).await;
    assert_eq!(paused_for(&app, t1).await, 20_000, "the pause doubled");
    online().await.unwrap();
    r.clock.advance(Duration::from_secs(19));
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0);

    // The agent is fixed and registers itself again, as it does at start-up.
    *agent.mode.lock().unwrap() = Mode::Run;
    register(&app, "flaky", &agent.url()).await;
    assert_eq!((failures().await, paused_for(&app, 0).await), (0, 0));
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    wait_for("a task ran", Duration::from_secs(10), || async {
        app.count("SELECT count(*) FROM llm_tasks WHERE status = 'completed'").await == 1
    })
    .await;
    assert_eq!(agent.executed.lock().unwrap().len(), 3, "two refusals, one run: no attempt burnt while paused");
    app.stop().await;
}

/// The CLI failing on the agent is a failed result reported by the agent's callback; an
/// agent that hangs up without answering fails the attempt, and the task is retried.
#[tokio::test]
async fn a_failed_run_is_recorded_and_a_hung_up_call_is_retried() {
    use bloom::reconciler::agent_dispatch;
    let app = TestApp::spawn().await;
    let agent = fake_agent::start(AGENT_KEY, Mode::Fail).await;
    register(&app, "failing", &agent.url()).await;
    let failed = app.submit("fails").await["id"].as_str().unwrap().to_owned();
    let r = manual_reconciler(&app).await;
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    wait_for("failed", Duration::from_secs(10), || async { app.status_of(&failed).await == "failed" }).await;
    let (_, results) = app.get(&format!("/api/runtime/llm-tasks/{failed}/results")).await;
    assert_eq!(
        (&results[0]["status"], &results[0]["error_message"]),
        (&json!("error"), &json!("Claude CLI returned exit code 1"))
    );
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'released'").await, 1);
    assert_eq!(app.count("SELECT dispatch_failures::bigint FROM workers WHERE id = 'failing'").await, 0);
    sqlx::query("DELETE FROM workers WHERE id = 'failing'").execute(&app.pool).await.unwrap();

    let hangs_up = fake_agent::start_hanging_up().await;
    register(&app, "hangs-up", &hangs_up).await;
    let retried = app.submit("retried").await["id"].as_str().unwrap().to_owned();
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    wait_for("requeued", Duration::from_secs(10), || async {
        let sql =
            format!("SELECT count(*) FROM llm_tasks WHERE id = '{retried}' AND status = 'queued' AND attempts = 1");
        app.count(&sql).await == 1
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'failed'").await, 1);
    assert_eq!(app.status_of_worker("hangs-up").await, "offline");
    app.stop().await;
}

/// An agent paused after failed dispatches that nothing marks online again (no membridge
/// sync, no registration of its own) is asked for its `/health` once its pause is over:
/// up again, it is online and sent tasks; still down, it is paused for twice as long.
#[tokio::test]
async fn a_paused_agent_is_checked_when_its_pause_ends_and_sent_tasks_once_it_answers() {
    use bloom::reconciler::agent_dispatch;
    let app = TestApp::spawn().await;
    let agent = fake_agent::start(AGENT_KEY, Mode::NoCli).await;
    register(&app, "flaky", &agent.url()).await;
    let first = app.submit("first").await["id"].as_str().unwrap().to_owned();
    let second = app.submit("second").await["id"].as_str().unwrap().to_owned();
    let r = manual_reconciler(&app).await;
    let failures_of = |id: &str| {
        let (app, sql) = (&app, format!("SELECT dispatch_failures::bigint FROM workers WHERE id = '{id}'"));
        async move { app.count(&sql).await }
    };
    let paused_until = |id: &str| {
        let (app, sql) = (&app, format!("SELECT dispatch_paused_until FROM workers WHERE id = '{id}'"));
        async move { app.count(&sql).await }
    };
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    wait_for("refused", Duration::from_secs(10), || async { failures_of("flaky").await == 1 }).await;
    assert_eq!(app.status_of_worker("flaky").await, "offline");

    // Fixed meanwhile: nobody says so, and nothing is checked before the pause ends.
    *agent.mode.lock().unwrap() = Mode::Run;
    r.clock.advance(Duration::from_secs(9));
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0);
    assert_eq!(app.status_of_worker("flaky").await, "offline", "no check during the pause");
    r.clock.advance(Duration::from_secs(2));
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0, "offline when the pass began");
    wait_for("online after its health check", Duration::from_secs(10), || async {
        app.status_of_worker("flaky").await == "online"
    })
    .await;
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    wait_for("run", Duration::from_secs(10), || async { app.status_of(&first).await == "completed" }).await;
    assert_eq!(failures_of("flaky").await, 0, "a task taken clears the failures");

    // An agent that is still down when its pause ends is paused again, for longer.
    let (status, _) = app.post("/api/runtime/workers/flaky/drain", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    register(&app, "gone", "http://127.0.0.1:9").await;
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    wait_for("unreachable", Duration::from_secs(10), || async { failures_of("gone").await == 1 }).await;
    r.clock.advance(Duration::from_secs(11));
    let checked_at = r.clock.now_ms();
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0);
    wait_for("its check failed", Duration::from_secs(15), || async { failures_of("gone").await == 2 }).await;
    assert_eq!(paused_until("gone").await - checked_at, 20_000);
    assert_eq!(app.status_of_worker("gone").await, "offline");
    assert_eq!(app.status_of(&second).await, "queued", "its attempt was given back to the queue");
    app.stop().await;
}

/// An agent that took a task (its heartbeat came) and lost the call keeps it: the
/// attempt is not abandoned, the agent not paused, and its `complete` callback, late or
/// sent before the call broke, completes the task once; the same through
/// `POST /dispatch`, which answers 502 with the task left to the agent, as upstream.
#[tokio::test]
async fn an_agent_that_took_a_task_and_lost_the_call_completes_it() {
    use bloom::reconciler::agent_dispatch;
    use fake_agent::LostCall;
    let app = TestApp::spawn().await;
    let r = manual_reconciler(&app).await;
    let audited = "SELECT count(*) FROM audit_logs WHERE action = 'dispatch_failed'";
    for (n, when) in [LostCall::BeforeComplete(Duration::from_secs(1)), LostCall::AfterComplete].into_iter().enumerate()
    {
        let agent = fake_agent::start_losing_the_call(when).await;
        let name = format!("flaky-{n}");
        register(&app, &name, &agent).await;
        let sent = app.submit("answered, the call lost").await["id"].as_str().unwrap().to_owned();
        assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
        wait_for("completed by the callback", Duration::from_secs(10), || async {
            app.status_of(&sent).await == "completed"
        })
        .await;
        wait_for("the broken call audited", Duration::from_secs(10), || async {
            app.count(audited).await == n as i64 + 1
        })
        .await;
        assert_eq!(app.status_of_worker(&name).await, "online", "{when:?}: not paused");
        let failures = format!("SELECT dispatch_failures::bigint FROM workers WHERE id = '{name}'");
        assert_eq!(app.count(&failures).await, 0, "{when:?}");
        sqlx::query("DELETE FROM workers WHERE id = $1").bind(&name).execute(&app.pool).await.unwrap();
    }

    let agent = fake_agent::start_losing_the_call(LostCall::BeforeComplete(Duration::from_secs(1))).await;
    register(&app, "by-hand", &agent).await;
    let by_hand = app.submit("dispatched by hand").await["id"].as_str().unwrap().to_owned();
    let (status, answer) = app.post(&format!("/api/runtime/llm-tasks/{by_hand}/dispatch"), json!({})).await;
    assert_eq!((status, &answer["dispatched"]), (StatusCode::BAD_GATEWAY, &json!(false)), "{answer}");
    assert_eq!(app.status_of(&by_hand).await, "running", "left to the agent");
    wait_for("completed by the late callback", Duration::from_secs(10), || async {
        app.status_of(&by_hand).await == "completed"
    })
    .await;
    assert_eq!(app.count(audited).await, 3);
    assert_eq!(app.count("SELECT count(*) FROM llm_results").await, 3);
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'failed'").await, 0);
    assert_eq!(app.count("SELECT sum(attempts)::bigint FROM llm_tasks").await, 3, "one attempt each");
    app.stop().await;
}

/// A reconciler process killed while an agent runs a task it sent: the agent's callbacks
/// complete the task through the API, once, and nothing is dispatched again.
#[tokio::test]
async fn a_reconciler_killed_during_an_http_dispatch_loses_and_repeats_nothing() {
    use std::process::{Command, Stdio};
    let app = TestApp::spawn().await;
    let agent = fake_agent::start(AGENT_KEY, Mode::RunFor(Duration::from_millis(1500))).await;
    register(&app, "agent-1", &agent.url()).await;
    let db: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&app.pool).await.unwrap();
    let base = crate::common::admin_db_url();
    let db_url = format!("{}/{db}", base.rsplit_once('/').unwrap().0);
    let mut reconciler = crate::common::Kill(
        Command::new(env!("CARGO_BIN_EXE_bloom-reconciler"))
            .env("DATABASE_URL", db_url)
            .env("NATS_URL", crate::common::nats_url())
            .env("BLOOM_NATS_NAMESPACE", app.names.namespace())
            .env("BLOOM_RECONCILER_HTTP_PORT", "0")
            .env("BLOOM_RUNTIME_URL", app.url(""))
            .env("MEMBRIDGE_AGENT_KEY", AGENT_KEY)
            .env("MEMBRIDGE_SERVER_URL", "http://127.0.0.1:9")
            .env("BLOOM_AGENT_DISPATCH_INTERVAL_MS", "50")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let id = app.submit("long question").await["id"].as_str().unwrap().to_owned();
    wait_for("sent to the agent", Duration::from_secs(30), || async { agent.executed.lock().unwrap().len() == 1 })
        .await;
    reconciler.0.kill().unwrap();
    reconciler.0.wait().unwrap();
    assert_ne!(app.status_of(&id).await, "completed", "killed while the agent still ran the task");
    wait_for("completed by the agent's callback", Duration::from_secs(10), || async {
        app.status_of(&id).await == "completed"
    })
    .await;
    assert_eq!(app.count("SELECT count(*) FROM llm_results").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM leases WHERE status = 'released'").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM leases").await, 1);
    assert_eq!(app.count("SELECT count(*) FROM audit_logs WHERE action = 'dispatch_failed'").await, 0);
    assert_eq!(agent.executed.lock().unwrap().len(), 1);
    app.stop().await;
}

async fn worker_of(app: &TestApp, task: &str) -> Option<String> {
    sqlx::query_scalar("SELECT worker_id FROM llm_tasks WHERE id = $1").bind(task).fetch_one(&app.pool).await.unwrap()
}

/// Sticky contexts across HTTP agents: a task whose context an agent holds waits for
/// that agent while it has room, and goes to any agent once it has none.
#[tokio::test]
async fn an_agent_holding_a_context_gets_its_next_tasks_while_it_has_room() {
    use bloom::reconciler::agent_dispatch;
    let app = TestApp::spawn().await;
    let slow = Mode::RunFor(Duration::from_secs(30));
    let (x, y) = (fake_agent::start(AGENT_KEY, slow).await, fake_agent::start(AGENT_KEY, slow).await);
    for (name, agent) in [("x", &x), ("y", &y)] {
        let body = json!({"name": name, "url": agent.url(), "status": "online", "capabilities": {"max_concurrency": 2},
                          "agent_version": "0.4.0"});
        assert_eq!(app.post("/api/runtime/workers", body).await.0, StatusCode::CREATED);
    }
    let submit =
        |ctx: &str, prompt: &str| app.submit_with(json!({"context_id": ctx, "agent_slug": "a", "prompt": prompt}));
    let id = |v: serde_json::Value| v["id"].as_str().unwrap().to_owned();
    let r = manual_reconciler(&app).await;
    let first = id(submit("conversation", "first").await);
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    let holder = worker_of(&app, &first).await.unwrap();
    let other = if holder == "x" { "y" } else { "x" };

    // The other agent is the less busy, so it is served first: it takes the other
    // context's task and leaves the conversation's to the holder.
    let second = id(submit("conversation", "second").await);
    let unrelated = id(submit("elsewhere", "unrelated").await);
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 2);
    assert_eq!(worker_of(&app, &second).await.as_deref(), Some(holder.as_str()), "sticky while the holder has room");
    assert_eq!(worker_of(&app, &unrelated).await.as_deref(), Some(other));

    // The holder is full now: the conversation's next task goes to the other agent.
    let third = id(submit("conversation", "third").await);
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    assert_eq!(worker_of(&app, &third).await.as_deref(), Some(other), "no room: any agent");
    app.stop().await;
}

/// Concurrency limits hold for HTTP agents too: the reconcilers lease an agent only
/// what the limits admit, and put the rest aside until a slot frees.
#[tokio::test]
async fn an_agent_is_sent_only_what_the_concurrency_limits_admit() {
    let app = TestApp::spawn().await;
    let agent = fake_agent::start(AGENT_KEY, Mode::RunFor(Duration::from_millis(200))).await;
    let body = json!({"name": "agent-1", "url": agent.url(), "status": "online", "capabilities": {"max_concurrency": 4},
                      "agent_version": "0.4.0"});
    assert_eq!(app.post("/api/runtime/workers", body).await.0, StatusCode::CREATED);
    let (status, _) = app.put("/api/runtime/concurrency-limits/context_id/*", json!({"max_running": 1})).await;
    assert_eq!(status, StatusCode::OK);
    start_reconciler(&app).await;
    let most = crate::concurrency::watch_leases(&app, async {
        for i in 0..3 {
            app.submit_with(json!({"context_id": "one", "agent_slug": "writer", "prompt": format!("q{i}")})).await;
        }
        app.submit_with(json!({"context_id": "two", "agent_slug": "writer", "prompt": "other"})).await;
        wait_for("completed by the agent", Duration::from_secs(30), || async {
            app.count("SELECT count(*) FROM llm_tasks WHERE status = 'completed'").await == 4
        })
        .await;
    })
    .await;
    assert_eq!((most.get("one"), most.get("two")), (Some(&1), Some(&1)), "{most:?}");
    assert_eq!(agent.executed.lock().unwrap().len(), 4, "each task sent once");
    let aside = "SELECT count(*) FROM audit_logs WHERE action = 'task_deferred' AND detail LIKE 'Lease deferred: concurrency limit of context_id one%'";
    assert!(app.count(aside).await >= 1, "the agent's assignment put the conversation's next tasks aside");
    assert_eq!(app.count("SELECT max(attempts)::bigint FROM llm_tasks").await, 1);
    assert_eq!(app.count("SELECT COALESCE(sum(running), 0)::bigint FROM concurrency_slot_counts").await, 0);
    app.stop().await;
}

/// A drained HTTP agent is sent nothing, and is sent tasks again once resumed.
#[tokio::test]
async fn a_drained_agent_is_sent_no_task_until_it_is_resumed() {
    use bloom::reconciler::agent_dispatch;
    let app = TestApp::spawn().await;
    let agent = fake_agent::start(AGENT_KEY, Mode::Run).await;
    register(&app, "agent-1", &agent.url()).await;
    let (status, w) = app.post("/api/runtime/workers/agent-1/drain", json!({})).await;
    assert_eq!((status, w["transport"].clone()), (StatusCode::OK, json!("http")), "{w}");
    let id = app.submit("for a drained agent").await["id"].as_str().unwrap().to_owned();
    let r = manual_reconciler(&app).await;
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0);
    assert_eq!(app.status_of(&id).await, "queued");
    assert!(agent.executed.lock().unwrap().is_empty());

    let (status, _) = app.post("/api/runtime/workers/agent-1/resume", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    wait_for("completed by the agent", Duration::from_secs(10), || async { app.status_of(&id).await == "completed" })
        .await;
    app.stop().await;
}

/// A task just submitted is left to its client for the client window: a client that
/// submits and then dispatches it (the upstream web client's Create & Dispatch) gets it
/// however the dispatch passes fall, instead of a 409. A task nobody dispatches goes to
/// an agent once the window has passed.
#[tokio::test]
async fn a_task_just_submitted_is_left_to_the_client_that_dispatches_it() {
    use bloom::reconciler::agent_dispatch;
    let app = TestApp::spawn().await;
    let saved = json!({"membridge_server_url": "http://127.0.0.1:9", "admin_key": "admin", "agent_key": AGENT_KEY});
    assert_eq!(app.post("/api/runtime/config", saved).await.0, StatusCode::OK);
    let agent = fake_agent::start(AGENT_KEY, Mode::Run).await;
    register(&app, "agent-1", &agent.url()).await;
    let r = manual_reconciler_with(&app, Duration::from_secs(1)).await;

    let mine = app.submit("dispatched by its client").await["id"].as_str().unwrap().to_owned();
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0, "left to its client");
    let (status, answer) = app.post(&format!("/api/runtime/llm-tasks/{mine}/dispatch"), json!({})).await;
    assert_eq!((status, &answer["dispatched"]), (StatusCode::OK, &json!(true)), "{answer}");
    assert_eq!(app.status_of(&mine).await, "completed");

    let nobodys = app.submit("dispatched by nobody").await["id"].as_str().unwrap().to_owned();
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0);
    // The clock started before both submissions; a minute on, both are older than the
    // window (the API stamps them with the system clock).
    r.clock.advance(Duration::from_secs(60));
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1);
    wait_for("sent", Duration::from_secs(10), || async { agent.executed.lock().unwrap().len() == 2 }).await;
    let executed = agent.executed.lock().unwrap().clone();
    assert_eq!(executed[1].0["task_id"], json!(nobodys));
    app.stop().await;
}

/// A worker that registers a URL without saying it is an agent (no version; the
/// original's REST workers may give a URL) leases its own tasks, as the original's
/// workers did: the reconcilers send it nothing, not even a task queued again, so they
/// never mark it offline for a URL nobody serves. `dispatch` still sends it a task when
/// asked. Once it gives its version (its registration, or an `agent-health` check), it is
/// sent tasks like any agent. An empty version or install method says nothing.
#[tokio::test]
async fn a_worker_that_gave_a_url_but_no_agent_version_leases_its_own_tasks() {
    use bloom::reconciler::agent_dispatch;
    let app = TestApp::spawn().await;
    let r = manual_reconciler(&app).await;
    let body = json!({"name": "rest-1", "url": "http://127.0.0.1:9", "capabilities": {"max_concurrency": 2},
                      "agent_version": "", "install_method": ""});
    let (status, worker) = app.post("/api/runtime/workers", body).await;
    assert_eq!(status, StatusCode::CREATED, "{worker}");
    assert_eq!(
        (&worker["transport"], &worker["agent_version"], &worker["install_method"]),
        (&json!("http"), &json!("unknown"), &json!("manual"))
    );
    let first = app.submit("leased by its worker").await["id"].as_str().unwrap().to_owned();
    r.clock.advance(Duration::from_secs(60));
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0);
    let (status, lease) =
        app.post(&format!("/api/runtime/llm-tasks/{first}/lease"), json!({"worker_id": "rest-1"})).await;
    assert_eq!(status, StatusCode::CREATED, "{lease}");
    let lease_id = lease["lease"]["id"].as_str().unwrap();
    let done = json!({"lease_id": lease_id, "status": "error", "error_message": "try again",
                      "metrics": {"duration_ms": 3}});
    assert_eq!(app.post(&format!("/api/runtime/llm-tasks/{first}/complete"), done).await.0, StatusCode::OK);
    let (status, _) = app.post(&format!("/api/runtime/llm-tasks/{first}/requeue"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0, "a requeued task is not pushed either");
    assert_eq!(app.status_of(&first).await, "queued");
    assert_eq!(app.status_of_worker("rest-1").await, "online");

    // Asked for, a dispatch reaches it (nothing listens there: 502, the worker offline).
    let (status, answer) = app.post(&format!("/api/runtime/llm-tasks/{first}/dispatch"), json!({})).await;
    assert_eq!((status, &answer["dispatched"]), (StatusCode::BAD_GATEWAY, &json!(false)), "{answer}");
    let (status, _) = app.post(&format!("/api/runtime/llm-tasks/{first}/cancel"), json!({})).await;
    assert_eq!(status, StatusCode::OK);

    // An agent is sent tasks once it has said its version (here: its health check).
    let agent = fake_agent::start(AGENT_KEY, Mode::Run).await;
    let body = json!({"name": "agent-1", "url": agent.url(), "capabilities": {"max_concurrency": 2}});
    assert_eq!(app.post("/api/runtime/workers", body).await.0, StatusCode::CREATED);
    let second = app.submit("for the agent").await["id"].as_str().unwrap().to_owned();
    r.clock.advance(Duration::from_secs(60));
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0, "no version yet");
    let (status, health) = app.get("/api/runtime/workers/agent-1/agent-health").await;
    assert_eq!((status, &health["reachable"]), (StatusCode::OK, &json!(true)), "{health}");
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 1, "its health check recorded its version");
    wait_for("completed by the agent", Duration::from_secs(10), || async {
        app.status_of(&second).await == "completed"
    })
    .await;

    // Uninstalled, it is sent nothing, even when something says it is online again.
    let saved = json!({"membridge_server_url": "http://127.0.0.1:9", "admin_key": "admin", "agent_key": AGENT_KEY});
    assert_eq!(app.post("/api/runtime/config", saved).await.0, StatusCode::OK);
    let (status, gone) = app.post("/api/runtime/workers/agent-1/agent-uninstall", json!({})).await;
    assert_eq!((status, &gone["status"]), (StatusCode::OK, &json!("uninstalled")), "{gone}");
    sqlx::query("UPDATE workers SET status = 'online' WHERE id = 'agent-1'").execute(&app.pool).await.unwrap();
    app.submit("after the uninstall").await;
    r.clock.advance(Duration::from_secs(60));
    assert_eq!(agent_dispatch::run_once(&r).await.unwrap().sent, 0, "uninstalled");
    app.stop().await;
}
