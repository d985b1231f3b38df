//! Admission of tasks about to be leased, against concurrency limits and budgets
//! (`bloom_admit`, migrations 0021, 0023 and 0044): every way of leasing (claims, REST
//! leases, HTTP agent assignments) admits the tasks it is about to lease in the lease's
//! own transaction, and puts aside those it refused.

use serde_json::Value;
use sqlx::types::Json;

use crate::db::concurrency;
use crate::domain::{new_id, TaskId};

/// Takes the concurrency limits' table lock a lease's transaction holds for its
/// admission, before any row lock: a limit being set (which takes the table
/// exclusively, then lease rows) then waits for the whole transaction, or the
/// transaction waits for it, never each for the other. Claims take it with their
/// statement.
pub async fn hold_limits(tx: &mut sqlx::PgConnection) -> sqlx::Result<()> {
    sqlx::query!("LOCK TABLE concurrency_limits IN ACCESS SHARE MODE").execute(&mut *tx).await?;
    Ok(())
}

/// What the admission of a task about to be leased decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Admission {
    /// Every slot had room and every budget allowed the run: the task took its slots and
    /// reserved on its budget counters; its lease records both (`slots`, `charges`).
    Admitted { slots: Vec<String>, charges: Value },
    /// A slot is full (`until` absent: the task waits for a lease of it to end) or a
    /// budget is used up (`until`: the end of its window). `on` names the slot or budget
    /// counter, `reason` says why (the task's `wait_reason`).
    Blocked { on: String, until: Option<i64>, reason: String },
}

impl Admission {
    /// Admitted with nothing to take (no limit or budget applies).
    pub fn free() -> Admission {
        Admission::Admitted { slots: Vec::new(), charges: Value::Array(Vec::new()) }
    }
}

/// Admits tasks about to be leased in `tx` (whose rows it has locked), in order, at
/// `now`: the admitted take their slots and reserve on their budgets, under the slots'
/// and budget counters' locks, so no limit is exceeded whatever runs concurrently; the
/// transaction must lease exactly them, or roll back.
pub async fn admit(tx: &mut sqlx::PgConnection, ids: &[TaskId], now: i64) -> sqlx::Result<Vec<(TaskId, Admission)>> {
    let rows = sqlx::query!(
        r#"SELECT admit_task AS "task!", admit_slots AS "slots?", admit_charges AS "charges?: Json<Value>",
                  admit_blocked AS "blocked?", admit_until AS "until?", admit_reason AS "reason?"
           FROM bloom_admit($1, $2)"#,
        ids.iter().map(TaskId::as_str).collect::<Vec<_>>() as _,
        now
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let admission = match (r.slots, r.charges) {
                (Some(slots), Some(Json(charges))) => Admission::Admitted { slots, charges },
                _ => Admission::Blocked {
                    on: r.blocked.unwrap_or_default(),
                    until: r.until,
                    reason: r.reason.unwrap_or_default(),
                },
            };
            (TaskId::from(r.task), admission)
        })
        .collect())
}

/// A task an admission refused: what it waits on, until when, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Refused {
    pub task: TaskId,
    pub on: String,
    pub until: Option<i64>,
    pub reason: String,
}

/// Puts aside queued tasks their admission refused: no dispatch (`dispatch_seq`
/// negated, so no message on the bus can claim them), `blocked_on` the full slot or
/// budget, `not_before` the end of the budget's window (absent for a slot: its release
/// makes the task due), `wait_reason` saying why; each with a `task_deferred` audit
/// entry.
pub async fn set_aside(tx: &mut sqlx::PgConnection, refused: &[Refused], now: i64) -> sqlx::Result<()> {
    if refused.is_empty() {
        return Ok(());
    }
    sqlx::query!(
        "WITH b AS (SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[])
                        AS b(id, blocked_on, until, reason, audit_id)),
         t AS (
            UPDATE llm_tasks t SET dispatch_seq = -abs(t.dispatch_seq), not_before = b.until, updated_at = $6,
                   routed_to = NULL, blocked_on = b.blocked_on, wait_reason = b.reason
            FROM b WHERE t.id = b.id AND t.status = 'queued'
            RETURNING t.id, b.reason, b.audit_id)
         INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
         SELECT audit_id, $6, 'task_deferred', 'llm_task', id, 'router', 'Lease deferred: ' || reason FROM t",
        refused.iter().map(|r| r.task.as_str()).collect::<Vec<_>>() as _,
        refused.iter().map(|r| r.on.as_str()).collect::<Vec<_>>() as _,
        refused.iter().map(|r| r.until).collect::<Vec<_>>() as _,
        refused.iter().map(|r| r.reason.as_str()).collect::<Vec<_>>() as _,
        &refused.iter().map(|_| new_id()).collect::<Vec<_>>(),
        now
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// The full concurrency slots among refused tasks (not the budget windows), each once:
/// what the transaction that put them aside rechecks once it has committed.
pub fn full_slots(refused: &[Refused]) -> Vec<String> {
    let mut slots: Vec<String> = refused.iter().filter(|r| r.until.is_none()).map(|r| r.on.clone()).collect();
    slots.sort_unstable();
    slots.dedup();
    slots
}

/// Rechecks full slots after the transaction that put tasks aside for them committed
/// ([`concurrency::recheck`]). A failure (a lock wait given up, the database gone) is
/// left to the reconcilers' periodic wake, which makes the same tasks due.
pub async fn recheck(pool: &sqlx::PgPool, slots: &[String]) {
    let _ = concurrency::recheck(pool, slots, concurrency::RECHECK_PATIENCE).await;
}
