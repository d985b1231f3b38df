//! `bloomctl` against a running installation: submit and wait, list, show, exit codes,
//! rate limits.

use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use reqwest::StatusCode;

use crate::common::TestApp;

fn bloomctl(app: &TestApp, args: &[&str]) -> (i32, String, String) {
    bloomctl_at(&app.base, args)
}

fn bloomctl_at(api_url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bloomctl"))
        .args(args)
        .env("BLOOM_API_URL", api_url)
        .env_remove("RUNTIME_API_KEY")
        .output()
        .expect("run bloomctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[tokio::test]
async fn submit_wait_list_show_and_exit_codes() {
    let app = TestApp::spawn().await;
    app.start_reconciler().await;
    app.start_worker("w", 4).await;
    let a = app.clone_handle();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || bloomctl(&a, &["submit", "hello from bloomctl", "--wait"])).await.unwrap();
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "hello from bloomctl");
    let a = app.clone_handle();
    let (code, out, _) = tokio::task::spawn_blocking(move || {
        bloomctl(&a, &["submit", "fail: nope", "--wait", "--count", "2", "--json"])
    })
    .await
    .unwrap();
    assert_eq!(code, 5, "a failed task exits 5");
    let results: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(results.as_array().unwrap().len(), 2);
    assert_eq!(
        (results[0]["status"].clone(), results[0]["error"].clone()),
        (serde_json::json!("failed"), serde_json::json!("nope"))
    );
    let a = app.clone_handle();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || bloomctl(&a, &["submit", "fail: out of budget", "--wait"])).await.unwrap();
    assert_eq!(code, 5);
    assert!(err.contains("error: out of budget"), "{err}");

    let a = app.clone_handle();
    let (code, out, _) = tokio::task::spawn_blocking(move || bloomctl(&a, &["tasks", "list", "--json"])).await.unwrap();
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap().as_array().unwrap().len(), 4);
    let a = app.clone_handle();
    let (code, out, _) =
        tokio::task::spawn_blocking(move || bloomctl(&a, &["tasks", "list", "--status", "completed"])).await.unwrap();
    assert_eq!(code, 0);
    assert!(out.starts_with("ID"), "{out}");
    assert_eq!(out.lines().count(), 2, "{out}");
    // By the start of the prompt, ignoring case; at most --limit rows.
    for (limit, rows) in [("10", 3), ("2", 2)] {
        let a = app.clone_handle();
        let args = ["tasks", "list", "--prompt", "FAIL:", "--limit", limit, "--json"];
        let (code, out, err) = tokio::task::spawn_blocking(move || bloomctl(&a, &args)).await.unwrap();
        assert_eq!(code, 0, "{err}");
        let tasks: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(tasks.as_array().unwrap().len(), rows, "{out}");
        assert!(tasks.as_array().unwrap().iter().all(|t| t["prompt"].as_str().unwrap().starts_with("fail: ")), "{out}");
    }
    let a = app.clone_handle();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || bloomctl(&a, &["tasks", "show", "missing"])).await.unwrap();
    assert_eq!(code, 3, "{err}");
    let a = app.clone_handle();
    let (code, _, _) =
        tokio::task::spawn_blocking(move || bloomctl(&a, &["tasks", "requeue", "missing"])).await.unwrap();
    assert_eq!(code, 3);
    let a = app.clone_handle();
    let (code, out, _) = tokio::task::spawn_blocking(move || bloomctl(&a, &["stats"])).await.unwrap();
    assert_eq!(code, 0);
    assert!(out.contains("tasks    total 4"), "{out}");
    // The audit log by action: the four submissions, oldest first.
    let a = app.clone_handle();
    let args = ["audit", "--action", "task_created", "--json"];
    let (code, out, err) = tokio::task::spawn_blocking(move || bloomctl(&a, &args)).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let entries: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(entries.len(), 4, "{out}");
    assert!(entries.iter().all(|e| e["action"] == "task_created"), "{out}");
    // By filter: the three failed tasks of the default agent, counted first.
    let a = app.clone_handle();
    let args = ["tasks", "requeue", "--agent", "default", "--status", "failed", "--dry-run", "--json"];
    let (code, out, err) = tokio::task::spawn_blocking(move || bloomctl(&a, &args)).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((report["dry_run"].as_bool(), report["matched"].as_i64()), (Some(true), Some(3)), "{report}");
    let a = app.clone_handle();
    let args = ["tasks", "cancel", "--agent", "default", "--dry-run", "--json"];
    let (code, out, err) = tokio::task::spawn_blocking(move || bloomctl(&a, &args)).await.unwrap();
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["matched"], 0, "nothing unfinished: {report}");
    let a = app.clone_handle();
    let (code, out, _) = tokio::task::spawn_blocking(move || bloomctl(&a, &["usage"])).await.unwrap();
    assert_eq!(code, 0);
    let header: Vec<&str> = out.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header[..4], ["AGENT", "RUNS", "ERRORS", "COST_USD"], "{out}");
    let total: Vec<&str> = out.lines().last().unwrap_or_default().split_whitespace().collect();
    assert_eq!(total[..3], ["(total)", "4", "3"], "four runs, three failed: {out}");
    let a = app.clone_handle();
    let (code, out, _) = tokio::task::spawn_blocking(move || bloomctl(&a, &["tasks", "list"])).await.unwrap();
    assert_eq!(code, 0);
    let (id, _) = out.lines().nth(1).unwrap().split_once(' ').unwrap();
    let a = app.clone_handle();
    let id = id.to_owned();
    let (code, out, _) = tokio::task::spawn_blocking(move || bloomctl(&a, &["tasks", "show", &id])).await.unwrap();
    assert_eq!(code, 0);
    let created = out.lines().find(|l| l.starts_with("created_at")).unwrap();
    let stamp = created.split_whitespace().nth(1).unwrap();
    assert!(stamp.len() == 24 && stamp.starts_with("20") && stamp.ends_with('Z'), "ISO 8601 UTC: {created}");

    // Concurrency limits: set (a key with a slash), listed, refused, removed.
    let a = app.clone_handle();
    let run = move |args: &'static [&'static str]| {
        let a = a.clone_handle();
        tokio::task::spawn_blocking(move || bloomctl(&a, args))
    };
    let (code, out, _) = run(&["limits", "set", "concurrency_key", "team/a", "3"]).await.unwrap();
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = run(&["limits"]).await.unwrap();
    assert_eq!(code, 0);
    let row: Vec<&str> = out.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row, ["concurrency_key", "team/a", "3", "0", "0"], "{out}");
    let (code, _, err) = run(&["limits", "set", "model", "x", "1"]).await.unwrap();
    assert_ne!(code, 0, "an unknown scope is refused: {err}");
    let (code, out, _) = run(&["keys", "--scope", "concurrency_key"]).await.unwrap();
    assert_eq!(
        (code, out.lines().next().map(|l| l.split_whitespace().collect::<Vec<_>>())),
        (0, Some(vec!["SCOPE", "KEY", "MAX_RUNNING", "RUNNING", "WAITING"])),
        "{out}"
    );
    let (code, out, _) = run(&["limits", "delete", "concurrency_key", "team/a"]).await.unwrap();
    assert_eq!((code, out.trim()), (0, "removed concurrency_key team/a"));
    let (code, _, _) = run(&["limits", "delete", "concurrency_key", "team/a"]).await.unwrap();
    assert_eq!(code, 3, "not found");

    // Budgets: set (a key with a slash), listed with what is used, removed.
    let (code, out, err) =
        run(&["budgets", "set", "agent_slug", "team/w", "usd-per-day", "2.5", "--estimate", "0.5"]).await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = run(&["budgets"]).await.unwrap();
    assert_eq!(code, 0);
    let row: Vec<&str> = out.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row[..7], ["agent_slug", "team/w", "usd-per-day", "2.5", "0.0", "2.5", "0"], "{out}");
    let (code, _, err) = run(&["budgets", "set", "agent_slug", "x", "usd-per-week", "1"]).await.unwrap();
    assert_ne!(code, 0, "an unknown rule is refused: {err}");
    assert!(err.contains("rule"), "{err}");
    let (code, out, _) = run(&["budget-usage"]).await.unwrap();
    assert_eq!(code, 0, "{out}");
    let (code, out, _) = run(&["budgets", "delete", "agent_slug", "team/w", "usd-per-day"]).await.unwrap();
    assert_eq!((code, out.trim()), (0, "removed agent_slug team/w usd-per-day"));
    app.stop().await;
}

