//! The dispatch path's batch statements find their rows by key even when Postgres plans
//! them once, on empty tables, for the connection's life: a cached plan that scanned
//! `llm_tasks` or `leases` (or a whole index of theirs) would make every batch slower as
//! the tables grow.

use sqlx::Row;

use crate::common::fresh_db;

/// The plan `EXPLAIN EXECUTE <statement>(<args>)` prints.
async fn explain(conn: &mut sqlx::PgConnection, statement: &str, args: &str) -> String {
    let rows = sqlx::raw_sql(&format!("EXPLAIN EXECUTE {statement}({args})")).fetch_all(conn).await.unwrap();
    rows.iter().map(|row| row.get::<String, _>(0)).collect::<Vec<_>>().join("\n")
}

/// The scans of the hot tables (and of `workers`, which submissions consult) in a plan's
/// text that do not look rows up by key: sequential scans, and index scans whose
/// condition names no key (a pass over a whole index, or over every entry of one status:
/// the planner believes these small, while between vacuums they hold thousands of dead
/// entries).
fn table_scans(plan: &str) -> Vec<String> {
    let lines: Vec<&str> = plan.lines().collect();
    let mut scans = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if !(line.contains(" on llm_tasks") || line.contains(" on leases") || line.contains(" on workers")) {
            continue;
        }
        // A node's details follow it up to the next node.
        let keyed = || {
            lines[i + 1..].iter().take_while(|d| !d.contains("->")).any(|d| {
                d.contains("Index Cond") && (d.contains("id)") || d.contains("id =") || d.contains("expires_at"))
            })
        };
        // An `id` condition served by an index whose first key is not `id` is a pass over
        // that whole index.
        let by_id_off_key = (line.contains("Index Scan") || line.contains("Index Only Scan"))
            && !line.contains("_pkey")
            && lines[i + 1..]
                .iter()
                .take_while(|d| !d.contains("->"))
                .any(|d| d.contains("Index Cond") && d.contains("(id)"));
        if line.contains("Seq Scan") || by_id_off_key || (line.contains("Index") && line.contains("Scan") && !keyed()) {
            scans.push(line.trim().to_owned());
        }
    }
    scans
}

/// Index conditions that join on a key and also name an array of keys
/// (`id = r.task_id AND id = ANY($3)`): the scan is repeated for every row of the join,
/// and each repetition sorts the whole array again (`_bt_preprocess_array_keys`), so the
/// statement's cost grows with the square of its batch. The array belongs on a scan that
/// runs once.
fn array_keys_per_rescan(plan: &str) -> Vec<String> {
    plan.lines()
        .filter(|line| line.contains("Index Cond") && line.contains("= ANY (") && line.contains(" AND "))
        .map(|line| line.trim().to_owned())
        .collect()
}

/// The number of parameters of a statement (its highest `$n`).
fn params(sql: &str) -> usize {
    sql.split('$')
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Prepares every hot statement with a generic plan and checks it looks rows up by key.
async fn check_hot_statements(conn: &mut sqlx::PgConnection) {
    sqlx::raw_sql("DEALLOCATE ALL; SET plan_cache_mode = force_generic_plan").execute(&mut *conn).await.unwrap();
    for (name, sql) in bloom::db::lifecycle::HOT_STATEMENTS {
        // Every parameter is NULL: a generic plan does not look at the values.
        let max_param = params(sql);
        sqlx::raw_sql(&format!("PREPARE hot_{name} AS {sql}")).execute(&mut *conn).await.unwrap();
        let nulls = vec!["NULL"; max_param].join(", ");
        let plan = explain(&mut *conn, &format!("hot_{name}"), &nulls).await;
        assert!(plan.contains("Index"), "{name}: no index in the plan:\n{plan}");
        assert_eq!(table_scans(&plan), Vec::<String>::new(), "{name} scans a hot table:\n{plan}");
        assert_eq!(array_keys_per_rescan(&plan), Vec::<String>::new(), "{name} sorts its keys per row:\n{plan}");
    }
}

#[tokio::test]
async fn hot_statements_use_keys_in_plans_made_on_empty_tables() {
    let (pool, _) = fresh_db().await;
    // Detached: DEALLOCATE ALL would leave a pooled connection's statement cache stale.
    let mut conn = pool.acquire().await.unwrap().detach();
    // The worst case: one plan for all executions, made now, while the tables are empty.
    check_hot_statements(&mut conn).await;
}

#[tokio::test]
async fn hot_statements_use_keys_in_plans_made_on_tables_of_finished_work() {
    // What a busy installation's statistics say: thousands of tasks and leases, nearly all
    // finished. A plan made from them once went through every entry of the status index
    // for the few active leases (and met the dead entries of thousands of finished ones).
    let (pool, _) = fresh_db().await;
    sqlx::raw_sql(
        "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at, lease_id, worker_id)
         SELECT 't' || i, 'ctx-' || (i % 1000), 'a', 'p', CASE WHEN i % 2500 = 0 THEN 'leased' ELSE 'completed' END,
                i, i, 'l' || i, 'w' || (i % 2)
         FROM generate_series(1, 5000) i;
         INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, context_id)
         SELECT 'l' || i, 't' || i, 'w' || (i % 2), i, i + 60000, 60,
                CASE WHEN i % 2500 = 0 THEN 'active' ELSE 'released' END, i, 'ctx-' || (i % 1000)
         FROM generate_series(1, 5000) i;
         ANALYZE llm_tasks; ANALYZE leases",
    )
    .execute(&pool)
    .await
    .unwrap();
    // Detached: DEALLOCATE ALL would leave a pooled connection's statement cache stale.
    let mut conn = pool.acquire().await.unwrap().detach();
    check_hot_statements(&mut conn).await;
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
    let plan = explain(&mut conn, "hot_claim", &vec!["NULL"; params(claim)].join(", ")).await;
    assert!(table_scans(&plan).iter().any(|s| s.contains("Seq Scan on llm_tasks")), "expected a scan:\n{plan}");
}

