//! API key, open routes, path tricks, rate limits, body limits, production mode and the
//! membridge configuration.

use reqwest::StatusCode;
use serde_json::json;

use crate::common::{Opts, TestApp};

#[tokio::test]
async fn api_key_protects_everything_but_the_open_routes() {
    let app = TestApp::spawn_with(Opts { api_key: Some("s3cret-key"), ..Opts::default() }).await;
    let http = &app.http;
    for path in ["/api/runtime/llm-tasks", "/api/runtime/workers", "/api/runtime/stats", "/api/membridge/projects"] {
        let r = http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(r.json::<serde_json::Value>().await.unwrap(), json!({"error": "Unauthorized"}));
        let r = http.get(app.url(path)).header("X-Runtime-Api-Key", "wrong").send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let r = http.get(app.url("/api/runtime/health")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let health: serde_json::Value = r.json().await.unwrap();
    assert_eq!((health["status"].clone(), health["service"].clone()), (json!("ok"), json!("bloom-runtime")));
    assert!(health["membridge"]["connected"].is_boolean());
    let r = http.post(app.url("/api/runtime/test-connection")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "test-connection is open");
    // Tricks around the open routes do not open anything.
    for path in [
        "/api/runtime/health/",
        "/api/runtime//health",
        "/api/runtime/workers/health",
        "/api/runtime/health/../workers",
        "/api/runtime/health%2F..%2Fworkers",
        "/API/runtime/workers",
        "/api/runtime/llm-tasks/health",
        "/api/runtime/test-connection/../llm-tasks",
    ] {
        let r = http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
    let r = http.get(app.url("/api/runtime/workers")).header("X-Runtime-Api-Key", "s3cret-key").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The dashboard's files are public, hold no secret and may run only themselves; what
    // they call is not.
    for (path, kind) in
        [("/ui", "text/html"), ("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")]
    {
        let r = http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert!(header("content-type").starts_with(kind), "{path}");
        assert!(header("content-security-policy").contains("script-src 'self'"), "{path}");
        assert!(!r.text().await.unwrap().contains("s3cret-key"), "{path}");
    }
    for path in ["/ui/../api/runtime/workers", "/ui/missing.js"] {
        let r = http.get(app.url(path)).send().await.unwrap();
        assert_ne!(r.status(), StatusCode::OK, "{path}");
    }
    let r = http.get(app.url("/api/runtime/failures")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    app.stop().await;
}

#[tokio::test]
async fn rate_limits_answer_429_with_standard_headers() {
    let app = TestApp::spawn_with(Opts { rate_limit: 3, test_connection_limit: 1, ..Opts::default() }).await;
    for i in 0..3 {
        let r = app.http.get(app.url("/api/runtime/stats")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["ratelimit-limit"], "3");
        assert_eq!(r.headers()["ratelimit-remaining"], (2 - i).to_string().as_str());
        assert_eq!(r.headers()["ratelimit-policy"], "3;w=60");
    }
    let r = app.http.get(app.url("/api/runtime/stats")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("ratelimit-reset"));
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap(),
        json!({"error": "Too many requests, please try again later"})
    );
    // /healthz and /metrics are outside the API limiter.
    assert_eq!(app.http.get(app.url("/healthz")).send().await.unwrap().status(), StatusCode::OK);
    app.stop().await;

    let app = TestApp::spawn_with(Opts { rate_limit: 0, test_connection_limit: 1, ..Opts::default() }).await;
    let first = app.http.post(app.url("/api/runtime/test-connection")).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let second = app.http.post(app.url("/api/runtime/test-connection")).send().await.unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    app.stop().await;
}

#[tokio::test]
async fn oversized_deep_or_invalid_bodies_are_4xx() {
    let app = TestApp::spawn_with(Opts { body_limit: 4096, ..Opts::default() }).await;
    let big = json!({"context_id": "c", "agent_slug": "a", "prompt": "x".repeat(10_000)});
    let r = app.http.post(app.url("/api/runtime/llm-tasks")).json(&big).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
    let r = app.http.post(app.url("/api/runtime/llm-tasks")).body(deep).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = app
        .http
        .post(app.url("/api/runtime/llm-tasks"))
        .body(vec![b'{', b'"', 0xff, 0xfe, b'"', b'}'])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // NUL bytes (which Postgres text refuses) are 400s wherever they appear.
    let (status, body) =
        app.post("/api/runtime/llm-tasks", json!({"context_id": "c\u{0}", "agent_slug": "a", "prompt": "p"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["fieldErrors"]["context_id"].is_array());
    let (status, _) = app.post("/api/runtime/workers", json!({"name": "w", "ip_addrs": ["1.2.3.4\u{0}"]})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    for path in ["/api/runtime/llm-tasks/a%00b", "/api/runtime/artifacts?task_id=%00", "/api/runtime/workers/%00/x"] {
        let r = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
    }
    // Malformed query strings and wrong methods answer JSON errors too.
    let r = app.http.get(app.url("/api/runtime/llm-tasks?limit=1&limit=2")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.json::<serde_json::Value>().await.unwrap()["error"].as_str().unwrap().contains("limit"));
    let r = app.http.put(app.url("/api/runtime/llm-tasks")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(r.json::<serde_json::Value>().await.unwrap()["error"].is_string());
    // Unknown fields are ignored, as zod strips them.
    let (status, _) = app
        .post("/api/runtime/llm-tasks", json!({"context_id": "c", "agent_slug": "a", "prompt": "p", "evil": {"x": 1}}))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(app.count("SELECT count(*) FROM llm_tasks").await, 1);
    app.stop().await;
}

#[tokio::test]
async fn production_mode_redirects_plain_http_and_requires_a_key() {
    let app = TestApp::spawn_with(Opts { production: true, api_key: Some("k"), ..Opts::default() }).await;
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = client
        .get(app.url("/api/runtime/health?x=1"))
        .header("x-forwarded-proto", "http")
        .header("host", "bloom.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(r.headers()["location"], "https://bloom.example/api/runtime/health?x=1");
    app.stop().await;

    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        api: bloom::config::ApiArgs,
    }
    let cli = Cli::try_parse_from(["x", "--node-env", "production"]).unwrap();
    assert!(cli.api.validate().unwrap_err().contains("RUNTIME_API_KEY"));
    let cli = Cli::try_parse_from(["x", "--bloom-env", "production", "--runtime-api-key", "k"]).unwrap();
    assert!(cli.api.validate().is_ok());
}

#[tokio::test]
async fn config_is_validated_persisted_and_the_admin_key_never_returned() {
    let app = TestApp::spawn().await;
    let (status, body) =
        app.post("/api/runtime/config", json!({"membridge_server_url": "not a url", "admin_key": ""})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["fieldErrors"]["membridge_server_url"][0], "Invalid url");
    assert!(body["error"]["fieldErrors"]["admin_key"].is_array());
    let (status, cfg) = app
        .post(
            "/api/runtime/config",
            json!({"membridge_server_url": "http://membridge:8000", "admin_key": "supersecretadminkey"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        cfg,
        json!({"membridge_server_url": "http://membridge:8000", "admin_key_masked": "supe****nkey",
                           "connected": false, "last_test": null})
    );
    let (_, again) = app.get("/api/runtime/config").await;
    assert_eq!(again, cfg);
    let (_, audit) = app.get("/api/runtime/audit").await;
    assert!(!audit.to_string().contains("supersecretadminkey"));
    assert_eq!(audit[0]["action"], "config_updated");
    app.stop().await;
}

/// A web client served from `--web-dir`: its files and client routes are public, its
/// API calls still need the key, and nothing outside the directory is read.
#[tokio::test]
async fn the_web_client_is_served_beside_the_api() {
    let dir = std::env::temp_dir().join(format!("bloom-web-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(dir.join("assets")).unwrap();
    std::fs::write(dir.join("index.html"), "<!doctype html><div id=root></div>").unwrap();
    std::fs::write(dir.join("assets/app.js"), "console.log('app')").unwrap();
    let opts = Opts { api_key: Some("k"), web_dir: Some(dir.clone()), rate_limit: 3, ..Opts::default() };
    let app = TestApp::spawn_with(opts).await;
    let get = |path: &str| app.http.get(app.url(path)).send();
    let page = get("/").await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("id=root"));
    let js = get("/assets/app.js").await.unwrap();
    assert_eq!(
        (js.status(), js.headers()["content-type"].to_str().unwrap()),
        (StatusCode::OK, "text/javascript; charset=utf-8")
    );
    let route = get("/nodes").await.unwrap();
    assert_eq!(route.status(), StatusCode::OK, "a client route is the application's page");
    assert!(route.text().await.unwrap().contains("id=root"));
    assert_eq!(get("/assets/missing.js").await.unwrap().status(), StatusCode::NOT_FOUND);
    // Sent as is on a raw connection (an HTTP client would normalize the dots away).
    let raw = raw_get(&app.url(""), "/assets/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd").await;
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
    assert!(!raw.contains("root:"));
    // The rate limit counts API calls only (3 a minute here), as upstream's: a page's
    // files do not use up its calls.
    for _ in 0..5 {
        assert_eq!(get("/assets/app.js").await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(get("/api/runtime/workers").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(get("/api/nope").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(get("/api/runtime/workers").await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(get("/api/runtime/workers").await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(get("/nodes").await.unwrap().status(), StatusCode::OK);
    app.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

/// A GET of `path` exactly as written, on a new connection; the answer as text.
async fn raw_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://").trim_end_matches('/');
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    answer
}
