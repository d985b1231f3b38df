//! Watches the migrations applied to the database while the process runs: a migration
//! that changes what a prepared statement returns makes Postgres fail that statement on
//! every session that prepared it, at every call, so once a new one is seen the pool's
//! sessions are retired ([`super::retire_sessions`]) and each is replaced when next taken.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// How often the applied migrations are read.
pub const EVERY: Duration = Duration::from_secs(10);

/// The latest migration applied (0 when none).
pub async fn schema_version(pool: &PgPool) -> sqlx::Result<i64> {
    sqlx::query_scalar!(r#"SELECT COALESCE(max(version), 0) AS "version!" FROM _sqlx_migrations"#).fetch_one(pool).await
}

/// The migrations seen so far.
#[derive(Debug, Default)]
pub struct SchemaWatch {
    seen: Option<i64>,
}

impl SchemaWatch {
    /// Reads the latest migration; when it differs from the one seen before, retires the
    /// pool's sessions and returns true.
    pub async fn check(&mut self, pool: &PgPool) -> sqlx::Result<bool> {
        let now = schema_version(pool).await?;
        let changed = self.seen.is_some_and(|seen| seen != now);
        if changed {
            tracing::info!(version = now, "a migration was applied: database sessions are replaced");
            super::retire_sessions();
        }
        self.seen = Some(now);
        Ok(changed)
    }
}

/// Checks every `every` until `cancel`; a failed read is tried again at the next check.
pub async fn run(pool: PgPool, every: Duration, cancel: CancellationToken) {
    let mut watch = SchemaWatch::default();
    loop {
        if let Err(e) = watch.check(&pool).await {
            tracing::debug!(error = %e, "reading the applied migrations failed");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
