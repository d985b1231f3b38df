//! Postgres: the pool, migrations and every SQL statement of the runtime.
//!
//! Postgres is the single source of truth. All task and lease state changes live in
//! [`lifecycle`]; the other modules read and write the tables that have no state machine.

pub mod activity;
pub mod admission;
pub mod artifacts;
pub mod audit;
pub mod budgets;
pub mod concurrency;
pub mod dedicated;
pub mod failures;
pub mod holds;
pub mod idempotency;
pub mod leader;
pub mod leases;
pub mod lifecycle;
pub mod outbox;
pub mod page;
pub mod projects;
pub mod results;
mod rows;
pub mod sessions;
pub mod settings;
pub mod stats;
pub mod tasks;
pub mod usage;
pub mod workers;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPoolOptions, PgSeverity};
use sqlx::PgPool;

pub use dedicated::Dedicated;
pub use page::{Cursor, Page};
pub use sessions::{is_stale_session, retire_sessions};

/// The embedded migrations of `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Pool settings.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    pub statement_timeout: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

/// Connects a pool. Every connection carries a statement timeout so no query can hang
/// a caller forever.
pub async fn connect(url: &str, opts: &PoolOptions) -> Result<PgPool, sqlx::Error> {
    let connect: PgConnectOptions = url.parse()?;
    let statement_timeout = opts.statement_timeout.as_millis().to_string();
    // Statements are prepared once per connection and Postgres soon plans them once for
    // all executions (a generic plan). A plan made while the tables are still small would
    // read them sequentially for the connection's life: every claim and completion batch
    // would scan all of `llm_tasks`. With sequential scans disabled the planner takes an
    // index wherever one answers the query, whatever the table's size when it planned;
    // tables without a usable index are still scanned. Such a scan carries the disabled
    // scan's cost (10^10) into its statement's estimate, far above `jit_above_cost`: with
    // JIT on, Postgres would compile that statement with LLVM at every execution (about a
    // second). No statement here runs long enough for compiling to pay: JIT is off.
    let connect =
        connect.options([("statement_timeout", statement_timeout.as_str()), ("enable_seqscan", "off"), ("jit", "off")]);
    PgPoolOptions::new()
        .max_connections(opts.max_connections)
        .acquire_timeout(opts.acquire_timeout)
        // A session that a migration left with prepared statements that no longer fit is
        // closed when next taken (see `retire_sessions`), so the pool opens a new one.
        .before_acquire(|_, meta| Box::pin(async move { Ok(!sessions::opened_before_retirement(meta.age)) }))
        .connect_with(connect)
        .await
}

/// Whether Postgres refused a statement (a constraint, bad data) on a connection that is
/// still usable, as opposed to a lost connection, a timeout, a fatal error that ended
/// the session (a terminated backend, a server shutting down), or an error that the
/// session would repeat on every call: a prepared statement whose result type changed
/// under it (a migration added a column), a missing prepared statement, a server that
/// became read-only (a failover).
pub fn is_refusal(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => !d.try_downcast_ref::<PgDatabaseError>().is_some_and(|p| {
            matches!(p.severity(), PgSeverity::Fatal | PgSeverity::Panic)
                || sessions::STALE_STATEMENT_STATES.contains(&p.code())
                || p.code() == "25006"
                || p.code().starts_with("08")
                || p.code().starts_with("57")
        }),
        _ => false,
    }
}

/// Whether the database is unreachable or refusing work for now (a lost or refused
/// connection, a timeout, a server shutting down or out of resources, a read-only
/// server during a failover, a serialization failure or deadlock): retrying later can
/// succeed, so callers answer 503 rather than 500.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|c| {
            ["08", "53", "57"].iter().any(|class| c.starts_with(class)) || ["25006", "40001", "40P01"].contains(&&*c)
        }),
        _ => false,
    }
}

/// Whether Postgres refused a statement because of the data it was given (SQLSTATE
/// classes 22, data exception; 23, integrity constraint violation; 54, program limit
/// exceeded): the same data is refused again, unlike a deadlock, a full disk or a lock
/// timeout, which pass.
pub fn is_data_refusal(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.code().is_some_and(|c| ["22", "23", "54"].iter().any(|class| c.starts_with(class)))
        }
        _ => false,
    }
}

/// Whether Postgres answers a trivial query (health and readiness).
pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query_scalar!("SELECT 1 AS one").fetch_one(pool).await.is_ok()
}

