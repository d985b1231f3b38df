//! The dispatch path's batch statements find their rows by key even when Postgres plans
//! them once, on empty tables, for the connection's life: a cached plan that scanned
//! `llm_tasks` or `leases` would make every batch slower as the tables grow.

use sqlx::Row;

use crate::common::fresh_db;

/// The plan `EXPLAIN EXECUTE <statement>(<args>)` prints.
async fn explain(conn: &mut sqlx::PgConnection, statement: &str, args: &str) -> String {
    let rows = sqlx::raw_sql(&format!("EXPLAIN EXECUTE {statement}({args})")).fetch_all(conn).await.unwrap();
    rows.iter().map(|row| row.get::<String, _>(0)).collect::<Vec<_>>().join("\n")
}

/// The scans a plan's text names on the hot tables.
fn table_scans(plan: &str) -> Vec<String> {
    plan.lines()
        .filter(|l| l.contains("Seq Scan on llm_tasks") || l.contains("Seq Scan on leases"))
        .map(|l| l.trim().to_owned())
        .collect()
}

#[tokio::test]
async fn hot_statements_use_keys_in_plans_made_on_empty_tables() {
    let (pool, _) = fresh_db().await;
    let mut conn = pool.acquire().await.unwrap();
    // The worst case: one plan for all executions, made now, while the tables are empty.
    sqlx::query("SET plan_cache_mode = force_generic_plan").execute(&mut *conn).await.unwrap();
    for (name, sql) in bloom::db::lifecycle::HOT_STATEMENTS {
        // Every parameter is NULL: a generic plan does not look at the values.
        let max_param = (1..=9).rev().find(|n| sql.contains(&format!("${n}"))).unwrap_or(0);
        sqlx::raw_sql(&format!("PREPARE hot_{name} AS {sql}")).execute(&mut *conn).await.unwrap();
        let nulls = vec!["NULL"; max_param].join(", ");
        let plan = explain(&mut conn, &format!("hot_{name}"), &nulls).await;
        assert!(plan.contains("Index"), "{name}: no index in the plan:\n{plan}");
        assert_eq!(table_scans(&plan), Vec::<String>::new(), "{name} scans a hot table:\n{plan}");
    }
}

#[tokio::test]
async fn the_same_plans_scan_without_the_connection_settings() {
    // The check above can fail: with the planner's defaults the claim's generic plan
    // made on empty tables is a sequential scan of `llm_tasks`.
    let (pool, _) = fresh_db().await;
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql("SET plan_cache_mode = force_generic_plan; SET enable_seqscan = on")
        .execute(&mut *conn)
        .await
        .unwrap();
    let (_, claim) = bloom::db::lifecycle::HOT_STATEMENTS.iter().find(|(n, _)| *n == "claim").unwrap();
    sqlx::raw_sql(&format!("PREPARE hot_claim AS {claim}")).execute(&mut *conn).await.unwrap();
    let plan = explain(&mut conn, "hot_claim", "NULL, NULL, NULL").await;
    assert!(!table_scans(&plan).is_empty(), "expected a scan:\n{plan}");
}
