//! Concurrency limits (`concurrency_limits`) and their slots (`concurrency_slots`): set,
//! removed and read here; taken by every way of leasing a task (see [`super::admission`]),
//! which counts a slot's running tasks from the active leases holding it (migration 0044).

use std::time::Duration;

use serde::Serialize;
use sqlx::{PgExecutor, PgPool};

use crate::domain::{ConcurrencyLimit, ConcurrencyScope, ANY_KEY};

/// A limit, with the keys it governs now.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LimitView {
    #[serde(flatten)]
    pub limit: ConcurrencyLimit,
    pub updated_at: i64,
    /// Tasks of the limit's key (of every key it governs, for `*`) leased or running.
    pub running: i64,
    /// Tasks waiting for a slot of those keys.
    pub waiting: i64,
}

/// One key under a limit: its limit, what runs and what waits.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct KeyView {
    pub scope: ConcurrencyScope,
    pub key: String,
    /// The limit that applies (the key's own, else the scope's `*`); absent when the
    /// limit was removed since.
    pub max_running: Option<i32>,
    pub running: i64,
    pub waiting: i64,
}

/// Sets a limit (or, with `only_if_absent`, sets it only when the scope and key have
/// none: configuration seeds limits, the API changes them). Returns whether it was written.
///
/// Tasks already leased or running when a limit appears count against it: the table's
/// exclusive lock waits for every admission in progress and holds new ones back for the
/// few milliseconds this takes, and the active leases of the keys concerned take their
/// slot. Waiting tasks that the new value lets run are made due.
pub async fn set(pool: &PgPool, limit: &ConcurrencyLimit, only_if_absent: bool, now: i64) -> sqlx::Result<bool> {
    if only_if_absent && exists(pool, limit.scope, &limit.key).await? {
        return Ok(false);
    }
    let mut tx = pool.begin().await?;
    sqlx::query!("LOCK TABLE concurrency_limits IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await?;
    let written = sqlx::query!(
        "INSERT INTO concurrency_limits (scope, key, max_running, updated_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (scope, key) DO UPDATE SET max_running = EXCLUDED.max_running, updated_at = EXCLUDED.updated_at
         WHERE NOT $5",
        limit.scope.as_str(),
        limit.key,
        limit.max_running,
        now,
        only_if_absent
    )
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if written {
        count_running(&mut tx, limit).await?;
    }
    tx.commit().await?;
    wake(pool).await?;
    Ok(written)
}

async fn exists(db: impl PgExecutor<'_>, scope: ConcurrencyScope, key: &str) -> sqlx::Result<bool> {
    let found = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM concurrency_limits WHERE scope = $1 AND key = $2) AS "found!""#,
        scope.as_str(),
        key
    )
    .fetch_one(db)
    .await?;
    Ok(found)
}

