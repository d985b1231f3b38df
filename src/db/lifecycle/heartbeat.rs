//! `heartbeat`: leases renewed, tasks `running` (batch).

use sqlx::PgExecutor;

use crate::domain::{Lease, LeaseId, LeaseStatus, TaskId};

/// Batch lease heartbeat: `$1` task ids, `$2` lease ids, `$3` now.
pub(super) const HEARTBEAT_SQL: &str = include_str!("heartbeat.sql");

/// Renews active leases (`expires_at = now + ttl`) and moves their tasks to `running`,
/// in one transaction. A lease is renewed only while it is active and still the
/// current lease of its task. Returns the renewed leases.
pub async fn heartbeat<'c>(db: impl PgExecutor<'c>, beats: &[(TaskId, LeaseId)], now: i64) -> sqlx::Result<Vec<Lease>> {
    let tasks: Vec<&str> = beats.iter().map(|(t, _)| t.as_str()).collect();
    let leases: Vec<&str> = beats.iter().map(|(_, l)| l.as_str()).collect();
    sqlx::query_file_as!(Lease, "src/db/lifecycle/heartbeat.sql", tasks as _, leases as _, now).fetch_all(db).await
}
