//! `/api/runtime/projects`: create, list, show, delete; clone, propagate and memory sync
//! against fake agents and a fake membridge over real sockets.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{Opts, TestApp};
use crate::{fake_agent, fake_membridge};

#[tokio::test]
async fn projects_are_validated_created_listed_and_deleted() {
    let clock = bloom::time::Clock::manual(bloom::time::now_ms());
    let app = TestApp::spawn_with(Opts { clock: Some(clock.clone()), ..Opts::default() }).await;
    let (status, body) = app
        .post("/api/runtime/projects", json!({"name": "bad/name", "repo_url": "ftp://x", "target_path": "../etc"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let fields = &body["error"]["fieldErrors"];
    assert_eq!(fields["name"], json!(["Name must be alphanumeric with dashes/underscores/dots/spaces"]));
    assert_eq!(fields["repo_url"], json!(["Must be a valid HTTP(S) or git@ URL"]));
    assert_eq!(fields["target_path"], json!(["Path must not contain '..' for security"]));

    let (status, p) =
        app.post("/api/runtime/projects", json!({"name": "demo", "repo_url": "https://git.example/demo.git"})).await;
    assert_eq!(status, StatusCode::CREATED, "{p}");
    assert_eq!(
        (&p["canonical_id"], &p["clone_status"], &p["target_path"]),
        (&json!("2a97516c354b6884"), &json!("pending"), &json!(null))
    );
    let id = p["id"].as_str().unwrap().to_owned();
    clock.advance(std::time::Duration::from_millis(5));
    let (status, _) = app.post("/api/runtime/projects", json!({"name": "second", "repo_url": "git@host:x.git"})).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, all) = app.get("/api/runtime/projects").await;
    let names: Vec<&str> = all.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["second", "demo"], "newest first");
    let (status, shown) = app.get(&format!("/api/runtime/projects/{id}")).await;
    assert_eq!((status, &shown["name"], &shown["nodes"]), (StatusCode::OK, &json!("demo"), &json!([])));
    let (status, removed) = app.delete(&format!("/api/runtime/projects/{id}")).await;
    assert_eq!((status, removed), (StatusCode::OK, json!({"removed": true, "id": id})));
    let (status, body) = app.get(&format!("/api/runtime/projects/{id}")).await;
    assert_eq!((status, body), (StatusCode::NOT_FOUND, json!({"error": "Project not found"})));
    assert_eq!(
        app.count("SELECT count(*) FROM audit_logs WHERE action IN ('project_created', 'project_deleted')").await,
        3
    );
    app.stop().await;
}

#[tokio::test]
async fn a_project_is_cloned_on_its_node_propagated_and_its_memory_synced() {
    let membridge = fake_membridge::start("admin").await;
    let app = TestApp::spawn_with(Opts {
        membridge: Some(bloom::domain::Endpoint {
            url: membridge.url(),
            admin_key: bloom::domain::Secret::new("admin"),
        }),
        ..Opts::default()
    })
    .await;
    let a = fake_agent::start("", fake_agent::Mode::Run).await;
    let b = fake_agent::start("", fake_agent::Mode::Run).await;
    for (name, agent) in [("node-a", &a), ("node-b", &b)] {
        app.post("/api/runtime/workers", json!({"name": name, "url": agent.url()})).await;
    }
    let (_, p) =
        app.post("/api/runtime/projects", json!({"name": "demo", "repo_url": "https://git.example/demo.git"})).await;
    let id = p["id"].as_str().unwrap().to_owned();
    let (status, body) = app.post(&format!("/api/runtime/projects/{id}/clone"), json!({})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "No target node specified. Provide node_id in body or set primary_node_id on project.");

    let (status, cloned) = app.post(&format!("/api/runtime/projects/{id}/clone"), json!({"node_id": "node-a"})).await;
    assert_eq!(status, StatusCode::OK, "{cloned}");
    assert_eq!(
        (&cloned["status"], &cloned["node"], &cloned["result"]["ok"]),
        (&json!("cloned"), &json!("node-a"), &json!(true))
    );
    let (_, shown) = app.get(&format!("/api/runtime/projects/{id}")).await;
    assert_eq!((&shown["clone_status"], &shown["primary_node_id"]), (&json!("cloned"), &json!("node-a")));
    let (_, nodes) = app.get(&format!("/api/runtime/projects/{id}/node-status")).await;
    assert_eq!(nodes[0]["repo_path"], "/home/agent/projects/demo");
    assert!(nodes[0]["last_sync_at"].as_i64().is_some());

    let (status, spread) = app.post(&format!("/api/runtime/projects/{id}/propagate"), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(spread, json!({"status": "synced", "results": [{"node_id": "node-b", "status": "cloned"}]}));
    let (_, again) = app.post(&format!("/api/runtime/projects/{id}/propagate"), json!({})).await;
    assert_eq!(again["status"], "nothing_to_propagate");

    let (status, synced) =
        app.post(&format!("/api/runtime/projects/{id}/sync-memory"), json!({"direction": "pull"})).await;
    assert_eq!(status, StatusCode::OK, "{synced}");
    assert_eq!(
        (&synced["direction"], &synced["node"], &synced["result"]["project"]),
        (&json!("pull"), &json!("node-a"), &json!("demo"))
    );
    let (status, _) =
        app.post(&format!("/api/runtime/projects/{id}/sync-memory"), json!({"direction": "sideways"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    for action in ["project_cloned", "project_propagated", "memory_sync_pull"] {
        assert_eq!(
            app.count(&format!("SELECT count(*) FROM audit_logs WHERE action = '{action}'")).await,
            1,
            "{action}"
        );
    }

    // A git failure answered 200 `ok: false` is a failure.
    let (_, broken) = app
        .post(
            "/api/runtime/projects",
            json!({"name": "broken", "repo_url": "https://git.example/x.git",
                                                                 "primary_node_id": "node-b"}),
        )
        .await;
    let bid = broken["id"].as_str().unwrap().to_owned();
    let (status, body) = app.post(&format!("/api/runtime/projects/{bid}/clone"), json!({})).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(body["error"].as_str().unwrap().contains("git clone failed"), "{body}");
    let (_, shown) = app.get(&format!("/api/runtime/projects/{bid}")).await;
    assert_eq!((&shown["clone_status"], &shown["nodes"][0]["clone_status"]), (&json!("failed"), &json!("failed")));
    app.stop().await;
}
