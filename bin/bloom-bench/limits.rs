//! The machine's limits for the work of a task's life: Postgres and NATS measured
//! directly, without the runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};

/// The writes of a task's life, batched as the runtime batches them, executed directly.
pub async fn postgres_limit(url: &str, tasks: u64, connections: usize, batch: usize) -> anyhow::Result<Value> {
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
pub async fn nats_limit(url: &str, msgs: usize) -> anyhow::Result<Value> {
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
