//! `workers`: registration over REST, liveness beats over NATS, and membridge sync.
//!
//! A worker's active leases are counted from `leases` where they are read
//! (`bloom_worker_leases`, migration 0046); nothing is written to the worker's row when a
//! lease starts or ends. What starts leases locks the worker's row first and counts in a
//! later statement, so concurrent leases cannot overfill it.

use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, PgPool};

use super::audit;
use super::rows::WorkerRow;
use crate::domain::{
    AuditAction, Capabilities, NewAudit, Registration, Worker, WorkerId, WorkerSource, WorkerStatus, WorkerTransport,
};

/// All workers, by id.
pub async fn list(db: impl PgExecutor<'_>, limit: i64, after: Option<&str>) -> sqlx::Result<Vec<Worker>> {
    let rows = sqlx::query_as!(
        WorkerRow,
        r#"SELECT w.id, w.node_id, w.url, w.status AS "status: WorkerStatus",
                  w.capabilities AS "capabilities: Json<Capabilities>", w.last_heartbeat,
                  w.ip_addrs AS "ip_addrs: Json<Vec<String>>", w.obs_count, w.db_sha, w.registered_at,
                  w.source AS "source: WorkerSource", bloom_worker_leases(w.id) AS "active_leases!",
                  w.agent_version, w.os_info,
                  w.install_method, w.transport AS "transport!: WorkerTransport", w.draining_since
           FROM workers w WHERE w.id > $1 ORDER BY w.id LIMIT $2"#,
        after.unwrap_or(""),
        limit
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Worker::from).collect())
}

/// Every worker that could take a lease (the candidates of [`crate::domain::pick_worker`]).
pub async fn candidates(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<Worker>> {
    let rows = sqlx::query_as!(
        WorkerRow,
        r#"SELECT w.id, w.node_id, w.url, w.status AS "status: WorkerStatus",
                  w.capabilities AS "capabilities: Json<Capabilities>", w.last_heartbeat,
                  w.ip_addrs AS "ip_addrs: Json<Vec<String>>", w.obs_count, w.db_sha, w.registered_at,
                  w.source AS "source: WorkerSource", bloom_worker_leases(w.id) AS "active_leases!",
                  w.agent_version, w.os_info,
                  w.install_method, w.transport AS "transport!: WorkerTransport", w.draining_since
           FROM workers w WHERE w.status = 'online' ORDER BY w.registered_at, w.id"#
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(Worker::from).collect())
}

/// One worker.
pub async fn get(db: impl PgExecutor<'_>, id: &WorkerId) -> sqlx::Result<Option<Worker>> {
    let row = sqlx::query_as!(
        WorkerRow,
        r#"SELECT w.id, w.node_id, w.url, w.status AS "status: WorkerStatus",
                  w.capabilities AS "capabilities: Json<Capabilities>", w.last_heartbeat,
                  w.ip_addrs AS "ip_addrs: Json<Vec<String>>", w.obs_count, w.db_sha, w.registered_at,
                  w.source AS "source: WorkerSource", bloom_worker_leases(w.id) AS "active_leases!",
                  w.agent_version, w.os_info,
                  w.install_method, w.transport AS "transport!: WorkerTransport", w.draining_since
           FROM workers w WHERE w.id = $1"#,
        id.as_str()
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(Worker::from))
}

/// One worker, its row locked until the transaction ends (serialises leases to it).
/// The row is read in a statement after the one that locks it, so `active_leases`
/// counts the leases of every transaction that held the lock before.
pub async fn get_for_update(db: &mut PgConnection, id: &WorkerId) -> sqlx::Result<Option<Worker>> {
    let locked = sqlx::query_scalar!("SELECT 1 AS \"one!\" FROM workers WHERE id = $1 FOR UPDATE", id.as_str())
        .fetch_optional(&mut *db)
        .await?;
    match locked {
        Some(_) => get(&mut *db, id).await,
        None => Ok(None),
    }
}

/// An HTTP agent that can take a lease, and where to reach it.
#[derive(Clone, Debug)]
pub struct HttpAgent {
    pub id: WorkerId,
    pub url: String,
}

/// HTTP agents the runtime sends tasks to ([`crate::domain::Worker::takes_pushed_tasks`])
/// that can take a lease at `now` (online, Claude CLI, a free slot, not paused after failed
/// dispatches, not draining), the least busy first.
pub async fn http_agents_with_room(db: impl PgExecutor<'_>, now: i64) -> sqlx::Result<Vec<HttpAgent>> {
    let rows = sqlx::query!(
        "SELECT id, url FROM workers
         WHERE transport = 'http' AND agent_version <> 'uninstalled'
           AND (source = 'membridge' OR agent_version <> 'unknown')
           AND status = 'online' AND COALESCE((capabilities->>'claude_cli')::boolean, true)
           AND bloom_worker_leases(id) < COALESCE((capabilities->>'max_concurrency')::int, 1)
           AND dispatch_paused_until <= $1 AND draining_since IS NULL
         ORDER BY bloom_worker_leases(id), id",
        now
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| HttpAgent { id: r.id.into(), url: r.url }).collect())
}

