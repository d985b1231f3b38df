//! The web client (a built single-page application, e.g. the upstream BLOOM web
//! client's build output), served from `BLOOM_WEB_DIR` at `/` beside the API: a file by its
//! path, and `index.html` for any other path without an extension (the client routes
//! it). Its files are public, as the upstream server's static files are; `/api` stays
//! behind the API key.

use std::path::{Component, Path, PathBuf};

use axum::http::{header, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// The content type of a file, by its extension.
fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "woff" => "font/woff",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// The file under `root` a request path names: decoded, and refused when any part of
/// it is not a plain name (`..`, a root, a prefix), so nothing outside `root` is read.
fn resolve(root: &Path, uri_path: &str) -> Option<PathBuf> {
    let decoded = percent_encoding::percent_decode_str(uri_path).decode_utf8().ok()?;
    if decoded.contains('\0') || decoded.contains('\\') {
        return None;
    }
    let relative = Path::new(decoded.trim_start_matches('/'));
    if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return None;
    }
    Some(root.join(relative))
}

/// Whether `uri_path` is the web client's (not the API's).
pub fn is_web_path(uri_path: &str) -> bool {
    uri_path != "/api" && !uri_path.starts_with("/api/")
}

/// Serves `uri` from `root`.
pub async fn serve(root: &Path, uri: &Uri) -> Response {
    let path = uri.path();
    let file = match resolve(root, path) {
        Some(f) if path != "/" => f,
        Some(_) => root.join("index.html"),
        None => return StatusCode::NOT_FOUND.into_response(),
    };
    let (file, fallback) = match tokio::fs::metadata(&file).await {
        Ok(m) if m.is_file() => (file, false),
        // A client route (no extension): the application's page.
        _ if Path::new(path).extension().is_none() => (root.join("index.html"), true),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    match tokio::fs::read(&file).await {
        Ok(bytes) => {
            let cache = if fallback || file.ends_with("index.html") { "no-cache" } else { "public, max-age=3600" };
            ([(header::CONTENT_TYPE, content_type(&file)), (header::CACHE_CONTROL, cache)], bytes).into_response()
        }
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_under_the_root_resolve() {
        let root = Path::new("/srv/web");
        assert_eq!(resolve(root, "/assets/app.js"), Some(PathBuf::from("/srv/web/assets/app.js")));
        assert_eq!(resolve(root, "/nodes"), Some(PathBuf::from("/srv/web/nodes")));
        for bad in ["/../etc/passwd", "/assets/%2e%2e/%2e%2e/etc/passwd", "/a/..%2f..%2fetc", "/%00", "/a%5c..%5cb"] {
            assert_eq!(resolve(root, bad), None, "{bad}");
        }
        assert!(is_web_path("/nodes") && is_web_path("/") && !is_web_path("/api/runtime/x") && !is_web_path("/api"));
    }
}
