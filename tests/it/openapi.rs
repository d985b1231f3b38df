//! The published OpenAPI document matches the router: every documented operation is
//! routed (router and document come from the same registrations; this checks the wiring).

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
        for method in ["get", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            operations += 1;
            let concrete = path.replace("{id}", "x").replace("{cid}", "x");
            let req = match method {
                "get" => app.http.get(app.url(&concrete)),
                "post" => app.http.post(app.url(&concrete)).json(&serde_json::json!({})),
                _ => app.http.delete(app.url(&concrete)),
            };
            let resp = req.send().await.unwrap();
            let status = resp.status();
            let body = resp.text().await.unwrap();
            assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(body != r#"{"error":"Not found"}"#, "{method} {path} is documented but not routed");
        }
    }
    assert_eq!(operations, 27, "documented operations");
    for schema in ["Task", "Lease", "Worker", "Artifact", "LlmResult", "AuditEntry", "CreateTask", "ErrorBody"] {
        assert!(doc["components"]["schemas"][schema].is_object(), "{schema} schema");
    }
    let docs = app.get_text("/docs").await;
    assert!(docs.contains("/openapi.json"));
    app.stop().await;
}
