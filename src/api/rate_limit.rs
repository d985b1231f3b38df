//! Per-client fixed-window rate limiting with the standard `RateLimit-*` headers (the
//! seed used express-rate-limit with `standardHeaders: true`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::ErrorBody;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// Entries kept before expired windows are purged.
const PURGE_AT: usize = 10_000;

/// A limit of `max` requests per `window` per client. `max == 0` disables it.
pub struct RateLimiter {
    max: u32,
    window: Duration,
    trust_proxy: bool,
    clients: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// The decision for one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub remaining: u32,
    pub reset_secs: u64,
}

impl RateLimiter {
    /// A limiter; `trust_proxy` takes the client from `X-Forwarded-For`.
    pub fn new(max: u32, window: Duration, trust_proxy: bool) -> Arc<RateLimiter> {
        Arc::new(RateLimiter { max, window, trust_proxy, clients: Mutex::new(HashMap::new()) })
    }

    /// Counts one request of `client` at `now`.
    pub fn check(&self, client: IpAddr, now: Instant) -> Decision {
        let mut clients = self.clients.lock().expect("rate limiter lock");
        if clients.len() >= PURGE_AT {
            let window = self.window;
            clients.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let entry = clients.entry(client).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        let reset = self.window.saturating_sub(now.duration_since(entry.0));
        Decision {
            allowed: entry.1 <= self.max,
            remaining: self.max.saturating_sub(entry.1),
            reset_secs: reset.as_secs_f64().ceil() as u64,
        }
    }

    fn client(&self, req: &Request) -> IpAddr {
        if self.trust_proxy {
            let forwarded = req
                .headers()
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split(',').next())
                .and_then(|ip| ip.trim().parse().ok());
            if let Some(ip) = forwarded {
                return ip;
            }
        }
        req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    fn headers(&self, d: &Decision, headers: &mut HeaderMap) {
        let put = |h: &mut HeaderMap, k: &'static str, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        };
        put(headers, "ratelimit-policy", format!("{};w={}", self.max, self.window.as_secs()));
        put(headers, "ratelimit-limit", self.max.to_string());
        put(headers, "ratelimit-remaining", d.remaining.to_string());
        put(headers, "ratelimit-reset", d.reset_secs.to_string());
    }
}

/// Middleware: 429 once a client exceeds the limit; headers on every response.
pub async fn limit(State(limiter): State<Arc<RateLimiter>>, req: Request, next: Next) -> Response {
    // Upstream limits its API's calls; the web client's files are not counted.
    if limiter.max == 0 || !req.uri().path().starts_with("/api/") {
        return next.run(req).await;
    }
    let decision = limiter.check(limiter.client(&req), Instant::now());
    let mut resp = if decision.allowed {
        next.run(req).await
    } else {
        let mut r =
            (StatusCode::TOO_MANY_REQUESTS, Json(ErrorBody::message("Too many requests, please try again later")))
                .into_response();
        if let Ok(v) = HeaderValue::from_str(&decision.reset_secs.to_string()) {
            r.headers_mut().insert("retry-after", v);
        }
        r
    };
    limiter.headers(&decision, resp.headers_mut());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_max_per_window_then_resets() {
        let l = RateLimiter::new(2, Duration::from_secs(60), false);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        assert!(l.check(ip, t0).allowed);
        let second = l.check(ip, t0);
        assert!(second.allowed);
        assert_eq!(second.remaining, 0);
        assert!(!l.check(ip, t0).allowed);
        assert!(l.check("10.0.0.2".parse().unwrap(), t0).allowed, "clients are counted apart");
        assert!(l.check(ip, t0 + Duration::from_secs(61)).allowed);
    }
}
