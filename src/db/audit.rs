//! The audit log. Transitions append to it inside their own transaction via [`insert`].

use sqlx::PgExecutor;

use super::page::{Cursor, SCAN_LIMIT};
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

/// What a listing of the audit log keeps: entries equal on every field given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub action: Option<String>,
    pub entity_type: Option<String>,
    pub entity_id: Option<String>,
    pub actor: Option<String>,
}

impl AuditFilter {
    fn is_empty(&self) -> bool {
        *self == AuditFilter::default()
    }
}

/// A page of the audit log and where the next one starts (`None`: the log ends).
#[derive(Debug, PartialEq)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    pub next: Option<Cursor>,
}

/// Newest first: all entries, an entity's (indexed), or those matching the filter among
/// at most [`SCAN_LIMIT`] entries after the cursor.
pub async fn list(db: impl PgExecutor<'_>, page: &Page, filter: &AuditFilter) -> sqlx::Result<AuditPage> {
    let (key, id) = page.bounds();
    let last = |entries: &[AuditEntry]| {
        page.next(entries.len(), entries.last().map(|e| Cursor { key: e.timestamp, id: e.id.clone() }))
    };
    // Each case its own statement, so that a cached plan always fits it.
    if let Some(entity) = &filter.entity_id {
        let entries = sqlx::query_as!(
            AuditEntry,
            "SELECT id, timestamp, action, entity_type, entity_id, actor, detail FROM audit_logs
             WHERE entity_id = $4 AND (timestamp, id) < ($1, $2)
               AND ($5::text IS NULL OR action = $5) AND ($6::text IS NULL OR entity_type = $6)
               AND ($7::text IS NULL OR actor = $7)
             ORDER BY timestamp DESC, id DESC LIMIT $3",
            key,
            id,
            page.limit,
            entity,
            filter.action,
            filter.entity_type,
            filter.actor,
        )
        .fetch_all(db)
        .await?;
        let next = last(&entries);
        return Ok(AuditPage { entries, next });
    }
    if filter.is_empty() {
        let entries = sqlx::query_as!(
            AuditEntry,
            "SELECT id, timestamp, action, entity_type, entity_id, actor, detail FROM audit_logs
             WHERE (timestamp, id) < ($1, $2)
             ORDER BY timestamp DESC, id DESC LIMIT $3",
            key,
            id,
            page.limit
        )
        .fetch_all(db)
        .await?;
        let next = last(&entries);
        return Ok(AuditPage { entries, next });
    }
    // One statement, one snapshot: the matches among the entries read and the oldest
    // entry read (a row with only the latter when nothing matched).
    let rows = sqlx::query!(
        r#"WITH read AS MATERIALIZED (
               SELECT id, timestamp, action, entity_type, entity_id, actor, detail FROM audit_logs
               WHERE (timestamp, id) < ($1, $2) ORDER BY timestamp DESC, id DESC LIMIT $4),
           edge AS (SELECT r.timestamp, r.id, (SELECT count(*) FROM read) AS n FROM read r
                    ORDER BY r.timestamp, r.id LIMIT 1),
           hits AS (SELECT * FROM read r
                    WHERE ($5::text IS NULL OR r.action = $5) AND ($6::text IS NULL OR r.entity_type = $6)
                      AND ($7::text IS NULL OR r.actor = $7)
                    ORDER BY r.timestamp DESC, r.id DESC LIMIT $3)
           SELECT h.id AS "id?", h.timestamp AS "timestamp?", h.action AS "action?",
                  h.entity_type AS "entity_type?", h.entity_id AS "entity_id?", h.actor AS "actor?",
                  h.detail AS "detail?", e.timestamp AS "edge_timestamp!", e.id AS "edge_id!", e.n AS "read!"
           FROM edge e LEFT JOIN hits h ON true
           ORDER BY h.timestamp DESC, h.id DESC"#,
        key,
        id,
        page.limit,
        SCAN_LIMIT,
        filter.action,
        filter.entity_type,
        filter.actor,
    )
    .fetch_all(db)
    .await?;
    let edge =
        rows.first().filter(|r| r.read == SCAN_LIMIT).map(|r| Cursor { key: r.edge_timestamp, id: r.edge_id.clone() });
    let entries: Vec<AuditEntry> = rows
        .into_iter()
        .filter_map(|r| {
            Some(AuditEntry {
                id: r.id?,
                timestamp: r.timestamp?,
                action: r.action?,
                entity_type: r.entity_type?,
                entity_id: r.entity_id?,
                actor: r.actor?,
                detail: r.detail?,
            })
        })
        .collect();
    let next = last(&entries).or(edge);
    Ok(AuditPage { entries, next })
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
