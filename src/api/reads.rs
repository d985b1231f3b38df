//! Read-only listings: leases, runs, artifacts, audit log, stats; and the pagination
//! shared by every list endpoint (`limit`, default 100, max 1000, and `cursor`; the next
//! page's cursor is returned in the `X-Next-Cursor` header, the body stays an array).

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::schemas::ErrorBody;
use super::validate::{query_int, query_text, FieldErrors};
use super::{ApiError, AppState};
use crate::artifacts::{ArtifactError, Content};
use crate::db::page::{Cursor, KeyPage, DEFAULT_LIMIT, MAX_LIMIT};
use crate::db::{artifacts, audit, leases, stats, tasks, Page};
use crate::domain::{Artifact, ArtifactId, AuditEntry, Lease, LeaseStatus, Task, TaskId};

/// `limit` and `cursor` query parameters.
#[derive(Debug, Default, Deserialize)]
pub struct PageQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

impl PageQuery {
    /// The page asked for. `limit` is read as the original read it (`parseInt(limit) ||
    /// default`: leading digits count, no digits or 0 mean the default), capped at the
    /// maximum; a negative `limit` or a malformed `cursor` is a 400 naming it.
    pub fn page(&self) -> Result<Page, ApiError> {
        self.page_with_default(DEFAULT_LIMIT)
    }

    /// As [`PageQuery::page`] with another default size.
    pub fn page_with_default(&self, default: i64) -> Result<Page, ApiError> {
        let mut errors = FieldErrors::default();
        let limit = match self.limit.as_deref().and_then(parse_int) {
            None | Some(0) => default,
            Some(n) if n > 0 => n.min(MAX_LIMIT),
            Some(_) => {
                let s = self.limit.as_deref().unwrap_or_default();
                errors.add("limit", format!("Expected an integer from 1 to {MAX_LIMIT}, received '{s}'"));
                default
            }
        };
        let after = match self.cursor.as_deref() {
            None | Some("") => None,
            Some(s) => {
                let c = Cursor::decode(s);
                if c.is_none() {
                    errors.add("cursor", "Invalid cursor");
                }
                c
            }
        };
        Ok(errors.finish(Page { limit, after })?)
    }
}

/// JavaScript's `parseInt(s)` (no radix, as the original called it): optional leading
/// whitespace and sign, then the leading digits, hexadecimal after `0x`; `None` when
/// there are none (`NaN`). Saturates instead of overflowing.
fn parse_int(s: &str) -> Option<i64> {
    let s = s.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    let (negative, rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, digits) = match rest.get(..2) {
        Some("0x" | "0X") => (16, &rest[2..]),
        _ => (10, rest),
    };
    let values: Vec<u32> = digits.chars().map_while(|c| c.to_digit(radix)).collect();
    if values.is_empty() {
        return None;
    }
    let n = values.iter().fold(0i64, |n, d| n.saturating_mul(i64::from(radix)).saturating_add(i64::from(*d)));
    Some(if negative { -n } else { n })
}

/// `X-Next-Cursor` with `next`, when there is one.
fn cursor_header(next: Option<Cursor>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(v) = next.and_then(|c| HeaderValue::from_str(&c.encode()).ok()) {
        headers.insert("x-next-cursor", v);
    }
    headers
}

/// A JSON array response with `X-Next-Cursor` when the page is full.
pub fn paged<T: Serialize>(rows: Vec<T>, page: &Page, key: impl Fn(&T) -> (i64, String)) -> impl IntoResponse {
    let last = rows.last().map(|r| {
        let (key, id) = key(r);
        Cursor { key, id }
    });
    (cursor_header(page.next(rows.len(), last)), Json(rows))
}

/// Bytes of rows a streamed listing reads and sends at a time.
const STREAM_BUDGET: i64 = 1 << 20;
/// Characters of a large text value read and sent at a time.
const SLICE_CHARS: i32 = 256 * 1024;

/// Writes a JSON array into a response body a piece at a time, waiting while the
/// client reads (the body holds at most one piece besides the one being written).
pub struct ArrayWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    first: bool,
}

