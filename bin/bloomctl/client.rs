//! A small client of the BLOOM runtime REST API.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
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

/// A page of a list endpoint and the cursor of the next one (`X-Next-Cursor`).
pub struct Page {
    pub rows: Vec<Value>,
    pub next: Option<String>,
}

/// Wait after a 429 that names no delay.
const DEFAULT_BACKOFF: Duration = Duration::from_secs(5);

/// The REST client. A request refused with 429 (rate limited) is sent again after the
/// delay the API names (`Retry-After`, else `RateLimit-Reset`), with a note on stderr.
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

    /// Sends a request until it is not rate limited; answers the response's headers and
    /// body (JSON, or the text as a JSON string).
    async fn send(&self, method: Method, path: &str, body: Option<&Value>) -> Result<(HeaderMap, Value), Failure> {
        let resp = loop {
            let mut req = self.http.request(method.clone(), format!("{}{path}", self.base));
            if let Some(k) = &self.key {
                req = req.header("X-Runtime-Api-Key", k);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(transport)?;
            if resp.status() != StatusCode::TOO_MANY_REQUESTS {
                break resp;
            }
            let wait = retry_after(resp.headers());
            eprintln!("bloomctl: rate limited by the API (HTTP 429); retrying in {}s", wait.as_secs());
            tokio::time::sleep(wait).await;
        };
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.map_err(transport)?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok((headers, body));
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
        Ok(self.send(Method::GET, path, None).await?.1)
    }

    /// One page of a list endpoint (`path` carries `limit` and `cursor`).
    pub async fn get_page(&self, path: &str) -> Result<Page, Failure> {
        let (headers, body) = self.send(Method::GET, path, None).await?;
        let next = headers.get("x-next-cursor").and_then(|v| v.to_str().ok()).map(str::to_owned);
        match body {
            Value::Array(rows) => Ok(Page { rows, next }),
            other => Err(Failure::new(exit::ERROR, format!("expected a JSON array from {path}, got {other}"))),
        }
    }

    /// Up to `limit` rows of a list endpoint (`path` carries its filters, no paging),
    /// following `X-Next-Cursor`: a filtered listing may answer short pages that go on.
    pub async fn get_up_to(&self, path: &str, limit: u32) -> Result<Vec<Value>, Failure> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut rows = Vec::new();
        let mut cursor = String::new();
        loop {
            let want = (limit as usize - rows.len()).clamp(1, 1000);
            let page = self.get_page(&format!("{path}{sep}limit={want}{cursor}")).await?;
            rows.extend(page.rows);
            match page.next {
                Some(next) if rows.len() < limit as usize => {
                    cursor = format!("&cursor={}", bloom::membridge::encode(&next));
                }
                _ => return Ok(rows),
            }
        }
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        Ok(self.send(Method::POST, path, Some(body)).await?.1)
    }

    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        Ok(self.send(Method::PUT, path, Some(body)).await?.1)
    }

    pub async fn delete(&self, path: &str) -> Result<Value, Failure> {
        Ok(self.send(Method::DELETE, path, None).await?.1)
    }

    /// The raw body of a GET (artifact content).
    pub async fn get_text(&self, path: &str) -> Result<String, Failure> {
        match self.get(path).await? {
            Value::String(s) => Ok(s),
            other => Ok(other.to_string()),
        }
    }
}

/// A transport failure, with its causes and the URL (without credentials).
fn transport(e: reqwest::Error) -> Failure {
    let e = bloom::telemetry::without_credentials(e);
    Failure::new(exit::ERROR, format!("request failed: {}", bloom::telemetry::ErrorChain(&e)))
}

/// How long a 429 asks to wait: `Retry-After` seconds, else `RateLimit-Reset` seconds,
/// else [`DEFAULT_BACKOFF`]; at least a second.
fn retry_after(headers: &HeaderMap) -> Duration {
    let seconds = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    let wait = seconds("retry-after").or_else(|| seconds("ratelimit-reset")).map(Duration::from_secs);
    wait.unwrap_or(DEFAULT_BACKOFF).max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (reqwest::header::HeaderName::from_static(k), v.parse().unwrap())).collect()
    }

    #[test]
    fn a_429_waits_as_long_as_the_api_asks() {
        assert_eq!(retry_after(&headers(&[("retry-after", "7"), ("ratelimit-reset", "9")])), Duration::from_secs(7));
        assert_eq!(retry_after(&headers(&[("ratelimit-reset", "9")])), Duration::from_secs(9));
        assert_eq!(retry_after(&headers(&[("retry-after", "0")])), Duration::from_secs(1));
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), DEFAULT_BACKOFF);
        assert_eq!(retry_after(&HeaderMap::new()), DEFAULT_BACKOFF);
    }
}
