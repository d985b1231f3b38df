//! HTTP client for the membridge control plane (`MEMBRIDGE_API.md`).
//!
//! Behaves as the original client: 10 s timeout, up to 3 retries with exponential
//! backoff from 500 ms plus up to 30 % jitter, only on network errors and 5xx, and the
//! `X-MEMBRIDGE-ADMIN` header on every call. Unlike the original, an authentication
//! failure (401/403) counts as "not connected", and a non-idempotent POST is only
//! retried when the request provably never reached the server (connect errors).

use std::time::Duration;

use backon::{BackoffBuilder, Retryable};
use bytes::Bytes;
use sqlx::PgPool;

use crate::db::settings;
use crate::time::now_ms;

pub use crate::domain::{ClientState, ConnectionStatus, Endpoint};

/// A response from membridge.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

impl Response {
    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// Membridge could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Timeout after {0}ms")]
    Timeout(u64),
    #[error("{0}")]
    Network(String),
    #[error("HTTP {0}")]
    Server(u16),
}

/// Retry policy of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Retry network errors and 5xx up to `n` times (idempotent requests).
    Idempotent(usize),
    /// Retry only connect errors up to `n` times: the request never left.
    ConnectOnly(usize),
}

/// The seed's backoff: 500 ms · 2^(attempt-1), plus up to 30 % jitter.
#[derive(Clone, Copy, Debug)]
struct SeedBackoff {
    max_times: usize,
}

struct SeedBackoffIter {
    attempt: u32,
    max_times: usize,
}

impl Iterator for SeedBackoffIter {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        if self.attempt as usize >= self.max_times {
            return None;
        }
        let base = 500.0 * 2f64.powi(self.attempt as i32);
        self.attempt += 1;
        Some(Duration::from_millis((base + fastrand::f64() * base * 0.3) as u64))
    }
}

impl BackoffBuilder for SeedBackoff {
    type Backoff = SeedBackoffIter;
    fn build(self) -> SeedBackoffIter {
        SeedBackoffIter { attempt: 0, max_times: self.max_times }
    }
}

enum Attempt {
    Done(Response),
    Failed { error: Error, connect: bool, last: Option<Response> },
}

/// Whether a call's success shows that membridge accepts the admin key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Auth {
    /// An authenticated route: its answer decides the connection state.
    Checked,
    /// An open route (`/health`): it answers whatever the key, so only its failures
    /// count.
    Open,
}

/// The client. One per process; the connection state it records is persisted.
pub struct Client {
    http: reqwest::Client,
    timeout: Duration,
    pool: PgPool,
}

impl Client {
    /// A client whose every request times out after `timeout`; it records the
    /// connection state in `pool`.
    pub fn new(timeout: Duration, pool: PgPool) -> Client {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .build()
            .expect("reqwest client with static settings");
        Client { http, timeout, pool }
    }

    /// The connection state, as the last call of any process left it.
    pub async fn state(&self) -> sqlx::Result<ClientState> {
        settings::membridge_state(&self.pool).await
    }

    async fn record(&self, outcome: Result<(), String>) {
        if let Err(e) =
            settings::record_membridge_call(&self.pool, outcome.as_ref().map(|_| ()).map_err(String::as_str), now_ms())
                .await
        {
            tracing::warn!(error = %e, "membridge connection state not saved");
        }
    }

    async fn once(
        &self,
        ep: &Endpoint,
        method: &reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Attempt {
        let url = format!("{}{}", ep.url.trim_end_matches('/'), path);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header("Content-Type", "application/json")
            .header("X-MEMBRIDGE-ADMIN", ep.admin_key.expose());
        if let Some(b) = body {
            req = req.json(b);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.bytes().await {
                    Ok(body) if status < 500 => Attempt::Done(Response { status, body }),
                    Ok(body) => Attempt::Failed {
                        error: Error::Server(status),
                        connect: false,
                        last: Some(Response { status, body }),
                    },
                    Err(e) => Attempt::Failed { error: self.classify(e), connect: false, last: None },
                }
            }
            Err(e) => {
                let connect = e.is_connect();
                Attempt::Failed { error: self.classify(e), connect, last: None }
            }
        }
    }

    fn classify(&self, e: reqwest::Error) -> Error {
        if e.is_timeout() {
            Error::Timeout(self.timeout.as_millis() as u64)
        } else {
            // With the URL (less any credentials) and every cause: "error sending request"
            // alone does not say where or why.
            let e = crate::telemetry::without_credentials(e);
            Error::Network(crate::telemetry::ErrorChain(&e).to_string())
        }
    }

    /// Sends a request with the given retry policy. A response (any status) is `Ok`;
    /// a 5xx is returned once retries are exhausted. 401/403 and 5xx mark the client
    /// not connected; a success marks it connected unless the route is [`Auth::Open`].
    pub async fn call(
        &self,
        ep: &Endpoint,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        retry: Retry,
        auth: Auth,
    ) -> Result<Response, Error> {
        let (times, connect_only) = match retry {
            Retry::Idempotent(n) => (n, false),
            Retry::ConnectOnly(n) => (n, true),
        };
        let outcome = (|| async {
            match self.once(ep, &method, path, body).await {
                Attempt::Done(r) => Ok(r),
                Attempt::Failed { error, connect, last } => Err((error, connect, last)),
            }
        })
        .retry(SeedBackoff { max_times: times })
        .when(|(_, connect, _)| !connect_only || *connect)
        .await;
        match outcome {
            Ok(r) if r.status == 401 || r.status == 403 => {
                self.record(Err(format!("HTTP {}: authentication failed", r.status))).await;
                Ok(r)
            }
            Ok(r) => {
                if auth == Auth::Checked {
                    self.record(Ok(())).await;
                }
                Ok(r)
            }
            Err((error, _, Some(last))) => {
                self.record(Err(error.to_string())).await;
                Ok(last)
            }
            Err((error, _, None)) => {
                self.record(Err(error.to_string())).await;
                Err(error)
            }
        }
    }
}

/// Characters of a path segment sent as they are: RFC 3986's unreserved set
/// (`A-Z a-z 0-9 - . _ ~`); everything else is percent-encoded.
const SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Percent-encodes every character of `s` outside RFC 3986's unreserved set.
pub fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

/// Percent-encodes one path segment, so a client-supplied id cannot change the path.
/// `None` for `.` and `..`, which are dot segments however they are encoded (and
/// would make the request go to a parent path).
pub fn segment(s: &str) -> Option<String> {
    if s.is_empty() || s == "." || s == ".." {
        return None;
    }
    Some(encode(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_exponential_from_500ms_with_at_most_30_percent_jitter() {
        let delays: Vec<_> = SeedBackoff { max_times: 3 }.build().collect();
        assert_eq!(delays.len(), 3);
        for (i, d) in delays.iter().enumerate() {
            let base = 500 * (1 << i);
            assert!(d.as_millis() >= base && d.as_millis() <= base * 13 / 10, "{i}: {d:?}");
        }
    }

    #[test]
    fn segments_cannot_inject_path() {
        assert_eq!(segment("../agents").as_deref(), Some("..%2Fagents"));
        assert_eq!(segment("abc123").as_deref(), Some("abc123"));
        assert_eq!(segment("a-b.c_d~e f?#%").as_deref(), Some("a-b.c_d~e%20f%3F%23%25"));
        for dots in ["", ".", ".."] {
            assert_eq!(segment(dots), None, "{dots:?}");
        }
    }
}
