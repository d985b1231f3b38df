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
