//! The membridge proxy and client behaviour against a fake membridge.

use std::sync::atomic::Ordering;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{Opts, TestApp};
use crate::fake_membridge::{self, now_secs};

async fn app_with(fake: &fake_membridge::Fake, key: &str) -> TestApp {
    TestApp::spawn_with(Opts {
        membridge: Some(bloom::domain::Endpoint { url: fake.url(), admin_key: bloom::domain::Secret::new(key) }),
        ..Opts::default()
    })
    .await
}

#[tokio::test]
async fn proxy_routes_pass_membridge_through() {
    let fake = fake_membridge::start("admin-key").await;
    let app = app_with(&fake, "admin-key").await;
    let (status, health) = app.get("/api/membridge/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["service"], "membridge-control-plane");
    let (status, projects) = app.get("/api/membridge/projects").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(projects[0]["canonical_id"], "2a97516c354b6884");
    let (status, nodes) = app.get("/api/membridge/projects/2a97516c354b6884/nodes").await;
    assert_eq!((status, nodes[0]["node_id"].clone()), (StatusCode::OK, json!("node-a")));
    let (status, lead) = app.get("/api/membridge/projects/2a97516c354b6884/leadership").await;
    assert_eq!((status, lead["node_count"].clone()), (StatusCode::OK, json!(1)));
    let (status, body) = app.get("/api/membridge/projects/unknown/leadership").await;
    assert_eq!((status, body), (StatusCode::NOT_FOUND, json!({"error": "Membridge returned 404"})));
    // A cid cannot walk the upstream path.
    let (status, _) = app.get("/api/membridge/projects/..%2F..%2Fagents/nodes").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(fake.agent_calls.load(Ordering::SeqCst), 0);

    let (status, sel) = app
        .post("/api/membridge/projects/2a97516c354b6884/leadership/select", json!({"primary_node_id": "node-a"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{sel}");
    assert_eq!(sel["ok"], true);
    assert_eq!(sel["lease_seconds"], 3600);
    let (_, audit) = app.get("/api/runtime/audit?limit=1").await;
    assert_eq!(audit[0]["action"], "leadership_promote");
    assert_eq!(audit[0]["detail"], "Promoted primary to node-a for project 2a97516c354b6884");
    let (status, _) = app
        .post("/api/membridge/projects/2a97516c354b6884/leadership/select", json!({"primary_node_id": "ghost"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The POST is not retried on 5xx: membridge may have applied it.
    fake.inner.lock().unwrap().fail_next = 1;
    let before = fake.select_calls.load(Ordering::SeqCst);
    let (status, _) = app
        .post("/api/membridge/projects/2a97516c354b6884/leadership/select", json!({"primary_node_id": "node-a"}))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(fake.select_calls.load(Ordering::SeqCst), before, "the 503 was not followed by a resend");
    // GETs are retried on 5xx.
    fake.inner.lock().unwrap().fail_next = 2;
    let (status, _) = app.get("/api/membridge/projects").await;
    assert_eq!(status, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn unreachable_or_unauthorized_membridge_is_reported_not_connected() {
    let fake = fake_membridge::start("right-key").await;
    let app = app_with(&fake, "wrong-key").await;
    let (status, body) = app.post("/api/runtime/test-connection", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["connected"], false);
    assert!(body["error"].as_str().unwrap().contains("401"), "{body}");
    let (_, health) = app.get("/api/runtime/health").await;
    assert_eq!(health["membridge"]["connected"], false);
    assert!(health["membridge"]["lastError"].as_str().unwrap().contains("401"));
    let (status, _) = app.get("/api/membridge/projects").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Fix the key through the API: connected.
    let (status, _) =
        app.post("/api/runtime/config", json!({"membridge_server_url": fake.url(), "admin_key": "right-key"})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = app.post("/api/runtime/test-connection", json!({})).await;
    assert_eq!(body["connected"], true, "{body}");
    assert_eq!(body["health"]["status"], "ok");
    let (_, cfg) = app.get("/api/runtime/config").await;
    assert_eq!(cfg["connected"], true);
    assert!(cfg["last_test"].is_i64());
    let (_, health) = app.get("/api/runtime/health").await;
    assert_eq!(health["membridge"]["connected"], true);
    app.stop().await;

    // Nothing listens: 502 from the proxy, not connected.
    let dead = TestApp::spawn().await;
    let (status, body) = dead.get("/api/membridge/projects").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    dead.stop().await;
}

#[tokio::test]
async fn a_slow_membridge_times_out_with_retries_and_502() {
    let fake = fake_membridge::start("k").await;
    fake.inner.lock().unwrap().delay_ms = 1_000;
    let app = TestApp::spawn_with(Opts {
        membridge: Some(bloom::domain::Endpoint { url: fake.url(), admin_key: bloom::domain::Secret::new("k") }),
        membridge_timeout: std::time::Duration::from_millis(200),
        ..Opts::default()
    })
    .await;
    let before = fake.requests.load(Ordering::SeqCst);
    let (status, body) = app.get("/api/membridge/projects").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "Timeout after 200ms");
    // One try and three retries.
    assert_eq!(fake.requests.load(Ordering::SeqCst) - before, 4);
    let (_, health) = app.get("/api/runtime/health").await;
    assert_eq!(health["membridge"]["connected"], false);
    // Membridge recovers: the next call succeeds.
    fake.inner.lock().unwrap().delay_ms = 0;
    let (status, _) = app.get("/api/membridge/projects").await;
    assert_eq!(status, StatusCode::OK);
    app.stop().await;
}

/// Sends `GET path` as written (no client-side normalisation of dot segments) and
/// returns the status code.
async fn raw_get(app: &TestApp, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.url("").trim_start_matches("http://").trim_end_matches('/').to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn a_dot_segment_cid_is_refused_and_unreserved_characters_are_sent_as_they_are() {
    let fake = fake_membridge::start("k").await;
    let app = app_with(&fake, "k").await;
    for cid in [".", "..", "%2e%2e", "%2E", ".%2e"] {
        for route in ["nodes", "leadership"] {
            let path = format!("/api/membridge/projects/{cid}/{route}");
            assert_eq!(raw_get(&app, &path).await, 400, "{path}");
        }
        let (status, body) = app
            .post(&format!("/api/membridge/projects/{cid}/leadership/select"), json!({"primary_node_id": "n"}))
            .await;
        // The client may fold `..` itself; either way nothing reaches membridge.
        assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND, "{cid}: {status} {body}");
    }
    assert!(fake.paths.lock().unwrap().is_empty(), "{:?}", fake.paths.lock().unwrap());
    let (status, _) = app.get("/api/membridge/projects/a-b.c_d~e%20f/nodes").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(fake.paths.lock().unwrap().as_slice(), ["/projects/a-b.c_d~e%20f/nodes"]);
    app.stop().await;
}

#[tokio::test]
async fn connection_state_is_shared_reset_by_new_settings_and_not_set_by_the_open_health_route() {
    let fake = fake_membridge::start("right-key").await;
    let app = app_with(&fake, "wrong-key").await;
    let (_, health) = app.get("/api/runtime/health").await;
    assert_eq!(health["membridge"]["status"], "unknown", "{health}");
    // membridge's /health needs no key: reaching it says nothing of the key.
    let (status, _) = app.get("/api/membridge/health").await;
    assert_eq!(status, StatusCode::OK);
    let (_, health) = app.get("/api/runtime/health").await;
    assert_eq!(
        (health["membridge"]["connected"].clone(), health["membridge"]["status"].clone()),
        (json!(false), json!("unknown"))
    );
    // The reconciler's sync is rejected: every process reports it.
    let cancel = app.cancel.child_token();
    let r = app.reconciler_with(app.reconciler_settings(), &cancel).await;
    bloom::reconciler::membridge_sync::run_logged(&r).await;
    let (_, health) = app.get("/api/runtime/health").await;
    assert_eq!(health["membridge"]["connected"], false);
    assert_eq!(health["membridge"]["status"], "disconnected");
    assert!(health["membridge"]["lastError"].as_str().unwrap().contains("401"), "{health}");
    assert_eq!(health["membridge"]["sync"]["ok"], false);
    assert!(health["membridge"]["sync"]["error"].as_str().unwrap().contains("401"), "{health}");
    // New settings: unknown again until a call succeeds.
    let (status, cfg) =
        app.post("/api/runtime/config", json!({"membridge_server_url": fake.url(), "admin_key": "right-key"})).await;
    assert_eq!((status, cfg["connected"].clone()), (StatusCode::OK, json!(false)));
    let (_, health) = app.get("/api/runtime/health").await;
    assert_eq!(health["membridge"]["status"], "unknown");
    assert_eq!(health["membridge"]["consecutiveFailures"], 0);
    bloom::reconciler::membridge_sync::run_logged(&r).await;
    let (_, health) = app.get("/api/runtime/health").await;
    assert_eq!(health["membridge"]["status"], "connected", "{health}");
    assert_eq!(health["membridge"]["sync"]["ok"], true);
    let (_, cfg) = app.get("/api/runtime/config").await;
    assert_eq!(cfg["connected"], true);
    app.stop().await;
}

#[tokio::test]
async fn sync_keeps_what_a_node_registered_and_takes_liveness_from_membridge() {
    let fake = fake_membridge::start("k").await;
    let app = app_with(&fake, "k").await;
    let (status, _) = app
        .post(
            "/api/runtime/workers",
            json!({"name": "node-1", "url": "http://node-1:8001", "status": "online",
                   "capabilities": {"claude_cli": false, "max_concurrency": 2, "labels": ["gpu"]}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    fake.set_agents(vec![
        json!({"name": "node-1", "url": "http://membridge-view:9", "status": "unknown", "registered_at": 1.0, "last_seen": null}),
        json!({"node_id": "node-2", "max_concurrency": 3, "labels": ["a"], "status": "online", "last_seen": null}),
    ]);
    let cancel = app.cancel.child_token();
    let r = app.reconciler_with(app.reconciler_settings(), &cancel).await;
    bloom::reconciler::membridge_sync::run_once(&r).await.unwrap();
    let (_, n1) = app.get("/api/runtime/workers/node-1").await;
    assert_eq!(
        (n1["status"].clone(), n1["url"].clone(), n1["capabilities"].clone()),
        (
            json!("online"),
            json!("http://node-1:8001"),
            json!({"claude_cli": false, "max_concurrency": 2, "labels": ["gpu"]})
        )
    );
    assert!(n1["last_heartbeat"].as_i64().unwrap() > 0, "the registration's heartbeat stays: {n1}");
    let (_, n2) = app.get("/api/runtime/workers/node-2").await;
    assert_eq!(n2["capabilities"], json!({"claude_cli": true, "max_concurrency": 3, "labels": ["a"]}));
    assert_eq!(n2["last_heartbeat"], json!(null), "never seen by membridge: no heartbeat made up");
    // Membridge's liveness wins when it knows something.
    fake.set_agents(vec![json!({"name": "node-1", "url": "", "status": "offline", "last_seen": now_secs()})]);
    bloom::reconciler::membridge_sync::run_once(&r).await.unwrap();
    let (_, n1) = app.get("/api/runtime/workers/node-1").await;
    assert_eq!((n1["status"].clone(), n1["capabilities"]["max_concurrency"].clone()), (json!("offline"), json!(2)));
    app.stop().await;
}

#[tokio::test]
async fn workers_of_an_unreadable_membridge_go_offline_after_the_staleness_limit() {
    let fake = fake_membridge::start("k").await;
    let app = app_with(&fake, "k").await;
    fake.set_agents(vec![json!({"name": "a1", "url": "http://a1", "status": "online", "last_seen": now_secs()})]);
    let cancel = app.cancel.child_token();
    let settings = bloom::reconciler::ReconcilerSettings {
        membridge_stale_after: std::time::Duration::from_millis(300),
        ..app.reconciler_settings()
    };
    let mut r = app.reconciler_with(settings, &cancel).await;
    r.clock = bloom::time::Clock::manual(bloom::time::now_ms());
    bloom::reconciler::membridge_sync::run_logged(&r).await;
    assert_eq!(app.status_of_worker("a1").await, "online");
    // The key is rejected from now on: within the limit nothing changes...
    bloom::db::settings::save_membridge(&app.pool, &fake.url(), "rotated").await.unwrap();
    bloom::reconciler::membridge_sync::run_logged(&r).await;
    assert_eq!(app.status_of_worker("a1").await, "online");
    // ...past it, the workers membridge reported are offline.
    r.clock.advance(std::time::Duration::from_millis(400));
    bloom::reconciler::membridge_sync::run_logged(&r).await;
    assert_eq!(app.status_of_worker("a1").await, "offline");
    let audited = "SELECT count(*) FROM audit_logs WHERE action = 'worker_offline' AND entity_id = 'a1'
                   AND actor = 'reconciler' AND detail LIKE 'Membridge unreadable%'";
    assert_eq!(app.count(audited).await, 1);
    let (_, health) = app.get("/api/runtime/health").await;
    assert_eq!(health["membridge"]["sync"]["ok"], false);
    assert!(health["membridge"]["sync"]["lastSuccess"].is_i64(), "{health}");
    app.stop().await;
}
