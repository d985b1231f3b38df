//! Leader election by a Postgres session advisory lock.
//!
//! The lock lives as long as the dedicated (unpooled) connection that took it: when the
//! leader process dies or its connection breaks, Postgres releases the lock and another
//! replica's next [`try_acquire`] succeeds.

use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// A held leadership. Dropping it closes its connection, which releases the lock.
pub struct Leadership {
    conn: PgConnection,
    key: i64,
}

/// Tries to become leader for `key` without waiting, on a new connection.
pub async fn try_acquire(pool: &PgPool, key: i64) -> sqlx::Result<Option<Leadership>> {
    let mut conn = pool.connect_options().connect().await?;
    let got = sqlx::query_scalar!(r#"SELECT pg_try_advisory_lock($1) AS "got!""#, key).fetch_one(&mut conn).await?;
    if got {
        Ok(Some(Leadership { conn, key }))
    } else {
        let _ = conn.close().await;
        Ok(None)
    }
}

impl Leadership {
    /// Checks that the connection is alive and still owns the lock.
    pub async fn still_held(&mut self) -> bool {
        let held = sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
                AND classid = (($1::bigint >> 32) & x'FFFFFFFF'::bigint)::oid
                AND objid = ($1::bigint & x'FFFFFFFF'::bigint)::oid AND granted) AS "held!""#,
            self.key
        )
        .fetch_one(&mut self.conn)
        .await;
        held.unwrap_or(false)
    }

    /// Gives up leadership explicitly.
    pub async fn release(mut self) {
        let _ = sqlx::query_scalar!("SELECT pg_advisory_unlock($1)", self.key).fetch_one(&mut self.conn).await;
        let _ = self.conn.close().await;
    }
}
