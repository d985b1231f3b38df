//! HTTP client for membridge agents (the upstream `agent/main.py`): the workers reached
//! over HTTP. Every call sends `X-MEMBRIDGE-AGENT` with the agent key and has a timeout;
//! none is retried (a retried `/execute-task` would run the task twice).

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::domain::{DesiredFormat, Policy, Secret, Task};

/// Extra time an `/execute-task` call is given beyond the task's own timeout (the agent
/// waits for the CLI up to its timeout plus 10 s).
pub const EXECUTE_MARGIN: Duration = Duration::from_secs(30);

/// A call to an agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent answered with a non-2xx status: it refused (no Claude CLI, a wrong key,
    /// a body it cannot read) or failed.
    #[error("Agent returned {status}: {body}")]
    Refused { status: u16, body: String },
    /// No connection: the request never reached the agent.
    #[error("{0}")]
    Unreachable(String),
    /// The request was sent but no whole answer came (a dropped connection, no answer
    /// in time): the agent may have taken the task and be running it.
    #[error("{0}")]
    NoAnswer(String),
    /// A 2xx answer that is not JSON.
    #[error("Agent answered with invalid JSON: {0}")]
    InvalidJson(String),
}

impl AgentError {
    /// The agent cannot take tasks now: it could not be reached, or refuses every task
    /// (401/403: a wrong key; 503: no Claude CLI).
    pub fn agent_is_down(&self) -> bool {
        match self {
            AgentError::Unreachable(_) | AgentError::NoAnswer(_) => true,
            AgentError::Refused { status, .. } => [401, 403, 503].contains(status),
            AgentError::InvalidJson(_) => false,
        }
    }

    /// The request went out and the call broke off: the agent may be running the task.
    pub fn may_have_run(&self) -> bool {
        matches!(self, AgentError::NoAnswer(_))
    }
}

/// The body of `POST /execute-task`, as the agent reads it.
#[derive(Debug, Serialize)]
pub struct ExecuteTask<'a> {
    pub task_id: &'a str,
    pub prompt: &'a str,
    pub context_id: &'a str,
    pub agent_slug: &'a str,
    pub desired_format: DesiredFormat,
    pub context_hints: &'a [String],
    pub policy: &'a Policy,
    /// Where the agent sends its heartbeat and `complete` callbacks.
    pub runtime_url: &'a str,
}

impl<'a> ExecuteTask<'a> {
    /// The body for `task`, whose callbacks go to `runtime_url`.
    pub fn new(task: &'a Task, runtime_url: &'a str) -> ExecuteTask<'a> {
        ExecuteTask {
            task_id: task.id.as_str(),
            prompt: &task.prompt,
            context_id: &task.context_id,
            agent_slug: &task.agent_slug,
            desired_format: task.desired_format,
            context_hints: &task.context_hints,
            policy: &task.policy,
            runtime_url,
        }
    }
}

/// Calls agents.
#[derive(Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    key: Secret,
}

impl AgentClient {
    /// A client that authenticates with `key` (`MEMBRIDGE_AGENT_KEY`).
    pub fn new(key: Secret) -> AgentClient {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("the HTTP client builds with static settings");
        AgentClient { http, key }
    }

    /// This client with another key (the same connections).
    pub fn with_key(&self, key: Secret) -> AgentClient {
        AgentClient { http: self.http.clone(), key }
    }

    /// `POST {url}/execute-task`: runs the task on the agent, which answers once the CLI
    /// ended (after its `complete` callback). Waits the task's timeout plus
    /// [`EXECUTE_MARGIN`].
    pub async fn execute(&self, url: &str, body: &ExecuteTask<'_>) -> Result<Value, AgentError> {
        let timeout = Duration::from_secs(body.policy.timeout_sec.clamp(1, 3600) as u64) + EXECUTE_MARGIN;
        self.post(url, "/execute-task", Some(body), timeout).await
    }

    /// `GET {url}/health` (open on the agent: no key sent), within 10 s. Any JSON answer
    /// counts, whatever its status, as upstream reads it.
    pub async fn health(&self, url: &str) -> Result<Value, AgentError> {
        let resp = self
            .http
            .get(format!("{url}/health"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| AgentError::Unreachable(describe(&e)))?;
        let text = resp.text().await.map_err(|e| AgentError::Unreachable(describe(&e)))?;
        parse(&text)
    }

    /// `POST {url}{path}` with an optional JSON body, within `timeout`.
    pub async fn post<B: Serialize + ?Sized>(
        &self,
        url: &str,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let mut req = self
            .http
            .post(format!("{url}{path}"))
            .timeout(timeout)
            .header("X-MEMBRIDGE-AGENT", self.key.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                AgentError::Unreachable(describe(&e))
            } else {
                AgentError::NoAnswer(describe(&e))
            }
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| AgentError::NoAnswer(describe(&e)))?;
        if !status.is_success() {
            return Err(AgentError::Refused { status: status.as_u16(), body: crate::protocol::without_nul(text) });
        }
        parse(&text)
    }
}

/// An agent's JSON answer, with every NUL character of its strings and keys replaced by
/// U+FFFD: Postgres text and `jsonb` cannot hold one, and what an agent answers is
/// stored (its version, OS, capabilities, messages).
fn parse(text: &str) -> Result<Value, AgentError> {
    serde_json::from_str(text).map(without_nul).map_err(|e| AgentError::InvalidJson(e.to_string()))
}

fn without_nul(value: Value) -> Value {
    use crate::protocol::without_nul as text;
    match value {
        Value::String(s) => Value::String(text(s)),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nul).collect()),
        Value::Object(map) => Value::Object(map.into_iter().map(|(k, v)| (text(k), without_nul(v))).collect()),
        other => other,
    }
}

/// A reqwest error with its causes (reqwest's own message hides them).
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
