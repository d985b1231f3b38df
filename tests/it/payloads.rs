//! Large payloads: list endpoints write their rows a run at a time, so the API's memory
//! does not grow with the size of what it lists. Measured on a real `bloom-api`
//! process (its peak resident set, `VmHWM`).

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{free_port, fresh_db, nats_url, wait_for, Kill};

/// Growth of the API's peak RSS allowed for four concurrent 5 MB completions.
const COMPLETE_LIMIT_MB: u64 = 120;

/// Peak resident set of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[tokio::test]
async fn listing_large_artifacts_and_prompts_keeps_the_api_memory_flat() {
    const MB: usize = 1 << 20;
    let (pool, db_url) = fresh_db().await;
    let port = free_port();
    let ns = format!("pl{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let api = Kill(
        Command::new(env!("CARGO_BIN_EXE_bloom-api"))
            .envs([
                ("DATABASE_URL", db_url.as_str()),
                ("NATS_URL", nats_url().as_str()),
                ("BLOOM_NATS_NAMESPACE", ns.as_str()),
                ("BLOOM_RUNTIME_HOST", "127.0.0.1"),
                ("BLOOM_RUNTIME_PORT", port.to_string().as_str()),
                ("BLOOM_RATE_LIMIT_PER_MIN", "0"),
                ("RUST_LOG", "warn"),
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    wait_for("API ready", Duration::from_secs(30), || async {
        http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    // 20 artifacts of 5 MB and 200 tasks with prompts of 500 kB (100 MB each way).
    sqlx::query(
        "INSERT INTO runtime_artifacts (id, task_id, type, created_at, finalized, content)
         SELECT 'a' || i, 't' || i, 'LLM_RESULT', i, true, repeat(chr(97 + i % 26), $1) FROM generate_series(1, 20) i",
    )
    .bind(5 * MB as i32)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
                                created_at, updated_at, attempts, max_attempts, dispatch_seq)
         SELECT 't' || i, 'c', 'a', repeat('p', $1), '[]', '{\"timeout_sec\": 120, \"budget\": 0}', 'text', 'completed',
                i, i, 1, 3, 1
         FROM generate_series(1, 200) i",
    )
    .bind(500 * 1024)
    .execute(&pool)
    .await
    .unwrap();
    let before = peak_rss(api.0.id());
    for path in ["/api/runtime/artifacts", "/api/runtime/llm-tasks?limit=200", "/api/runtime/runs?limit=200"] {
        let calls = (0..4).map(|_| {
            let (http, url) = (http.clone(), format!("{base}{path}"));
            async move { http.get(url).send().await.unwrap().json::<serde_json::Value>().await.unwrap() }
        });
        for list in futures::future::join_all(calls).await {
            let rows = list.as_array().unwrap_or_else(|| panic!("{path}: not an array"));
            assert_eq!(rows.len(), if path.contains("artifacts") { 20 } else { 200 }, "{path}");
            // Newest first, every row whole.
            let (first, field, size) = if path.contains("artifacts") {
                (&rows[0], "content", 5 * MB)
            } else {
                (&rows[0], "prompt", 500 * 1024)
            };
            assert_eq!(first[field].as_str().unwrap().len(), size, "{path}");
            assert!(first["id"].as_str().unwrap().ends_with("20") || first["id"] == "t200", "{path}: {}", first["id"]);
        }
        eprintln!("{path}: peak RSS {} MB above the start", peak_rss(api.0.id()).saturating_sub(before) / MB as u64);
    }
    let grown = peak_rss(api.0.id()).saturating_sub(before);
    eprintln!("API peak RSS grew by {} MB listing 4 x 100 MB concurrently, three times", grown / MB as u64);
    // Four concurrent listings of 100 MB each: about a run of rows (1 MB) or a slice of
    // a content per response, not the page, nor one whole 5 MB artifact.
    assert!(grown < 40 * MB as u64, "API peak RSS grew by {} MB", grown / MB as u64);

    // Four concurrent completions with 5 MB outputs: the answer holds the output twice
    // (the result's, and the artifact's content, in the original's shape); nothing else
    // copies it.
    let post = |path: String, body: serde_json::Value| {
        let (http, url) = (http.clone(), format!("{base}{path}"));
        async move { http.post(url).json(&body).send().await.unwrap() }
    };
    post("/api/runtime/workers".into(), serde_json::json!({"name": "w", "capabilities": {"max_concurrency": 8}})).await;
    let mut ids = Vec::new();
    for i in 0..4 {
        let body = serde_json::json!({"context_id": "big", "agent_slug": "a", "prompt": format!("p{i}")});
        let task: serde_json::Value = post("/api/runtime/llm-tasks".into(), body).await.json().await.unwrap();
        let id = task["id"].as_str().unwrap().to_owned();
        assert!(post(format!("/api/runtime/llm-tasks/{id}/lease"), serde_json::json!({})).await.status().is_success());
        ids.push(id);
    }
    let before = peak_rss(api.0.id());
    let output = "o".repeat(5 * MB);
    let completions = ids.iter().map(|id| {
        let body = serde_json::json!({"status": "success", "output": output, "metrics": {"duration_ms": 1}});
        let done = post(format!("/api/runtime/llm-tasks/{id}/complete"), body);
        async move { done.await.json::<serde_json::Value>().await.unwrap() }
    });
    for done in futures::future::join_all(completions).await {
        assert_eq!(done["result"]["output"].as_str().map(str::len), Some(5 * MB));
        assert_eq!(done["artifact"]["content"].as_str().map(str::len), Some(5 * MB));
    }
    let grown = peak_rss(api.0.id()).saturating_sub(before);
    eprintln!("API peak RSS grew by {} MB completing 4 tasks with 5 MB outputs at once", grown / MB as u64);
    assert!(grown < COMPLETE_LIMIT_MB * MB as u64, "API peak RSS grew by {} MB", grown / MB as u64);
    drop(api);
}
