//! Phases of the task-control features: batch submission against single submissions,
//! saturation with every priority in use against priority 0 only, and how long an
//! urgent task waits behind a flood of background tasks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{json, Value};
use sqlx::PgPool;

use super::{db_latencies, http, summary, wait_completed, Opts};

const BATCH_PATH: &str = "/api/runtime/llm-tasks/batch";

/// A batch request body of `n` tasks tagged `tag`, numbered from `first`, with
/// `priority(i)` and `prompt`.
fn batch_body(tag: &str, first: u64, n: u64, prompt: &str, priority: impl Fn(u64) -> i64) -> Vec<u8> {
    let tasks: Vec<Value> = (first..first + n)
        .map(|i| {
            json!({"context_id": format!("ctx-{}", i % 1000), "agent_slug": tag, "prompt": prompt,
                   "priority": priority(i)})
        })
        .collect();
    serde_json::to_vec(&json!({ "tasks": tasks })).expect("batch body serializes")
}

/// Submits `total` tasks through the batch route, `batch` per request from `clients`
/// connections; returns the submission time in seconds.
async fn submit_batches(
    o: &Opts,
    tag: &'static str,
    total: u64,
    batch: u64,
    clients: usize,
    prompt: &'static str,
    priority: fn(u64) -> i64,
) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let addr = format!("127.0.0.1:{}", o.port);
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..clients {
        let (mut conn, addr, next) = (http::Connection::new(&addr), addr.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= total {
                    return anyhow::Ok(());
                }
                let n = batch.min(total - first);
                let request = http::post_json(&addr, BATCH_PATH, &batch_body(tag, first, n, prompt, priority));
                let r = conn.send(&request).await?;
                if r.status != 201 {
                    bail!("batch submit answered {}: {}", r.status, String::from_utf8_lossy(&r.body));
                }
            }
        }));
    }
    for h in handles {
        h.await??;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// `o.tasks` tasks submitted 100 per request, completed end to end: compare with the
/// saturation phase's single submissions.
pub async fn batch_submit(o: &Opts, pool: &PgPool) -> anyhow::Result<Value> {
    let tag = "bench-batch";
    let submit_secs = submit_batches(o, tag, o.tasks, o.batch_size, 8, "noop", |_| 0).await?;
    wait_completed(pool, tag, o.tasks, Duration::from_secs(600)).await?;
    let (dispatch, e2e, first, last) = db_latencies(pool, tag).await?;
    let secs = ((last - first) as f64 / 1000.0).max(0.001);
    Ok(json!({
        "tasks": o.tasks, "batch_size": o.batch_size, "submit_per_sec": o.tasks as f64 / submit_secs,
        "tasks_per_sec": o.tasks as f64 / secs, "dispatch_ms": summary(dispatch), "end_to_end_ms": summary(e2e),
    }))
}

/// The saturation phase's load (single submissions) with the tasks spread over the five
/// priorities: every pool consumer in use.
pub async fn saturation_all_priorities(o: &Opts, pool: &PgPool) -> anyhow::Result<Value> {
    let tag = "bench-priorities";
    let next = Arc::new(AtomicU64::new(0));
    let addr = format!("127.0.0.1:{}", o.port);
    let mut clients = Vec::new();
    for _ in 0..o.clients {
        let (mut conn, addr, next, n) = (http::Connection::new(&addr), addr.clone(), next.clone(), o.tasks);
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let body = json!({"context_id": format!("ctx-{}", i % 1000), "agent_slug": tag, "prompt": "noop",
                                  "priority": (i % 5) as i64 - 2});
                let r = conn.send(&http::post_json(&addr, super::SUBMIT_PATH, &serde_json::to_vec(&body)?)).await?;
                if r.status != 201 {
                    bail!("submit answered {}", r.status);
                }
            }
        }));
    }
    for c in clients {
        c.await??;
    }
    wait_completed(pool, tag, o.tasks, Duration::from_secs(600)).await?;
    let (dispatch, e2e, first, last) = db_latencies(pool, tag).await?;
    let secs = ((last - first) as f64 / 1000.0).max(0.001);
    Ok(json!({
        "tasks": o.tasks, "tasks_per_sec": o.tasks as f64 / secs,
        "dispatch_ms": summary(dispatch), "end_to_end_ms": summary(e2e),
    }))
}

/// Task duration of the flood, ms.
const FLOOD_TASK_MS: u64 = 200;
/// Urgent tasks submitted during the flood.
const URGENT: u64 = 20;

/// Fills every slot with background tasks (priority -2, 200 ms each) and a backlog of
/// several rounds, then submits urgent ones (priority 2) one by one: how long each waits
/// for a slot (submit → lease), against one task duration and the background's wait.
pub async fn priority_under_flood(
    o: &Opts,
    http: &reqwest::Client,
    base: &str,
    pool: &PgPool,
) -> anyhow::Result<Value> {
    let flood = (o.workers * o.worker_concurrency) as u64 * 6;
    submit_batches(o, "bench-flood", flood, o.batch_size, 4, "sleep:200", |_| -2).await?;
    let mut urgent_ms = Vec::new();
    for i in 0..URGENT {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let body = json!({"context_id": format!("urgent-{i}"), "agent_slug": "bench-urgent", "prompt": "noop",
                          "priority": 2});
        let r = http.post(format!("{base}{}", super::SUBMIT_PATH)).json(&body).send().await?;
        if r.status().as_u16() != 201 {
            bail!("submit answered {}", r.status());
        }
    }
    wait_completed(pool, "bench-urgent", URGENT, Duration::from_secs(120)).await?;
    wait_completed(pool, "bench-flood", flood, Duration::from_secs(600)).await?;
    let (urgent_dispatch, _, _, _) = db_latencies(pool, "bench-urgent").await?;
    urgent_ms.extend(urgent_dispatch);
    let (flood_dispatch, _, first, last) = db_latencies(pool, "bench-flood").await?;
    let secs = ((last - first) as f64 / 1000.0).max(0.001);
    Ok(json!({
        "slots": o.workers * o.worker_concurrency, "flood_tasks": flood, "task_ms": FLOOD_TASK_MS,
        "urgent_tasks": URGENT, "urgent_dispatch_ms": summary(urgent_ms),
        "flood_dispatch_ms": summary(flood_dispatch), "flood_tasks_per_sec": flood as f64 / secs,
    }))
}