/// The client went away: stop producing the listing.
#[derive(Debug, thiserror::Error)]
#[error("the client closed the response")]
pub struct Gone;

impl ArrayWriter {
    async fn send(&self, piece: Vec<u8>) -> Result<(), Gone> {
        self.tx.send(Ok(Bytes::from(piece))).await.map_err(|_| Gone)
    }

    /// Starts the next element with `piece`.
    pub async fn element(&mut self, mut piece: Vec<u8>) -> Result<(), Gone> {
        if !std::mem::replace(&mut self.first, false) {
            piece.insert(0, b',');
        }
        self.send(piece).await
    }

    /// Continues the current element.
    pub async fn more(&mut self, piece: Vec<u8>) -> Result<(), Gone> {
        self.send(piece).await
    }
}

/// A listing of rows that can be large (prompts, artifact contents), answered as the
/// same JSON array as [`paged`] but written as it is read: `page` (the rows without their
/// content) decides the rows, their order and `X-Next-Cursor`; `write` gets the ids in
/// runs of about [`STREAM_BUDGET`] bytes and writes each row, reading each run on a
/// pooled connection given back before the run is sent. A response holds about one run
/// in memory however large the page, and a slow client holds no connection.
pub fn streamed<F, Fut>(page: KeyPage, write: F) -> Response
where
    F: FnOnce(Vec<Vec<String>>, ArrayWriter) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut headers = cursor_header(page.next);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let runs = crate::db::page::runs(&page.keys, STREAM_BUDGET);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let writer = ArrayWriter { tx: tx.clone(), first: true };
        let _ = tx.send(Ok(Bytes::from_static(b"["))).await;
        match write(runs, writer).await {
            Ok(()) => {
                let _ = tx.send(Ok(Bytes::from_static(b"]"))).await;
            }
            Err(e) if e.is::<Gone>() => {}
            Err(e) => {
                // The status is sent: all that is left is to cut the body short.
                tracing::error!(error = format!("{e:#}"), "reading a listing failed midway");
                let _ = tx.send(Err(std::io::Error::other(e))).await;
            }
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|piece| (piece, rx)) });
    (headers, axum::body::Body::from_stream(body)).into_response()
}

/// Writes artifacts; a content longer than a slice is read and escaped a slice at a
/// time, so even one artifact of many megabytes is never whole in memory. `content` is
/// the last field of an artifact's JSON: its `null` is replaced by the string, written
/// in pieces.
async fn write_artifacts(pool: sqlx::PgPool, runs: Vec<Vec<String>>, mut out: ArrayWriter) -> anyhow::Result<()> {
    const NULL_CONTENT: &[u8] = b"null}";
    for run in runs {
        let mut found: std::collections::HashMap<String, artifacts::ArtifactHead> =
            artifacts::heads(&pool, &run, SLICE_CHARS)
                .await?
                .into_iter()
                .map(|h| (h.artifact.id.0.clone(), h))
                .collect();
        for head in run.iter().filter_map(|i| found.remove(i)) {
            let mut json = serde_json::to_vec(&head.artifact)?;
            let Some(chars) = head.content_chars else {
                out.element(json).await?;
                continue;
            };
            anyhow::ensure!(json.ends_with(NULL_CONTENT), "an artifact's JSON does not end with its content");
            json.truncate(json.len() - NULL_CONTENT.len());
            json.push(b'"');
            out.element(json).await?;
            let mut from = 1;
            while from <= chars {
                let slice = artifacts::content_slice(&pool, &head.artifact.id, from, SLICE_CHARS).await?;
                let escaped = serde_json::to_vec(&slice)?;
                // Without the quotes serde_json put around the slice.
                out.more(escaped[1..escaped.len() - 1].to_vec()).await?;
                from += SLICE_CHARS;
            }
            out.more(b"\"}".to_vec()).await?;
        }
    }
    Ok(())
}

