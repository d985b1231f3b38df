//! A small client of the BLOOM runtime REST API.

use std::time::Duration;

use serde_json::Value;

/// Exit codes scripts can rely on.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Transport failure or a 5xx.
    pub const ERROR: i32 = 1;
    /// Bad command line (clap's own code).
    pub const USAGE: i32 = 2;
    /// The entity does not exist (404).
    pub const NOT_FOUND: i32 = 3;
    /// Refused: validation (400), conflict (409), auth (401), other 4xx.
    pub const REFUSED: i32 = 4;
    /// A waited-for task ended `failed` or `dead`.
    pub const TASK_FAILED: i32 = 5;
    /// Waiting timed out.
    pub const TIMEOUT: i32 = 6;
}

/// A failed call, with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }
}

/// The REST client.
pub struct Client {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
}

impl Client {
    pub fn new(base: &str, key: Option<String>) -> Client {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("static client settings");
        Client { http, base: base.trim_end_matches('/').to_owned(), key }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let req = match &self.key {
            Some(k) => req.header("X-Runtime-Api-Key", k),
            None => req,
        };
        let resp = req.send().await.map_err(|e| Failure::new(exit::ERROR, format!("request failed: {e}")))?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| Failure::new(exit::ERROR, e.to_string()))?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(body);
        }
        let message = match &body["error"] {
            Value::String(s) => s.clone(),
            Value::Null => body.to_string(),
            other => other.to_string(),
        };
        let code = match status.as_u16() {
            404 => exit::NOT_FOUND,
            400..=499 => exit::REFUSED,
            _ => exit::ERROR,
        };
        Err(Failure::new(code, format!("HTTP {}: {message}", status.as_u16())))
    }

    pub async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body)).await
    }

    /// The raw body of a GET (artifact content).
    pub async fn get_text(&self, path: &str) -> Result<String, Failure> {
        match self.get(path).await? {
            Value::String(s) => Ok(s),
            other => Ok(other.to_string()),
        }
    }
}
