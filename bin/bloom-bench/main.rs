//! `bloom-bench`: end-to-end benchmark of the runtime against the machine's own limits.
//!
//! It starts the real binaries (one API, two reconcilers, workers with the built-in
//! executor) against a fresh database and a private NATS namespace, then measures:
//!
//! * `low_rate`, then `fixed_rate`: tasks submitted over REST at a fixed offered rate
//!   (200 and 1,000 tasks/s); submit, dispatch (submit → claim) and end-to-end (submit →
//!   `completed`) latency percentiles;
//! * `saturation`: as many tasks as the runtime takes; sustained tasks/s from the first
//!   submit to the last completion in Postgres;
//! * `rest_path`: the seed's worker protocol over REST (create, lease, heartbeat,
//!   complete) in tasks/s;
//! * `batch_submit`: the saturation phase's tasks submitted 100 per request through the
//!   batch route, tasks/s from the first submission to the last completion;
//! * `all_priorities`: the saturation phase with its tasks spread over the five
//!   priorities, tasks/s (its ratio to `saturation` is what priorities cost);
//! * `priority_under_flood`: every slot busy with 200 ms background tasks and a backlog
//!   of five rounds, then urgent tasks one by one: their wait for a slot;
//! * `postgres_limit`: the same writes a task's life costs, executed directly with the
//!   same batching and durability, in tasks/s;
//! * `nats_limit`: publish with ack, then pull and ack, of task-sized messages, in msgs/s;
//! * `commit_rate`: one-row INSERTs, each its own commit, from concurrent connections, in
//!   commits/s: the single-insert commit rate of the same Postgres;
//! * `idle`: the CPU each process spends per second with no task to do;
//! * the peak memory (VmHWM) of every process it started;
//! * for the fixed-rate phases and `saturation`, the CPU each process spent per task and the
//!   transactions Postgres committed and WAL bytes it wrote per task (`postgres_writes`).
//!
//! The limits are measured three times before the runtime and three times after it, and
//! the runtime is compared with their median (the machine's speed drifts during a run,
//! and single measurements vary by a factor of two). It prints a table
//! on stderr and the JSON report on stdout; the ratios `saturation / commit_rate` and
//! `saturation / min(postgres_limit, nats_limit)` are the headline.

mod http;
mod limits;
mod procs;
mod task_control;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::{json, Value};
use sqlx::{Connection, PgPool};

use limits::{commit_rate, nats_limit, postgres_limit};
use procs::{cpu_ms_per, cpu_ms_per_task, cpu_ticks, spawn, Proc};

/// Benchmark options.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Opts {
    /// Postgres server (the benchmark creates database `bloom_bench`).
    #[arg(long, env = "BLOOM_BENCH_PG", default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    pg: String,
    /// NATS server(s), comma separated (e.g. `scripts/nats-cluster.sh url`).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Replicas of the runtime's streams, and of the NATS limit's (3 on a three-node
    /// cluster).
    #[arg(long, env = "BLOOM_NATS_REPLICAS", default_value_t = 1)]
    nats_replicas: usize,
    /// Offered rate of the fixed-rate phase, tasks/s.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Duration of the fixed-rate phase, seconds.
    #[arg(long, default_value_t = 5)]
    rate_secs: u64,
    /// Offered rate of a second fixed-rate phase (as long as the first), low enough that
    /// every step carries one task at a time: what a step costs; 0 skips it.
    #[arg(long, default_value_t = 200)]
    low_rate: u64,
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
    /// Measurements of each limit before the runtime, and again after it.
    #[arg(long, default_value_t = 3)]
    limit_runs: usize,
    /// Measure the limits only (`--limit-runs` times each), not the runtime: the
    /// Postgres limit keyed against plain is a quick measure of what the concurrency
    /// slots' bookkeeping costs Postgres.
    #[arg(long, conflicts_with = "no_limits")]
    limits_only: bool,
    /// Concurrent connections of the single-insert commit rate.
    #[arg(long, default_value_t = 64)]
    commit_connections: usize,
    /// Store artifacts in this S3-compatible server (the tests' moto on loopback:
    /// `http://127.0.0.1:9311`), in a bucket of the run's own; without it, artifacts
    /// stay in Postgres.
    #[arg(long, env = "BLOOM_BENCH_S3")]
    s3_endpoint: Option<String>,
    /// Tasks per request of the batch phase.
    #[arg(long, default_value_t = 100)]
    batch_size: u64,
    /// Skip the task-control phases (batch submit, all priorities, priority under a flood).
    #[arg(long)]
    no_task_control: bool,
    /// Concurrency keys of the keyed saturation phase (a limit of 1 on each); 0 skips it.
    #[arg(long, default_value_t = 1000)]
    concurrency_keys: u64,
    /// The limit of each key in the keyed phase (a limit no key reaches measures the
    /// admission's bookkeeping alone).
    #[arg(long, default_value_t = 1)]
    key_limit: u32,
    /// Keyed phases, each followed by a plain one: the keyed rate is compared with the
    /// plain phases on either side of each, and the rounds' ratios are averaged (one
    /// phase's rate moves by 10 % with the machine).
    #[arg(long, default_value_t = 3)]
    key_rounds: u32,
    /// Write the JSON report here too.
    #[arg(long)]
    out: Option<PathBuf>,
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

