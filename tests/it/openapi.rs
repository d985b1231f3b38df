//! The published OpenAPI document matches the router: every documented operation is
//! routed (router and document come from the same registrations; this checks the wiring).
//! The documentation page loads nothing from outside the API.

use reqwest::StatusCode;

use crate::common::TestApp;

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let app = TestApp::spawn().await;
    let r = app.http.get(app.url("/openapi.json")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let doc: serde_json::Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.")), Some(true));
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for method in ["get", "post", "put", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            operations += 1;
            let concrete = path
                .replace("{id}", "x")
                .replace("{cid}", "x")
                .replace("{scope}", "context_id")
                .replace("{key}", "x")
                .replace("{rule}", "usd-per-day");
            let req = match method {
                "get" => app.http.get(app.url(&concrete)),
                "post" => app.http.post(app.url(&concrete)).json(&serde_json::json!({})),
                "put" => app.http.put(app.url(&concrete)).json(&serde_json::json!({})),
                _ => app.http.delete(app.url(&concrete)),
            };
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let body = resp.text().await.unwrap();
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(body != r#"{"error":"Not found"}"#, "{method} {path} is documented but not routed");
        }
    }
    assert_eq!(operations, 62, "documented operations");
    for schema in [
        "Task",
        "Lease",
        "Worker",
        "Artifact",
        "LlmResult",
        "AuditEntry",
        "CreateTask",
        "ErrorBody",
        "RegisterWorker",
        "CreateProject",
        "Project",
    ] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema} schema");
    }
    let docs = app.get_text("/docs").await;
    assert!(docs.contains("/openapi.json"));
    app.stop().await;
}

/// The `src`/`href` attribute values of an HTML page.
fn linked(html: &str) -> Vec<String> {
    ["src=\"", "href=\""]
        .iter()
        .flat_map(|attr| html.split(attr).skip(1).filter_map(|rest| rest.split('"').next().map(str::to_owned)))
        .collect()
}

#[tokio::test]
async fn docs_page_and_its_assets_are_served_by_the_api() {
    let app = TestApp::spawn().await;
    let page = app.http.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("spec-url=\"/openapi.json\""), "{html}");
    assert!(!html.contains("http://") && !html.contains("https://"), "the page loads nothing from elsewhere: {html}");
    let assets = linked(&html);
    assert!(!assets.is_empty(), "{html}");
    for asset in assets {
        assert!(asset.starts_with("/docs/assets/"), "{asset}");
        let r = app.http.get(app.url(&asset)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{asset}");
        let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(header("content-type").starts_with("text/javascript"), "{asset}");
        assert!(header("cache-control").contains("max-age=31536000"), "{asset}");
        let script = r.text().await.unwrap();
        assert!(script.len() > 500_000 && script.contains("spec-url"), "{asset} is the Redoc bundle");
    }
    let notices = app.get_text("/docs/assets/redoc.standalone.js.LICENSE.txt").await;
    assert!(notices.contains("MIT"), "{notices}");
    app.stop().await;
}
