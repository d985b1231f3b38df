//! `bloom-bench`: end-to-end benchmark of the runtime against the machine's own limits.
//!
//! It starts the real binaries (one API, two reconcilers, workers with the built-in
//! executor) against a fresh database and a private NATS namespace, then measures:
//!
//! * `fixed_rate`: tasks submitted over REST at a fixed offered rate; submit, dispatch
//!   (submit → claim) and end-to-end (submit → `completed`) latency percentiles;
//! * `saturation`: as many tasks as the runtime takes; sustained tasks/s from the first
//!   submit to the last completion in Postgres;
//! * `rest_path`: the seed's worker protocol over REST (create, lease, heartbeat,
//!   complete) in tasks/s;
//! * `postgres_limit`: the same writes a task's life costs, executed directly with the
//!   same batching and durability, in tasks/s;
//! * `nats_limit`: publish with ack, then pull and ack, of task-sized messages, in msgs/s;
//! * the peak memory (VmHWM) of every process it started.
//!
//! The limits are measured before the runtime and again after it, and the runtime is
//! compared with their mean (the machine's speed drifts during a run). It prints a table
//! on stderr and the JSON report on stdout; the ratio
//! `saturation / min(postgres_limit, nats_limit)` is the headline.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};
use sqlx::{Connection, PgPool};

/// Benchmark options.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Opts {
    /// Postgres server (the benchmark creates database `bloom_bench`).
    #[arg(long, env = "BLOOM_BENCH_PG", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg: String,
    /// NATS server.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Offered rate of the fixed-rate phase, tasks/s.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Duration of the fixed-rate phase, seconds.
    #[arg(long, default_value_t = 5)]
    rate_secs: u64,
    /// Tasks in the saturation phase.
    #[arg(long, default_value_t = 20_000)]
    tasks: u64,
    /// Concurrent HTTP clients in the saturation phase (and, up to 32, the REST phase):
    /// enough that submissions queue up at every stage, which is what saturation means.
    #[arg(long, default_value_t = 256)]
    clients: usize,
    /// Tasks in the REST-path phase.
    #[arg(long, default_value_t = 2_000)]
    rest_tasks: u64,
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Slots per worker.
    #[arg(long, default_value_t = 256)]
    worker_concurrency: usize,
    /// Port of the API under test.
    #[arg(long, default_value_t = 39002)]
    port: u16,
    /// Skip the limit measurements.
    #[arg(long)]
    no_limits: bool,
    /// Write the JSON report here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    /// Peak resident memory in KiB.
    fn peak_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system, in clock ticks) of every process on the machine, by pid and