/// The first pause of an agent whose dispatch failed; it doubles with each consecutive
/// failure up to [`MAX_DISPATCH_PAUSE_MS`].
pub const FIRST_DISPATCH_PAUSE_MS: i64 = 10_000;
pub const MAX_DISPATCH_PAUSE_MS: i64 = 300_000;

/// Records that an HTTP agent could not be reached or refuses every task: it is marked
/// offline and takes no tasks for a pause that doubles with each consecutive failure
/// (whatever membridge's sync says of its status meanwhile). A `bloom-worker`, whose
/// own beats say whether it is alive, is left alone. Returns the pause's end (ms).
pub async fn record_dispatch_failure(db: impl PgExecutor<'_>, id: &WorkerId, now: i64) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar!(
        "UPDATE workers SET status = 'offline', dispatch_failures = dispatch_failures + 1,
                dispatch_paused_until = $2 + LEAST($3 * (1::bigint << LEAST(dispatch_failures, 10)), $4)
         WHERE id = $1 AND source <> 'nats'
         RETURNING dispatch_paused_until",
        id.as_str(),
        now,
        FIRST_DISPATCH_PAUSE_MS,
        MAX_DISPATCH_PAUSE_MS,
    )
    .fetch_optional(db)
    .await
}

/// Records that an HTTP agent took a task: its failure count and pause are cleared.
pub async fn record_dispatch_success(db: impl PgExecutor<'_>, id: &WorkerId) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE workers SET dispatch_failures = 0, dispatch_paused_until = 0 WHERE id = $1 AND dispatch_failures > 0",
        id.as_str()
    )
    .execute(db)
    .await?;
    Ok(())
}

/// HTTP agents the runtime sends tasks to that failed dispatches marked offline and whose
/// pause is over: each is taken for a health check, its pause moved on to `until` so that
/// no other pass or replica checks it meanwhile.
pub async fn take_due_health_checks(db: impl PgExecutor<'_>, now: i64, until: i64) -> sqlx::Result<Vec<HttpAgent>> {
    let rows = sqlx::query!(
        "UPDATE workers SET dispatch_paused_until = $2
         WHERE transport = 'http' AND agent_version <> 'uninstalled'
           AND (source = 'membridge' OR agent_version <> 'unknown')
           AND status = 'offline' AND dispatch_failures > 0 AND dispatch_paused_until <= $1
         RETURNING id, url",
        now,
        until
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| HttpAgent { id: r.id.into(), url: r.url }).collect())
}

/// An agent that failed dispatches marked offline answered its health check after its
/// pause: online again, and no longer held for the check. Its failure count stays until
/// it takes a task, so another failure pauses it for longer.
pub async fn record_healthy_after_pause(db: impl PgExecutor<'_>, id: &WorkerId) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE workers SET status = 'online', dispatch_paused_until = 0
         WHERE id = $1 AND status = 'offline' AND dispatch_failures > 0",
        id.as_str()
    )
    .execute(db)
    .await?;
    Ok(())
}

