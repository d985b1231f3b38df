//! `assign`: queued tasks leased to an HTTP agent's free slots, `queued -> leased`, for
//! the reconcilers to send them to it (batch).

use sqlx::types::Json;
use sqlx::PgPool;

use crate::db::admission::{self, Admission, Refused};
use crate::db::rows::TaskRow;
use crate::db::workers;
use crate::domain::{new_id, DesiredFormat, Lease, LeaseId, Policy, Task, TaskId, TaskStatus, WorkerId};

/// A task leased to an HTTP agent, to be sent to it.
#[derive(Clone, Debug)]
pub struct Assigned {
    pub task: Task,
    pub lease: Lease,
}

/// Leases the most urgent (then oldest) queued tasks that no NATS worker was routed to, and whose context
/// no other HTTP agent with room holds, to `worker`'s free slots, in one transaction.
/// The worker must be an HTTP agent that can take a lease (online, Claude CLI); its row
/// is locked first, as every lease locks it, and its free
/// slots read after the lock. Tasks are taken `FOR UPDATE SKIP LOCKED` and updated only
/// while `queued`, so concurrent replicas, REST leases and NATS claims never lease one
/// twice (a NATS claim of a task leased here is refused). A lease's TTL is the task's
/// timeout plus `margin_secs` (an agent sends one heartbeat, not one per TTL/3), but
/// until that first heartbeat it expires `pickup_secs` after it was granted. Tasks
/// created after `created_by` are left to their clients for now.
pub async fn assign(
    pool: &PgPool,
    worker: &WorkerId,
    margin_secs: i32,
    pickup_secs: i32,
    created_by: i64,
    now: i64,
) -> sqlx::Result<Vec<Assigned>> {
    let mut tx = pool.begin().await?;
    admission::hold_limits(&mut tx).await?;
    let Some(agent) = workers::get_for_update(&mut tx, worker).await? else { return Ok(Vec::new()) };
    if !agent.takes_pushed_tasks() || !agent.is_eligible() {
        return Ok(Vec::new());
    }
    // Sticky contexts: a task whose context another HTTP agent holds (an active lease)
    // is left to that agent while it can take it, as a NATS worker holding a context is
    // routed its next tasks; the agent keeps the conversation's session on its disk.
    let ids = sqlx::query_scalar!(
        "SELECT t.id FROM llm_tasks t
         WHERE t.status = 'queued' AND t.routed_to IS NULL AND t.dispatch_seq > 0 AND t.created_at <= $4
           AND NOT EXISTS (SELECT 1 FROM bloom_hold(t.agent_slug, t.context_id, t.concurrency_key, $3))
           AND NOT EXISTS (
               SELECT 1 FROM leases l JOIN workers w ON w.id = l.worker_id
               WHERE l.status = 'active' AND l.context_id = t.context_id AND l.worker_id <> $2
                 AND w.transport = 'http' AND w.agent_version <> 'uninstalled'
                 AND (w.source = 'membridge' OR w.agent_version <> 'unknown')
                 AND w.status = 'online' AND w.dispatch_paused_until <= $3
                 AND w.draining_since IS NULL AND bloom_worker_leases(w.id) < COALESCE((w.capabilities->>'max_concurrency')::int, 1))
         ORDER BY t.priority DESC, t.created_at, t.id LIMIT $1 FOR UPDATE OF t SKIP LOCKED",
        i64::from(agent.free_capacity()),
        worker.as_str(),
        now,
        created_by
    )
    .fetch_all(&mut *tx)
    .await?;
    // Concurrency limits and budgets: the tasks take their slots and reserve on their
    // budgets, or are put aside until a slot frees or the budget's window ends.
    let mut admitted: Vec<String> = Vec::new();
    let mut slots: Vec<Json<Vec<String>>> = Vec::new();
    let mut charges: Vec<Json<serde_json::Value>> = Vec::new();
    let mut refused = Vec::new();
    let ids: Vec<TaskId> = ids.into_iter().map(TaskId::from).collect();
    for (id, decision) in admission::admit(&mut tx, &ids, now).await? {
        match decision {
            Admission::Admitted { slots: taken, charges: reserved } => {
                admitted.push(id.0);
                slots.push(Json(taken));
                charges.push(Json(reserved));
            }
            Admission::Blocked { on, until, reason } => refused.push(Refused { task: id, on, until, reason }),
        }
    }
    admission::set_aside(&mut tx, &refused, now).await?;
    let full = admission::full_slots(&refused);
    let ids = admitted;
    if ids.is_empty() {
        tx.commit().await?;
        admission::recheck(pool, &full).await;
        return Ok(Vec::new());
    }
    let lease_ids: Vec<String> = ids.iter().map(|_| LeaseId::generate().0).collect();
    let audit_ids: Vec<String> = ids.iter().map(|_| new_id()).collect();
    let rows = sqlx::query!(
        r#"WITH r AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $8::jsonb[], $9::jsonb[])
                      AS r(task_id, lease_id, audit_id, slots, charges)),
           t AS (
              UPDATE llm_tasks t SET status = 'leased', lease_id = r.lease_id, worker_id = $4,
                     attempts = t.attempts + 1, updated_at = $5, routed_to = NULL
              FROM r WHERE t.id = r.task_id AND t.status = 'queued'
              RETURNING t.*, r.audit_id, ARRAY(SELECT jsonb_array_elements_text(r.slots)) AS slots,
                        r.charges,
                        LEAST(GREATEST(COALESCE((t.policy->>'timeout_sec')::int, 120), 1), 3600) + $6 AS ttl),
           l AS (
              INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status,
                                  last_heartbeat, context_id, slots, charges)
              SELECT lease_id, id, $4, $5, $5 + LEAST(ttl, $7)::bigint * 1000, ttl, 'active', $5, context_id, slots,
                     charges
              FROM t),
           a AS (
              INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
              SELECT audit_id, $5, 'task_dispatched', 'llm_task', id, 'router',
                     'Task ' || id || ' dispatched to worker ' || $4 FROM t)
           SELECT id AS "id!", context_id AS "context_id!", agent_slug AS "agent_slug!", prompt AS "prompt!",
                  context_hints AS "context_hints!: Json<Vec<String>>", policy AS "policy!: Json<Policy>",
                  desired_format AS "desired_format!: DesiredFormat", status AS "status!: TaskStatus",
                  created_at AS "created_at!", updated_at AS "updated_at!", lease_id AS "lease_id?",
                  worker_id AS "worker_id?", attempts AS "attempts!", max_attempts AS "max_attempts!",
                  priority AS "priority!", not_before AS "not_before?", idempotency_key AS "idempotency_key?", concurrency_key AS "concurrency_key?",
                  wait_reason AS "wait_reason?", last_error AS "last_error?", dispatch_seq AS "dispatch_seq!", routed_to AS "routed_to?", ttl AS "ttl!"
           FROM t"#,
        &ids,
        &lease_ids,
        &audit_ids,
        worker.as_str(),
        now,
        margin_secs,
        pickup_secs,
        &slots as _,
        &charges as _
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    admission::recheck(pool, &full).await;
    Ok(rows
        .into_iter()
        .map(|r| {
            let ttl_seconds = r.ttl;
            let task = Task::from(TaskRow {
                id: r.id,
                context_id: r.context_id,
                agent_slug: r.agent_slug,
                prompt: r.prompt,
                context_hints: r.context_hints,
                policy: r.policy,
                desired_format: r.desired_format,
                status: r.status,
                created_at: r.created_at,
                updated_at: r.updated_at,
                lease_id: r.lease_id,
                worker_id: r.worker_id,
                attempts: r.attempts,
                max_attempts: r.max_attempts,
                priority: r.priority,
                not_before: r.not_before,
                idempotency_key: r.idempotency_key,
                concurrency_key: r.concurrency_key,
                wait_reason: r.wait_reason,
                last_error: r.last_error,
                dispatch_seq: r.dispatch_seq,
                routed_to: r.routed_to,
            });
            let fresh = super::lease::new_lease(&task, worker, ttl_seconds, now);
            let expires_at = now + i64::from(ttl_seconds.min(pickup_secs)) * 1000;
            let lease = Lease { id: task.lease_id.clone().unwrap_or(fresh.id.clone()), expires_at, ..fresh };
            Assigned { task, lease }
        })
        .collect())
}
