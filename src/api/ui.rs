//! `/ui`: the operator dashboard, a small single-page client of the REST API (plain
//! HTML, CSS, one JavaScript module and its icon, no build step) compiled into the binary, so it
//! works offline and behind a strict network policy. Its files are public and hold
//! nothing secret; every call it makes goes to `/api`, behind the API key, which the page
//! asks for once and keeps in the browser tab's session storage.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const APP_CSS: &str = include_str!("ui/app.css");
const ICON_SVG: &str = include_str!("ui/icon.svg");

/// Only the dashboard's own files and calls to its own origin: no inline script, no
/// framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
                   connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The dashboard's page and files.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| file("text/html; charset=utf-8", INDEX_HTML)))
        .route("/ui/", get(|| file("text/html; charset=utf-8", INDEX_HTML)))
        .route("/ui/app.js", get(|| file("text/javascript; charset=utf-8", APP_JS)))
        .route("/ui/app.css", get(|| file("text/css; charset=utf-8", APP_CSS)))
        .route("/ui/icon.svg", get(|| file("image/svg+xml", ICON_SVG)))
}

async fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Revalidated each time: a new release is picked up at once.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
}