/// What an agent's `/health` said of itself; absent fields keep what is stored.
#[derive(Clone, Debug, Default)]
pub struct AgentReport {
    pub version: Option<String>,
    pub os_info: Option<String>,
    /// Merged into the stored capabilities (the agent's flags; see
    /// [`Capabilities::agent_report`]).
    pub capabilities: Option<serde_json::Map<String, serde_json::Value>>,
    pub ip_addrs: Option<Vec<String>>,
}

/// Records a successful health check of an agent: online, seen `now`, and what it said.
pub async fn record_agent_health(
    db: impl PgExecutor<'_>,
    id: &WorkerId,
    report: &AgentReport,
    now: i64,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE workers SET status = 'online', last_heartbeat = $2,
                agent_version = COALESCE($3, agent_version), os_info = COALESCE($4, os_info),
                capabilities = capabilities || COALESCE($5::jsonb, '{}'::jsonb),
                ip_addrs = COALESCE($6::jsonb, ip_addrs), dispatch_failures = 0, dispatch_paused_until = 0
         WHERE id = $1",
        id.as_str(),
        now,
        report.version,
        report.os_info,
        report.capabilities.as_ref().map(Json) as _,
        report.ip_addrs.as_ref().map(Json) as _,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Records a failed health check of an agent: offline, checked `now`.
pub async fn record_agent_unreachable(db: impl PgExecutor<'_>, id: &WorkerId, now: i64) -> sqlx::Result<()> {
    sqlx::query!("UPDATE workers SET status = 'offline', last_heartbeat = $2 WHERE id = $1", id.as_str(), now)
        .execute(db)
        .await?;
    Ok(())
}

/// Sets an agent's version (after a self-update), and its status when given
/// (`offline` after an uninstall).
pub async fn set_agent_version(
    db: impl PgExecutor<'_>,
    id: &WorkerId,
    version: &str,
    status: Option<WorkerStatus>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE workers SET agent_version = $2, status = COALESCE($3, status) WHERE id = $1",
        id.as_str(),
        version,
        status.map(WorkerStatus::as_str)
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Inserts or updates a worker and writes its audit entry, in one transaction.
/// Returns the worker and whether it was new.
pub async fn register(db: &mut PgConnection, reg: &Registration, now: i64) -> sqlx::Result<(Worker, bool)> {
    let inserted = sqlx::query_scalar!(
        r#"INSERT INTO workers (id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, registered_at, source,
                                agent_version, os_info, install_method)
         VALUES ($1::text, $1::text, COALESCE($2, ''), $3, $4, $5, $6, $5, 'api',
                 COALESCE($7, 'unknown'), COALESCE($8, ''), COALESCE($9, 'manual'))
         ON CONFLICT (id) DO UPDATE SET
            node_id = EXCLUDED.node_id,
            url = COALESCE(NULLIF($2, ''), workers.url),
            status = EXCLUDED.status,
            capabilities = EXCLUDED.capabilities,
            last_heartbeat = EXCLUDED.last_heartbeat,
            ip_addrs = EXCLUDED.ip_addrs,
            source = 'api',
            agent_version = COALESCE($7, workers.agent_version),
            os_info = COALESCE($8, workers.os_info),
            install_method = COALESCE($9, workers.install_method),
            dispatch_failures = 0, dispatch_paused_until = 0
         RETURNING (xmax = 0) AS "inserted!""#,
        reg.name.as_str(),
        reg.url,
        reg.status.as_str(),
        Json(&reg.capabilities) as _,
        now,
        Json(&reg.ip_addrs) as _,
        reg.agent_version,
        reg.os_info,
        reg.install_method,
    )
    .fetch_one(&mut *db)
    .await?;
    let worker = get(&mut *db, &reg.name).await?.ok_or(sqlx::Error::RowNotFound)?;
    let action = if inserted { AuditAction::WorkerRegistered } else { AuditAction::WorkerUpdated };
    let detail = format!(
        "Worker {} registered, status={}, max_concurrency={}",
        worker.id,
        worker.status.as_str(),
        worker.capabilities.max_concurrency
    );
    audit::insert(&mut *db, &[NewAudit::new(action, "worker", worker.id.as_str(), "api", detail)], now).await?;
    Ok((worker, inserted))
}

/// Deletes a worker and writes its audit entry. Returns false when it did not exist.
pub async fn remove(db: &mut PgConnection, id: &WorkerId, now: i64) -> sqlx::Result<bool> {
    let deleted =
        sqlx::query!("DELETE FROM workers WHERE id = $1", id.as_str()).execute(&mut *db).await?.rows_affected();
    if deleted == 0 {
        return Ok(false);
    }
    let detail = format!("Worker {id} unregistered");
    audit::insert(&mut *db, &[NewAudit::new(AuditAction::WorkerRemoved, "worker", id.as_str(), "admin", detail)], now)
        .await?;
    Ok(true)
}

/// Starts (`draining`) or ends the draining of a worker, with an audit entry when that
/// changed it: a draining worker takes no new lease (claims find it full, HTTP agents
/// are not assigned, REST leases refuse it) and keeps those it holds. `None` when there
/// is no such worker.
pub async fn set_draining(
    db: &mut PgConnection,
    id: &WorkerId,
    draining: bool,
    actor: &str,
    now: i64,
) -> sqlx::Result<Option<Worker>> {
    let changed = sqlx::query!(
        "UPDATE workers SET draining_since = CASE WHEN $2 THEN $3::bigint END
         WHERE id = $1 AND (draining_since IS NULL) = $2",
        id.as_str(),
        draining,
        now
    )
    .execute(&mut *db)
    .await?
    .rows_affected()
        > 0;
    let Some(worker) = get(&mut *db, id).await? else {
        return Ok(None);
    };
    if changed {
        let (action, detail) = if draining {
            (AuditAction::WorkerDraining, format!("Worker {id} draining: no new lease, {} held", worker.active_leases))
        } else {
            (AuditAction::WorkerResumed, format!("Worker {id} resumed taking leases"))
        };
        audit::insert(&mut *db, &[NewAudit::new(action, "worker", id.as_str(), actor, detail)], now).await?;
    }
    Ok(Some(worker))
}

/// A liveness beat of a `bloom-worker` process, as stored.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Beat {
    pub id: WorkerId,
    pub status: WorkerStatus,
    pub capabilities: Capabilities,
    pub ip_addrs: Vec<String>,
}