/// A front of the API that answers every `every`-th request with 429 (as the API's rate
/// limiter does, asking to retry in a second) and passes the others on, keeping the
/// request lines it saw.
struct RateLimitingFront {
    target: String,
    every: usize,
    seen: Mutex<Vec<String>>,
    http: reqwest::Client,
}

impl RateLimitingFront {
    async fn spawn(target: &str, every: usize) -> (String, Arc<RateLimitingFront>) {
        let front = Arc::new(RateLimitingFront {
            target: target.to_owned(),
            every,
            seen: Mutex::new(Vec::new()),
            http: reqwest::Client::new(),
        });
        let router = axum::Router::new().fallback(pass_or_refuse).with_state(front.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        (url, front)
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn pass_or_refuse(State(front): State<Arc<RateLimitingFront>>, req: Request) -> Response {
    let n = {
        let mut seen = front.seen.lock().unwrap();
        seen.push(format!("{} {}", req.method(), req.uri()));
        seen.len()
    };
    if n % front.every == 0 {
        let headers = [("retry-after", "1"), ("ratelimit-reset", "1")];
        return (StatusCode::TOO_MANY_REQUESTS, headers, r#"{"error":"Too many requests"}"#).into_response();
    }
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let resp = front
        .http
        .request(parts.method, format!("{}{}", front.target, parts.uri))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let (status, headers) = (resp.status(), resp.headers().clone());
    let mut out = (status, resp.bytes().await.unwrap()).into_response();
    for (k, v) in headers.iter().filter(|(k, _)| *k != "content-length" && *k != "transfer-encoding") {
        out.headers_mut().insert(k.clone(), v.clone());
    }
    out
}

#[tokio::test]
async fn submit_waits_out_rate_limits_and_polls_by_listing() {
    let app = TestApp::spawn().await;
    app.start_reconciler().await;
    app.start_worker("w", 4).await;
    let (url, front) = RateLimitingFront::spawn(&app.base, 4).await;
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        bloomctl_at(&url, &["submit", "echo me", "--count", "6", "--wait", "--json"])
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("rate limited by the API (HTTP 429); retrying in 1s"), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("submitted ")).count(), 6, "each id as created: {err}");
    let results: serde_json::Value = serde_json::from_str(&out).unwrap();
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 6);
    for r in results {
        assert_eq!((r["status"].as_str(), r["output"].as_str()), (Some("completed"), Some("echo me")), "{r}");
        assert!(err.contains(&format!("submitted {}", r["id"].as_str().unwrap())), "{err}");
    }
    let seen = front.seen();
    let per_task: Vec<&String> =
        seen.iter().filter(|l| l.starts_with("GET /api/runtime/llm-tasks/") || l.contains("task_id=")).collect();
    assert!(per_task.is_empty(), "no request per task while waiting: {per_task:?}");
    app.stop().await;
}

#[tokio::test]
async fn nats_delete_removes_the_namespace_streams_only_when_confirmed() {
    let app = TestApp::spawn().await;
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_bloomctl"))
            .args(args)
            .env("NATS_URL", crate::common::nats_url())
            .env("BLOOM_NATS_NAMESPACE", app.names.namespace())
            .output()
            .expect("run bloomctl");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let js = async_nats::jetstream::new(app.nats.clone());
    let streams = [app.names.tasks_stream(), app.names.results_stream()];
    let (code, _) = run(&["nats", "delete"]);
    assert_eq!(code, 2, "refused without --yes");
    for s in &streams {
        assert!(js.get_stream(s).await.is_ok(), "{s} still there");
    }
    let (code, out) = run(&["nats", "delete", "--yes"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&streams[0]) && out.contains(&streams[1]), "{out}");
    for s in &streams {
        assert!(js.get_stream(s).await.is_err(), "{s} deleted");
    }
    let (code, out) = run(&["nats", "delete", "--yes"]);
    assert_eq!((code, out.trim()), (0, "streams deleted: none"), "deleting again is a no-op");
    app.stop().await;
}

#[tokio::test]
async fn nats_apply_refuses_replicas_a_single_server_cannot_hold_and_leaves_the_streams_as_they_were() {
    let app = TestApp::spawn().await;
    let run = |replicas: &str, namespace: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_bloomctl"))
            .args(["nats", "apply"])
            .env("NATS_URL", format!("nats://127.0.0.1:1, {}", crate::common::nats_url()))
            .env("BLOOM_NATS_NAMESPACE", namespace)
            .env("BLOOM_NATS_REPLICAS", replicas)
            .output()
            .expect("run bloomctl");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let js = async_nats::jetstream::new(app.nats.clone());
    let replicas_of = |name: String| {
        let js = js.clone();
        async move { js.get_stream(&name).await.expect("stream").cached_info().config.num_replicas }
    };
    // Existing streams (the app made them with one replica): the change is refused.
    let (code, err) = run("3", app.names.namespace());
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("BLOOM_NATS_REPLICAS") && err.contains("not part of a JetStream cluster"), "{err}");
    assert_eq!(replicas_of(app.names.tasks_stream()).await, 1);
    assert_eq!(replicas_of(app.names.results_stream()).await, 1);
    // New streams: the server refuses them, and says why.
    let fresh = format!("{}x", app.names.namespace());
    let (code, err) = run("3", &fresh);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("BLOOM_NATS_REPLICAS") && err.contains("non-clustered"), "{err}");
    // Out of range: refused before connecting.
    let (code, err) = run("6", &fresh);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("BLOOM_NATS_REPLICAS") || err.contains("nats-replicas"), "{err}");
    // One replica, through a server list whose first server is down: applied.
    let (code, err) = run("1", &fresh);
    assert_eq!(code, 0, "{err}");
    assert_eq!(replicas_of(format!("{fresh}_TASKS")).await, 1);
    let names = bloom::bus::Names::new(&fresh).unwrap();
    bloom::bus::provision::delete(&js, &names).await.unwrap();
    app.stop().await;
}

#[tokio::test]
async fn submit_a_jsonl_file_through_the_batch_route() {
    let app = TestApp::spawn().await;
    app.start_reconciler().await;
    app.start_worker("w", 4).await;
    let path = std::env::temp_dir().join(format!("bloom-{}.jsonl", bloom::domain::new_id()));
    std::fs::write(&path, "\"first\"\n{\"prompt\": \"second\", \"priority\": 1}\n\n{\"prompt\": \"third\"}\n").unwrap();
    let a = app.clone_handle();
    let file = path.display().to_string();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        bloomctl(&a, &["submit", "--file", &file, "--agent-slug", "bulk", "--wait", "--json"])
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, 0, "{err}");
    let results: serde_json::Value = serde_json::from_str(&out).unwrap();
    let outputs: Vec<&str> = results.as_array().unwrap().iter().map(|r| r["output"].as_str().unwrap()).collect();
    assert_eq!(outputs.len(), 3, "{results}");
    for prompt in ["first", "second", "third"] {
        assert!(outputs.contains(&prompt), "{results}");
    }
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks WHERE agent_slug = 'bulk'").await, 3);
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks WHERE priority = 1").await, 1);
    app.stop().await;
}
