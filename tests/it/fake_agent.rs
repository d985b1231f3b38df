//! A fake membridge agent speaking the agent's HTTP API (upstream `agent/main.py`) on a
//! real socket: `X-MEMBRIDGE-AGENT` auth, `/health`, and `/execute-task`, which sends
//! the agent's callbacks to the runtime as the real agent does (one heartbeat with
//! `Content-Type: application/json` and an empty body, then `complete` with
//! `tokens_used: null`) before it answers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

/// How the agent answers `/execute-task`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// Runs the task: heartbeat, `complete` with `agent: <prompt>`, then `ok: true`.
    Run,
    /// As `Run`, with the CLI taking this long between the heartbeat and `complete`.
    RunFor(std::time::Duration),
    /// The CLI exits non-zero: heartbeat, `complete` with `status: error`, then 200
    /// `ok: false`.
    Fail,
    /// `MEMBRIDGE_AGENT_DRYRUN=1`: 200 `{ok: true, dryrun: true}` and no callbacks.
    DryRun,
    /// `503 {"detail": "Claude CLI is not installed on this node"}`, no callbacks.
    NoCli,
    /// A proxy in front of the agent answers `502 Bad Gateway` in plain text.
    BehindFailingProxy,
}

#[derive(Clone)]
pub struct FakeAgent {
    pub key: String,
    pub mode: Arc<Mutex<Mode>>,
    /// Every `/execute-task` body received, and whether its key was right.
    pub executed: Arc<Mutex<Vec<(Value, bool)>>>,
    /// What `/health` answers.
    pub health: Arc<Mutex<Value>>,
    pub addr: SocketAddr,
    http: reqwest::Client,
}

impl FakeAgent {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub async fn start(key: &str, mode: Mode) -> FakeAgent {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = FakeAgent {
        key: key.into(),
        mode: Arc::new(Mutex::new(mode)),
        executed: Arc::default(),
        health: Arc::new(Mutex::new(json!({"status": "ok", "service": "membridge-agent", "version": "0.4.0",
            "hostname": "fake", "os_info": "fake / Test Linux",
            "capabilities": {"self_update": true, "restart": true, "uninstall": true, "clone": true,
                             "sync": true, "process_control": false}}))),
        addr: listener.local_addr().unwrap(),
        http: reqwest::Client::new(),
    };
    let app = Router::new()
        .route("/health", get(health))
        .route("/execute-task", post(execute))
        .route("/self-update", post(self_update))
        .route("/restart", post(restart))
        .route("/uninstall", post(uninstall))
        .route("/clone", post(clone))
        .with_state(agent.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    agent
}

async fn health(State(agent): State<FakeAgent>) -> Json<Value> {
    Json(agent.health.lock().unwrap().clone())
}

async fn execute(State(agent): State<FakeAgent>, req: Request) -> Response {
    let key_ok = req.headers().get("x-membridge-agent").is_some_and(|v| v.as_bytes() == agent.key.as_bytes());
    let bytes = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    agent.executed.lock().unwrap().push((body.clone(), key_ok));
    if !key_ok {
        let detail = "Unauthorized — invalid or missing X-MEMBRIDGE-AGENT header";
        return (StatusCode::UNAUTHORIZED, Json(json!({"detail": detail}))).into_response();
    }
    let mode = *agent.mode.lock().unwrap();
    if mode == Mode::NoCli {
        let detail = "Claude CLI is not installed on this node";
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"detail": detail}))).into_response();
    }
    if mode == Mode::BehindFailingProxy {
        return (StatusCode::BAD_GATEWAY, "Bad Gateway").into_response();
    }
    if mode == Mode::DryRun {
        let detail = "dryrun: task not executed";
        return Json(json!({"ok": true, "dryrun": true, "task_id": body["task_id"], "detail": detail})).into_response();
    }
    let (Some(task), Some(rt)) = (body["task_id"].as_str(), body["runtime_url"].as_str()) else {
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"detail": []}))).into_response();
    };
    // Like the real agent, the run goes on when the caller hangs up.
    let run = tokio::spawn(run(agent, mode, task.to_owned(), format!("{rt}/api/runtime/llm-tasks/{task}"), body));
    run.await.unwrap()
}

async fn run(agent: FakeAgent, mode: Mode, task: String, base: String, body: Value) -> Response {
    // The agent's one heartbeat: a JSON content type and no body at all.
    let beat = agent
        .http
        .post(format!("{base}/heartbeat"))
        .header("content-type", "application/json")
        .send()
        .await
        .map(|r| r.status().as_u16());
    if let Mode::RunFor(d) = mode {
        tokio::time::sleep(d).await;
    }
    let output = format!("agent: {}", body["prompt"].as_str().unwrap_or(""));
    let error = "Claude CLI returned exit code 1";
    let complete = if mode == Mode::Fail {
        json!({"status": "error", "output": null, "error_message": error,
               "metrics": {"duration_ms": 5, "tokens_used": null}})
    } else {
        json!({"status": "success", "output": output, "error_message": null,
               "metrics": {"duration_ms": 5, "tokens_used": null}})
    };
    let done = agent.http.post(format!("{base}/complete")).json(&complete).send().await.map(|r| r.status().as_u16());
    if mode == Mode::Fail {
        return Json(json!({"ok": false, "task_id": task, "error": error, "stdout": null, "stderr": "boom",
                           "duration_ms": 5, "returncode": 1, "detail": error}))
        .into_response();
    }
    Json(json!({"ok": true, "task_id": task, "output": output, "duration_ms": 5, "returncode": 0,
                "heartbeat_status": beat.ok(), "complete_status": done.ok()}))
    .into_response()
}

