//! Aggregate counts for `/api/runtime/stats` and metrics, computed in SQL.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::types::Json;
use sqlx::PgExecutor;

use crate::domain::TaskStatus;

/// The seed's stats shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Stats {
    pub tasks: TaskStats,
    pub leases: LeaseStats,
    pub workers: WorkerStats,
    /// With S3 configured only (an addition to the seed's shape).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifacts: Option<ArtifactStats>,
    /// Asked for with `count_limit` only (an addition): task counts by status and the
    /// lease total stop at this many, so a count equal to it means at least that many.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counted_up_to: Option<i64>,
}

/// Artifact counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ArtifactStats {
    /// Artifacts whose content is in Postgres (S3 failed when they were stored) and
    /// waits to be moved to S3.
    pub inline_backlog: i64,
}

/// Task counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TaskStats {
    pub total: i64,
    pub by_status: BTreeMap<String, i64>,
}

/// Lease counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct LeaseStats {
    pub total: i64,
    pub active: i64,
}

/// Worker counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct WorkerStats {
    pub total: i64,
    pub online: i64,
}

/// Computes all counts in one round trip.
pub async fn load(db: impl PgExecutor<'_>) -> sqlx::Result<Stats> {
    let counts = sqlx::query!(
        r#"SELECT
            COALESCE((SELECT jsonb_object_agg(status, n) FROM
                (SELECT status, count(*) AS n FROM llm_tasks GROUP BY status) s), '{}'::jsonb)
                AS "by_status!: Json<BTreeMap<String, i64>>",
            (SELECT count(*) FROM leases) AS "leases_total!",
            (SELECT count(*) FROM leases WHERE status = 'active') AS "leases_active!",
            (SELECT count(*) FROM workers) AS "workers_total!",
            (SELECT count(*) FROM workers WHERE status = 'online') AS "workers_online!""#
    )
    .fetch_one(db)
    .await?;
    let by_status = counts.by_status.0;
    Ok(Stats {
        tasks: TaskStats { total: by_status.values().sum(), by_status },
        leases: LeaseStats { total: counts.leases_total, active: counts.leases_active },
        workers: WorkerStats { total: counts.workers_total, online: counts.workers_online },
        artifacts: None,
        counted_up_to: None,
    })
}

/// [`load`] with every task count by status and the lease total counted up to `limit`
/// (read from the `(status, created_at)` index and stopped there): its cost is bounded
/// whatever the number of tasks, which an exact count is not (a scan of every row).
pub async fn load_up_to(db: impl PgExecutor<'_>, limit: i64) -> sqlx::Result<Stats> {
    let statuses: Vec<&str> = TaskStatus::ALL.iter().map(|s| s.as_str()).collect();
    let counts = sqlx::query!(
        r#"SELECT
            (SELECT jsonb_object_agg(s.status, s.n) FROM
                (SELECT u.status, (SELECT count(*) FROM (SELECT 1 FROM llm_tasks t WHERE t.status = u.status LIMIT $1) x) AS n
                 FROM unnest($2::text[]) AS u(status)) s WHERE s.n > 0)
                AS "by_status: Json<BTreeMap<String, i64>>",
            (SELECT count(*) FROM (SELECT 1 FROM leases LIMIT $1) x) AS "leases_total!",
            (SELECT count(*) FROM leases WHERE status = 'active') AS "leases_active!",
            (SELECT count(*) FROM workers) AS "workers_total!",
            (SELECT count(*) FROM workers WHERE status = 'online') AS "workers_online!""#,
        limit,
        &statuses as _,
    )
    .fetch_one(db)
    .await?;
    let by_status = counts.by_status.map(|j| j.0).unwrap_or_default();
    Ok(Stats {
        tasks: TaskStats { total: by_status.values().sum(), by_status },
        leases: LeaseStats { total: counts.leases_total, active: counts.leases_active },
        workers: WorkerStats { total: counts.workers_total, online: counts.workers_online },
        artifacts: None,
        counted_up_to: Some(limit),
    })
}

/// Rows of the outbox not yet acknowledged by JetStream.
pub async fn outbox_backlog(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT count(*) AS "rows!" FROM outbox"#).fetch_one(db).await
}