/// Upserts a batch of NATS worker beats in one statement, in id order (byte order, as
/// claims lock worker rows: a batch taking them in another order could deadlock with a
/// claim holding two of them). Returns each beating worker's draining state as stored (a
/// process that restarted, or missed a notice, learns it from there).
pub async fn record_beats(db: impl PgExecutor<'_>, beats: &[Beat], now: i64) -> sqlx::Result<Vec<(WorkerId, bool)>> {
    if beats.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query!(
        r#"INSERT INTO workers (id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, registered_at, source)
         SELECT r.id, r.id, '', r.status, r.capabilities, $1, r.ip_addrs, $1, 'nats'
         FROM UNNEST($2::text[], $3::text[], $4::jsonb[], $5::jsonb[]) AS r(id, status, capabilities, ip_addrs)
         ORDER BY r.id COLLATE "C"
         ON CONFLICT (id) DO UPDATE SET
            status = EXCLUDED.status, capabilities = EXCLUDED.capabilities,
            last_heartbeat = EXCLUDED.last_heartbeat, ip_addrs = EXCLUDED.ip_addrs, source = 'nats'
         RETURNING id, draining_since IS NOT NULL AS "draining!""#,
        now,
        beats.iter().map(|b| b.id.as_str()).collect::<Vec<_>>() as _,
        beats.iter().map(|b| b.status.as_str()).collect::<Vec<_>>() as _,
        beats.iter().map(|b| Json(&b.capabilities)).collect::<Vec<_>>() as _,
        beats.iter().map(|b| Json(&b.ip_addrs)).collect::<Vec<_>>() as _,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (WorkerId::from(r.id), r.draining)).collect())
}

