//! The audit log. Transitions append to it inside their own transaction via [`insert`].

use sqlx::PgExecutor;

use super::Page;
use crate::domain::{new_id, AuditEntry, NewAudit};

/// Appends entries, all stamped `now`, in one statement.
pub async fn insert(db: impl PgExecutor<'_>, entries: &[NewAudit], now: i64) -> sqlx::Result<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let rows: Vec<serde_json::Value> = entries
        .iter()
        .map(|e| {
            serde_json::json!({
                "id": new_id(), "action": e.action, "entity_type": e.entity_type,
                "entity_id": e.entity_id, "actor": e.actor, "detail": e.detail,
            })
        })
        .collect();
    sqlx::query(
        "INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
         SELECT r.id, $2, r.action, r.entity_type, r.entity_id, r.actor, r.detail
         FROM jsonb_to_recordset($1) AS r(id text, action text, entity_type text, entity_id text, actor text, detail text)",
    )
    .bind(serde_json::Value::Array(rows))
    .bind(now)
    .execute(db)
    .await?;
    Ok(())
}

/// Newest first.
pub async fn list(db: impl PgExecutor<'_>, page: &Page) -> sqlx::Result<Vec<AuditEntry>> {
    let (key, id) = page.bounds();
    sqlx::query_as(
        "SELECT * FROM audit_logs WHERE (timestamp, id) < ($1, $2)
         ORDER BY timestamp DESC, id DESC LIMIT $3",
    )
    .bind(key)
    .bind(id)
    .bind(page.limit)
    .fetch_all(db)
    .await
}
