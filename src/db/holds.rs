//! Provider rate-limit holds (`provider_holds`, migration 0029): written by `complete`
//! when a run reports a rate limit, on the run's agent or on the key its policy names;
//! read by every way of leasing a task (`bloom_hold`).

use sqlx::PgExecutor;

use crate::domain::{ConcurrencyScope, Task};

/// The hold on a task at `now` that lasts longest, and the task's `wait_reason` while
/// it waits for it.
#[derive(Clone, Debug, PartialEq)]
pub struct HeldBy {
    pub until: i64,
    pub reason: String,
}

/// The hold on `task` (on its agent, conversation or concurrency key) at `now`, if any.
pub async fn held(db: impl PgExecutor<'_>, task: &Task, now: i64) -> sqlx::Result<Option<HeldBy>> {
    sqlx::query_as!(
        HeldBy,
        r#"SELECT until AS "until!", reason AS "reason!" FROM bloom_hold($1, $2, $3, $4)"#,
        task.agent_slug,
        task.context_id,
        task.concurrency_key,
        now
    )
    .fetch_optional(db)
    .await
}

/// A key held at some time: until when, and why.
#[derive(Clone, Debug, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct Hold {
    pub scope: ConcurrencyScope,
    pub key: String,
    /// End of the hold (epoch ms).
    pub until: i64,
    /// The error that set it.
    pub reason: String,
    pub updated_at: i64,
}

/// An agent held at some time (the shape of `GET /api/runtime/agent-holds`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct AgentHold {
    pub agent_slug: String,
    /// End of the hold (epoch ms).
    pub until: i64,
    /// The error that set it.
    pub reason: String,
    pub updated_at: i64,
}

impl Hold {
    /// The hold as an agent's, when it holds an agent.
    pub fn of_agent(self) -> Option<AgentHold> {
        (self.scope == ConcurrencyScope::AgentSlug).then_some(AgentHold {
            agent_slug: self.key,
            until: self.until,
            reason: self.reason,
            updated_at: self.updated_at,
        })
    }
}

/// Keys held at `now`, the longest hold first.
pub async fn active(db: impl PgExecutor<'_>, now: i64) -> sqlx::Result<Vec<Hold>> {
    sqlx::query_as!(
        Hold,
        r#"SELECT scope AS "scope: ConcurrencyScope", key, until, reason, updated_at FROM provider_holds
           WHERE until > $1 ORDER BY until DESC, scope, key"#,
        now
    )
    .fetch_all(db)
    .await
}
