//! Postgres: the pool, migrations and every SQL statement of the runtime.
//!
//! Postgres is the single source of truth. All task and lease state changes live in
//! [`lifecycle`]; the other modules read and write the tables that have no state machine.

pub mod artifacts;
pub mod audit;
pub mod dedicated;
pub mod leader;
pub mod leases;
pub mod lifecycle;
pub mod outbox;
pub mod page;
pub mod results;
pub mod settings;
pub mod stats;
pub mod tasks;
pub mod workers;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgDatabaseError, PgPoolOptions, PgSeverity};
use sqlx::PgPool;

pub use dedicated::Dedicated;
pub use page::{Cursor, Page};

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
    // tables without a usable index are still scanned.
    let connect = connect.options([("statement_timeout", statement_timeout.as_str()), ("enable_seqscan", "off")]);
    PgPoolOptions::new()
        .max_connections(opts.max_connections)
        .acquire_timeout(opts.acquire_timeout)
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
    /// SQLSTATEs after which the session, not the statement, is what is wrong.
    const SESSION_STATES: [&str; 3] = ["0A000", "26000", "25006"];
    match e {
        sqlx::Error::Database(d) => !d.try_downcast_ref::<PgDatabaseError>().is_some_and(|p| {
            matches!(p.severity(), PgSeverity::Fatal | PgSeverity::Panic)
                || SESSION_STATES.contains(&p.code())
                || p.code().starts_with("08")
                || p.code().starts_with("57")
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

/// Applies pending migrations. Safe to run concurrently from several processes:
/// sqlx serialises them with an advisory lock.
/// Whether Postgres answers a trivial query (health and readiness).
pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

/// A connection of its own (outside the pool) whose commits do not wait for the WAL
/// flush: for writes whose loss in a crash is harmless (the outbox deletes of the
/// dispatcher: a lost delete means one redundant publish, which claims refuse).
pub async fn async_commit_connection(pool: &PgPool) -> sqlx::Result<sqlx::PgConnection> {
    use sqlx::ConnectOptions;
    let mut conn = pool.connect_options().connect().await?;
    sqlx::query("SET synchronous_commit = off").execute(&mut conn).await?;
    Ok(conn)
}

/// Applies the migrations.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