/// NATS workers whose last beat is older than `cutoff`, their rows locked in id order
/// (as claims lock them): those online are marked offline; those already offline that
/// still hold an active lease (a worker killed during its shutdown grace, whose beats
/// said offline) are taken too, if they beat since `since` (before it, their leases
/// have expired by their TTL). Those marked offline are audited.
pub async fn silent_nats_workers(
    db: &mut PgConnection,
    cutoff: i64,
    since: i64,
    now: i64,
) -> sqlx::Result<Vec<SilentWorker>> {
    let rows = sqlx::query!(
        r#"WITH s AS (
             SELECT id, status FROM workers w
             WHERE source = 'nats' AND COALESCE(last_heartbeat, 0) < $1
               AND (status = 'online'
                    OR (status = 'offline' AND last_heartbeat >= $2
                        AND EXISTS (SELECT 1 FROM leases l WHERE l.worker_id = w.id AND (l.status || '') = 'active')))
             ORDER BY id FOR UPDATE OF w),
           marked AS (UPDATE workers w SET status = 'offline' FROM s WHERE w.id = s.id AND s.status = 'online')
           SELECT id AS "id!", status = 'online' AS "marked_offline!" FROM s"#,
        cutoff,
        since
    )
    .fetch_all(&mut *db)
    .await?;
    let marked: Vec<&str> = rows.iter().filter(|r| r.marked_offline).map(|r| r.id.as_str()).collect();
    audit_offline(&mut *db, &marked, "No beat within the worker timeout: marked offline", now).await?;
    Ok(rows.into_iter().map(|r| SilentWorker { id: WorkerId::from(r.id), marked_offline: r.marked_offline }).collect())
}

/// A worker found silent by [`silent_nats_workers`].
#[derive(Debug)]
pub struct SilentWorker {
    pub id: WorkerId,
    /// It was online until now; otherwise its beats already said offline.
    pub marked_offline: bool,
}

/// One membridge agent mapped onto a worker row (the seed's field mapping).
#[derive(Clone, Debug, serde::Serialize)]
pub struct SyncedAgent {
    pub id: WorkerId,
    pub url: Option<String>,
    pub status: WorkerStatus,
    pub capabilities: Capabilities,
    /// Milliseconds since the epoch; `None` when membridge never saw the agent.
    pub last_heartbeat: Option<i64>,
    pub ip_addrs: Option<Vec<String>>,
    pub obs_count: Option<i32>,
    pub db_sha: Option<String>,
}

