//! The audit log. Transitions append to it inside their own transaction via [`insert`].

use sqlx::PgExecutor;

use super::Page;
use crate::domain::{new_id, AuditEntry, NewAudit};

/// Appends entries, all stamped `now`, in one statement.
pub async fn insert(db: impl PgExecutor<'_>, entries: &[NewAudit], now: i64) -> sqlx::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = entries.iter().map(|_| new_id()).collect();
    // Borrowed text arrays are bound as they are (`as _`): the macro's check wants owned
    // strings, Postgres checks the array's type.
    let text = |f: fn(&NewAudit) -> &str| entries.iter().map(f).collect::<Vec<&str>>();
    sqlx::query!(
        "INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
         SELECT r.id, $1, r.action, r.entity_type, r.entity_id, r.actor, r.detail
         FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
              AS r(id, action, entity_type, entity_id, actor, detail)",
        now,
        &ids,
        text(|e| e.action) as _,
        text(|e| e.entity_type) as _,
        text(|e| &e.entity_id) as _,
        text(|e| &e.actor) as _,
        text(|e| &e.detail) as _,
    )
    .execute(db)
    .await?;
    Ok(())
}

/// Newest first.
pub async fn list(db: impl PgExecutor<'_>, page: &Page) -> sqlx::Result<Vec<AuditEntry>> {
    let (key, id) = page.bounds();
    sqlx::query_as!(
        AuditEntry,
        "SELECT id, timestamp, action, entity_type, entity_id, actor, detail FROM audit_logs
         WHERE (timestamp, id) < ($1, $2)
         ORDER BY timestamp DESC, id DESC LIMIT $3",
        key,
        id,
        page.limit
    )
    .fetch_all(db)
    .await
}

/// The entries about any of `entities` (a task and its leases), oldest first, at most
/// `limit`.
pub async fn of_entities(db: impl PgExecutor<'_>, entities: &[&str], limit: i64) -> sqlx::Result<Vec<AuditEntry>> {
    sqlx::query_as!(
        AuditEntry,
        "SELECT id, timestamp, action, entity_type, entity_id, actor, detail FROM audit_logs
         WHERE entity_id = ANY($1) ORDER BY timestamp, id LIMIT $2",
        entities as _,
        limit
    )
    .fetch_all(db)
    .await
}
