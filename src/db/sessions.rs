//! Pooled sessions that outlive a schema change: a migration that changes what a
//! prepared statement returns makes Postgres fail that statement on every session that
//! prepared it, at every call. Such sessions are retired, when a statement fails so
//! ([`is_stale_session`]) or when the schema watch sees a new migration ([`run`]): each
//! pooled session opened before is closed when next taken ([`opened_before_retirement`],
//! the pool's `before_acquire`), so each is replaced once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// SQLSTATEs of a statement the session's prepared form no longer fits: a migration
/// changed what it returns (`0A000`, "cached plan must not change result type") or it is
/// gone (`26000`). The session repeats them at every call of that statement; a new
/// session does not.
pub(super) const STALE_STATEMENT_STATES: [&str; 2] = ["0A000", "26000"];

/// Whether a statement failed because the session's prepared statements no longer fit
/// the schema ([`STALE_STATEMENT_STATES`]).
pub fn is_stale_session(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().is_some_and(|c| STALE_STATEMENT_STATES.contains(&&*c)))
}

/// When sessions were last retired, as microseconds since [`base`] plus one (0: never).
static RETIRED_AT: AtomicU64 = AtomicU64::new(0);
static BASE: OnceLock<Instant> = OnceLock::new();

fn base() -> Instant {
    *BASE.get_or_init(Instant::now)
}

/// Retires every pooled session opened before now: each is closed when next taken from
/// its pool instead of being handed out.
pub fn retire_sessions() {
    RETIRED_AT.store(base().elapsed().as_micros() as u64 + 1, Ordering::Release);
}

/// Whether a session of this age was opened before the last retirement.
pub(super) fn opened_before_retirement(age: Duration) -> bool {
    match RETIRED_AT.load(Ordering::Acquire) {
        0 => false,
        at => {
            let retired = base() + Duration::from_micros(at - 1);
            match Instant::now().checked_sub(age) {
                Some(opened) => opened <= retired,
                None => true,
            }
        }
    }
}

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
            retire_sessions();
        }
        self.seen = Some(now);
        Ok(changed)
    }
}

/// The schema watch: checks every `every` until `cancel`; a failed read is tried again at
/// the next check.
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