/// What Postgres has written for the bench database so far: transactions committed (by
/// every process) and WAL bytes (the whole server's; nothing else writes during a run).
#[derive(Clone, Copy)]
struct PgWrites {
    commits: i64,
    wal: i64,
}

impl PgWrites {
    /// Read after the backends' statistics of what just finished were published (at
    /// most a second later).
    async fn read(pool: &PgPool) -> anyhow::Result<PgWrites> {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (commits, wal): (i64, i64) = sqlx::query_as(
            "SELECT xact_commit, pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(pool)
        .await?;
        Ok(PgWrites { commits, wal })
    }

    /// Commits and WAL bytes per task since `self`.
    async fn per_task(self, pool: &PgPool, tasks: u64) -> anyhow::Result<Value> {
        let now = PgWrites::read(pool).await?;
        let n = tasks.max(1) as f64;
        Ok(json!({
            "commits_per_task": (now.commits - self.commits) as f64 / n,
            "wal_bytes_per_task": (now.wal - self.wal) as f64 / n,
        }))
    }
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

const SUBMIT_PATH: &str = "/api/runtime/llm-tasks";

fn task_body(tag: &str, i: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({"context_id": format!("ctx-{}", i % 1000), "agent_slug": tag, "prompt": "noop"}))
        .expect("task body serializes")
}

/// A task of one of `keys` concurrency keys (`key-<i mod keys>`).
fn keyed_task_body(tag: &str, i: u64, keys: u64) -> Vec<u8> {
    let body = json!({"context_id": format!("ctx-{}", i % 1000), "agent_slug": tag, "prompt": "noop",
                      "concurrency_key": format!("key-{}", i % keys)});
    serde_json::to_vec(&body).expect("task body serializes")
}

/// Submits a task; returns the answer's body (parsed only by callers that need it, so the
/// load generator spends little of the machine).
async fn submit(http: &reqwest::Client, base: &str, body: Vec<u8>) -> anyhow::Result<bytes::Bytes> {
    let r = http
        .post(format!("{base}{SUBMIT_PATH}"))
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

/// How long the idle phase measures.
const IDLE_SECS: u64 = 5;

/// The CPU the runtime spends with nothing to do, per second: its duties and loops
/// polling, beating and waking (what a task at a low rate also pays for).
async fn idle(all: &[&Proc]) -> Value {
    // The workers' start-up traffic settles first.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = cpu_ticks();
    tokio::time::sleep(Duration::from_secs(IDLE_SECS)).await;
    json!({"secs": IDLE_SECS, "cpu_ms_per_sec": cpu_ms_per(&before, &cpu_ticks(), all, IDLE_SECS as f64)})
}

/// Submits `rate` tasks/s for `o.rate_secs` over REST (tagged `tag`), waits for all to
/// complete and reports their latencies, with the CPU each process spent per task and
/// Postgres's writes per task.
async fn fixed_rate(o: &Opts, rate: u64, tag: &str, all: &[&Proc], pool: &PgPool) -> anyhow::Result<Value> {
    let total = rate * o.rate_secs;
    let writes = PgWrites::read(pool).await?;
    let before = cpu_ticks();
    let mut phase = offer(o, rate, tag, pool).await?;
    phase["cpu_ms_per_task"] = cpu_ms_per_task(&before, &cpu_ticks(), all, total);
    phase["postgres_writes"] = writes.per_task(pool, total).await?;
    Ok(phase)
}

/// Keep-alive connections the load of a fixed-rate phase goes over.
const OFFER_CONNECTIONS: usize = 64;

/// The open load of a fixed-rate phase, and its latencies once every task completed.
/// Each request is due at its tick and goes over the first free connection; its submit
/// latency counts from the tick, so a wait for a connection counts too.
async fn offer(o: &Opts, rate: u64, tag: &str, pool: &PgPool) -> anyhow::Result<Value> {
    let total = rate * o.rate_secs;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let addr = format!("127.0.0.1:{}", o.port);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(Vec<u8>, Instant)>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let senders: Vec<_> = (0..OFFER_CONNECTIONS)
        .map(|_| {
            let (rx, mut conn) = (rx.clone(), http::Connection::new(&addr));
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let next = rx.lock().await.recv().await;
                    let Some((request, due)) = next else { return anyhow::Ok(lat) };
                    let r = conn.send(&request).await?;
                    if r.status != 201 {
                        bail!("submit answered {}: {}", r.status, String::from_utf8_lossy(&r.body));
                    }
                    lat.push(due.elapsed().as_secs_f64() * 1000.0);
                }
            })
        })
        .collect();
    let started = Instant::now();
    for i in 0..total {
        tick.tick().await;
        tx.send((http::post_json(&addr, SUBMIT_PATH, &task_body(tag, i)), Instant::now()))?;
    }
    let offered_secs = started.elapsed().as_secs_f64();
    drop(tx);
    let mut submit_ms = Vec::with_capacity(total as usize);
    for s in senders {
        submit_ms.extend(s.await??);
    }
    wait_completed(pool, tag, total, Duration::from_secs(120)).await?;
    let (dispatch, e2e, _, _) = db_latencies(pool, tag).await?;
    Ok(json!({
        "offered_rate": rate, "achieved_offer_rate": total as f64 / offered_secs, "tasks": total,
        "submit_ms": summary(submit_ms), "dispatch_ms": summary(dispatch), "end_to_end_ms": summary(e2e),
    }))
}