/// A connection of its own (outside the pool) whose commits do not wait for the WAL
/// flush: for writes whose loss in a crash is harmless (the outbox deletes of the
/// dispatcher: a lost delete means one redundant publish, which claims refuse).
///
/// Its statements use generic plans from the first execution, as [`Dedicated`]'s do: left
/// to choose, Postgres planned the outbox delete again at every call (0.04 ms, twice its
/// execution).
pub async fn async_commit_connection(pool: &PgPool) -> sqlx::Result<sqlx::PgConnection> {
    use sqlx::ConnectOptions;
    let options = pool.connect_options().as_ref().clone();
    options.options([("synchronous_commit", "off"), ("plan_cache_mode", "force_generic_plan")]).connect().await
}

/// Applies pending migrations. Safe to run concurrently from several processes:
/// sqlx serialises them with an advisory lock.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

#[cfg(test)]
mod tests {
    use crate::domain::{CloneStatus, LeaseStatus, ResultStatus, TaskStatus, WorkerStatus};

    /// Every file with statements of the runtime, as written (`mod.rs` has none with a state).
    const STATEMENTS: [(&str, &str); 22] = [
        ("artifacts.rs", include_str!("artifacts.rs")),
        ("audit.rs", include_str!("audit.rs")),
        ("leases.rs", include_str!("leases.rs")),
        ("outbox.rs", include_str!("outbox.rs")),
        ("results.rs", include_str!("results.rs")),
        ("stats.rs", include_str!("stats.rs")),
        ("tasks.rs", include_str!("tasks.rs")),
        ("workers.rs", include_str!("workers.rs")),
        ("lifecycle/claim.sql", include_str!("lifecycle/claim.sql")),
        ("lifecycle/complete.sql", include_str!("lifecycle/complete.sql")),
        ("lifecycle/create.sql", include_str!("lifecycle/create.sql")),
        ("lifecycle/heartbeat.sql", include_str!("lifecycle/heartbeat.sql")),
        ("lifecycle/expire.rs", include_str!("lifecycle/expire.rs")),
        ("lifecycle/assign.rs", include_str!("lifecycle/assign.rs")),
        ("lifecycle/abandon.rs", include_str!("lifecycle/abandon.rs")),
        ("lifecycle/lease.rs", include_str!("lifecycle/lease.rs")),
        ("lifecycle/release.rs", include_str!("lifecycle/release.rs")),
        ("lifecycle/requeue.rs", include_str!("lifecycle/requeue.rs")),
        ("lifecycle/reroute.rs", include_str!("lifecycle/reroute.rs")),
        ("settings.rs", include_str!("settings.rs")),
        ("leader.rs", include_str!("leader.rs")),
        ("projects.rs", include_str!("projects.rs")),
    ];

    /// The states compared with or written to a `status` column, as literals: in
    /// `status = 'x'`, `status <> 'x'`, `status IN ('x', 'y')` and `(status || '') = 'x'`.
    fn status_literals(sql: &str) -> Vec<String> {
        let mut found = Vec::new();
        for (at, _) in sql.match_indices("status") {
            let rest = sql[at + "status".len()..].trim_start();
            let rest = rest.strip_prefix("|| '')").unwrap_or(rest).trim_start();
            let Some(rest) = ["=", "<>", "IN"].iter().find_map(|op| rest.strip_prefix(op)) else { continue };
            let mut rest = rest.trim_start();
            rest = rest.strip_prefix('(').unwrap_or(rest).trim_start();
            while let Some(quoted) = rest.strip_prefix('\'') {
                let Some(end) = quoted.find('\'') else { break };
                found.push(quoted[..end].to_owned());
                rest = quoted[end + 1..].trim_start();
                rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
            }
        }
        found
    }

    /// States are literals in the SQL where the planner needs them (the partial indexes
    /// on active leases and queued tasks only serve statements that name the state), so
    /// every literal must be a state the Rust enums know.
    #[test]
    fn every_status_literal_in_the_sql_is_a_known_state() {
        let known = |s: &str| {
            TaskStatus::parse(s).is_some()
                || LeaseStatus::parse(s).is_some()
                || WorkerStatus::parse(s).is_some()
                || [ResultStatus::Success, ResultStatus::Error].iter().any(|r| r.as_str() == s)
                || [
                    CloneStatus::Pending,
                    CloneStatus::Cloning,
                    CloneStatus::Cloned,
                    CloneStatus::Failed,
                    CloneStatus::Propagating,
                    CloneStatus::Synced,
                ]
                .iter()
                .any(|c| c.as_str() == s)
        };
        let mut seen = 0;
        for (file, sql) in STATEMENTS {
            for literal in status_literals(sql) {
                assert!(known(&literal), "{file}: '{literal}' is not a state of any status enum");
                seen += 1;
            }
        }
        assert!(seen > 40, "the scan found only {seen} literals");
        assert_eq!(
            status_literals("WHERE (t.status || '') IN ('leased', 'running') AND status = 'qeued'"),
            ["leased", "running", "qeued"]
        );
    }
}