/// The index entries of `llm_tasks` a statement read (its functions' statements
/// included), from this transaction's statistics.
async fn task_index_entries_read(conn: &mut sqlx::PgConnection, statement: &str) -> i64 {
    index_entries_read(conn, "llm_tasks", statement).await
}

/// The index entries of `table` a statement read (its functions' statements included),
/// from this transaction's statistics; the statement is rolled back.
async fn index_entries_read(conn: &mut sqlx::PgConnection, table: &str, statement: &str) -> i64 {
    let mut tx = sqlx::Connection::begin(&mut *conn).await.unwrap();
    sqlx::raw_sql(statement).execute(&mut *tx).await.unwrap();
    let read: i64 = sqlx::query_scalar(
        "SELECT sum(pg_stat_get_xact_tuples_returned(indexrelid))::bigint FROM pg_index
         WHERE indrelid = $1::regclass",
    )
    .bind(table)
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    read
}

/// The statistics the slot lookups were planned from.
#[derive(Clone, Copy, PartialEq)]
enum Statistics {
    /// Analyzed while no task waited: what a busy installation's say most of the time.
    NoneWaiting,
    /// None yet: a new database.
    Missing,
}

/// A database where 5,000 tasks ran (each once waited for a slot: their entries in the
/// slots' index dead, not vacuumed yet), and a connection that planned the release and the
/// wake of a slot and the due pass's statements (generic plans, made once, as on the
/// reconcilers' connections) from `statistics`; then 2,000 tasks wait, 20 on each of the
/// slots `k0` to `k99`, without the plans being made again. Returns that connection.
async fn waiting_after_plans_made(statistics: Statistics) -> sqlx::PgConnection {
    let (pool, _) = fresh_db().await;
    let analyze = if statistics == Statistics::NoneWaiting { "ANALYZE llm_tasks" } else { "SELECT 1" };
    sqlx::raw_sql(&format!(
        "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at, blocked_on)
         SELECT 't' || i, 'ctx-' || (i % 1000), 'a', 'p', 'completed', i, i, 'concurrency_key:k' || (i % 1000)
         FROM generate_series(1, 5000) i;
         UPDATE llm_tasks SET blocked_on = NULL;
         {analyze}"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap().detach();
    sqlx::raw_sql(
        "SET plan_cache_mode = force_generic_plan;
         SELECT bloom_release_slots(ARRAY['concurrency_key:quiet']);
         SELECT bloom_wake(ARRAY['concurrency_key:quiet'])",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    // The due pass's statements, prepared and planned now too (`pass_<name>`).
    for (name, sql) in bloom::db::lifecycle::DUE_STATEMENTS {
        sqlx::raw_sql(&format!("PREPARE pass_{name} AS {sql}; EXECUTE pass_{name}(1, 1000)"))
            .execute(&mut conn)
            .await
            .unwrap();
    }
    sqlx::raw_sql(
        "INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, status, created_at, updated_at, dispatch_seq,
                                blocked_on)
         SELECT 'w' || i, 'ctx-' || i, 'a', 'p', 'queued', 10000 + i, 10000 + i, -1, 'concurrency_key:k' || (i % 100)
         FROM generate_series(1, 2000) i",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn
}

/// The tasks made due, oldest first.
async fn due(conn: &mut sqlx::PgConnection) -> Vec<String> {
    sqlx::query_scalar("SELECT id FROM llm_tasks WHERE not_before = 0 ORDER BY created_at")
        .fetch_all(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn wakes_read_only_their_slots_waiting_tasks_in_plans_made_while_none_waited() {
    // A lease's end wakes waiting tasks of its slots. PL/pgSQL plans that lookup once per
    // connection; planned while statistics said no task waits, it once read every waiting
    // task of every slot for each slot ended.
    let mut conn = waiting_after_plans_made(Statistics::NoneWaiting).await;
    let release =
        task_index_entries_read(&mut conn, "SELECT bloom_release_slots(ARRAY['concurrency_key:quiet'])").await;
    let wake = task_index_entries_read(&mut conn, "SELECT bloom_wake(ARRAY['concurrency_key:quiet'])").await;
    // Every waiting task read for each lookup: 2,000 entries or more; the slot's own
    // entries (here the few dead ones of finished tasks): a handful.
    assert!(release < 100, "the release of a slot nothing waits on read {release} index entries of tasks");
    assert!(wake < 100, "the wake of a slot nothing waits on read {wake} index entries of tasks");
    // The probes still find their slot's tasks: an end on k7 makes its oldest waiter due.
    sqlx::raw_sql("SELECT bloom_release_slots(ARRAY['concurrency_key:k7'])").execute(&mut conn).await.unwrap();
    assert_eq!(due(&mut conn).await, vec!["w7".to_owned()]);
}

#[tokio::test]
async fn a_slots_waiting_tasks_are_read_in_order_in_plans_made_on_a_new_database() {
    // Planned with no statistics, the lookup read all of a slot's waiting tasks and sorted
    // them; it reads them in the index's order (priority, then age) up to the first that
    // can be woken.
    let mut conn = waiting_after_plans_made(Statistics::Missing).await;
    // 20 tasks wait on k7, behind the dead entries of 5 that ran: all 25 read and sorted,
    // against those up to the first waiting one and the woken task's key.
    let release = task_index_entries_read(&mut conn, "SELECT bloom_release_slots(ARRAY['concurrency_key:k7'])").await;
    assert!(release <= 10, "the release of a slot 20 tasks wait on read {release} index entries of tasks");
    sqlx::raw_sql("SELECT bloom_release_slots(ARRAY['concurrency_key:k7', 'concurrency_key:k7'])")
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(due(&mut conn).await, vec!["w7".to_owned(), "w107".to_owned()]);
}

#[tokio::test]
async fn due_passes_read_only_the_due_tasks_in_plans_made_while_none_waited() {
    // A due pass finds the due tasks by `not_before`, then updates them (and holds budget
    // waiters). Those updates once went through the index of all waiting tasks to find
    // their rows, reading every waiting task at each pass.
    let mut conn = waiting_after_plans_made(Statistics::NoneWaiting).await;
    sqlx::raw_sql("UPDATE llm_tasks SET not_before = 0 WHERE id = 'w7'").execute(&mut conn).await.unwrap();
    for (name, _) in bloom::db::lifecycle::DUE_STATEMENTS {
        let read = task_index_entries_read(&mut conn, &format!("EXECUTE pass_{name}(1, 1000)")).await;
        // 2,000 waiting tasks or more when it reads them all; the due one and the rows
        // updated by key here.
        assert!(read < 100, "{name}: a due pass with one task due read {read} index entries of tasks");
    }
    // With a budget set, the hold looks at the due tasks' counters and their waiters too.
    sqlx::raw_sql(
        "INSERT INTO budget_limits (scope, key, metric, period, max_amount, updated_at)
         VALUES ('agent_slug', 'a', 'requests', 'minute', 10, 0)",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let read = task_index_entries_read(&mut conn, "EXECUTE pass_hold_budget_waiters(1, 1000)").await;
    assert!(read < 100, "a budget hold with one task due read {read} index entries of tasks");
    sqlx::raw_sql("EXECUTE pass_due(1, 1000)").execute(&mut conn).await.unwrap();
    let dispatched: Vec<(String, i64)> =
        sqlx::query_as("SELECT id, dispatch_seq FROM llm_tasks WHERE dispatch_seq > 0 AND status = 'queued'")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(dispatched, vec![("w7".to_owned(), 2)], "the due task got its next dispatch");
}

#[tokio::test]
async fn admissions_count_only_their_slots_leases_in_plans_made_on_empty_tables() {
    // An admission counts a slot's running tasks from the active leases holding it, through
    // an index of the active leases by slot. Planned on empty tables, the count once went
    // through the index of all active leases by expiry (its status matched that index's
    // predicate too); and with the slots compared under the collation of the ids passed
    // (byte order for a claim's, the database's for a literal), the slots' index did not
    // answer the comparison and was read whole. Either read every active lease (or every
    // keyed lease, ended ones included) for each slot of a batch.
    let (pool, _) = fresh_db().await;
    sqlx::raw_sql(
        "INSERT INTO concurrency_limits (scope, key, max_running, updated_at) VALUES ('concurrency_key', '*', 21, 0);
         INSERT INTO llm_tasks (id, context_id, agent_slug, prompt, created_at, updated_at, concurrency_key)
         VALUES ('x', 'c', 'a', 'p', 0, 0, 'k7'), ('y', 'c', 'a', 'p', 0, 0, 'k7')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap().detach();
    // The ids as a claim passes them, from the tasks' rows (`COLLATE "C"`): PL/pgSQL gives
    // the function's text variables the collation of its arguments.
    let admit = "SELECT * FROM bloom_admit(ARRAY(SELECT id FROM llm_tasks WHERE id = 'x'), 0)";
    sqlx::raw_sql(&format!("SET plan_cache_mode = force_generic_plan; BEGIN; {admit}; ROLLBACK"))
        .execute(&mut conn)
        .await
        .unwrap();
    // 3,000 active leases: 20 on each of the keys k0 to k99, the rest of no key.
    sqlx::raw_sql(
        "INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat, slots)
         SELECT 'l' || i, 't' || i, 'w', 0, 60000, 60, 'active', 0,
                CASE WHEN i <= 2000 THEN ARRAY['concurrency_key:k' || (i % 100)] ELSE '{}' END
         FROM generate_series(1, 3000) i",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let read = index_entries_read(&mut conn, "leases", admit).await;
    assert!(read <= 25, "an admission of a slot 20 leases hold read {read} index entries of leases");
    // And it counted them: one more fits under the limit of 21, not two.
    let decided: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT admit_task, admit_blocked FROM bloom_admit(ARRAY['x', 'y'], 0) ORDER BY 1")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    assert_eq!(decided, [("x".into(), None), ("y".into(), Some("concurrency_key:k7".into()))]);
}

#[tokio::test]
async fn a_claim_counts_only_its_workers_leases_in_plans_made_on_empty_tables() {
    // A claim counts each worker's running tasks from its active leases. Planned on empty
    // tables, a count that matched the predicate of every partial index of active leases
    // could go through one of them whole (every active lease, for each worker).
    let (pool, _) = fresh_db().await;
    sqlx::raw_sql(
        "INSERT INTO workers (id, node_id, status, capabilities, registered_at, source)
         VALUES ('w1', 'n', 'online', '{\"max_concurrency\": 50}', 0, 'nats')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut conn = pool.acquire().await.unwrap().detach();
    // The ids as a claim passes them: from rows (`COLLATE "C"`).
    let room = "SELECT * FROM bloom_worker_room(ARRAY(SELECT id FROM workers WHERE id = 'w1'))";
    sqlx::raw_sql(&format!("SET plan_cache_mode = force_generic_plan; BEGIN; {room}; ROLLBACK"))
        .execute(&mut conn)
        .await
        .unwrap();
    // 3,000 active leases: 20 of worker w1, the rest of 20 other workers; and 1,000 ended
    // leases of w1.
    sqlx::raw_sql(
        "INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat)
         SELECT 'l' || i, 't' || i, CASE WHEN i <= 20 THEN 'w1' ELSE 'v' || (i % 20) END, 0, 60000, 60,
                'active', 0
         FROM generate_series(1, 3000) i;
         INSERT INTO leases (id, task_id, worker_id, started_at, expires_at, ttl_seconds, status, last_heartbeat)
         SELECT 'e' || i, 'u' || i, 'w1', 0, 60000, 60, 'released', 0 FROM generate_series(1, 1000) i",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let read = index_entries_read(&mut conn, "leases", room).await;
    assert!(read <= 25, "counting a worker's 20 active leases read {read} index entries of leases");
    // And it counted them: 30 of its 50 slots are free.
    let free: (String, i32, bool) =
        sqlx::query_as("SELECT * FROM bloom_worker_room(ARRAY['w1'])").fetch_one(&mut conn).await.unwrap();
    assert_eq!(free, ("w1".into(), 30, false));
}
