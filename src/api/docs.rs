//! `/docs`: interactive documentation of `/openapi.json`, rendered by Redoc 2.5.4 (the
//! npm package `redoc@2.5.4`, `bundles/redoc.standalone.js`; MIT, see `docs/LICENSE`
//! and the bundle's third-party notices). Everything the page loads is served from the
//! binary, so it works without Internet access.

use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;

/// Version of the bundled Redoc; part of the script's URL, so a new version is never
/// served from a cache holding the old one.
const REDOC_VERSION: &str = "2.5.4";
const REDOC_JS: &str = include_str!("docs/redoc.standalone.js");
/// The bundle points to this file for the licenses of what it contains.
const REDOC_NOTICES: &str = include_str!("docs/redoc.standalone.js.LICENSE.txt");
const REDOC_LICENSE: &str = include_str!("docs/LICENSE");

/// Assets are immutable for a given URL.
const CACHE_FOREVER: &str = "public, max-age=31536000, immutable";

/// The documentation page and its assets.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/docs", get(page))
        .route("/docs/assets/redoc.standalone.js", get(script))
        .route("/docs/assets/redoc.standalone.js.LICENSE.txt", get(|| text(REDOC_NOTICES)))
        .route("/docs/assets/LICENSE.txt", get(|| text(REDOC_LICENSE)))
}

async fn page() -> Html<String> {
    Html(format!(
        r#"<!doctype html>
<html><head><title>BLOOM runtime API</title><meta charset="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1"/></head>
<body><redoc spec-url="/openapi.json"></redoc>
<script src="/docs/assets/redoc.standalone.js?v={REDOC_VERSION}"></script></body></html>"#
    ))
}

async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, CACHE_FOREVER)], REDOC_JS)
}

async fn text(body: &'static str) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, CACHE_FOREVER)], body)
}
