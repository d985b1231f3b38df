//! REST parity of `/api/runtime/workers`.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::TestApp;

#[tokio::test]
async fn register_update_show_and_remove_workers() {
    let app = TestApp::spawn().await;
    let (status, w) = app
        .post("/api/runtime/workers", json!({"name": "node-1", "url": "http://n1:9000", "ip_addrs": ["10.0.0.5"]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{w}");
    assert_eq!(w["id"], "node-1");
    assert_eq!(w["node_id"], "node-1");
    assert_eq!(w["status"], "online");
    assert_eq!(w["capabilities"], json!({"claude_cli": true, "max_concurrency": 1, "labels": []}));
    assert_eq!(w["ip_addrs"], json!(["10.0.0.5"]));
    assert_eq!(w["active_leases"], 0);
    // The upstream runtime's agent fields, with their defaults, and the transport.
    assert_eq!(
        (&w["agent_version"], &w["os_info"], &w["install_method"], &w["transport"]),
        (&json!("unknown"), &json!(""), &json!("manual"), &json!("http"))
    );
    let keys: Vec<&str> = w.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys.len(), 15, "{keys:?}");

    // Re-registering updates (200) and keeps the URL when none is given.
    let (status, w2) = app
        .post(
            "/api/runtime/workers",
            json!({"name": "node-1", "status": "syncing", "capabilities": {"max_concurrency": 8, "labels": ["gpu"]}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(w2["url"], "http://n1:9000");
    assert_eq!(w2["status"], "syncing");
    assert_eq!(w2["capabilities"]["max_concurrency"], 8);
    assert_eq!(w2["registered_at"], w["registered_at"]);

    for (body, field) in [
        (json!({"name": ""}), "name"),
        (json!({"name": "x".repeat(129)}), "name"),
        (json!({"name": "a", "status": "busy"}), "status"),
        (json!({"name": "a", "capabilities": {"max_concurrency": 33}}), "capabilities"),
        (json!({"name": "a", "capabilities": {"claude_cli": "yes"}}), "capabilities"),
    ] {
        let (status, resp) = app.post("/api/runtime/workers", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(resp["error"]["fieldErrors"][field].is_array(), "{field}: {resp}");
    }

    let (status, shown) = app.get("/api/runtime/workers/node-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["leases"], json!([]));
    let (status, body) = app.get("/api/runtime/workers/ghost").await;
    assert_eq!((status, body), (StatusCode::NOT_FOUND, json!({"error": "Worker not found"})));

    let (status, body) = app.delete("/api/runtime/workers/node-1").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"removed": true, "id": "node-1"})));
    let (status, _) = app.delete("/api/runtime/workers/node-1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, audit) = app.get("/api/runtime/audit").await;
    let mut actions: Vec<&str> = audit.as_array().unwrap().iter().map(|a| a["action"].as_str().unwrap()).collect();
    actions.sort();
    assert_eq!(actions, vec!["worker_registered", "worker_removed", "worker_updated"]);
    app.stop().await;
}

#[tokio::test]
async fn a_fleet_is_listed_in_one_answer() {
    let app = TestApp::spawn().await;
    let mut names: Vec<String> = (0..150).map(|i| format!("node-{i:03}")).collect();
    for name in &names {
        let (status, w) = app.post("/api/runtime/workers", json!({"name": name})).await;
        assert_eq!(status, StatusCode::CREATED, "{w}");
    }
    names.sort();
    let r = app.http.get(app.url("/api/runtime/workers")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get("x-next-cursor").is_none(), "one page");
    let listed: Vec<serde_json::Value> = r.json().await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|w| w["id"].as_str().unwrap()).collect();
    assert_eq!(ids, names.iter().map(String::as_str).collect::<Vec<_>>());

    // A smaller page still goes on with its cursor.
    let r = app.http.get(app.url("/api/runtime/workers?limit=100")).send().await.unwrap();
    let cursor = r.headers().get("x-next-cursor").expect("a next page").to_str().unwrap().to_owned();
    let first: Vec<serde_json::Value> = r.json().await.unwrap();
    let (status, rest) = app.get(&format!("/api/runtime/workers?limit=100&cursor={cursor}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((first.len(), rest.as_array().unwrap().len()), (100, 50));
    assert_eq!(rest[0]["id"], names[100]);
}