/// Submits `o.tasks` tasks from `o.clients` connections as fast as they are answered
/// and waits for all to complete; `keys`: spread over that many concurrency keys.
async fn saturation(o: &Opts, pool: &PgPool, tag: &str, keys: Option<u64>) -> anyhow::Result<Value> {
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut clients = Vec::new();
    let addr = format!("127.0.0.1:{}", o.port);
    for _ in 0..o.clients {
        let (mut conn, addr, next, n) = (http::Connection::new(&addr), addr.clone(), next.clone(), o.tasks);
        let tag = tag.to_owned();
        clients.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(lat);
                }
                let body = match keys {
                    Some(keys) => keyed_task_body(&tag, i, keys),
                    None => task_body(&tag, i),
                };
                let request = http::post_json(&addr, SUBMIT_PATH, &body);
                let t = Instant::now();
                let r = conn.send(&request).await?;
                if r.status != 201 {
                    bail!("submit answered {}: {}", r.status, String::from_utf8_lossy(&r.body));
                }
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

/// The concurrency keys' phases: `o.key_rounds` times, the saturation load spread over
/// `o.concurrency_keys` keys of limit `o.key_limit` (the limit set for the phase only),
/// then the plain load again. Each keyed phase is compared with the mean of the plain
/// phases on either side of it (`plain`, the first, is the saturation phase): the
/// machine's drift and what earlier phases left behind weigh on both sides alike.
/// Returns the keyed report (the first round's figures, the rounds' mean ratio, every
/// round) and the last plain phase.
async fn keyed_rounds(
    o: &Opts,
    pool: &PgPool,
    http: &reqwest::Client,
    base: &str,
    all: &[&Proc],
    plain: &Value,
) -> anyhow::Result<(Value, Value)> {
    let rate = |v: &Value| v["tasks_per_sec"].as_f64().unwrap_or(f64::NAN);
    let cpu = |v: &Value| v["cpu_ms_per_task"]["total"].as_f64().unwrap_or(f64::NAN);
    let limit = format!("{base}/api/runtime/concurrency-limits/concurrency_key/*");
    let mut before = plain.clone();
    let mut rounds = Vec::new();
    let mut most = None::<i64>;
    for round in 1..=o.key_rounds.max(1) {
        eprintln!(
            "saturation with {} concurrency keys of limit {} (round {round}): {} tasks",
            o.concurrency_keys, o.key_limit, o.tasks
        );
        let set = http.put(&limit).json(&json!({"max_running": o.key_limit})).send().await?;
        if !set.status().is_success() {
            bail!("setting the concurrency limit answered {}", set.status());
        }
        let ticks = cpu_ticks();
        let mut keyed = saturation(o, pool, &format!("bench-keys-{round}"), Some(o.concurrency_keys)).await?;
        keyed["cpu_ms_per_task"] = cpu_ms_per_task(&ticks, &cpu_ticks(), all, o.tasks);
        http.delete(&limit).send().await?;
        let running: Option<i64> =
            sqlx::query_scalar("SELECT max(running)::bigint FROM concurrency_slot_counts").fetch_one(pool).await?;
        most = most.max(running);
        eprintln!("saturation again (round {round}): {} tasks", o.tasks);
        let ticks = cpu_ticks();
        let mut after = saturation(o, pool, &format!("bench-saturation-after-{round}"), None).await?;
        after["cpu_ms_per_task"] = cpu_ms_per_task(&ticks, &cpu_ticks(), all, o.tasks);
        keyed["ratio_to_saturation"] = json!(rate(&keyed) / ((rate(&before) + rate(&after)) / 2.0));
        keyed["cpu_ratio"] = json!(((cpu(&before) + cpu(&after)) / 2.0) / cpu(&keyed));
        rounds.push(json!({"keyed": keyed, "plain_after": after}));
        before = after;
    }
    let mean =
        |field: &str| rounds.iter().filter_map(|r| r["keyed"][field].as_f64()).sum::<f64>() / rounds.len() as f64;
    let mut keyed = rounds[0]["keyed"].clone();
    keyed["ratio_to_saturation"] = json!(mean("ratio_to_saturation"));
    keyed["cpu_ratio"] = json!(mean("cpu_ratio"));
    keyed["ratio_to_saturation_first"] = rounds[0]["keyed"]["ratio_to_saturation"].clone();
    keyed["keys"] = json!(o.concurrency_keys);
    keyed["key_limit"] = json!(o.key_limit);
    keyed["set_aside"] = json!(
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_logs WHERE action = 'task_deferred'")
            .fetch_one(pool)
            .await?
    );
    keyed["slots_running_after"] = json!(most);
    keyed["rounds"] = json!(rounds);
    Ok((keyed, before))
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

/// Measurements of the machine's limits, each run `--limit-runs` times.
#[derive(Default)]
struct Limits {
    postgres: Vec<Value>,
    /// The Postgres limit with the tasks over `--concurrency-keys` keys (none with 0).
    postgres_keyed: Vec<Value>,
    nats: Vec<Value>,
    commits: Vec<Value>,
}

/// Measures the Postgres (plain, then keyed), NATS and commit-rate limits
/// `o.limit_runs` times each, in turn.
async fn limits(o: &Opts, db_url: &str) -> anyhow::Result<Limits> {
    let mut l = Limits::default();
    for _ in 0..o.limit_runs.max(1) {
        l.postgres.push(postgres_limit(db_url, o.tasks, 8, 128, None).await?);
        if o.concurrency_keys > 0 {
            l.postgres_keyed.push(postgres_limit(db_url, o.tasks, 8, 128, Some(o.concurrency_keys)).await?);
        }
        l.nats.push(nats_limit(&o.nats, o.nats_replicas, o.tasks as usize).await?);
        l.commits.push(commit_rate(db_url, o.tasks, o.commit_connections).await?);
    }
    Ok(l)
}

/// The limits' report: each limit's runs before and after the runtime with their
/// median, and for the keyed Postgres limit the medians of its runs' ratios to the
/// plain run just before each (the machine's speed drifts between runs more than within
/// a pair): the rate, and Postgres's CPU per task (plain over keyed, as the runtime's
/// keyed rounds give it).
fn limits_report(before: Limits, after: Limits) -> Value {
    let rate = |v: &Value| v["tasks_per_sec"].as_f64().unwrap_or(f64::NAN);
    let cpu = |v: &Value| v["cpu_ms_per_task"]["postgres"].as_f64().unwrap_or(f64::NAN);
    let pairs: Vec<Value> = (before.postgres.iter().zip(&before.postgres_keyed))
        .chain(after.postgres.iter().zip(&after.postgres_keyed))
        .map(|(plain, keyed)| json!({ "rate": rate(keyed) / rate(plain), "cpu": cpu(plain) / cpu(keyed) }))
        .collect();
    let keyed = if pairs.is_empty() {
        Value::Null
    } else {
        let mut keyed = before_and_after(before.postgres_keyed, after.postgres_keyed, "tasks_per_sec");
        keyed["ratio_to_plain"] = before_and_after(pairs.clone(), Vec::new(), "rate")["rate"].clone();
        keyed["postgres_cpu_ratio"] = before_and_after(pairs, Vec::new(), "cpu")["cpu"].clone();
        keyed
    };
    let pg = before_and_after(before.postgres, after.postgres, "tasks_per_sec");
    json!({
        "postgres_limit": pg,
        "postgres_limit_keyed": keyed,
        "nats_limit": before_and_after(before.nats, after.nats, "msgs_per_sec"),
        "commit_rate": before_and_after(before.commits, after.commits, "commits_per_sec"),
    })
}

/// A limit measured before and after the runtime: every measurement, and their median
/// under `key` (one slow or fast stretch of the machine does not move it).
fn before_and_after(before: Vec<Value>, after: Vec<Value>, key: &str) -> Value {
    let mut all: Vec<f64> = before.iter().chain(&after).filter_map(|v| v[key].as_f64()).collect();
    all.sort_by(f64::total_cmp);
    let median = match all.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => all[n / 2],
        n => (all[n / 2 - 1] + all[n / 2]) / 2.0,
    };
    json!({ key: median, "before": before, "after": after })
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
    // runtime is compared with the median of the limits measured before and after it.
    let limits_before = if o.no_limits {
        Limits::default()
    } else {
        eprintln!("limits: postgres, nats, commit rate ({} runs each)", o.limit_runs);
        let limits = limits(&o, &db_url).await?;
        sqlx::query("TRUNCATE llm_tasks, leases, outbox, audit_logs, runtime_artifacts, llm_results")
            .execute(&pool)
            .await?;
        limits
    };
    if o.limits_only {
        let report = limits_report(limits_before, Limits::default());
        eprintln!();
        print_limits(&report);
        return write_report(&report, o.out.as_deref());
    }
    let ns = format!("bench{}", &bloom::domain::new_id()[..8]);
    let mut common = vec![
        ("DATABASE_URL", db_url.clone()),
        ("NATS_URL", o.nats.clone()),
        ("BLOOM_NATS_NAMESPACE", ns.clone()),
        ("BLOOM_NATS_REPLICAS", o.nats_replicas.to_string()),
        ("BLOOM_LEASE_TTL_SECS", "60".into()),
    ];
    if let Some(endpoint) = &o.s3_endpoint {
        common.extend([
            ("BLOOM_S3_ENDPOINT", endpoint.clone()),
            ("BLOOM_S3_BUCKET", ns.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ]);
    }
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

    let all: Vec<&Proc> = workers.iter().chain(procs.iter()).collect();
    eprintln!("idle: {IDLE_SECS} s");
    let idle = idle(&all).await;
    // The low rate first: its cost per task is the one most sensitive to what earlier
    // phases left behind (dead rows between vacuums).
    let low = if o.low_rate == 0 {
        Value::Null
    } else {
        eprintln!("low rate: {} tasks/s for {} s", o.low_rate, o.rate_secs);
        fixed_rate(&o, o.low_rate, "bench-low-rate", &all, &pool).await?
    };
    eprintln!("fixed rate: {} tasks/s for {} s", o.rate, o.rate_secs);
    let fixed = fixed_rate(&o, o.rate, "bench-rate", &all, &pool).await?;
    eprintln!("saturation: {} tasks, {} clients", o.tasks, o.clients);
    let writes = PgWrites::read(&pool).await?;
    let before = cpu_ticks();
    let mut sat = saturation(&o, &pool, "bench-saturation", None).await?;
    sat["cpu_ms_per_task"] = cpu_ms_per_task(&before, &cpu_ticks(), &all, o.tasks);
    sat["postgres_writes"] = writes.per_task(&pool, o.tasks).await?;
    let (keyed, sat_after) = if o.concurrency_keys == 0 {
        (Value::Null, Value::Null)
    } else {
        keyed_rounds(&o, &pool, &http, &base, &all, &sat).await?
    };
    let task_control = if o.no_task_control {
        Value::Null
    } else {
        eprintln!("batch submit: {} tasks, {} per request", o.tasks, o.batch_size);
        let batch = task_control::batch_submit(&o, &pool).await?;
        eprintln!("saturation with all priorities: {} tasks", o.tasks);
        let all = task_control::saturation_all_priorities(&o, &pool).await?;
        eprintln!("priority under a flood");
        let flood = task_control::priority_under_flood(&o, &http, &base, &pool).await?;
        json!({"batch_submit": batch, "all_priorities": all, "priority_under_flood": flood})
    };
    let mut memory = serde_json::Map::new();
    for p in workers.iter().chain(procs.iter()) {
        memory.insert(p.name.clone(), json!(p.peak_kib().map(|k| k / 1024)));
    }
    drop(workers);
    eprintln!("REST path: {} tasks", o.rest_tasks);
    let rest = rest_path(&o, &http, &base).await?;
    drop(procs);
    // Where the runtime's artifacts went (the limit runs below replace the tables).
    let (in_s3, inline): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE url IS NOT NULL), count(*) FILTER (WHERE content IS NOT NULL)
         FROM runtime_artifacts",
    )
    .fetch_one(&pool)
    .await?;

    // Leave no streams behind on a shared server.
    if let Ok(client) = bloom::bus::connect(&o.nats, "bloom-bench").await {
        let js = async_nats::jetstream::new(client);
        let names = bloom::bus::Names::new(&ns).map_err(anyhow::Error::msg)?;
        let _ = js.delete_stream(names.tasks_stream()).await;
        let _ = js.delete_stream(names.results_stream()).await;
    }

    let measured = if o.no_limits {
        Value::Null
    } else {
        eprintln!("limits again: postgres, nats, commit rate");
        limits_report(limits_before, limits(&o, &db_url).await?)
    };
    let (pg, nats, commits) = (&measured["postgres_limit"], &measured["nats_limit"], &measured["commit_rate"]);
    let lower = [pg["tasks_per_sec"].as_f64(), nats["msgs_per_sec"].as_f64()]
        .into_iter()
        .flatten()
        .fold(f64::INFINITY, f64::min);
    let sat_tps = sat["tasks_per_sec"].as_f64().unwrap_or(0.0);
    let report = json!({
        "s3": o.s3_endpoint.is_some(),
        "artifacts": {"in_s3": in_s3, "in_postgres": inline},
        "idle": idle, "fixed_rate": fixed, "low_rate": low, "saturation": sat, "concurrency_keys": keyed,
        "saturation_after_keys": sat_after, "rest_path": rest, "task_control": task_control,
        "postgres_limit": pg, "postgres_limit_keyed": measured["postgres_limit_keyed"], "nats_limit": nats,
        "commit_rate": commits,
        "ratio_to_lower_limit": if lower.is_finite() { json!(sat_tps / lower) } else { Value::Null },
        "ratio_to_commit_rate": commits["commits_per_sec"].as_f64().map(|c| sat_tps / c),
        "peak_memory_mib": memory,
    });
    print_table(&report);
    write_report(&report, o.out.as_deref())
}

