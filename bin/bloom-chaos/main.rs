//! `bloom-chaos`: the fault-injection suite.
//!
//! Starts its own nats-server, PostgreSQL instance and S3 server (moto) on random
//! loopback ports (so it can stop them), the API, 3 reconcilers and 4 workers, then
//! submits tasks while a seeded random schedule SIGKILLs workers and reconcilers,
//! restarts nats-server and PostgreSQL and stops the S3 server for a while. Afterwards it
//! checks the invariants:
//!
//! * every submitted task is `completed`, or `dead` with all its attempts used, or
//!   `cancelled` (one in 25 is cancelled soon after submission: once the API confirmed
//!   it, the task stays `cancelled` and never completes);
//! * one task per submission, however often a submission was retried (each carries an
//!   idempotency key);
//! * no delayed task (one in ten, 1–2.5 s) leased before its `not_before`;
//! * exactly one `success` result per completed task, none for the others;
//! * no lease left active, no outbox row left unsent;
//! * the audit log agrees with the state (creation and completion entries);
//! * with S3 (the mixed scenario), no artifact left in Postgres once S3 is back: those
//!   an outage kept there have moved to S3 (counted as `artifacts_moved_to_s3`);
//!
//! and reports redeliveries (leases per task beyond the first), duplicate executions
//! (results that arrived after another execution took the task over), each attributed
//! to the fault that caused it (`duplicates.rs`), and the latency the runtime added to
//! each task (submission, or for a delayed task the time it was due, to stored result
//! less execution:
//! median, p99, worst, and how much the worst adds to the median).
//! `--scenario reconciler-kills` only kills reconcilers, with the default lease TTL:
//! it measures what a dead reconciler costs the tasks it held (claims and results are
//! retried within seconds, not after a lease TTL).
//! `--scenario nats-leaders` and `--scenario nats-rolling` run on a three-node NATS
//! JetStream cluster with streams of three replicas (provisioned with one, then changed
//! in place by `bloomctl nats apply`), with the default lease TTL: the first SIGKILLs the
//! server leading the tasks stream, restarts it once the others have taken over, then
//! does the same to the leader of the results stream, and so on; the second restarts
//! the three servers one after the other (SIGTERM, start, wait until caught up).
//! `--scenario limits` SIGKILLs workers and reconcilers (2 s lease TTL) while concurrency
//! limits allow one task per context and 12 of the agent at once: the active leases are
//! sampled every 20 ms and must never exceed either, and every slot must be given back;
//! a budget on the agent must have counted exactly one request per lease started.
//! Every fifth fault of the mixed scenario has Postgres refuse writes for 2 s
//! (`default_transaction_read_only`, as a primary being demoted in a failover).
//! Exit status 0 only when every invariant holds. `--seed` replays a run.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde_json::json;
use sqlx::{Connection, PgConnection};

mod duplicates;
mod nats;
use duplicates::{Fault, FaultKind};
use nats::Nats;

/// The lease TTL of the mixed scenario (short, so that tasks whose worker died are
/// retried within the run), and the runtime's default, which the other one keeps.
const MIXED_LEASE_TTL_SECS: i64 = 2;
const DEFAULT_LEASE_TTL_SECS: i64 = 300;
/// The `limits` scenario's concurrency limit of its agent (and 1 per context).
const AGENT_LIMIT: i64 = 12;

fn epoch_ms() -> i64 {
    bloom::time::now_ms()
}

/// Options.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Opts {
    /// Seed of the fault schedule (random when absent; printed for replay).
    #[arg(long)]
    seed: Option<u64>,
    /// Tasks to submit.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Submission rate, tasks/s.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// Mean interval between faults, milliseconds.
    #[arg(long, default_value_t = 1500)]
    fault_every_ms: u64,
    /// Time allowed for everything to settle after the last submission.
    #[arg(long, default_value_t = 180)]
    settle_secs: u64,
    /// Work directory, kept afterwards (by default a temporary one, removed when the run
    /// passes).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Which faults to inject: `mixed` (every kind, with a 2 s lease TTL),
    /// `reconciler-kills` (only SIGKILLs of one of the three reconcilers at a time, with
    /// the default lease TTL, to measure the latency a dead reconciler adds), or, on a
    /// three-node NATS cluster with the default lease TTL, `nats-leaders` (SIGKILL of the
    /// stream leaders in turn) and `nats-rolling` (rolling restarts); `limits` (SIGKILLs of
    /// workers and reconcilers, 2 s lease TTL, under concurrency limits: one task per
    /// context and [`AGENT_LIMIT`] of the agent at once).
    #[arg(long, value_enum, default_value_t = Scenario::Mixed)]
    scenario: Scenario,
    /// Fail when the worst latency the runtime added to a task (submission to stored
    /// result, less execution) exceeds the median by more than this (milliseconds);
    /// reported either way.
    #[arg(long)]
    max_added_latency_ms: Option<u64>,
    /// Lease TTL of the runtime under test, seconds (mixed: 2, short so that the tasks of
    /// killed workers are retried within the run; reconciler-kills: the default, 300).
    #[arg(long)]
    lease_ttl_secs: Option<i64>,
}

