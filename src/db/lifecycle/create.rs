//! `create`: new tasks, queued, with their outbox rows (batch).

use std::collections::HashMap;

use sqlx::types::Json;
use sqlx::PgExecutor;

use crate::db::outbox::Dispatch;
use crate::domain::{new_id, NewTask, Task, TaskId, TaskStatus, WorkerId};

/// Batch creation: `$1` now, `$2` actor, then one array per column of the new tasks.
pub(super) const CREATE_SQL: &str = "WITH r AS (
            SELECT * FROM UNNEST($3::text[], $4::text[], $5::text[], $6::text[], $7::jsonb[], $8::jsonb[],
                                 $9::text[], $10::int[], $11::text[], $12::text[])
                AS r(id, context_id, agent_slug, prompt, context_hints, policy, desired_format, max_attempts, audit_id,
                     audit)),
         recent AS (
            SELECT c.context_id, l.worker_id
            FROM (SELECT DISTINCT unnest($4::text[]) AS context_id) c
            CROSS JOIN LATERAL (
                SELECT worker_id FROM leases
                WHERE status = 'active' AND context_id = c.context_id
                ORDER BY started_at DESC LIMIT 1) l),
         sticky AS (
            SELECT recent.context_id, recent.worker_id
            FROM recent CROSS JOIN LATERAL (
                -- LIMIT keeps this a lookup by key per context (no join order that walks
                -- every worker), whatever the statistics of `workers` say.
                SELECT 1 FROM workers w
                WHERE w.id = recent.worker_id AND (w.status || '') = 'online' AND w.source = 'nats'
                  AND COALESCE((w.capabilities->>'claude_cli')::boolean, true)
                  AND w.active_leases < COALESCE((w.capabilities->>'max_concurrency')::int, 1)
                LIMIT 1) w),
         t AS (
            INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, context_hints, policy, desired_format, status,
                                   created_at, updated_at, attempts, max_attempts, dispatch_seq, routed_to)
            SELECT r.id, r.context_id, r.agent_slug, r.prompt, r.context_hints, r.policy, r.desired_format, 'queued',
                   $1, $1, 0, r.max_attempts, 1, s.worker_id
            FROM r LEFT JOIN sticky s ON s.context_id = r.context_id
            RETURNING id, routed_to),
         o AS (
            INSERT INTO outbox (task_id, dispatch_seq, worker_id, created_at)
            SELECT id, 1, routed_to, $1 FROM t RETURNING id, task_id, worker_id),
         a AS (
            INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
            SELECT r.audit_id, $1, 'task_created', 'llm_task', r.id, $2, r.audit FROM r)
         SELECT task_id, id, worker_id FROM o";

/// Creates tasks, their outbox rows and audit entries in one transaction. A task whose
/// context has an active lease on an online NATS worker with free capacity is routed to
/// that worker (sticky); the others go to the shared pool.
pub async fn create<'c>(
    db: impl PgExecutor<'c>,
    new: Vec<NewTask>,
    actor: &str,
    now: i64,
) -> sqlx::Result<Vec<Dispatch>> {
    let mut created: Vec<Task> = new
        .into_iter()
        .map(|n| Task {
            id: TaskId::generate(),
            routed_to: None,
            context_id: n.context_id,
            agent_slug: n.agent_slug,
            prompt: n.prompt,
            context_hints: n.context_hints,
            policy: n.policy,
            desired_format: n.desired_format,
            status: TaskStatus::Queued,
            created_at: now,
            updated_at: now,
            lease_id: None,
            worker_id: None,
            attempts: 0,
            max_attempts: n.max_attempts,
            dispatch_seq: 1,
        })
        .collect();
    let column = |f: fn(&Task) -> &str| created.iter().map(f).collect::<Vec<_>>();
    // One statement, so one round trip and one commit for the whole batch.
    let written: Vec<(TaskId, i64, Option<WorkerId>)> = sqlx::query_as(CREATE_SQL)
        .bind(now)
        .bind(actor)
        .bind(column(|t| t.id.as_str()))
        .bind(column(|t| &t.context_id))
        .bind(column(|t| &t.agent_slug))
        .bind(column(|t| &t.prompt))
        .bind(created.iter().map(|t| Json(&t.context_hints)).collect::<Vec<_>>())
        .bind(created.iter().map(|t| Json(&t.policy)).collect::<Vec<_>>())
        .bind(column(|t| t.desired_format.as_str()))
        .bind(created.iter().map(|t| t.max_attempts).collect::<Vec<_>>())
        .bind(created.iter().map(|_| new_id()).collect::<Vec<_>>())
        .bind(
            created
                .iter()
                .map(|t| format!("Task for agent {}, context {}", t.agent_slug, t.context_id))
                .collect::<Vec<_>>(),
        )
        .fetch_all(db)
        .await?;
    let mut by_task: HashMap<TaskId, (i64, Option<WorkerId>)> =
        written.into_iter().map(|(task, outbox, routed)| (task, (outbox, routed))).collect();
    Ok(created
        .drain(..)
        .filter_map(|mut task| {
            let (outbox_id, routed) = by_task.remove(&task.id)?;
            task.routed_to = routed;
            Some(Dispatch { outbox_id, task, trace: Vec::new() })
        })
        .collect())
}