/// Tasks listed by `page`, streamed (in its order; a task deleted since is left out).
pub fn stream_tasks(pool: sqlx::PgPool, page: KeyPage) -> Response {
    streamed(page, move |runs, mut out| async move {
        for run in runs {
            let mut found: std::collections::HashMap<String, Task> =
                tasks::get_many(&pool, &run).await?.into_iter().map(|t| (t.id.0.clone(), t)).collect();
            for task in run.iter().filter_map(|i| found.remove(i)) {
                out.element(serde_json::to_vec(&task)?).await?;
            }
        }
        Ok(())
    })
}

/// Query of `GET /api/runtime/leases`.
#[derive(Debug, Deserialize)]
pub struct LeaseQuery {
    status: Option<String>,
    #[serde(flatten)]
    page: PageQuery,
}

/// `GET /api/runtime/leases[?status=]`, most recent first. The original listed every
/// lease, and the upstream web client keeps the active ones of that list: so the first
/// page asked for without a status or a `limit` (as the client asks) also holds the
/// active leases older than its rows (up to 1,000, still most recent first), and a long
/// run is not hidden behind newer leases.
/// Its `X-Next-Cursor` follows the page's own rows, so an older active lease shows again
/// in its place further on.
#[utoipa::path(get, path = "/api/runtime/leases", tag = "leases", params(("status" = Option<String>, Query, description = "active|expired|released|failed|cancelled"), ("limit" = Option<i64>, Query, description = "page size, 1..1000, default 100; the first page asked for without status and limit also holds every older active lease (up to 1000)", minimum = 1, maximum = 1000), ("cursor" = Option<String>, Query, description = "X-Next-Cursor of the previous page")), responses((status = 200, body = Vec<Lease>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn leases(State(state): State<AppState>, Query(q): Query<LeaseQuery>) -> Result<impl IntoResponse, ApiError> {
    let page = q.page.page()?;
    let status = q.status.as_deref().filter(|s| !s.is_empty());
    let mut rows = match status.map(LeaseStatus::parse) {
        None => leases::list(&state.pool, None, &page).await?,
        Some(Some(status)) => leases::list(&state.pool, Some(status), &page).await?,
        // As in the original, a status no lease can have matches none.
        Some(None) => Vec::new(),
    };
    let next = page.next(rows.len(), rows.last().map(|l| Cursor { key: l.started_at, id: l.id.0.clone() }));
    let as_the_original = status.is_none() && q.page.limit.is_none() && page.after.is_none();
    if let Some(after) = next.clone().filter(|_| as_the_original) {
        let older = Page { limit: MAX_LIMIT, after: Some(after) };
        rows.extend(leases::list(&state.pool, Some(LeaseStatus::Active), &older).await?);
    }
    Ok((cursor_header(next), Json(rows)))
}

/// `GET /api/runtime/runs`: the 50 most recent tasks.
#[utoipa::path(get, path = "/api/runtime/runs", tag = "tasks", params(("limit" = Option<i64>, Query, description = "page size, 1..1000, default 50", minimum = 1, maximum = 1000), ("cursor" = Option<String>, Query, description = "X-Next-Cursor of the previous page")), responses((status = 200, body = Vec<Task>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn runs(State(state): State<AppState>, Query(q): Query<PageQuery>) -> Result<impl IntoResponse, ApiError> {
    let page = q.page_with_default(50)?;
    let keys = tasks::list_keys(&state.pool, &tasks::TaskFilter::default(), &page).await?;
    Ok(stream_tasks(state.pool.clone(), keys))
}

/// Query of `GET /api/runtime/artifacts`.
#[derive(Debug, Deserialize)]
pub struct ArtifactQuery {
    task_id: Option<String>,
    #[serde(flatten)]
    page: PageQuery,
}

/// `GET /api/runtime/artifacts[?task_id=]`, newest first.
#[utoipa::path(get, path = "/api/runtime/artifacts", tag = "artifacts", params(("task_id" = Option<String>, Query), ("limit" = Option<i64>, Query, description = "page size, 1..1000, default 100", minimum = 1, maximum = 1000), ("cursor" = Option<String>, Query, description = "X-Next-Cursor of the previous page")), responses((status = 200, body = Vec<Artifact>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn artifacts(
    State(state): State<AppState>,
    Query(q): Query<ArtifactQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let page = q.page.page()?;
    let task = q.task_id.filter(|t| !t.is_empty()).map(TaskId);
    let keys = artifacts::list_keys(&state.pool, task.as_ref(), &page).await?;
    let pool = state.pool.clone();
    Ok(streamed(KeyPage::full_or_last(keys, &page), move |runs, out| write_artifacts(pool, runs, out)))
}

