//! A connection owned by one loop of the dispatch path.
//!
//! The batch statements of the dispatch path (create, claim, heartbeat, complete) run on
//! connections their loops own instead of on the pool: sqlx checks a pooled connection
//! with a round trip when it is taken and again when it is given back, which at small
//! batches costs Postgres as much as the statement itself, and the pool hands out its
//! connections in turn, so each of them prepares and plans every statement again. A
//! loop's own connection runs one statement per batch, on a backend that already has it
//! planned.

use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection, PgPool};

/// One connection, opened on first use and again after it failed.
pub struct Dedicated {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    timeout: Duration,
}

impl Dedicated {
    /// A connection with the pool's settings (statement timeout, planner settings).
    /// `timeout` bounds every call on the client side, connecting included.
    pub fn new(pool: &PgPool, timeout: Duration) -> Dedicated {
        Dedicated { options: pool.connect_options().as_ref().clone(), conn: None, timeout }
    }

    /// Runs `f` on the connection. A failure other than Postgres refusing the statement
    /// (a lost connection, a timeout, a fatal error such as a terminated backend) closes
    /// the connection; the next call opens a new one.
    pub async fn run<T, F>(&mut self, f: F) -> sqlx::Result<T>
    where
        F: for<'c> FnOnce(&'c mut PgConnection) -> BoxFuture<'c, sqlx::Result<T>>,
    {
        let (options, conn) = (&self.options, &mut self.conn);
        let result = tokio::time::timeout(self.timeout, async move {
            if conn.is_none() {
                *conn = Some(options.connect().await?);
            }
            f(conn.as_mut().expect("connected above")).await
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
