//! A fake membridge control plane speaking its HTTP API (`MEMBRIDGE_API.md`) on a real
//! socket: admin-key auth, agents, projects, nodes and leadership.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

#[derive(Default)]
pub struct Inner {
    pub agents: Vec<Value>,
    /// (name, canonical_id, nodes)
    pub projects: Vec<(String, String, Vec<Value>)>,
    pub preferred: Option<String>,
    /// Answer this many requests with 503 before serving normally.
    pub fail_next: usize,
    /// Delay every answer by this many milliseconds.
    pub delay_ms: u64,
}

#[derive(Clone)]
pub struct Fake {
    pub key: String,
    pub inner: Arc<Mutex<Inner>>,
    pub requests: Arc<AtomicUsize>,
    pub agent_calls: Arc<AtomicUsize>,
    pub select_calls: Arc<AtomicUsize>,
    /// The path of every request, as sent (percent-encoding kept).
    pub paths: Arc<Mutex<Vec<String>>>,
    pub addr: SocketAddr,
}

impl Fake {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_agents(&self, agents: Vec<Value>) {
        self.inner.lock().unwrap().agents = agents;
    }
}

pub fn now_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

pub async fn start(key: &str) -> Fake {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut inner = Inner::default();
    inner.projects.push((
        "demo".into(),
        "2a97516c354b6884".into(),
        vec![json!({"node_id": "node-a", "canonical_id": "2a97516c354b6884", "role": "primary", "obs_count": 3,
                    "db_sha": "abc", "last_seen": now_secs(), "ip_addrs": ["10.0.0.1"], "registered_at": now_secs(),
                    "project_id": "demo"})],
    ));
    let fake = Fake {
        key: key.into(),
        inner: Arc::new(Mutex::new(inner)),
        requests: Arc::default(),
        agent_calls: Arc::default(),
        select_calls: Arc::default(),
        paths: Arc::default(),
        addr,
    };
    let app = Router::new()
        .route("/agents", get(agents).post(add_agent))
        .route("/projects", get(projects))
        .route("/projects/{cid}/nodes", get(nodes))
        .route("/projects/{cid}/leadership", get(leadership))
        .route("/projects/{cid}/leadership/select", post(select))
        .route("/sync/{direction}", post(sync))
        .layer(middleware::from_fn_with_state(fake.clone(), auth))
        .route("/health", get(health))
        .layer(middleware::from_fn_with_state(fake.clone(), count))
        .with_state(fake.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    fake
}

async fn count(State(f): State<Fake>, req: Request, next: Next) -> Response {
    f.requests.fetch_add(1, Ordering::SeqCst);
    f.paths.lock().unwrap().push(req.uri().path().to_owned());
    let delay = f.inner.lock().unwrap().delay_ms;
    if delay > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
    }
    {
        let mut inner = f.inner.lock().unwrap();
        if inner.fail_next > 0 {
            inner.fail_next -= 1;
            return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"detail": "busy"}))).into_response();
        }
    }
    next.run(req).await
}

async fn auth(State(f): State<Fake>, req: Request, next: Next) -> Response {
    let ok = req.headers().get("x-membridge-admin").is_some_and(|v| v.as_bytes() == f.key.as_bytes());
    if !ok {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"detail": "Unauthorized — invalid or missing X-MEMBRIDGE-ADMIN header"})),
        )
            .into_response();
    }
    next.run(req).await
}

async fn health(State(f): State<Fake>) -> Json<Value> {
    let i = f.inner.lock().unwrap();
    Json(json!({"status": "ok", "service": "membridge-control-plane", "version": "0.3.0",
                "projects": i.projects.len(), "agents": i.agents.len()}))
}

async fn agents(State(f): State<Fake>) -> Json<Value> {
    f.agent_calls.fetch_add(1, Ordering::SeqCst);
    Json(Value::Array(f.inner.lock().unwrap().agents.clone()))
}

async fn add_agent(State(f): State<Fake>, Json(body): Json<Value>) -> Response {
    let name = body["name"].as_str().unwrap_or_default().to_owned();
    let mut i = f.inner.lock().unwrap();
    if i.agents.iter().any(|a| a["name"] == name.as_str()) {
        return (StatusCode::CONFLICT, Json(json!({"detail": format!("Agent '{name}' already registered")})))
            .into_response();
    }
    let agent =
        json!({"name": name, "url": body["url"], "status": "unknown", "registered_at": now_secs(), "last_seen": null});
    i.agents.push(agent.clone());
    (StatusCode::CREATED, Json(agent)).into_response()
}

async fn projects(State(f): State<Fake>) -> Json<Value> {
    let i = f.inner.lock().unwrap();
    Json(Value::Array(
        i.projects
            .iter()
            .map(|(name, cid, nodes)| {
                json!({"name": name, "canonical_id": cid, "created_at": now_secs(),
                "last_seen": now_secs(), "nodes_count": nodes.len(), "source": "manual"})
            })
            .collect(),
    ))
}

fn find(f: &Fake, cid: &str) -> Option<Vec<Value>> {
    f.inner.lock().unwrap().projects.iter().find(|p| p.1 == cid).map(|p| p.2.clone())
}

async fn nodes(State(f): State<Fake>, Path(cid): Path<String>) -> Response {
    match find(&f, &cid) {
        Some(n) => Json(Value::Array(n)).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"detail": "Project not found"}))).into_response(),
    }
}

async fn leadership(State(f): State<Fake>, Path(cid): Path<String>) -> Response {
    match find(&f, &cid) {
        Some(n) => {
            let preferred = f.inner.lock().unwrap().preferred.clone();
            Json(json!({"canonical_id": cid, "preferred_primary": preferred, "node_count": n.len(), "nodes": n}))
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, Json(json!({"detail": "Project not found"}))).into_response(),
    }
}

async fn select(State(f): State<Fake>, Path(cid): Path<String>, Json(body): Json<Value>) -> Response {
    f.select_calls.fetch_add(1, Ordering::SeqCst);
    let Some(nodes) = find(&f, &cid) else {
        return (StatusCode::NOT_FOUND, Json(json!({"detail": "Project not found"}))).into_response();
    };
    let Some(primary) = body["primary_node_id"].as_str() else {
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"detail": [{"msg": "field required"}]})))
            .into_response();
    };
    if !nodes.iter().any(|n| n["node_id"] == primary) {
        return (StatusCode::BAD_REQUEST, Json(json!({"detail": format!("Node '{primary}' not found")})))
            .into_response();
    }
    f.inner.lock().unwrap().preferred = Some(primary.to_owned());
    let lease = body["lease_seconds"].as_i64().unwrap_or(3600);
    Json(json!({"ok": true, "canonical_id": cid, "primary_node_id": primary, "lease_seconds": lease,
                "detail": "primary selected"}))
    .into_response()
}

/// `POST /sync/{push,pull}`: membridge's body is `{project, agent}` (422 without them).
async fn sync(Path(direction): Path<String>, Json(body): Json<Value>) -> Response {
    match (body["project"].as_str(), body["agent"].as_str()) {
        (Some(project), Some(agent)) => {
            Json(json!({"ok": true, "direction": direction, "project": project, "agent": agent})).into_response()
        }
        _ => (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"detail": [{"msg": "Field required"}]}))).into_response(),
    }
}