/// Upserts the agents membridge reported (in id order, as claims and assignments lock
/// worker rows) and marks workers that vanished from it and were silent since
/// `stale_cutoff` offline (audited `worker_offline`). Returns the ids marked offline.
///
/// Who wins:
/// * a `bloom-worker` beating over NATS is left alone while it is online (it is live
///   regardless of membridge);
/// * a node that registered itself over REST keeps its capabilities, URL and source;
///   membridge supplies its liveness: its status (unless membridge says `unknown`, i.e.
///   knows nothing yet) and its latest `last_seen`;
/// * a worker known only from membridge takes membridge's view.
pub async fn sync_agents(
    db: &mut PgConnection,
    agents: &[SyncedAgent],
    now: i64,
    stale_cutoff: i64,
) -> sqlx::Result<Vec<WorkerId>> {
    sqlx::query!(
        "INSERT INTO workers (id, node_id, url, status, capabilities, last_heartbeat, ip_addrs, obs_count, db_sha,
                              registered_at, source)
         SELECT r.id, r.id, COALESCE(NULLIF(r.url, ''), ''), r.status, r.capabilities, r.last_heartbeat,
                COALESCE(r.ip_addrs, '[]'::jsonb), COALESCE(r.obs_count, 0), COALESCE(r.db_sha, ''), $1, 'membridge'
         FROM UNNEST($2::text[], $3::text[], $4::text[], $5::jsonb[], $6::bigint[], $7::jsonb[], $8::int[], $9::text[])
              AS r(id, url, status, capabilities, last_heartbeat, ip_addrs, obs_count, db_sha)
         ORDER BY r.id COLLATE \"C\"
         ON CONFLICT (id) DO UPDATE SET
            node_id = EXCLUDED.node_id,
            url = CASE WHEN workers.source = 'api' AND workers.url <> '' THEN workers.url
                       ELSE COALESCE(NULLIF(EXCLUDED.url, ''), workers.url) END,
            status = CASE WHEN workers.source = 'api' AND EXCLUDED.status = 'unknown' THEN workers.status
                          ELSE EXCLUDED.status END,
            capabilities = CASE WHEN workers.source = 'api' THEN workers.capabilities ELSE EXCLUDED.capabilities END,
            last_heartbeat = GREATEST(EXCLUDED.last_heartbeat, workers.last_heartbeat),
            ip_addrs = CASE WHEN EXCLUDED.ip_addrs = '[]'::jsonb THEN workers.ip_addrs ELSE EXCLUDED.ip_addrs END,
            obs_count = CASE WHEN EXCLUDED.obs_count = 0 THEN workers.obs_count ELSE EXCLUDED.obs_count END,
            db_sha = COALESCE(NULLIF(EXCLUDED.db_sha, ''), workers.db_sha),
            source = CASE WHEN workers.source = 'api' THEN 'api' ELSE 'membridge' END
         WHERE NOT (workers.source = 'nats' AND workers.status = 'online')",
        now,
        agents.iter().map(|a| a.id.as_str()).collect::<Vec<_>>() as _,
        agents.iter().map(|a| a.url.as_deref()).collect::<Vec<_>>() as _,
        agents.iter().map(|a| a.status.as_str()).collect::<Vec<_>>() as _,
        agents.iter().map(|a| Json(&a.capabilities)).collect::<Vec<_>>() as _,
        agents.iter().map(|a| a.last_heartbeat).collect::<Vec<_>>() as _,
        agents.iter().map(|a| a.ip_addrs.as_ref().map(Json)).collect::<Vec<_>>() as _,
        agents.iter().map(|a| a.obs_count).collect::<Vec<_>>() as _,
        agents.iter().map(|a| a.db_sha.as_deref()).collect::<Vec<_>>() as _,
    )
    .execute(&mut *db)
    .await?;
    let seen: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
    let ids = sqlx::query_scalar!(
        r#"WITH s AS (SELECT id FROM workers
                   WHERE status = 'online' AND source <> 'nats' AND NOT (id = ANY($1))
                       AND COALESCE(last_heartbeat, 0) < $2
                   ORDER BY id FOR UPDATE)
           UPDATE workers w SET status = 'offline' FROM s WHERE w.id = s.id RETURNING w.id AS "id!""#,
        seen as _,
        stale_cutoff
    )
    .fetch_all(&mut *db)
    .await?;
    audit_offline(&mut *db, &ids, "Not reported by membridge and silent: marked offline", now).await?;
    Ok(ids.into_iter().map(WorkerId::from).collect())
}

/// Audits workers marked offline (`worker_offline`, by the reconciler).
async fn audit_offline(db: impl PgExecutor<'_>, ids: &[impl AsRef<str>], why: &str, now: i64) -> sqlx::Result<()> {
    let entries: Vec<NewAudit> = ids
        .iter()
        .map(|id| NewAudit::new(AuditAction::WorkerOffline, "worker", id.as_ref(), "reconciler", why))
        .collect();
    audit::insert(db, &entries, now).await
}

/// Marks every online worker known only from membridge offline (membridge has not been
/// readable for longer than the staleness limit), audited. Returns their ids.
pub async fn expire_membridge_workers(pool: &PgPool, now: i64) -> sqlx::Result<Vec<WorkerId>> {
    let mut tx = pool.begin().await?;
    let ids = sqlx::query_scalar!(
        r#"WITH s AS (SELECT id FROM workers WHERE source = 'membridge' AND status = 'online' ORDER BY id FOR UPDATE)
           UPDATE workers w SET status = 'offline' FROM s WHERE w.id = s.id RETURNING w.id AS "id!""#,
    )
    .fetch_all(&mut *tx)
    .await?;
    audit_offline(&mut *tx, &ids, "Membridge unreadable past the staleness limit: marked offline", now).await?;
    tx.commit().await?;
    Ok(ids.into_iter().map(WorkerId::from).collect())
}
