//! API-key authentication of `/api/*` (the seed's `runtimeAuthMiddleware`).
//!
//! Open paths are matched exactly, on the raw request path, before any routing: no
//! encoding, case, slash or suffix trick can make a protected route look open.

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::AppState;

/// Paths that need no key: health checks and the connection test, as in the seed.
pub const OPEN_PATHS: [&str; 3] = ["/api/runtime/health", "/api/runtime/test-connection", "/api/membridge/health"];

/// Constant-time comparison (the time depends only on the length of `provided`).
pub fn constant_time_eq(provided: &[u8], expected: &[u8]) -> bool {
    let mut diff = provided.len() ^ expected.len();
    for (i, b) in provided.iter().enumerate() {
        let e = expected.get(i % expected.len().max(1)).copied().unwrap_or(0);
        diff |= usize::from(b ^ e);
    }
    diff == 0
}

/// Whether `path` requires the API key.
pub fn is_protected(path: &str) -> bool {
    !OPEN_PATHS.contains(&path)
}

/// Rejects requests without the right `X-Runtime-Api-Key` with 401.
pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(expected) = state.api_key.as_ref() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    // The web client's files are public (its API calls are not).
    if !is_protected(path) || (state.settings.web_dir.is_some() && super::web::is_web_path(path)) {
        return next.run(req).await;
    }
    let ok = req
        .headers()
        .get("x-runtime-api-key")
        .is_some_and(|v| constant_time_eq(v.as_bytes(), expected.expose().as_bytes()));
    if ok {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, Json(super::error::ErrorBody::message("Unauthorized"))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_keys() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }

    #[test]
    fn only_exact_open_paths_are_open() {
        for p in OPEN_PATHS {
            assert!(!is_protected(p));
        }
        for p in [
            "/api/runtime/health/",
            "/api/runtime/workers/health",
            "/api/runtime//health",
            "/API/runtime/health",
            "/api/runtime/health%2F..%2Fworkers",
            "/api/runtime/test-connection/x",
            "/api/runtime/workers",
        ] {
            assert!(is_protected(p), "{p}");
        }
    }
}
