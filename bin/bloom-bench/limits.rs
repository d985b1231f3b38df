//! The machine's limits for the work of a task's life: Postgres and NATS measured
//! directly, without the runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};

use crate::procs::{cpu_ms_per_task, cpu_ticks};

/// The writes of a task's life, executed directly with the runtime's own statements
/// (`db::lifecycle`), batched as the runtime batches them: create (task, outbox row,
/// audit), the outbox delete after the publish (asynchronous commit, as the dispatcher
/// does), claim (task, lease, audit) and complete (task, lease, artifact, result,
/// audit). Each connection claims for a worker of its own, registered first.
///
/// With `keys`, the tasks take turns over that many concurrency keys, under a limit of
/// the `concurrency_key` scope that no key reaches (set for the run only): every claim
/// admits its tasks through their slots (each slot locked and its active leases
/// counted at the claim, its waiting tasks probed at the completion) and none waits, so
/// the rate against a plain run's is what the slots' bookkeeping costs Postgres.
pub async fn postgres_limit(
    url: &str,
    tasks: u64,
    connections: usize,
    batch: usize,
    keys: Option<u64>,
) -> anyhow::Result<Value> {
    use bloom::db::lifecycle::{self, Claim, ClaimOutcome, Completion};
    use bloom::db::{concurrency, outbox, workers};
    use bloom::domain::concurrency::MAX_RUNNING_LIMIT;
    use bloom::domain::{
        ArtifactBody, ArtifactId, Capabilities, ConcurrencyLimit, ConcurrencyScope, Metrics, NewTask, Outcome,
        WorkerId, WorkerStatus, ANY_KEY,
    };

    let pool = bloom::db::connect(
        url,
        &bloom::db::PoolOptions { max_connections: connections as u32 * 2, ..Default::default() },
    )
    .await?;
    sqlx::query(
        "TRUNCATE llm_tasks, leases, outbox, audit_logs, runtime_artifacts, llm_results, workers, concurrency_slots",
    )
    .execute(&pool)
    .await?;
    let unreached = ConcurrencyLimit::new(ConcurrencyScope::ConcurrencyKey, ANY_KEY, MAX_RUNNING_LIMIT.into())
        .map_err(anyhow::Error::msg)?;
    if keys.is_some() {
        concurrency::set(&pool, &unreached, false, bloom::time::now_ms()).await?;
    }
    let beats: Vec<workers::Beat> = (0..connections)
        .map(|i| workers::Beat {
            id: WorkerId::from(format!("bench-limit-{i}")),
            status: WorkerStatus::Online,
            capabilities: Capabilities { max_concurrency: batch as i32, ..Capabilities::default() },
            ip_addrs: Vec::new(),
        })
        .collect();
    workers::record_beats(&pool, &beats, bloom::time::now_ms()).await?;
    let next = Arc::new(AtomicU64::new(0));
    let ticks = cpu_ticks();
    let started = Instant::now();
    let mut loops = Vec::new();
    for beat in beats {
        let (pool, next, worker) = (pool.clone(), next.clone(), beat.id);
        loops.push(tokio::spawn(async move {
            let mut async_commit = bloom::db::async_commit_connection(&pool).await?;
            loop {
                let start = next.fetch_add(batch as u64, Ordering::Relaxed);
                if start >= tasks {
                    return anyhow::Ok(());
                }
                let n = (tasks - start).min(batch as u64) as usize;
                let now = bloom::time::now_ms();
                let new = (start..start + n as u64)
                    .map(|i| NewTask {
                        concurrency_key: keys.map(|k| format!("k{}", i % k)),
                        ..NewTask::new("ctx", "limit", "noop")
                    })
                    .collect();
                let dispatches: Vec<_> =
                    lifecycle::create(&mut *pool.acquire().await?, new, "bench", now, lifecycle::KeyRules::default())
                        .await?
                        .into_iter()
                        .filter_map(lifecycle::Submitted::into_dispatch)
                        .collect();
                let sent: Vec<i64> = dispatches.iter().map(|d| d.outbox_id).collect();
                outbox::delete(&mut async_commit, &sent).await?;
                let claims: Vec<Claim> = dispatches
                    .iter()
                    .map(|d| Claim {
                        task_id: d.task.id.clone(),
                        dispatch_seq: d.task.dispatch_seq,
                        worker_id: worker.clone(),
                        ttl_seconds: 300,
                    })
                    .collect();
                let completions: Vec<Completion> = lifecycle::claim(&pool, &claims, now)
                    .await?
                    .into_iter()
                    .filter_map(|outcome| match outcome {
                        ClaimOutcome::Granted(lease) => Some(Completion {
                            task_id: lease.task_id,
                            lease_id: lease.id,
                            outcome: Outcome::success("noop".into(), Metrics::default()),
                            artifact_type: "LLM_RESULT".into(),
                            artifact_tags: Vec::new(),
                            artifact_id: ArtifactId::generate(),
                            artifact: ArtifactBody::Inline,
                        }),
                        _ => None,
                    })
                    .collect();
                anyhow::ensure!(completions.len() == n, "{} of {n} claims granted", completions.len());
                lifecycle::complete(&pool, &completions, now).await?;
            }
        }));
    }
    for l in loops {
        l.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_ms_per_task(&ticks, &cpu_ticks(), &[], tasks);
    // Its workers must not pass for the runtime's, nor its limit for the runtime's.
    sqlx::query("DELETE FROM workers WHERE id LIKE 'bench-limit-%'").execute(&pool).await?;
    if keys.is_some() {
        concurrency::remove(&pool, unreached.scope, &unreached.key).await?;
    }
    Ok(json!({"tasks": tasks, "connections": connections, "batch": batch, "keys": keys, "seconds": secs,
              "tasks_per_sec": tasks as f64 / secs, "cpu_ms_per_task": cpu}))
}

/// The single-insert commit rate of this Postgres: one-row INSERTs of a task-sized row,
/// each its own transaction, from `connections` connections at once (Postgres flushes
/// the WAL of concurrent commits together), in commits/s. The reference a durable queue
/// with one commit per job is held to.
pub async fn commit_rate(url: &str, commits: u64, connections: usize) -> anyhow::Result<Value> {
    let pool =
        bloom::db::connect(url, &bloom::db::PoolOptions { max_connections: connections as u32, ..Default::default() })
            .await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_commits (id text PRIMARY KEY, created_at bigint NOT NULL, body text NOT NULL)",
    )
    .execute(&pool)
    .await?;
    sqlx::query("TRUNCATE bench_commits").execute(&pool).await?;
    let body = "x".repeat(400);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut loops = Vec::new();
    for _ in 0..connections {
        let (pool, next, body) = (pool.clone(), next.clone(), body.clone());
        loops.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            while next.fetch_add(1, Ordering::Relaxed) < commits {
                sqlx::query("INSERT INTO bench_commits (id, created_at, body) VALUES ($1, $2, $3)")
                    .bind(bloom::domain::new_id())
                    .bind(bloom::time::now_ms())
                    .bind(&body)
                    .execute(&mut *conn)
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for l in loops {
        l.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    sqlx::query("DROP TABLE bench_commits").execute(&pool).await?;
    Ok(json!({"commits": commits, "connections": connections, "seconds": secs,
              "commits_per_sec": commits as f64 / secs}))
}

/// Publish with ack, then pull and ack, of task-sized messages.
pub async fn nats_limit(url: &str, replicas: usize, msgs: usize) -> anyhow::Result<Value> {
    use futures::StreamExt;
    let client = bloom::bus::connect(url, "bloom-bench").await?;
    let js = async_nats::jetstream::new(client);
    let name = format!("benchlimit{}", &bloom::domain::new_id()[..8]);
    let stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("{name}.>")],
            retention: async_nats::jetstream::stream::RetentionPolicy::WorkQueue,
            num_replicas: replicas,
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
