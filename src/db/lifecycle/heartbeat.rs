//! `heartbeat`: leases renewed, tasks `running` (batch).

use sqlx::PgExecutor;

use crate::domain::{Lease, LeaseId, TaskId};

/// Batch lease heartbeat: `$1` task ids, `$2` lease ids, `$3` now.
pub(super) const HEARTBEAT_SQL: &str =
    "WITH r AS (SELECT * FROM UNNEST($1::text[], $2::text[]) AS r(task_id, lease_id)),
         t AS (
            UPDATE llm_tasks t SET status = 'running', updated_at = $3
            FROM r WHERE t.id = r.task_id AND t.lease_id = r.lease_id AND (t.status || '') IN ('leased', 'running')
            RETURNING t.lease_id)
         UPDATE leases l SET last_heartbeat = $3, expires_at = $3 + l.ttl_seconds::bigint * 1000
         FROM t WHERE l.id = t.lease_id AND (l.status || '') = 'active'
         RETURNING l.*";

/// Renews active leases (`expires_at = now + ttl`) and moves their tasks to `running`,
/// in one transaction. A lease is renewed only while it is active and still the
/// current lease of its task. Returns the renewed leases.
pub async fn heartbeat<'c>(db: impl PgExecutor<'c>, beats: &[(TaskId, LeaseId)], now: i64) -> sqlx::Result<Vec<Lease>> {
    let tasks: Vec<&TaskId> = beats.iter().map(|(t, _)| t).collect();
    let leases: Vec<&LeaseId> = beats.iter().map(|(_, l)| l).collect();
    sqlx::query_as(HEARTBEAT_SQL).bind(tasks).bind(leases).bind(now).fetch_all(db).await
}