/// command name.
fn cpu_ticks() -> Vec<(u32, String, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`: comm may hold spaces, so split after the last ')'.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1.to_owned();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        Some((pid, comm, ticks))
    })
    .collect()
}

/// CPU milliseconds each component used between two [`cpu_ticks`] snapshots, divided by
/// `tasks`: the runtime's processes by label, Postgres and nats-server by name.
fn cpu_ms_per_task(before: &[(u32, String, u64)], after: &[(u32, String, u64)], procs: &[&Proc], tasks: u64) -> Value {
    let tick_ms = 1000.0 / 100.0; // USER_HZ is 100 on Linux
    let component = |pid: u32, comm: &str| -> Option<String> {
        if let Some(p) = procs.iter().find(|p| p.child.id() == pid) {
            return Some(p.name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-').to_owned());
        }
        match comm {
            "postgres" => Some("postgres".into()),
            "nats-server" => Some("nats-server".into()),
            "bloom-bench" => Some("load generator".into()),
            _ => None,
        }
    };
    let mut totals = std::collections::BTreeMap::<String, f64>::new();
    for (pid, comm, ticks) in after {
        let Some(name) = component(*pid, comm) else { continue };
        let start = before.iter().find(|(p, c, _)| p == pid && c == comm).map_or(0, |b| b.2);
        *totals.entry(name).or_default() += ticks.saturating_sub(start) as f64 * tick_ms / tasks.max(1) as f64;
    }
    let all: f64 = totals.values().sum();
    totals.insert("total".into(), all);
    json!(totals)
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.parent().context("binary directory")?.join(name);
    if !path.exists() {
        bail!("{} not found next to bloom-bench: build all binaries first", path.display());
    }
    Ok(path)
}

fn spawn(name: &str, label: &str, env: &[(&str, String)]) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(sibling(name)?);
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).env("RUST_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Ok(Proc { name: label.to_owned(), child: cmd.spawn().with_context(|| format!("starting {name}"))? })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    json!({
        "p50": percentile(&v, 50.0), "p95": percentile(&v, 95.0), "p99": percentile(&v, 99.0),
        "max": v.last().copied().unwrap_or(f64::NAN), "n": v.len(),
    })
}

async fn wait_ready(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the API did not become ready")
}

async fn wait_workers(pool: &PgPool, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let online: i64 =
            sqlx::query_scalar("SELECT count(*) FROM workers WHERE status = 'online' AND source = 'nats'")
                .fetch_one(pool)
                .await?;
        if online as usize >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("workers did not come online")
}

async fn wait_completed(pool: &PgPool, tag: &str, n: u64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM llm_tasks WHERE agent_slug = $1 AND status = 'completed'")
                .bind(tag)
                .fetch_one(pool)
                .await?;
        if done as u64 >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{tag}: only {done} of {n} tasks completed in {timeout:?}");
        }
        // Polling is load on the database under test: not too often.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn task_body(tag: &str, i: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({"context_id": format!("ctx-{}", i % 1000), "agent_slug": tag, "prompt": "noop"}))
        .expect("task body serializes")
}

/// Submits a task; returns the answer's body (parsed only by callers that need it, so the
/// load generator spends little of the machine).
async fn submit(http: &reqwest::Client, base: &str, body: Vec<u8>) -> anyhow::Result<bytes::Bytes> {
    let r = http
        .post(format!("{base}/api/runtime/llm-tasks"))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await?;
    if r.status().as_u16() != 201 {
        bail!("submit answered {}", r.status());
    }
    Ok(r.bytes().await?)
}

/// Latencies (ms) from Postgres: dispatch = lease start - creation, e2e = completion - creation.
async fn db_latencies(pool: &PgPool, tag: &str) -> anyhow::Result<(Vec<f64>, Vec<f64>, i64, i64)> {
    let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT t.created_at, l.started_at, t.updated_at FROM llm_tasks t JOIN leases l ON l.id = t.lease_id
         WHERE t.agent_slug = $1 AND t.status = 'completed'",
    )
    .bind(tag)
    .fetch_all(pool)
    .await?;
    let first = rows.iter().map(|r| r.0).min().unwrap_or(0);
    let last = rows.iter().map(|r| r.2).max().unwrap_or(0);
    let dispatch = rows.iter().map(|(c, s, _)| (s - c) as f64).collect();
    let e2e = rows.iter().map(|(c, _, u)| (u - c) as f64).collect();
    Ok((dispatch, e2e, first, last))
}

async fn fixed_rate(o: &Opts, http: &reqwest::Client, base: &str, pool: &PgPool) -> anyhow::Result<Value> {
    let tag = "bench-rate";
    let total = o.rate * o.rate_secs;
    let period = Duration::from_secs_f64(1.0 / o.rate as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut handles = Vec::with_capacity(total as usize);
    let started = Instant::now();
    for i in 0..total {
        tick.tick().await;
        let (http, base, body) = (http.clone(), base.to_owned(), task_body(tag, i));
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            submit(&http, &base, body).await.map(|_| t.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let offered_secs = started.elapsed().as_secs_f64();
    let mut submit_ms = Vec::with_capacity(handles.len());
    for h in handles {
        submit_ms.push(h.await??);
    }
    wait_completed(pool, tag, total, Duration::from_secs(120)).await?;
    let (dispatch, e2e, _, _) = db_latencies(pool, tag).await?;
    Ok(json!({
        "offered_rate": o.rate, "achieved_offer_rate": total as f64 / offered_secs, "tasks": total,
        "submit_ms": summary(submit_ms), "dispatch_ms": summary(dispatch), "end_to_end_ms": summary(e2e),
    }))
}

async fn saturation(o: &Opts, http: &reqwest::Client, base: &str, pool: &PgPool) -> anyhow::Result<Value> {
    let tag = "bench-saturation";
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..o.clients {
        let (http, base, next, n) = (http.clone(), base.to_owned(), next.clone(), o.tasks);
        clients.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(lat);
                }
                let t = Instant::now();
                submit(&http, &base, task_body(tag, i)).await?;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }));
    }
    let mut submit_ms = Vec::new();
    for c in clients {
        submit_ms.extend(c.await??);
    }
    let submit_secs = started.elapsed().as_secs_f64();
    wait_completed(pool, tag, o.tasks, Duration::from_secs(600)).await?;
    let (dispatch, e2e, first, last) = db_latencies(pool, tag).await?;
    let secs = ((last - first) as f64 / 1000.0).max(0.001);
    Ok(json!({
        "tasks": o.tasks, "clients": o.clients, "seconds": secs, "tasks_per_sec": o.tasks as f64 / secs,
        "submit_per_sec": o.tasks as f64 / submit_secs,
        "submit_ms": summary(submit_ms), "dispatch_ms": summary(dispatch), "end_to_end_ms": summary(e2e),
    }))
}

async fn rest_path(o: &Opts, http: &reqwest::Client, base: &str) -> anyhow::Result<Value> {
    let tag = "bench-rest";
    let r = http
        .post(format!("{base}/api/runtime/workers"))
        .json(&json!({"name": "bench-rest-worker", "capabilities": {"max_concurrency": 32}}))
        .send()
        .await?;
    if !r.status().is_success() {
        bail!("registering the REST worker answered {}", r.status());
    }
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..o.clients.min(32) {
        let (http, base, next, n) = (http.clone(), base.to_owned(), next.clone(), o.rest_tasks);
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let task: Value = serde_json::from_slice(&submit(&http, &base, task_body(tag, i)).await?)?;
                let id = task["id"].as_str().context("task id")?;
                let url = |step: &str| format!("{base}/api/runtime/llm-tasks/{id}/{step}");
                let leased = http.post(url("lease")).json(&json!({"worker_id": "bench-rest-worker"})).send().await?;
                if leased.status().as_u16() != 201 {
                    // A NATS worker of an earlier phase may still hold it; not counted.
                    continue;
                }
                http.post(url("heartbeat")).json(&json!({})).send().await?;
                let done = http
                    .post(url("complete"))
                    .json(&json!({"status": "success", "output": "ok", "metrics": {"duration_ms": 0}}))
                    .send()
                    .await?;
                if !done.status().is_success() {
                    bail!("complete answered {}", done.status());
                }
            }
        }));
    }
    for c in clients {
        c.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(json!({"tasks": o.rest_tasks, "seconds": secs, "tasks_per_sec": o.rest_tasks as f64 / secs}))
}

/// The writes of a task's life, batched as the runtime batches them, executed directly.
async fn postgres_limit(url: &str, tasks: u64, connections: usize, batch: usize) -> anyhow::Result<Value> {
    let pool =
        bloom::db::connect(url, &bloom::db::PoolOptions { max_connections: connections as u32, ..Default::default() })
            .await?;
    sqlx::query("TRUNCATE llm_tasks, leases, outbox, audit_logs, runtime_artifacts, llm_results")
        .execute(&pool)
        .await?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..connections {
        let (pool, next) = (pool.clone(), next.clone());
        loops.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(batch as u64, Ordering::Relaxed);
                if start >= tasks {
                    return anyhow::Ok(());
                }
                let n = (tasks - start).min(batch as u64) as i64;
                let ids: Vec<String> = (0..n).map(|_| bloom::domain::new_id()).collect();
                let leases: Vec<String> = (0..n).map(|_| bloom::domain::new_id()).collect();
                let now = bloom::time::now_ms();
                // 1. create: task + outbox + audit
                let mut tx = pool.begin().await?;
                sqlx::query(
                    "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, created_at, updated_at, dispatch_seq)
                     SELECT id, 'ctx', 'limit', 'noop', $2, $2, 1 FROM UNNEST($1::text[]) AS id",
                )
                .bind(&ids)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                let outbox: Vec<i64> = sqlx::query_scalar(
                    "INSERT INTO outbox (task_id, dispatch_seq, created_at) SELECT id, 1, $2 FROM UNNEST($1::text[]) AS id RETURNING id",
                )
                .bind(&ids)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
                audit(&mut tx, &ids, "task_created", now).await?;
                tx.commit().await?;
                // 2. outbox delete (asynchronous commit, as the dispatcher does)
                let mut tx = pool.begin().await?;
                sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *tx).await?;
                sqlx::query("DELETE FROM outbox WHERE id = ANY($1)").bind(&outbox).execute(&mut *tx).await?;
                tx.commit().await?;
                // 3. claim: task update + leases + audit
                let mut tx = pool.begin().await?;
                sqlx::query(
                    "UPDATE llm_tasks t SET status = 'leased', lease_id = r.l, worker_id = 'w', attempts = attempts + 1
                     FROM UNNEST($1::text[], $2::text[]) AS r(id, l) WHERE t.id = r.id AND t.status = 'queued'",
                )
                .bind(&ids)
                .bind(&leases)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, last_heartbeat, context_id)
                     SELECT l, id, 'w', $3, $3 + 300000, 300, $3, 'ctx' FROM UNNEST($1::text[], $2::text[]) AS r(id, l)",
                )
                .bind(&ids)
                .bind(&leases)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                audit(&mut tx, &ids, "task_leased", now).await?;
                tx.commit().await?;
                // 4. complete: task + lease + artifact + result + audit
                let mut tx = pool.begin().await?;
                sqlx::query("UPDATE llm_tasks SET status = 'completed' WHERE id = ANY($1) AND status = 'leased'")
                    .bind(&ids)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE leases SET status = 'released' WHERE id = ANY($1) AND status = 'active'")
                    .bind(&leases)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO runtime_artifacts (id, task_id, type, created_at, finalized, content)
                     SELECT l, id, 'LLM_RESULT', $3, true, 'noop' FROM UNNEST($1::text[], $2::text[]) AS r(id, l)",
                )
                .bind(&ids)
                .bind(&leases)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, metrics, completed_at)
                     SELECT l || 'r', id, 'w', l, 'success', 'noop', '{\"duration_ms\":0}', $3
                     FROM UNNEST($1::text[], $2::text[]) AS r(id, l)",
                )
                .bind(&ids)
                .bind(&leases)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                audit(&mut tx, &ids, "task_completed", now).await?;
                tx.commit().await?;
            }
        }));
    }
    for l in loops {
        l.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(json!({"tasks": tasks, "connections": connections, "batch": batch, "seconds": secs,
              "tasks_per_sec": tasks as f64 / secs}))
}

async fn audit(tx: &mut sqlx::PgConnection, ids: &[String], action: &str, now: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
         SELECT gen_random_uuid()::text, $2, $3, 'llm_task', id, 'bench', 'limit' FROM UNNEST($1::text[]) AS id",
    )
    .bind(ids)
    .bind(now)
    .bind(action)
    .execute(tx)
    .await?;
    Ok(())
}

/// Publish with ack, then pull and ack, of task-sized messages.
async fn nats_limit(url: &str, msgs: usize) -> anyhow::Result<Value> {
    use futures::StreamExt;
    let client = async_nats::connect(url).await?;
    let js = async_nats::jetstream::new(client);
    let name = format!("benchlimit{}", &bloom::domain::new_id()[..8]);
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    let payload = bytes::Bytes::from(vec![b'x'; 400]);
    let started = Instant::now();
    let mut acks = Vec::with_capacity(msgs);
    for i in 0..msgs {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", i.to_string().as_str());
        acks.push(js.publish_with_headers(format!("{name}.t"), h, payload.clone()).await?);
        if acks.len() >= 4096 {
            for a in acks.drain(..) {
                a.await?;
            }
        }
    }
    for a in acks {
        a.await?;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("c".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut messages = consumer.stream().max_messages_per_batch(512).messages().await?;
    let mut got = 0;
    while got < msgs {
        let m = messages.next().await.context("stream ended")?.map_err(|e| anyhow::anyhow!(e))?;
        m.ack().await.map_err(|e| anyhow::anyhow!(e))?;
        got += 1;
    }
    let pull_secs = started.elapsed().as_secs_f64();
    let _ = js.delete_stream(&name).await;
    let publish = msgs as f64 / publish_secs;
    let pull = msgs as f64 / pull_secs;
    Ok(json!({"messages": msgs, "publish_acked_per_sec": publish, "pull_ack_per_sec": pull,
              "msgs_per_sec": 1.0 / (1.0 / publish + 1.0 / pull)}))
}

/// A limit measured twice: both measurements, and their mean under `key`.
fn before_and_after(before: Value, after: Value, key: &str) -> Value {
    let mean = (before[key].as_f64().unwrap_or(f64::NAN) + after[key].as_f64().unwrap_or(f64::NAN)) / 2.0;
    json!({ key: mean, "before": before, "after": after })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let base_url = o.pg.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or(o.pg.clone());
    let db_url = format!("{base_url}/bloom_bench");
    {
        let mut admin = sqlx::PgConnection::connect(&o.pg).await.context("connecting to Postgres")?;
        sqlx::query("DROP DATABASE IF EXISTS bloom_bench WITH (FORCE)").execute(&mut admin).await?;
        sqlx::query("CREATE DATABASE bloom_bench").execute(&mut admin).await?;
    }
    let pool = bloom::db::connect(&db_url, &bloom::db::PoolOptions::default()).await?;
    bloom::db::migrate(&pool).await?;
    // The machine's limits first, on the fresh database, then the runtime on the same
    // tables, then the limits again: the machine's speed drifts during a run, and the
    // runtime is compared with the mean of the limits measured before and after it.
    let (pg_before, nats_before) = if o.no_limits {
        (Value::Null, Value::Null)
    } else {
        eprintln!("limits: postgres, nats");
        let limits = (postgres_limit(&db_url, o.tasks, 8, 128).await?, nats_limit(&o.nats, o.tasks as usize).await?);
        sqlx::query("TRUNCATE llm_tasks, leases, outbox, audit_logs, runtime_artifacts, llm_results")
            .execute(&pool)
            .await?;
        limits
    };
    let ns = format!("bench{}", &bloom::domain::new_id()[..8]);
    let common = vec![
        ("DATABASE_URL", db_url.clone()),
        ("NATS_URL", o.nats.clone()),
        ("BLOOM_NATS_NAMESPACE", ns.clone()),
        ("BLOOM_LEASE_TTL_SECS", "60".into()),
    ];
    let with = |extra: &[(&'static str, String)]| {
        let mut v = common.clone();
        v.extend_from_slice(extra);
        v
    };
    let mut procs = vec![spawn(
        "bloom-api",
        "bloom-api",
        &with(&[
            ("BLOOM_RUNTIME_PORT", o.port.to_string()),
            ("BLOOM_RUNTIME_HOST", "127.0.0.1".into()),
            ("BLOOM_RATE_LIMIT_PER_MIN", "0".into()),
            ("BLOOM_DB_MAX_CONNECTIONS", "16".into()),
        ]),
    )?];
    for i in 0..2 {
        procs.push(spawn(
            "bloom-reconciler",
            &format!("bloom-reconciler-{i}"),
            &with(&[("BLOOM_RECONCILER_HTTP_PORT", "0".into()), ("BLOOM_DB_MAX_CONNECTIONS", "16".into())]),
        )?);
    }
    let mut workers = Vec::new();
    for i in 0..o.workers {
        workers.push(spawn(
            "bloom-worker",
            &format!("bloom-worker-{i}"),
            &with(&[
                ("BLOOM_WORKER_ID", format!("bench-worker-{i}")),
                ("BLOOM_EXECUTOR", "builtin".into()),
                ("BLOOM_WORKER_MAX_CONCURRENCY", o.worker_concurrency.to_string()),
                ("BLOOM_WORKER_HTTP_PORT", "0".into()),
            ]),
        )?);
    }
    let http =
        reqwest::Client::builder().pool_max_idle_per_host(o.clients * 2).timeout(Duration::from_secs(30)).build()?;
    let base = format!("http://127.0.0.1:{}", o.port);
    wait_ready(&http, &base).await?;
    wait_workers(&pool, o.workers).await?;

    eprintln!("fixed rate: {} tasks/s for {} s", o.rate, o.rate_secs);
    let fixed = fixed_rate(&o, &http, &base, &pool).await?;
    eprintln!("saturation: {} tasks, {} clients", o.tasks, o.clients);
    let before = cpu_ticks();
    let mut sat = saturation(&o, &http, &base, &pool).await?;
    let all: Vec<&Proc> = workers.iter().chain(procs.iter()).collect();
    sat["cpu_ms_per_task"] = cpu_ms_per_task(&before, &cpu_ticks(), &all, o.tasks);
    let mut memory = serde_json::Map::new();
    for p in workers.iter().chain(procs.iter()) {
        memory.insert(p.name.clone(), json!(p.peak_kib().map(|k| k / 1024)));
    }
    drop(workers);
    eprintln!("REST path: {} tasks", o.rest_tasks);
    let rest = rest_path(&o, &http, &base).await?;
    drop(procs);
    // Leave no streams behind on a shared server.
    if let Ok(client) = async_nats::connect(&o.nats).await {
        let js = async_nats::jetstream::new(client);
        let names = bloom::bus::Names::new(&ns).map_err(anyhow::Error::msg)?;
        let _ = js.delete_stream(names.tasks_stream()).await;
        let _ = js.delete_stream(names.results_stream()).await;
    }

    let (pg, nats) = if o.no_limits {
        (Value::Null, Value::Null)
    } else {
        eprintln!("limits again: postgres, nats");
        let pg_after = postgres_limit(&db_url, o.tasks, 8, 128).await?;
        let nats_after = nats_limit(&o.nats, o.tasks as usize).await?;
        (
            before_and_after(pg_before, pg_after, "tasks_per_sec"),
            before_and_after(nats_before, nats_after, "msgs_per_sec"),
        )
    };
    let lower = [pg["tasks_per_sec"].as_f64(), nats["msgs_per_sec"].as_f64()]
        .into_iter()
        .flatten()
        .fold(f64::INFINITY, f64::min);
    let sat_tps = sat["tasks_per_sec"].as_f64().unwrap_or(0.0);
    let report = json!({
        "fixed_rate": fixed, "saturation": sat, "rest_path": rest,
        "postgres_limit": pg, "nats_limit": nats,
        "ratio_to_lower_limit": if lower.is_finite() { json!(sat_tps / lower) } else { Value::Null },
        "peak_memory_mib": memory,
    });
    print_table(&report);
    let text = serde_json::to_string_pretty(&report)?;
    println!("{text}");
    if let Some(path) = &o.out {
        std::fs::write(path, &text)?;
    }
    Ok(())
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    let lat = |v: &Value| format!("p50 {} / p95 {} / p99 {} ms", f(&v["p50"]), f(&v["p95"]), f(&v["p99"]));
    eprintln!("\n{:<38} {}", "measure", "value");
    eprintln!("{:<38} {}", "saturation tasks/s (submit→completed)", f(&r["saturation"]["tasks_per_sec"]));
    eprintln!("{:<38} {}", "saturation submit latency", lat(&r["saturation"]["submit_ms"]));
    eprintln!("{:<38} {}", "saturation dispatch latency", lat(&r["saturation"]["dispatch_ms"]));
    eprintln!("{:<38} {}", "saturation end-to-end latency", lat(&r["saturation"]["end_to_end_ms"]));
    if let Some(cpu) = r["saturation"]["cpu_ms_per_task"].as_object() {
        let parts: Vec<String> = cpu.iter().map(|(k, v)| format!("{k} {:.3}", v.as_f64().unwrap_or(0.0))).collect();
        eprintln!("{:<38} {}", "saturation CPU ms per task", parts.join(", "));
    }
    eprintln!("{:<38} {}", "fixed-rate offered tasks/s", f(&r["fixed_rate"]["offered_rate"]));
    eprintln!("{:<38} {}", "fixed-rate submit latency", lat(&r["fixed_rate"]["submit_ms"]));
    eprintln!("{:<38} {}", "fixed-rate dispatch latency", lat(&r["fixed_rate"]["dispatch_ms"]));
    eprintln!("{:<38} {}", "fixed-rate end-to-end latency", lat(&r["fixed_rate"]["end_to_end_ms"]));
    eprintln!("{:<38} {}", "seed REST path tasks/s", f(&r["rest_path"]["tasks_per_sec"]));
    let limit = |l: &Value, key: &str| {
        format!("{} (before {}, after {})", f(&l[key]), f(&l["before"][key]), f(&l["after"][key]))
    };
    eprintln!("{:<38} {}", "postgres limit tasks/s", limit(&r["postgres_limit"], "tasks_per_sec"));
    eprintln!("{:<38} {}", "nats limit msgs/s", limit(&r["nats_limit"], "msgs_per_sec"));
    let ratio = r["ratio_to_lower_limit"].as_f64().map_or("-".to_owned(), |x| format!("{x:.2}"));
    eprintln!("{:<38} {}", "ratio to the lower limit", ratio);
    if let Some(m) = r["peak_memory_mib"].as_object() {
        for (k, v) in m {
            eprintln!("{:<38} {} MiB", format!("peak memory {k}"), f(v));
        }
    }
}