async fn find_artifact(state: &AppState, id: String) -> Result<Artifact, ApiError> {
    artifacts::get(&state.pool, &ArtifactId(id)).await?.ok_or_else(|| ApiError::NotFound("Artifact not found".into()))
}

/// `GET /api/runtime/artifacts/:id`.
#[utoipa::path(get, path = "/api/runtime/artifacts/{id}", tag = "artifacts", params(("id" = String, Path, description = "Artifact id")), responses((status = 200, body = Artifact), (status = 404, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn artifact(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Artifact>, ApiError> {
    Ok(Json(find_artifact(&state, id).await?))
}

/// Query of `GET /api/runtime/artifacts/:id/content`.
#[derive(Debug, Deserialize)]
pub struct ContentQuery {
    /// `true`: answer `{url, expires_in}` with a presigned S3 URL instead of the content.
    #[serde(default)]
    presign: Option<String>,
}

/// Seconds a presigned artifact URL stays valid.
const PRESIGN_SECS: u64 = 3600;

/// `GET /api/runtime/artifacts/:id/content`: the stored output, streamed from S3 or read
/// from Postgres; with `?presign=true`, a presigned S3 URL.
#[utoipa::path(get, path = "/api/runtime/artifacts/{id}/content", tag = "artifacts", params(("id" = String, Path, description = "Artifact id"), ("presign" = Option<bool>, Query, description = "answer a presigned S3 URL instead")), responses((status = 200, description = "the content (application/octet-stream), or with presign `{url, expires_in}`"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 502, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn artifact_content(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<ContentQuery>,
) -> Result<axum::response::Response, ApiError> {
    let artifact = find_artifact(&state, id).await?;
    if matches!(q.presign.as_deref(), Some("true" | "1")) {
        let url = state
            .artifacts
            .presign(&artifact, std::time::Duration::from_secs(PRESIGN_SECS))
            .await
            .map_err(|e| ApiError::Conflict(format!("Cannot presign this artifact: {e}")))?;
        return Ok(Json(super::schemas::Presigned { url, expires_in: PRESIGN_SECS }).into_response());
    }
    let content = state.artifacts.content(&artifact).await.map_err(|e| match e {
        ArtifactError::Empty => ApiError::NotFound("Artifact has no content".into()),
        ArtifactError::S3(m) => ApiError::BadGateway(format!("Artifact store unavailable: {m}")),
        other => ApiError::Conflict(other.to_string()),
    })?;
    let body = match content {
        Content::Inline(s) => axum::body::Body::from(s),
        Content::Stream(bytes) => {
            axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(bytes.into_async_read()))
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

/// Query of `GET /api/runtime/audit`: exact-match filters (additions to the seed).
#[derive(Debug, Deserialize)]
pub struct AuditQuery {
    action: Option<String>,
    entity_type: Option<String>,
    entity_id: Option<String>,
    actor: Option<String>,
    #[serde(flatten)]
    page: PageQuery,
}

impl AuditQuery {
    fn filter(&self) -> audit::AuditFilter {
        audit::AuditFilter {
            action: query_text(&self.action),
            entity_type: query_text(&self.entity_type),
            entity_id: query_text(&self.entity_id),
            actor: query_text(&self.actor),
        }
    }
}

/// `GET /api/runtime/audit[?action=&entity_type=&entity_id=&actor=]`, newest first. With
/// a filter but no `entity_id`, a page reads at most 10,000 entries: it may hold fewer
/// than `limit` and still have an `X-Next-Cursor` (where the reading stopped).
#[utoipa::path(get, path = "/api/runtime/audit", tag = "audit", params(
    ("action" = Option<String>, Query, description = "only this action, e.g. task_cancelled"),
    ("entity_type" = Option<String>, Query, description = "only this entity type: llm_task, lease, worker, ..."),
    ("entity_id" = Option<String>, Query, description = "only entries about this entity (indexed)"),
    ("actor" = Option<String>, Query, description = "only this actor"),
    ("limit" = Option<i64>, Query, description = "page size, 1..1000, default 100", minimum = 1, maximum = 1000),
    ("cursor" = Option<String>, Query, description = "X-Next-Cursor of the previous page")),
    responses((status = 200, body = Vec<AuditEntry>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn audit(State(state): State<AppState>, Query(q): Query<AuditQuery>) -> Result<impl IntoResponse, ApiError> {
    let page = q.page.page()?;
    let audit::AuditPage { entries, next } = audit::list(&state.pool, &page, &q.filter()).await?;
    Ok((cursor_header(next), Json(entries)))
}

/// Query of `GET /api/runtime/stats`.
#[derive(Debug, Deserialize)]
pub struct StatsQuery {
    count_limit: Option<String>,
}

/// `GET /api/runtime/stats[?count_limit=]`, computed in SQL: exact counts as the seed's,
/// or with `count_limit` (1..10,000,000, an addition) task counts by status and the lease
/// total counted up to that many, at a cost bounded by it (the dashboard polls so).
#[utoipa::path(get, path = "/api/runtime/stats", tag = "stats", params(("count_limit" = Option<i64>, Query, description = "count tasks of each status and leases up to this many (1..10000000); exact without it", minimum = 1, maximum = 10000000)), responses((status = 200, body = stats::Stats), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn stats(State(state): State<AppState>, Query(q): Query<StatsQuery>) -> Result<Json<stats::Stats>, ApiError> {
    let mut errors = FieldErrors::default();
    let limit = query_int(&mut errors, "count_limit", &q.count_limit, 1, 10_000_000);
    errors.finish(())?;
    let mut stats = match limit {
        Some(limit) => stats::load_up_to(&state.pool, limit).await?,
        None => stats::load(&state.pool).await?,
    };
    if state.artifacts.uses_s3() {
        let inline_backlog = crate::db::artifacts::inline_backlog(&state.pool).await?;
        stats.artifacts = Some(stats::ArtifactStats { inline_backlog });
    }
    Ok(Json(stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(s: &str) -> Result<i64, ApiError> {
        PageQuery { limit: Some(s.to_owned()), cursor: None }.page().map(|p| p.limit)
    }

    #[test]
    fn an_artifacts_content_is_the_last_field_of_its_json() {
        // `write_artifacts` writes the content in slices in place of this `null`.
        let a = Artifact {
            id: ArtifactId("a".into()),
            task_id: TaskId("t".into()),
            job_id: None,
            kind: "LLM_RESULT".into(),
            created_at: 1,
            finalized: true,
            url: None,
            entity_refs: vec![],
            tags: vec![],
            content: None,
        };
        assert!(serde_json::to_string(&a).unwrap().ends_with(r#","content":null}"#));
    }

    #[test]
    fn limit_reads_as_parse_int_or_the_default() {
        assert_eq!(parse_int(" 10abc"), Some(10));
        assert_eq!(parse_int("+7"), Some(7));
        assert_eq!(parse_int("-3"), Some(-3));
        assert_eq!(parse_int("abc"), None);
        assert_eq!(parse_int("0x10"), Some(16));
        assert_eq!(parse_int("0x"), None);
        assert_eq!(parse_int("\u{feff}12"), Some(12));
        assert_eq!(parse_int("٣"), None, "only ASCII digits");
        assert_eq!(parse_int("99999999999999999999999"), Some(i64::MAX));
        assert_eq!(limit("10abc").unwrap(), 10);
        assert_eq!(limit("abc").unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit("0").unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit("2.9").unwrap(), 2);
        assert_eq!(limit("5000").unwrap(), MAX_LIMIT);
        assert!(matches!(limit("-1"), Err(ApiError::Validation(_))));
    }
}
