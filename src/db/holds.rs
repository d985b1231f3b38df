//! Provider rate-limit holds on agents (`agent_holds`): written by `complete` when a run
//! reports a rate limit, read by every way of leasing a task.

use sqlx::PgExecutor;

/// When the hold on `agent_slug` ends, if it is held at `now`.
pub async fn held_until(db: impl PgExecutor<'_>, agent_slug: &str, now: i64) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar!("SELECT until FROM agent_holds WHERE agent_slug = $1 AND until > $2", agent_slug, now)
        .fetch_optional(db)
        .await
}

/// An agent held at some time: until when, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Hold {
    pub agent_slug: String,
    /// End of the hold (epoch ms).
    pub until: i64,
    /// The error that set it.
    pub reason: String,
    pub updated_at: i64,
}

/// Agents held at `now`, the longest hold first.
pub async fn active(db: impl PgExecutor<'_>, now: i64) -> sqlx::Result<Vec<Hold>> {
    sqlx::query_as!(
        Hold,
        "SELECT agent_slug, until, reason, updated_at FROM agent_holds WHERE until > $1 ORDER BY until DESC, agent_slug",
        now
    )
    .fetch_all(db)
    .await
}