/// The active leases of the limit's keys take the slot they lack (their rows locked
/// first): admissions count a slot's running tasks from the active leases holding it.
async fn count_running(tx: &mut sqlx::PgConnection, limit: &ConcurrencyLimit) -> sqlx::Result<()> {
    let any = limit.key == ANY_KEY;
    sqlx::query!(
        "WITH m AS (
            SELECT l.id, $1 || ':' || k.key AS slot
            FROM leases l JOIN llm_tasks t ON t.id = l.task_id
            CROSS JOIN LATERAL (SELECT CASE $1 WHEN 'context_id' THEN t.context_id
                                             WHEN 'agent_slug' THEN t.agent_slug
                                             ELSE t.concurrency_key END AS key) k
            WHERE l.status = 'active' AND k.key IS NOT NULL AND ($3 OR k.key = $2))
         UPDATE leases l SET slots = l.slots || m.slot FROM m
         WHERE l.id = m.id AND l.status = 'active' AND NOT (m.slot = ANY(l.slots))",
        limit.scope.as_str(),
        limit.key,
        any
    )
    .execute(&mut *tx)
    .await?;
    // The slots the operator views list (admissions add the ones they meet).
    sqlx::query!(
        "INSERT INTO concurrency_slots (slot, scope, key)
         SELECT DISTINCT s, $1, substr(s, length($1) + 2)
         FROM leases l, unnest(l.slots) AS s
         WHERE l.status = 'active' AND starts_with(s, $1 || ':') AND ($3 OR s = $1 || ':' || $2)
         ORDER BY 1
         ON CONFLICT (slot) DO NOTHING",
        limit.scope.as_str(),
        limit.key,
        any
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Whether any limit is set.
pub async fn any_limit(db: impl PgExecutor<'_>) -> sqlx::Result<bool> {
    let any =
        sqlx::query_scalar!(r#"SELECT EXISTS (SELECT 1 FROM concurrency_limits) AS "any!""#).fetch_one(db).await?;
    Ok(any)
}

/// Removes a limit; the tasks waiting for its keys are made due (another limit may
/// still hold them back). Returns whether there was one.
pub async fn remove(pool: &PgPool, scope: ConcurrencyScope, key: &str) -> sqlx::Result<bool> {
    // As `set`: no admission runs while the limits change under it.
    let mut tx = pool.begin().await?;
    sqlx::query!("LOCK TABLE concurrency_limits IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await?;
    let removed = sqlx::query!("DELETE FROM concurrency_limits WHERE scope = $1 AND key = $2", scope.as_str(), key)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    tx.commit().await?;
    wake(pool).await?;
    Ok(removed)
}

/// Makes due the waiting tasks that their slot has room for now (or that no limit
/// holds back any more), highest priority then oldest first; tasks already made due
/// and not yet dispatched count as taking the room (`bloom_wake`, migration 0032).
/// Releases make waiting tasks due as they happen; this catches up after a limit
/// changed, after a task made due was cancelled before its dispatch, and after a recheck
/// ([`recheck`]) gave up waiting. Returns how many.
pub async fn wake(db: impl PgExecutor<'_>) -> sqlx::Result<u64> {
    let n = sqlx::query_scalar!(r#"SELECT bloom_wake(NULL) AS "n!""#).fetch_one(db).await?;
    Ok(n as u64)
}

/// How long a recheck tries again the slots with ends in flight, and then waits for
/// their locks: ends commit within milliseconds; a longer wait means locks taken out of
/// order, which the periodic wake resolves instead.
pub const RECHECK_PATIENCE: Duration = Duration::from_millis(200);

/// How long a recheck lets an end in flight finish before it tries a slot's lock again.
const BUSY_RETRY: Duration = Duration::from_millis(2);

/// After a transaction that put tasks aside for these full slots committed: makes due the
/// waiting tasks the slots have room for, once no end of theirs is in flight. An end
/// that committed after the admission read the slot, but whose own wake ran before the
/// task was put aside, is seen here. Each slot's lock is only tried
/// (`bloom_slots_try_recheck`, migration 0038): the slots with an end in flight are tried
/// again every [`BUSY_RETRY`], so that no later end queues behind a waiting recheck;
/// past `patience` the rest wait for their ends (`bloom_slots_recheck`, migration 0032,
/// failing after `patience` more). Returns how many tasks were made due.
pub async fn recheck(db: &PgPool, slots: &[String], patience: Duration) -> sqlx::Result<u64> {
    let deadline = tokio::time::Instant::now() + patience;
    let mut woken = 0;
    let mut left = slots.to_vec();
    while !left.is_empty() {
        let tried =
            sqlx::query!(r#"SELECT woken AS "woken!", busy AS "busy!" FROM bloom_slots_try_recheck($1)"#, &left)
                .fetch_one(db)
                .await?;
        woken += tried.woken as u64;
        left = tried.busy;
        if left.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let n = sqlx::query_scalar!(
                r#"SELECT bloom_slots_recheck($1, $2) AS "n!""#,
                &left,
                patience.as_millis().min(i32::MAX as u128) as i32
            )
            .fetch_one(db)
            .await?;
            return Ok(woken + n as u64);
        }
        tokio::time::sleep(BUSY_RETRY).await;
    }
    Ok(woken)
}

/// Every limit, with what runs and waits under it.
pub async fn limits(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<LimitView>> {
    let rows = sqlx::query!(
        r#"SELECT l.scope AS "scope!: ConcurrencyScope", l.key, l.max_running, l.updated_at,
                  COALESCE(sum(c.running), 0)::bigint AS "running!",
                  COALESCE(sum((SELECT count(*) FROM llm_tasks b WHERE b.blocked_on = c.slot
                                   AND (b.status || '') = 'queued' AND b.dispatch_seq <= 0)), 0)::bigint AS "waiting!"
           FROM concurrency_limits l
           LEFT JOIN concurrency_slot_counts c ON c.scope = l.scope
               AND (c.key = l.key OR (l.key = '*' AND NOT EXISTS (
                   SELECT 1 FROM concurrency_limits o WHERE o.scope = c.scope AND o.key = c.key)))
           GROUP BY l.scope, l.key, l.max_running, l.updated_at
           ORDER BY l.scope, l.key"#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| LimitView {
            limit: ConcurrencyLimit { scope: r.scope, key: r.key, max_running: r.max_running },
            updated_at: r.updated_at,
            running: r.running,
            waiting: r.waiting,
        })
        .collect())
}

/// The busiest keys under limits (most running and waiting first), of one scope or all,
/// at most `limit`; keys with nothing running or waiting are left out.
pub async fn keys(db: impl PgExecutor<'_>, scope: Option<ConcurrencyScope>, limit: i64) -> sqlx::Result<Vec<KeyView>> {
    sqlx::query_as!(
        KeyView,
        r#"SELECT c.scope AS "scope!: ConcurrencyScope", c.key AS "key!",
                  COALESCE(own.max_running, any_.max_running) AS "max_running?",
                  c.running::bigint AS "running!", w.n AS "waiting!"
           FROM concurrency_slot_counts c
           LEFT JOIN concurrency_limits own ON own.scope = c.scope AND own.key = c.key
           LEFT JOIN concurrency_limits any_ ON any_.scope = c.scope AND any_.key = '*'
           CROSS JOIN LATERAL (SELECT count(*) AS n FROM llm_tasks b WHERE b.blocked_on = c.slot
                               AND (b.status || '') = 'queued' AND b.dispatch_seq <= 0) w
           WHERE ($1::text IS NULL OR c.scope = $1) AND (c.running > 0 OR w.n > 0)
           ORDER BY c.running + w.n DESC, c.slot
           LIMIT $2"#,
        scope.map(ConcurrencyScope::as_str),
        limit
    )
    .fetch_all(db)
    .await
}