/// A fault schedule.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    Mixed,
    ReconcilerKills,
    NatsLeaders,
    NatsRolling,
    Limits,
}

impl Scenario {
    fn clustered(self) -> bool {
        matches!(self, Scenario::NatsLeaders | Scenario::NatsRolling)
    }
}

/// One step of a fault schedule.
enum Step {
    KillWorker,
    KillReconciler,
    /// Kill and restart the single nats-server.
    RestartNats,
    /// SIGKILL the cluster server leading this stream; restart it after 3 s.
    KillStreamLeader(String),
    /// SIGTERM and restart cluster server `i`.
    RestartNatsServer(usize),
    RestartPostgres,
    PostgresReadOnly,
    StopS3,
}

/// Servers in the NATS cluster of the clustered scenarios, and the streams' replicas there.
const CLUSTER_SIZE: usize = 3;

/// Ports handed to the servers a run starts are taken below Linux's ephemeral range
/// (32768–60999 by default): a port the kernel picks for `bind(0)` is released before
/// the server binds it, and meanwhile any outgoing connection on the machine may take
/// it as its source port. Each port is handed out once per run.
const SERVER_PORTS: std::ops::Range<u16> = 20_000..32_000;

fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().expect("port list");
    let span = u32::from(SERVER_PORTS.end - SERVER_PORTS.start);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let start = std::process::id().wrapping_mul(7919).wrapping_add(nanos) % span;
    (0..span)
        .map(|i| SERVER_PORTS.start + ((start + i) % span) as u16)
        .find(|p| !handed_out.contains(p) && TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .inspect(|p| handed_out.push(*p))
        .expect("a free port below the ephemeral range")
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.parent().context("binary dir")?.join(name);
    if !p.exists() {
        bail!("{} not found: build all binaries first", p.display());
    }
    Ok(p)
}

fn pg_bin(name: &str) -> anyhow::Result<PathBuf> {
    let mut versions: Vec<PathBuf> =
        std::fs::read_dir("/usr/lib/postgresql")?.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).collect();
    versions.sort();
    versions.into_iter().rev().map(|b| b.join(name)).find(|p| p.exists()).context("PostgreSQL binaries not found")
}

/// Runs a command as the `postgres` user (initdb and postgres refuse to run as root).
fn as_postgres(program: &Path, args: &[&str]) -> Command {
    let running_as_root = unsafe { libc::geteuid() } == 0;
    if running_as_root {
        let mut c = Command::new("runuser");
        c.arg("-u").arg("postgres").arg("--").arg(program).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        c
    }
}

/// A restartable child process.
struct Service {
    name: String,
    cmd: Box<dyn Fn() -> Command>,
    child: Option<Child>,
    log: PathBuf,
}

impl Service {
    fn new(name: &str, dir: &Path, cmd: impl Fn() -> Command + 'static) -> Service {
        Service { name: name.into(), cmd: Box::new(cmd), child: None, log: dir.join(format!("{name}.log")) }
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = (self.cmd)();
        cmd.stdout(log.try_clone()?).stderr(log).stdin(Stdio::null());
        self.child = Some(cmd.spawn().with_context(|| format!("starting {}", self.name))?);
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within 10 s.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last lines the process wrote, for an error saying why it did not come up.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// xorshift64*: a tiny seeded generator, so a run replays exactly from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn wait_port(port: u16, what: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not listen on {port}")
}

struct Postgres {
    data: PathBuf,
    port: u16,
    pg_ctl: PathBuf,
    log: PathBuf,
}

impl Postgres {
    fn init(dir: &Path) -> anyhow::Result<Postgres> {
        let data = dir.join("pgdata");
        std::fs::create_dir_all(&data)?;
        let _ = Command::new("chown").arg("-R").arg("postgres:postgres").arg(dir).status();
        let status = as_postgres(&pg_bin("initdb")?, &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres"])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("initdb failed");
        }
        let pg = Postgres { data, port: free_port(), pg_ctl: pg_bin("pg_ctl")?, log: dir.join("postgres.log") };
        pg.start()?;
        Ok(pg)
    }

    fn start(&self) -> anyhow::Result<()> {
        let opts = format!("-p {} -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200", self.port);
        let status = as_postgres(
            &self.pg_ctl,
            &["-D", self.data.to_str().unwrap(), "-l", self.log.to_str().unwrap(), "-o", &opts, "-w", "start"],
        )
        .stdout(Stdio::null())
        .status()?;
        if !status.success() {
            bail!("pg_ctl start failed");
        }
        Ok(())
    }