/// Prints the JSON report on stdout, and writes it to `out` if given.
fn write_report(report: &Value, out: Option<&std::path::Path>) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(report)?;
    println!("{text}");
    if let Some(path) = out {
        std::fs::write(path, &text)?;
    }
    Ok(())
}

fn print_table(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    let lat = |v: &Value| format!("p50 {} / p95 {} / p99 {} ms", f(&v["p50"]), f(&v["p95"]), f(&v["p99"]));
    eprintln!("\n{:<38} value", "measure");
    eprintln!("{:<38} {}", "saturation tasks/s (submit→completed)", f(&r["saturation"]["tasks_per_sec"]));
    eprintln!("{:<38} {}", "saturation submit latency", lat(&r["saturation"]["submit_ms"]));
    eprintln!("{:<38} {}", "saturation dispatch latency", lat(&r["saturation"]["dispatch_ms"]));
    eprintln!("{:<38} {}", "saturation end-to-end latency", lat(&r["saturation"]["end_to_end_ms"]));
    if let Some(cpu) = r["saturation"]["cpu_ms_per_task"].as_object() {
        let parts: Vec<String> = cpu.iter().map(|(k, v)| format!("{k} {:.3}", v.as_f64().unwrap_or(0.0))).collect();
        eprintln!("{:<38} {}", "saturation CPU ms per task", parts.join(", "));
    }
    if !r["concurrency_keys"].is_null() {
        let k = &r["concurrency_keys"];
        let label = format!("{} keys of limit {} tasks/s", k["keys"], k["key_limit"]);
        let ratios: Vec<String> = k["rounds"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| format!("{:.2}", r["keyed"]["ratio_to_saturation"].as_f64().unwrap_or(0.0)))
            .collect();
        eprintln!(
            "{label:<38} {} (rounds' mean {:.2}× plain on either side: {}; CPU {:.2})",
            f(&k["tasks_per_sec"]),
            k["ratio_to_saturation"].as_f64().unwrap_or(0.0),
            ratios.join(", "),
            k["cpu_ratio"].as_f64().unwrap_or(0.0)
        );
        eprintln!("{:<38} {}", "saturation after the keys tasks/s", f(&r["saturation_after_keys"]["tasks_per_sec"]));
    }
    if let Some(cpu) = r["idle"]["cpu_ms_per_sec"].as_object() {
        let parts: Vec<String> = cpu.iter().map(|(k, v)| format!("{k} {:.1}", v.as_f64().unwrap_or(0.0))).collect();
        eprintln!("{:<38} {}", "idle CPU ms per second", parts.join(", "));
    }
    eprintln!("{:<38} {}", "fixed-rate offered tasks/s", f(&r["fixed_rate"]["offered_rate"]));
    if let Some(cpu) = r["fixed_rate"]["cpu_ms_per_task"].as_object() {
        let parts: Vec<String> = cpu.iter().map(|(k, v)| format!("{k} {:.3}", v.as_f64().unwrap_or(0.0))).collect();
        eprintln!("{:<38} {}", "fixed-rate CPU ms per task", parts.join(", "));
    }
    if let Some(cpu) = r["low_rate"]["cpu_ms_per_task"].as_object() {
        let parts: Vec<String> = cpu.iter().map(|(k, v)| format!("{k} {:.3}", v.as_f64().unwrap_or(0.0))).collect();
        let label = format!("{} tasks/s CPU ms per task", r["low_rate"]["offered_rate"]);
        eprintln!("{label:<38} {}", parts.join(", "));
        eprintln!("{:<38} {}", "low-rate dispatch latency", lat(&r["low_rate"]["dispatch_ms"]));
    }
    for phase in ["saturation", "fixed_rate", "low_rate"] {
        let w = &r[phase]["postgres_writes"];
        let label = format!("{} Postgres commits / WAL per task", phase.replace('_', "-"));
        eprintln!("{label:<38} {} / {} bytes", f(&w["commits_per_task"]), f(&w["wal_bytes_per_task"]));
    }
    eprintln!("{:<38} {}", "fixed-rate submit latency", lat(&r["fixed_rate"]["submit_ms"]));
    eprintln!("{:<38} {}", "fixed-rate dispatch latency", lat(&r["fixed_rate"]["dispatch_ms"]));
    eprintln!("{:<38} {}", "fixed-rate end-to-end latency", lat(&r["fixed_rate"]["end_to_end_ms"]));
    eprintln!("{:<38} {}", "seed REST path tasks/s", f(&r["rest_path"]["tasks_per_sec"]));
    let tc = &r["task_control"];
    if !tc.is_null() {
        eprintln!("{:<38} {}", "batch submit tasks/s (submit→completed)", f(&tc["batch_submit"]["tasks_per_sec"]));
        eprintln!("{:<38} {}", "batch submit: submitted tasks/s", f(&tc["batch_submit"]["submit_per_sec"]));
        eprintln!("{:<38} {}", "all priorities tasks/s", f(&tc["all_priorities"]["tasks_per_sec"]));
        let flood = &tc["priority_under_flood"];
        eprintln!("{:<38} {}", "urgent task wait under a flood", lat(&flood["urgent_dispatch_ms"]));
        eprintln!("{:<38} {}", "background task wait in the flood", lat(&flood["flood_dispatch_ms"]));
    }
    print_limits(r);
    let ratio = |key: &str| r[key].as_f64().map_or("-".to_owned(), |x| format!("{x:.2}"));
    eprintln!("{:<38} {}", "ratio to the lower limit", ratio("ratio_to_lower_limit"));
    eprintln!("{:<38} {}", "ratio to the commit rate", ratio("ratio_to_commit_rate"));
    if let Some(m) = r["peak_memory_mib"].as_object() {
        for (k, v) in m {
            eprintln!("{:<38} {} MiB", format!("peak memory {k}"), f(v));
        }
    }
}

