//! Aggregate counts for `/api/runtime/stats` and metrics, computed in SQL.

use std::collections::BTreeMap;

use serde::Serialize;
use sqlx::PgExecutor;

/// The seed's stats shape.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Stats {
    pub tasks: TaskStats,
    pub leases: LeaseStats,
    pub workers: WorkerStats,
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
    let (by_status, leases_total, leases_active, workers_total, workers_online): (
        serde_json::Value,
        i64,
        i64,
        i64,
        i64,
    ) = sqlx::query_as(
        "SELECT
            COALESCE((SELECT jsonb_object_agg(status, n) FROM
                (SELECT status, count(*) AS n FROM llm_tasks GROUP BY status) s), '{}'::jsonb),
            (SELECT count(*) FROM leases),
            (SELECT count(*) FROM leases WHERE status = 'active'),
            (SELECT count(*) FROM workers),
            (SELECT count(*) FROM workers WHERE status = 'online')",
    )
    .fetch_one(db)
    .await?;
    let by_status: BTreeMap<String, i64> = serde_json::from_value(by_status).unwrap_or_default();
    Ok(Stats {
        tasks: TaskStats { total: by_status.values().sum(), by_status },
        leases: LeaseStats { total: leases_total, active: leases_active },
        workers: WorkerStats { total: workers_total, online: workers_online },
    })
}

/// Rows of the outbox not yet acknowledged by JetStream.
pub async fn outbox_backlog(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM outbox").fetch_one(db).await
}