/// An agent address that accepts connections and drops each as soon as the request
/// arrives, without an answer.
pub async fn start_hanging_up() -> String {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            drop(socket);
        }
    });
    url
}

/// When an agent that takes a task loses the call.
#[derive(Clone, Copy, Debug)]
pub enum LostCall {
    /// After the heartbeat; `complete` comes this long after the connection dropped.
    BeforeComplete(std::time::Duration),
    /// After `complete`, which the real agent sends before it answers.
    AfterComplete,
}

/// An agent that takes each task and loses the call: it reads the request, sends the
/// task's heartbeat, and drops the connection without an answer (a proxy's idle timeout,
/// a restarted load balancer) before or after its `complete` callback.
pub async fn start_losing_the_call(when: LostCall) -> String {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 8192];
            // Headers, then as many body bytes as `content-length` says.
            let body = loop {
                let n = socket.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    break None;
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request);
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= length {
                        break serde_json::from_str::<Value>(body).ok();
                    }
                }
            };
            let Some(body) = body else { continue };
            let base = format!(
                "{}/api/runtime/llm-tasks/{}",
                body["runtime_url"].as_str().unwrap_or(""),
                body["task_id"].as_str().unwrap_or("")
            );
            let beat = http.post(format!("{base}/heartbeat")).header("content-type", "application/json").send();
            let _ = beat.await;
            let complete = json!({"status": "success", "output": "answered, the call lost", "error_message": null,
                                  "metrics": {"duration_ms": 5, "tokens_used": null}});
            match when {
                LostCall::AfterComplete => {
                    let _ = http.post(format!("{base}/complete")).json(&complete).send().await;
                    drop(socket);
                }
                LostCall::BeforeComplete(after) => {
                    drop(socket);
                    let http = http.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let _ = http.post(format!("{base}/complete")).json(&complete).send().await;
                    });
                }
            }
        }
    });
    url
}

/// The agent's process-control endpoints, behind its key.
fn operation(agent: &FakeAgent, req: &Request, reply: Value) -> Response {
    let key_ok = req.headers().get("x-membridge-agent").is_some_and(|v| v.as_bytes() == agent.key.as_bytes());
    if !key_ok {
        let detail = "Unauthorized — invalid or missing X-MEMBRIDGE-AGENT header";
        return (StatusCode::UNAUTHORIZED, Json(json!({"detail": detail}))).into_response();
    }
    Json(reply).into_response()
}

async fn self_update(State(agent): State<FakeAgent>, req: Request) -> Response {
    let reply = json!({"ok": true, "version": "0.4.1", "new_commit": "abc123", "steps": [], "detail": "updated"});
    operation(&agent, &req, reply)
}

async fn restart(State(agent): State<FakeAgent>, req: Request) -> Response {
    let reply = json!({"ok": true, "init_system": "systemd", "service": "membridge-agent", "detail": "restarting"});
    operation(&agent, &req, reply)
}

async fn uninstall(State(agent): State<FakeAgent>, req: Request) -> Response {
    let reply = json!({"ok": true, "node_id": "fake", "init_system": "systemd", "steps": [], "detail": "uninstalled"});
    operation(&agent, &req, reply)
}

/// `POST /clone`, behind the key: the agent's name rule (no spaces), and a git failure
/// (`ok: false`, still 200) for a project named `broken`.
async fn clone(State(agent): State<FakeAgent>, req: Request) -> Response {
    let refused = operation(&agent, &req, Value::Null);
    if refused.status() != StatusCode::OK {
        return refused;
    }
    let bytes = axum::body::to_bytes(req.into_body(), 1 << 20).await.unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    agent.executed.lock().unwrap().push((body.clone(), true));
    let name = body["project_name"].as_str().unwrap_or("");
    if name.is_empty() || name.contains(' ') {
        return (StatusCode::BAD_REQUEST, Json(json!({"detail": "Invalid project_name"}))).into_response();
    }
    if name == "broken" {
        return Json(json!({"ok": false, "action": "clone", "path": null, "project_name": name,
                           "stderr": "fatal: repository not found", "detail": "git clone failed"}))
        .into_response();
    }
    Json(json!({"ok": true, "action": "clone", "path": format!("/home/agent/projects/{name}"), "project_name": name,
                "stdout": "", "stderr": null, "detail": "cloned"}))
    .into_response()
}
