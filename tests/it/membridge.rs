//! The membridge proxy and client behaviour against a fake membridge.

use std::sync::atomic::Ordering;

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{Opts, TestApp};
use crate::fake_membridge;

async fn app_with(fake: &fake_membridge::Fake, key: &str) -> TestApp {
    TestApp::spawn_with(Opts {
        membridge: Some(bloom::membridge::Endpoint { url: fake.url(), admin_key: bloom::config::Secret::new(key) }),
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
        membridge: Some(bloom::membridge::Endpoint { url: fake.url(), admin_key: bloom::config::Secret::new("k") }),
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