/// The limits' lines of the table.
fn print_limits(r: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    let limit = |l: &Value, key: &str| {
        let runs = |v: &Value| {
            v.as_array().map_or("-".to_owned(), |a| a.iter().map(|r| f(&r[key])).collect::<Vec<_>>().join(", "))
        };
        format!("{} (before {}; after {})", f(&l[key]), runs(&l["before"]), runs(&l["after"]))
    };
    eprintln!("{:<38} {}", "postgres limit tasks/s", limit(&r["postgres_limit"], "tasks_per_sec"));
    if !r["postgres_limit_keyed"].is_null() {
        let keyed = &r["postgres_limit_keyed"];
        eprintln!("{:<38} {}", "postgres limit, keyed tasks/s", limit(keyed, "tasks_per_sec"));
        let ratio = |key: &str| keyed[key].as_f64().map_or("-".to_owned(), |x| format!("{x:.3}"));
        eprintln!("{:<38} {}", "postgres limit, keyed over plain", ratio("ratio_to_plain"));
        eprintln!("{:<38} {}", "postgres CPU per task, plain over keyed", ratio("postgres_cpu_ratio"));
    }
    eprintln!("{:<38} {}", "nats limit msgs/s", limit(&r["nats_limit"], "msgs_per_sec"));
    eprintln!("{:<38} {}", "single-insert commits/s", limit(&r["commit_rate"], "commits_per_sec"));
}