    /// Crash-like stop: immediate shutdown (no checkpoint), as a killed server.
    fn crash(&self) {
        let _ = as_postgres(&self.pg_ctl, &["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .status();
    }

    fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Makes every session's new transactions read-only (`on`) or writable again, as
    /// when the server behind the address is a demoted primary and then the new one.
    async fn set_read_only(&self, on: bool) -> anyhow::Result<()> {
        let mut c = PgConnection::connect(&self.url("postgres")).await?;
        sqlx::query("SET default_transaction_read_only = off").execute(&mut c).await?;
        let set = if on {
            "ALTER SYSTEM SET default_transaction_read_only = on"
        } else {
            "ALTER SYSTEM RESET default_transaction_read_only"
        };
        sqlx::query(set).execute(&mut c).await?;
        sqlx::query("SELECT pg_reload_conf()").execute(&mut c).await?;
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.crash();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let seed = o.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    eprintln!("bloom-chaos seed {seed} (replay with --seed {seed})");
    // xorshift needs a non-zero state.
    let mut rng = Rng(seed | 1);
    let tmp = o.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("bloom-chaos-{seed}")));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;

    // Infrastructure on private ports.
    let pg = Postgres::init(&tmp)?;
    {
        let mut c = PgConnection::connect(&pg.url("postgres")).await?;
        sqlx::query("CREATE DATABASE bloom").execute(&mut c).await?;
    }
    let db_url = pg.url("bloom");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let mut nats = if o.scenario.clustered() { Nats::cluster(&tmp, CLUSTER_SIZE)? } else { Nats::single(&tmp) };
    nats.start_all()?;
    nats.wait_all_healthy(&http, Duration::from_secs(30)).await?;
    let names = bloom::bus::Names::new("chaos").map_err(anyhow::Error::msg)?;
    let js = bloom::bus::jetstream(bloom::bus::connect(&nats.url(), "bloom-chaos").await?, Duration::from_secs(5));
    let replicas = if o.scenario.clustered() {
        // Streams made with one replica, then changed in place to three.
        for n in [1, CLUSTER_SIZE] {
            let status = Command::new(bin("bloomctl")?)
                .args(["nats", "apply"])
                .envs([("NATS_URL", nats.url()), ("BLOOM_NATS_NAMESPACE", "chaos".into())])
                .env("BLOOM_NATS_REPLICAS", n.to_string())
                .status()?;
            let have = nats::stream_replicas(&js, &names.tasks_stream()).await?;
            if !status.success() || have != n {
                bail!("bloomctl nats apply with {n} replica(s) left the tasks stream with {have}");
            }
        }
        nats.wait_all_healthy(&http, Duration::from_secs(60)).await?;
        CLUSTER_SIZE
    } else {
        1
    };
    let s3_port = free_port();
    let mut s3 = Service::new("moto", &tmp, move || {
        let mut c = Command::new("moto_server");
        c.args(["-H", "127.0.0.1", "-p", &s3_port.to_string()]);
        c
    });
    s3.start()?;
    wait_port(s3_port, "moto", Duration::from_secs(30))?;

    let status = Command::new(bin("bloomctl")?).arg("migrate").env("DATABASE_URL", &db_url).status()?;
    if !status.success() {
        bail!("migrations failed");
    }

    let api_port = free_port();
    let env: Vec<(String, String)> = vec![
        ("DATABASE_URL".into(), db_url.clone()),
        ("NATS_URL".into(), nats.url()),
        ("BLOOM_NATS_REPLICAS".into(), replicas.to_string()),
        ("BLOOM_NATS_NAMESPACE".into(), "chaos".into()),
        ("BLOOM_RATE_LIMIT_PER_MIN".into(), "0".into()),
        ("BLOOM_RUNTIME_HOST".into(), "127.0.0.1".into()),
        ("BLOOM_RUNTIME_PORT".into(), api_port.to_string()),
        ("BLOOM_EXPIRY_GRACE_MS".into(), "500".into()),
        ("BLOOM_SWEEP_INTERVAL_MS".into(), "250".into()),
        ("BLOOM_RELAY_MIN_AGE_MS".into(), "1000".into()),
        // A worker silent this long loses its leases: five beats missed, not one.
        ("BLOOM_WORKER_TIMEOUT_MS".into(), "5000".into()),
        ("BLOOM_WORKER_BEAT_INTERVAL_MS".into(), "1000".into()),
        ("BLOOM_RECONCILER_HTTP_PORT".into(), "0".into()),
        ("BLOOM_WORKER_HTTP_PORT".into(), "0".into()),
        ("BLOOM_EXECUTOR".into(), "builtin".into()),
        ("BLOOM_WORKER_MAX_CONCURRENCY".into(), "8".into()),
        ("BLOOM_WORKER_SHUTDOWN_GRACE_SECS".into(), "1".into()),
        ("RUST_LOG".into(), "warn".into()),
    ];
    let mut env = env;
    let lease_ttl_secs = o.lease_ttl_secs.unwrap_or(match o.scenario {
        Scenario::Mixed | Scenario::Limits => MIXED_LEASE_TTL_SECS,
        Scenario::ReconcilerKills | Scenario::NatsLeaders | Scenario::NatsRolling => DEFAULT_LEASE_TTL_SECS,
    });
    env.push(("BLOOM_LEASE_TTL_SECS".into(), lease_ttl_secs.to_string()));
    if o.scenario == Scenario::Limits {
        env.push(("BLOOM_CONCURRENCY_LIMITS".into(), format!("context_id:*=1,agent_slug:chaos={AGENT_LIMIT}")));
        // A budget that never holds anything back: each lease reserves one request on it,
        // which must match the leases started, however processes die.
        env.push(("BLOOM_BUDGETS".into(), "agent_slug:chaos:requests-per-day=1000000000".into()));
    }
    if o.scenario == Scenario::Mixed {
        // Artifacts go to S3, which has outages of its own. The reconciler-kill scenario
        // keeps them in Postgres: the S3 test server's throughput would be what it measures.
        env.extend([
            ("BLOOM_S3_ENDPOINT".into(), format!("http://127.0.0.1:{s3_port}")),
            ("BLOOM_S3_BUCKET".into(), "chaos-artifacts".into()),
            ("BLOOM_S3_TIMEOUT_MS".into(), "2000".into()),
            ("AWS_ACCESS_KEY_ID".into(), "test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ]);
    }
    let service = |name: &str, binary: &str, extra: Vec<(String, String)>| -> anyhow::Result<Service> {
        let path = bin(binary)?;
        let env = env.clone();
        Ok(Service::new(name, &tmp, move || {
            let mut c = Command::new(&path);
            c.envs(env.iter().cloned()).envs(extra.iter().cloned());
            c
        }))
    };
    let mut api = service("api", "bloom-api", vec![])?;
    api.start()?;
    let mut reconcilers: Vec<Service> =
        (0..3).map(|i| service(&format!("reconciler-{i}"), "bloom-reconciler", vec![])).collect::<Result<_, _>>()?;
    let mut workers: Vec<Service> = (0..4)
        .map(|i| {
            service(&format!("worker-{i}"), "bloom-worker", vec![("BLOOM_WORKER_ID".into(), format!("chaos-{i}"))])
        })
        .collect::<Result<_, _>>()?;
    for s in reconcilers.iter_mut().chain(workers.iter_mut()) {
        s.start()?;
    }
    wait_port(api_port, "bloom-api", Duration::from_secs(30))?;
    let sampler = (o.scenario == Scenario::Limits).then(|| LeaseSampler::spawn(db_url.clone()));

    // Submit while faults happen.
    let base = format!("http://127.0.0.1:{api_port}");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<anyhow::Result<Option<String>>>();
    let submitter = {
        let (http, base, tasks, rate) = (http.clone(), base.clone(), o.tasks, o.rate);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
            for i in 0..tasks {
                tick.tick().await;
                let (http, base, tx) = (http.clone(), base.clone(), tx.clone());
                tokio::spawn(async move {
                    // Prompts vary the work: mostly quick, some slower, so kills catch tasks mid-run.
                    let prompt =
                        if i % 5 == 0 { format!("sleep:{}", 300 + (i % 7) * 100) } else { format!("chaos {i}") };
                    let mut body = json!({"context_id": format!("c{}", i % 50), "agent_slug": "chaos", "prompt": prompt,
                                          "max_attempts": 10, "priority": (i % 3) as i64 - 1});
                    // Some delayed (they must never start early), some cancelled soon after
                    // submission (they must never complete).
                    if i % 10 == 3 {
                        body["delay_ms"] = json!(1000 + (i % 4) * 500);
                    }
                    let cancel_after = (i % 25 == 7).then(|| Duration::from_millis((i as u64 % 8) * 100));
                    // Retry until accepted: the API answers 5xx while Postgres is down. The
                    // idempotency key makes a retry of a submission whose answer was lost
                    // return the task it created instead of a second one.
                    let deadline = Instant::now() + Duration::from_secs(120);
                    loop {
                        let r = http
                            .post(format!("{base}/api/runtime/llm-tasks"))
                            .header("Idempotency-Key", format!("chaos-{i}"))
                            .json(&body)
                            .send()
                            .await;
                        if let Ok(r) = r.and_then(|r| r.error_for_status()) {
                            let mut cancelled = None;
                            if let Some(after) = cancel_after {
                                let task: serde_json::Value = r.json().await.unwrap_or_default();
                                if let Some(id) = task["id"].as_str() {
                                    if cancel(&http, &base, id, after).await {
                                        cancelled = Some(id.to_owned());
                                    }
                                }
                            }
                            let _ = tx.send(Ok(cancelled));
                            return;
                        }
                        if Instant::now() > deadline {
                            let _ = tx.send(Err(anyhow::anyhow!("task {i} was never accepted")));
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
            }
        })
    };

    let mut faults = serde_json::Map::new();
    let mut count = |k: &str| {
        let n = faults.get(k).and_then(|v| v.as_u64()).unwrap_or(0) + 1;
        faults.insert(k.into(), json!(n));
    };
    let mut s3_down_until: Option<Instant> = None;
    let mut fault_log: Vec<Fault> = Vec::new();
    let started = Instant::now();
    let started_ms = epoch_ms();
    let mut steps = 0;
    while !submitter.is_finished() {
        tokio::time::sleep(Duration::from_millis(o.fault_every_ms / 2 + rng.below(o.fault_every_ms))).await;
        if let Some(t) = s3_down_until {
            if Instant::now() > t {
                s3.start()?;
                s3_down_until = None;
            }
        }
        // Restart whatever a previous fault killed.
        for s in reconcilers.iter_mut().chain(workers.iter_mut()) {
            if !s.running() {
                s.start()?;
            }
        }
        let fault = match o.scenario {
            // Every fifth step a read-only phase, so that each run has some.
            Scenario::Mixed if steps % 5 == 4 => Step::PostgresReadOnly,
            Scenario::Mixed => match rng.below(10) {
                0..=3 => Step::KillWorker,
                4..=6 => Step::KillReconciler,
                7 => Step::RestartNats,
                8 => Step::RestartPostgres,
                _ => Step::StopS3,
            },
            Scenario::ReconcilerKills => Step::KillReconciler,
            Scenario::NatsLeaders if steps % 2 == 0 => Step::KillStreamLeader(names.tasks_stream()),
            Scenario::NatsLeaders => Step::KillStreamLeader(names.results_stream()),
            Scenario::NatsRolling => Step::RestartNatsServer(steps % CLUSTER_SIZE),
            Scenario::Limits if rng.below(2) == 0 => Step::KillWorker,
            Scenario::Limits => Step::KillReconciler,
        };
        steps += 1;
        let at = started.elapsed().as_secs_f64();
        match fault {
            Step::KillWorker => {
                let i = rng.below(workers.len() as u64) as usize;
                eprintln!("[{at:>5.1}s] SIGKILL {}", workers[i].name);
                workers[i].kill();
                fault_log.push(Fault { at_ms: epoch_ms(), kind: FaultKind::WorkerKill(format!("chaos-{i}")) });
                count("worker_kills");
            }
            Step::KillReconciler => {
                let i = rng.below(reconcilers.len() as u64) as usize;
                eprintln!("[{at:>5.1}s] SIGKILL {}", reconcilers[i].name);
                reconcilers[i].kill();
                fault_log.push(Fault { at_ms: epoch_ms(), kind: FaultKind::ReconcilerKill });
                count("reconciler_kills");
            }
            Step::RestartNats => {
                eprintln!("[{at:>5.1}s] restart nats-server");
                nats.servers[0].kill();
                fault_log.push(Fault { at_ms: epoch_ms(), kind: FaultKind::NatsRestart });
                tokio::time::sleep(Duration::from_millis(500)).await;
                nats.start_all()?;
                count("nats_restarts");
            }
            Step::KillStreamLeader(stream) => match nats::stream_leader(&js, &stream).await {
                Ok(i) => {
                    eprintln!("[{at:>5.1}s] SIGKILL {} (leader of {stream}); restart in 3 s", nats.servers[i].name);
                    nats.servers[i].kill();
                    fault_log.push(Fault { at_ms: epoch_ms(), kind: FaultKind::NatsServerDown });
                    count("nats_leader_kills");
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    nats.servers[i].start()?;
                    nats.wait_healthy(i, &http, Duration::from_secs(60)).await?;
                    eprintln!("[{:>5.1}s] {} back and current", started.elapsed().as_secs_f64(), nats.servers[i].name);
                }
                Err(e) => eprintln!("[{at:>5.1}s] no leader of {stream} found ({e:#}); skipped"),
            },
            Step::RestartNatsServer(i) => {
                eprintln!("[{at:>5.1}s] rolling restart: SIGTERM {}", nats.servers[i].name);
                nats.servers[i].stop();
                fault_log.push(Fault { at_ms: epoch_ms(), kind: FaultKind::NatsServerDown });
                count("nats_server_restarts");
                nats.servers[i].start()?;
                nats.wait_healthy(i, &http, Duration::from_secs(60)).await?;
                eprintln!("[{:>5.1}s] {} back and current", started.elapsed().as_secs_f64(), nats.servers[i].name);
            }
            Step::RestartPostgres => {
                eprintln!("[{at:>5.1}s] crash and restart postgres");
                pg.crash();
                fault_log.push(Fault { at_ms: epoch_ms(), kind: FaultKind::PostgresRestart });
                tokio::time::sleep(Duration::from_millis(500)).await;
                pg.start()?;
                count("postgres_restarts");
            }
            Step::PostgresReadOnly => {
                eprintln!("[{at:>5.1}s] postgres refuses writes for 2 s");
                pg.set_read_only(true).await?;
                fault_log.push(Fault { at_ms: epoch_ms(), kind: FaultKind::PostgresReadOnly });
                tokio::time::sleep(Duration::from_secs(2)).await;
                pg.set_read_only(false).await?;
                count("postgres_read_only_phases");
            }
            Step::StopS3 => {
                if s3_down_until.is_none() {
                    eprintln!("[{at:>5.1}s] stop S3 for 3 s");
                    s3.kill();
                    fault_log.push(Fault { at_ms: epoch_ms(), kind: FaultKind::S3Outage });
                    s3_down_until = Some(Instant::now() + Duration::from_secs(3));
                    count("s3_outages");
                }
            }
        }
    }
    if s3_down_until.is_some() {
        s3.start()?;
    }
    for s in reconcilers.iter_mut().chain(workers.iter_mut()) {
        if !s.running() {
            s.start()?;
        }
    }
    drop(submitter);
    let mut accepted = 0;
    let mut cancelled_ids: Vec<String> = Vec::new();
    while accepted < o.tasks {
        match tokio::time::timeout(Duration::from_secs(150), rx.recv()).await {
            Ok(Some(Ok(cancelled))) => {
                accepted += 1;
                cancelled_ids.extend(cancelled);
            }
            Ok(Some(Err(e))) => return Err(e),
            _ => bail!("submissions did not finish"),
        }
    }
    eprintln!("all {accepted} submissions accepted after {:.1}s; settling", started.elapsed().as_secs_f64());

    // Settle: every task final, outbox drained, and with S3 (up again by now) every
    // artifact an outage left in Postgres moved to S3.
    let with_s3 = o.scenario == Scenario::Mixed;
    let pool = bloom::db::connect(&db_url, &bloom::db::PoolOptions::default()).await?;
    let deadline = Instant::now() + Duration::from_secs(o.settle_secs);
    loop {
        let (open, outbox, inline): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM llm_tasks WHERE status NOT IN ('completed', 'dead', 'cancelled')),
                    (SELECT count(*) FROM outbox),
                    (SELECT count(*) FROM runtime_artifacts WHERE url IS NULL AND content IS NOT NULL)",
        )
        .fetch_one(&pool)
        .await?;
        if open == 0 && outbox == 0 && (!with_s3 || inline == 0) {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("not settled: {open} open tasks, {outbox} outbox rows, {inline} artifacts in Postgres");
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Invariants.
    let q = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await }
    };
    let inline_artifacts =
        q("SELECT count(*) FROM runtime_artifacts WHERE url IS NULL AND content IS NOT NULL").await?;
    let mut checks: Vec<(&str, i64)> = vec![
        ("tasks not completed, dead nor cancelled", q("SELECT count(*) FROM llm_tasks WHERE status NOT IN ('completed', 'dead', 'cancelled')").await?),
        ("tasks stored beyond those submitted (a retried submission created another)", (submitted_count(&pool).await? - o.tasks as i64).max(0)),
        ("delayed tasks leased before their not_before", q("SELECT count(*) FROM leases l JOIN llm_tasks t ON t.id = l.task_id WHERE t.not_before IS NOT NULL AND l.started_at < t.not_before").await?),
        ("cancelled tasks that did not stay cancelled", cancelled_not_kept(&pool, &cancelled_ids).await?),
        ("dead tasks with attempts left", q("SELECT count(*) FROM llm_tasks WHERE status = 'dead' AND attempts < max_attempts").await?),
        ("completed tasks without exactly one success", q("SELECT count(*) FROM llm_tasks t WHERE status = 'completed' AND (SELECT count(*) FROM llm_results r WHERE r.task_id = t.id AND r.status = 'success') <> 1").await?),
        ("success results of tasks not completed", q("SELECT count(*) FROM llm_results r JOIN llm_tasks t ON t.id = r.task_id WHERE r.status = 'success' AND t.status <> 'completed'").await?),
        ("active leases left", q("SELECT count(*) FROM leases WHERE status = 'active'").await?),
        ("outbox rows left", q("SELECT count(*) FROM outbox").await?),
        ("tasks without a creation audit entry", q("SELECT count(*) FROM llm_tasks t WHERE NOT EXISTS (SELECT 1 FROM audit_logs a WHERE a.entity_id = t.id AND a.action = 'task_created')").await?),
        ("completed tasks without a completion audit entry", q("SELECT count(*) FROM llm_tasks t WHERE status = 'completed' AND NOT EXISTS (SELECT 1 FROM audit_logs a WHERE a.entity_id = t.id AND a.action = 'task_completed')").await?),
        ("leases per task above attempts", q("SELECT count(*) FROM llm_tasks t WHERE (SELECT count(*) FROM leases l WHERE l.task_id = t.id) < t.attempts").await?),
    ];
    if with_s3 {
        checks.push(("artifacts left in Postgres while S3 is up", inline_artifacts));
    }
    let limits = match sampler {
        Some(sampler) => {
            let seen = sampler.stop().await;
            checks.push((
                "active leases of one context above its limit of 1 (sampled)",
                (seen.most_per_context - 1).max(0),
            ));
            checks
                .push(("active leases of the agent above its limit (sampled)", (seen.most_total - AGENT_LIMIT).max(0)));
            checks.push((
                "concurrency slots not given back",
                q("SELECT count(*) FROM concurrency_slot_counts WHERE running <> 0").await?,
            ));
            checks.push((
                "requests counted by the budget other than the leases started",
                q("SELECT COALESCE(sum(abs(c.used::bigint - (SELECT count(*) FROM leases l JOIN llm_tasks t ON t.id = l.task_id
                                                           WHERE t.agent_slug = 'chaos' AND l.started_at >= c.window_start))), 0)::bigint
                   FROM budget_counters c WHERE c.counter = 'agent_slug:chaos:requests/day'")
                .await?,
            ));
            json!({"samples": seen.samples, "most_active_per_context": seen.most_per_context,
                   "most_active_of_agent": seen.most_total, "agent_limit": AGENT_LIMIT,
                   "set_aside": q("SELECT count(*) FROM audit_logs WHERE action = 'task_deferred'").await?})
        }
        None => json!(null),
    };
    let submitted = q("SELECT count(*) FROM llm_tasks").await?;
    // Latency the runtime added to each completed task: submission (or, delayed, the time
    // it was due) to stored result, less the task's own execution time, in ms.
    let latency: (Option<f64>, Option<f64>, Option<i64>) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d), percentile_cont(0.99) WITHIN GROUP (ORDER BY d), max(d)
         FROM (SELECT r.completed_at - GREATEST(t.created_at, COALESCE(t.not_before, 0))
                      - COALESCE((r.metrics->>'duration_ms')::bigint, 0) AS d
               FROM llm_results r JOIN llm_tasks t ON t.id = r.task_id
               WHERE r.status = 'success') x",
    )
    .fetch_one(&pool)
    .await?;
    // Where the slowest tasks spent their time, against the faults around them, so that
    // a run over the latency limit explains itself.
    let slowest: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT t.id, t.created_at, COALESCE(min(l.started_at), 0), COALESCE(max(l.started_at), 0), r.completed_at
         FROM llm_results r JOIN llm_tasks t ON t.id = r.task_id LEFT JOIN leases l ON l.task_id = t.id
         WHERE r.status = 'success'
         GROUP BY t.id, t.created_at, t.not_before, r.completed_at, r.metrics
         ORDER BY r.completed_at - GREATEST(t.created_at, COALESCE(t.not_before, 0))
                  - COALESCE((r.metrics->>'duration_ms')::bigint, 0) DESC LIMIT 3",
    )
    .fetch_all(&pool)
    .await?;
    let rel = |ms: i64| if ms == 0 { json!(null) } else { json!(ms - started_ms) };
    let slowest: Vec<_> = slowest
        .iter()
        .map(|(id, created, first_lease, last_lease, done)| {
            json!({"task_id": id, "created_ms": rel(*created), "first_lease_ms": rel(*first_lease),
                   "last_lease_ms": rel(*last_lease), "completed_ms": rel(*done),
                   "faults_ms": fault_log.iter().filter(|f| f.at_ms >= created - 5_000 && f.at_ms <= *done)
                       .map(|f| json!({"at_ms": f.at_ms - started_ms, "fault": format!("{:?}", f.kind)})).collect::<Vec<_>>()})
        })
        .collect();
    let lease_ttl_ms = 1000 * lease_ttl_secs;
    let (p50, p99, worst) = (latency.0.unwrap_or(0.0), latency.1.unwrap_or(0.0), latency.2.unwrap_or(0));
    let added = (worst as f64 - p50).max(0.0) as u64;
    let report = json!({
        "seed": seed,
        "tasks_accepted": accepted,
        "tasks_stored": submitted,
        "completed": q("SELECT count(*) FROM llm_tasks WHERE status = 'completed'").await?,
        "cancelled": cancelled_ids.len(),
        "delayed": q("SELECT count(*) FROM llm_tasks WHERE not_before IS NOT NULL").await?,
        "dead": q("SELECT count(*) FROM llm_tasks WHERE status = 'dead'").await?,
        "redeliveries": q("SELECT COALESCE(sum(n - 1), 0)::bigint FROM (SELECT count(*) AS n FROM leases GROUP BY task_id) x").await?,
        "duplicate_executions": duplicates::attribute(&pool, &fault_log, lease_ttl_ms).await?,
        "leases_expired": q("SELECT count(*) FROM leases WHERE status = 'expired'").await?,
        "artifacts_in_s3": q("SELECT count(*) FROM runtime_artifacts WHERE url IS NOT NULL").await?,
        "artifacts_in_postgres": inline_artifacts,
        "artifacts_moved_to_s3": q("SELECT count(*) FROM audit_logs WHERE action = 'artifact_moved'").await?,
        "faults": faults,
        "overhead_ms": {"p50": p50, "p99": p99, "max": worst},
        "worst_added_latency_ms": added,
        "slowest_tasks": slowest,
        "concurrency_limits": limits,
        "violations": checks.iter().filter(|(_, n)| *n != 0).map(|(k, n)| json!({k.to_string(): n})).collect::<Vec<_>>(),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(limit) = o.max_added_latency_ms {
        checks.push(("tasks delayed beyond the added-latency limit", i64::from(added > limit)));
    }
    let failed: Vec<_> = checks.iter().filter(|(_, n)| *n != 0).collect();
    let passed = checks.len() - failed.len();
    println!("chaos: {passed} passed, {} failed", failed.len());
    let ok = failed.is_empty() && (submitted as usize) >= accepted;
    for (what, n) in failed {
        eprintln!("VIOLATION: {what}: {n}");
    }
    // Every process it started stops, whatever the verdict.
    drop(workers);
    drop(reconcilers);
    drop(api);
    drop(pool);
    drop(pg);
    drop(nats);
    drop(s3);
    if !ok {
        eprintln!("logs in {}", tmp.display());
        std::process::exit(1);
    }
    if o.dir.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(())
}

/// Cancels task `id` `after` its submission, retrying while the API is unavailable;
/// true when the API confirmed the cancellation (a task that finished first answers 409).
async fn cancel(http: &reqwest::Client, base: &str, id: &str, after: Duration) -> bool {
    tokio::time::sleep(after).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match http.post(format!("{base}/api/runtime/llm-tasks/{id}/cancel")).send().await {
            Ok(r) if r.status().as_u16() == 200 => return true,
            Ok(r) if r.status().as_u16() == 409 => return false,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    false
}

async fn submitted_count(pool: &sqlx::PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM llm_tasks").fetch_one(pool).await
}

/// Of the tasks whose cancellation the API confirmed, those not `cancelled` now (a
/// cancelled task must never complete, nor be run again).
async fn cancelled_not_kept(pool: &sqlx::PgPool, ids: &[String]) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM llm_tasks WHERE id = ANY($1) AND status <> 'cancelled'")
        .bind(ids)
        .fetch_one(pool)
        .await
}

/// What [`LeaseSampler`] saw.
#[derive(Debug, Default)]
struct Sampled {
    samples: u64,
    most_per_context: i64,
    most_total: i64,
}

/// Samples the active leases every 20 ms while the `limits` scenario runs: the most of
/// one context, and the most in all (one agent), seen at once.
struct LeaseSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Sampled>,
}

impl LeaseSampler {
    fn spawn(db_url: String) -> LeaseSampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut seen = Sampled::default();
            let mut conn: Option<PgConnection> = None;
            while stopped.try_recv().is_err() {
                if conn.is_none() {
                    conn = PgConnection::connect(&db_url).await.ok();
                }
                if let Some(c) = conn.as_mut() {
                    let row: Result<(i64, i64), _> = sqlx::query_as(
                        "SELECT COALESCE(max(n), 0)::bigint, COALESCE(sum(n), 0)::bigint
                         FROM (SELECT count(*) AS n FROM leases WHERE status = 'active' GROUP BY context_id) x",
                    )
                    .fetch_one(&mut *c)
                    .await;
                    match row {
                        Ok((per_context, total)) => {
                            seen.samples += 1;
                            seen.most_per_context = seen.most_per_context.max(per_context);
                            seen.most_total = seen.most_total.max(total);
                        }
                        Err(_) => conn = None,
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        });
        LeaseSampler { stop, task }
    }

    async fn stop(self) -> Sampled {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}
