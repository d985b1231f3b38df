//! A loop's own connection: kept across statements Postgres refuses, replaced after a
//! lost connection or a call that ran past its timeout, checked before use when idle.

use std::time::Duration;

use bloom::db::Dedicated;
use sqlx::PgConnection;

use crate::common::fresh_db;

/// The backend process serving the connection.
async fn backend(db: &mut Dedicated) -> sqlx::Result<i32> {
    db.run(|c: &mut PgConnection| {
        Box::pin(async move { sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(c).await })
    })
    .await
}

#[tokio::test]
async fn a_dedicated_connection_survives_refusals_and_is_replaced_after_failures() {
    let (pool, _) = fresh_db().await;
    let mut db = Dedicated::new(&pool, Duration::from_secs(3));
    let first = backend(&mut db).await.unwrap();
    assert_eq!(backend(&mut db).await.unwrap(), first, "one backend for successive statements");

    // Postgres refuses a statement: the connection stays.
    let refused = db.run(|c| Box::pin(async move { sqlx::query("SELECT 1 / 0").execute(c).await })).await;
    assert!(matches!(refused, Err(sqlx::Error::Database(_))), "{refused:?}");
    assert_eq!(backend(&mut db).await.unwrap(), first);

    // The backend is terminated while the connection is busy: the next call fails (or,
    // if it came after the idle check's delay, runs on a new connection), and the one
    // after runs on a new connection.
    sqlx::query("SELECT pg_terminate_backend($1)").bind(first).execute(&pool).await.unwrap();
    let second = match backend(&mut db).await {
        Ok(pid) => pid,
        Err(_) => backend(&mut db).await.unwrap(),
    };
    assert_ne!(second, first);

    // Terminated while idle: the check before use finds it dead and the call succeeds.
    sqlx::query("SELECT pg_terminate_backend($1)").bind(second).execute(&pool).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let third = backend(&mut db).await.expect("an idle connection is checked before use");
    assert_ne!(third, second);

    // A call past the timeout fails on the client side and the connection is replaced.
    let slow = db.run(|c| Box::pin(async move { sqlx::query("SELECT pg_sleep(30)").execute(c).await })).await;
    assert!(matches!(&slow, Err(sqlx::Error::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut), "{slow:?}");
    let fourth = backend(&mut db).await.unwrap();
    assert_ne!(fourth, third);
}

#[tokio::test]
async fn a_dedicated_connection_keeps_the_pool_settings_and_uses_generic_plans() {
    let (pool, _) = fresh_db().await;
    let mut db = Dedicated::new(&pool, Duration::from_secs(3));
    let settings: (String, String, String) = db
        .run(|c| {
            Box::pin(async move {
                sqlx::query_as(
                    "SELECT current_setting('plan_cache_mode'), current_setting('enable_seqscan'),
                            current_setting('statement_timeout')",
                )
                .fetch_one(c)
                .await
            })
        })
        .await
        .unwrap();
    let pooled: String =
        sqlx::query_scalar("SELECT current_setting('statement_timeout')").fetch_one(&pool).await.unwrap();
    assert_eq!(settings, ("force_generic_plan".to_owned(), "off".to_owned(), pooled));
}

/// A migration that changes what a prepared statement returns fails that statement on
/// every pooled session that prepared it; once the sessions are retired (by the API on
/// such an error, or by the schema watch when it sees a new migration), the pool opens new
/// ones and the statement runs again. One test: retiring is process-wide, and each part
/// checks that sessions opened after a retirement are kept.
#[tokio::test]
async fn pooled_sessions_left_stale_by_a_migration_are_replaced_once_retired() {
    let (_, url) = fresh_db().await;
    let pool =
        bloom::db::connect(&url, &bloom::db::PoolOptions { max_connections: 1, ..Default::default() }).await.unwrap();
    let backend = || sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()").fetch_one(&pool);
    let read = || sqlx::query_scalar::<_, String>("SELECT id FROM workers ORDER BY id LIMIT 1").fetch_optional(&pool);
    sqlx::query("INSERT INTO workers (id, node_id, registered_at) VALUES ('w-1', 'n-1', 0)")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(read().await.unwrap().as_deref(), Some("w-1"));
    let before = backend().await.unwrap();

    // Another session changes the column's collation (its result type, for Postgres).
    let mut other = <PgConnection as sqlx::Connection>::connect(&url).await.unwrap();
    sqlx::query(r#"ALTER TABLE workers ALTER COLUMN id TYPE varchar COLLATE "POSIX""#)
        .execute(&mut other)
        .await
        .unwrap();
    let stale = read().await.unwrap_err();
    assert!(bloom::db::is_stale_session(&stale), "{stale:?}");
    assert!(bloom::db::is_stale_session(&read().await.unwrap_err()), "the session repeats it");

    bloom::db::retire_sessions();
    assert_eq!(read().await.unwrap().as_deref(), Some("w-1"));
    let after = backend().await.unwrap();
    assert_ne!(after, before, "a new session");
    assert_eq!(backend().await.unwrap(), after, "sessions opened after the retirement are kept");

    // The schema watch: a migration applied while the process runs retires the sessions
    // before any of their statements fails.
    let mut watch = bloom::db::sessions::SchemaWatch::default();
    assert!(!watch.check(&pool).await.unwrap(), "the first read only records the version");
    assert!(!watch.check(&pool).await.unwrap(), "nothing applied since");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99999, 'applied by a newer release', true, '\\x00', 1)",
    )
    .execute(&mut other)
    .await
    .unwrap();
    assert!(watch.check(&pool).await.unwrap(), "a new migration is seen");
    let replaced = backend().await.unwrap();
    assert_ne!(replaced, after, "the session opened before it was replaced");
    assert!(!watch.check(&pool).await.unwrap());
    assert_eq!(backend().await.unwrap(), replaced, "once");
}
