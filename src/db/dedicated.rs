//! A connection owned by one loop of the dispatch path.
//!
//! The batch statements of the dispatch path (create, claim, heartbeat, complete) run on
//! connections their loops own instead of on the pool: sqlx checks a pooled connection
//! with a round trip when it is taken and again when it is given back, which at small
//! batches costs Postgres as much as the statement itself, and the pool hands out its
//! connections in turn, so each of them prepares and plans every statement again. A
//! loop's own connection runs one statement per batch, on a backend that already has it
//! planned.
//!
//! Planned once, not per call: these connections use generic plans from the first
//! execution (`plan_cache_mode = force_generic_plan`). Left to choose, Postgres keeps
//! planning the batch statements for every execution (it estimates their generic plan
//! dearer than a custom one), which costs about 0.3 ms of its CPU per statement: at one
//! or two tasks per batch, more than executing it. The generic plans look rows up by
//! key whatever the tables' size (`enable_seqscan = off`, checked by
//! `tests/it/plans.rs`).

use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// A connection idle this long is checked with a round trip before it is used (a server
/// restarted meanwhile would otherwise fail the first statement). Busy loops never
/// wait this long, so they never pay for the check.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Connections are replaced after this long, like the pool's.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// One connection, opened on first use and again after it failed.
pub struct Dedicated {
    options: PgConnectOptions,
    conn: Option<Open>,
    timeout: Duration,
}

struct Open {
    conn: PgConnection,
    opened: Instant,
    used: Instant,
}

impl Dedicated {
    /// A connection with the pool's settings (statement timeout, planner settings) and
    /// generic plans. `timeout` bounds every call on the client side, connecting included.
    pub fn new(pool: &PgPool, timeout: Duration) -> Dedicated {
        let options = pool.connect_options().as_ref().clone().options([("plan_cache_mode", "force_generic_plan")]);
        Dedicated { options, conn: None, timeout }
    }

    /// Runs `f` on the connection. A failure other than Postgres refusing the statement
    /// (a lost connection, a timeout, a fatal error such as a terminated backend) closes
    /// the connection; the next call opens a new one.
    pub async fn run<T, F>(&mut self, f: F) -> sqlx::Result<T>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, sqlx::Result<T>>,
    {
        let (options, slot) = (&self.options, &mut self.conn);
        let result = tokio::time::timeout(self.timeout, async move {
            if let Some(open) = slot.as_mut() {
                let stale = open.opened.elapsed() > MAX_LIFETIME
                    || (open.used.elapsed() > IDLE_CHECK && open.conn.ping().await.is_err());
                if stale {
                    *slot = None;
                }
            }
            let open = match slot {
                Some(open) => open,
                None => {
                    let now = Instant::now();
                    slot.insert(Open { conn: options.connect().await?, opened: now, used: now })
                }
            };
            open.used = Instant::now();
            f(&mut open.conn).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "database call timed out")))
        });
        if matches!(&result, Err(e) if !super::is_refusal(e)) {
            self.conn = None;
        }
        result
    }
}
