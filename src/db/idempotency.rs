//! `idempotency_keys`: the keys submissions were made with, kept for a retention window.
//! A key is taken by the transaction that creates its task; a concurrent submission with
//! the same key waits on the key's unique index until that transaction ends, then finds
//! the key taken (or, if it rolled back, takes it).

use sqlx::{PgConnection, PgExecutor};

/// A key as stored: the task it created and the hash of the request that created it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRecord {
    pub key: String,
    pub task_id: String,
    pub request_hash: String,
}

/// Takes the keys not held by a record created at or after `window_start` (a record
/// older than that is replaced); returns the keys taken. Keys must be distinct.
pub async fn take(
    db: &mut PgConnection,
    records: &[KeyRecord],
    window_start: i64,
    now: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        r#"INSERT INTO idempotency_keys (key, task_id, request_hash, created_at)
           SELECT * , $4::bigint FROM UNNEST($1::text[], $2::text[], $3::text[])
           ON CONFLICT (key) DO UPDATE
               SET task_id = EXCLUDED.task_id, request_hash = EXCLUDED.request_hash, created_at = EXCLUDED.created_at
               WHERE idempotency_keys.created_at < $5
           RETURNING key"#,
        &records.iter().map(|r| r.key.clone()).collect::<Vec<_>>(),
        &records.iter().map(|r| r.task_id.clone()).collect::<Vec<_>>(),
        &records.iter().map(|r| r.request_hash.clone()).collect::<Vec<_>>(),
        now,
        window_start
    )
    .fetch_all(db)
    .await
}

/// The records of `keys`.
pub async fn get_many(db: impl PgExecutor<'_>, keys: &[String]) -> sqlx::Result<Vec<KeyRecord>> {
    sqlx::query_as!(KeyRecord, "SELECT key, task_id, request_hash FROM idempotency_keys WHERE key = ANY($1)", keys)
        .fetch_all(db)
        .await
}

/// Deletes up to `limit` records created before `window_start`; returns how many.
pub async fn forget_expired(db: impl PgExecutor<'_>, window_start: i64, limit: i64) -> sqlx::Result<u64> {
    Ok(sqlx::query!(
        "DELETE FROM idempotency_keys WHERE key IN (
             SELECT key FROM idempotency_keys WHERE created_at < $1 ORDER BY created_at LIMIT $2
             FOR UPDATE SKIP LOCKED)",
        window_start,
        limit
    )
    .execute(db)
    .await?
    .rows_affected())
}
