//! `complete`: results of leases, tasks `completed` or `failed` (batch).

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use sqlx::PgExecutor;

use crate::domain::{
    new_id, Artifact, ArtifactId, LeaseId, LlmResult, Metrics, ResultId, ResultStatus, Task, TaskId, TaskStatus,
    WorkerId,
};

/// Batch completion: `$1` rows as JSON, `$2` now, `$3` the completed task ids.
pub(super) const COMPLETE_SQL: &str = "WITH r AS (
            SELECT * FROM jsonb_to_recordset($1) AS r(task_id text, lease_id text, final_status text, status text,
                output text, error_message text, metrics jsonb, artifact_id text, artifact_type text, tags jsonb,
                url text, inline boolean, result_id text, audit_id text, done text, late text)),
         t AS (
            UPDATE llm_tasks t SET status = r.final_status, updated_at = $2, lease_id = r.lease_id,
                   worker_id = COALESCE(t.worker_id, (SELECT l.worker_id FROM leases l WHERE l.id = r.lease_id)),
                   routed_to = NULL
            FROM r WHERE t.id = ANY($3) AND t.id = r.task_id AND (
                (t.lease_id = r.lease_id AND (t.status || '') IN ('leased', 'running'))
                -- The lease expired and the task was requeued, but nobody leased it again:
                -- the result of the work done is still the task's only one.
                OR ((t.status || '') = 'queued' AND EXISTS (
                    SELECT 1 FROM leases l WHERE l.id = r.lease_id AND l.task_id = t.id AND (l.status || '') = 'expired')))
            RETURNING t.*),
         w AS (SELECT r.*, COALESCE(t.worker_id, 'unknown') AS worker
               FROM r JOIN t ON t.id = r.task_id AND t.lease_id = r.lease_id),
         l AS (
            UPDATE leases SET status = 'released'
            FROM w WHERE leases.id = w.lease_id AND (leases.status || '') = 'active'),
         art AS (
            INSERT INTO runtime_artifacts (id, task_id, job_id, type, created_at, finalized, url, entity_refs, tags,
                                           content)
            SELECT artifact_id, task_id, NULL, artifact_type, $2, true, url, '[]'::jsonb, tags,
                   CASE WHEN inline THEN output END FROM w),
         res AS (
            INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message, metrics,
                                     completed_at)
            SELECT result_id, task_id, worker, artifact_id, status, output, error_message, metrics, $2 FROM w),
         a AS (
            INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
            SELECT audit_id, $2, 'task_completed', 'llm_task', task_id, worker, done FROM w
            UNION ALL
            SELECT audit_id, $2, 'result_late', 'llm_task', task_id, 'reconciler', late
            FROM r WHERE NOT EXISTS (SELECT 1 FROM w WHERE w.task_id = r.task_id AND w.lease_id = r.lease_id))
         SELECT * FROM t";

/// Where an artifact's content went.
#[derive(Clone, Debug, PartialEq)]
pub enum ArtifactBody {
    /// Uploaded to S3: the object's URL.
    S3 { url: String },
    /// Kept in Postgres: the artifact's content is the result's output (written once to
    /// the statement, not twice).
    Inline,
}

/// A result reported for one lease.
#[derive(Clone, Debug)]
pub struct Completion {
    pub task_id: TaskId,
    pub lease_id: LeaseId,
    pub status: ResultStatus,
    pub output: Option<String>,
    pub error_message: Option<String>,
    pub metrics: Metrics,
    pub artifact_type: String,
    pub artifact_tags: Vec<String>,
    /// Id of the artifact to create: deterministic per lease so a redelivered result
    /// maps onto the same artifact.
    pub artifact_id: ArtifactId,
    pub artifact: ArtifactBody,
}

/// One row of [`COMPLETE_SQL`]'s `$1`; field names are its column names.
#[derive(Serialize)]
struct CompleteRow<'a> {
    task_id: &'a TaskId,
    lease_id: &'a LeaseId,
    final_status: TaskStatus,
    status: ResultStatus,
    output: Option<&'a str>,
    error_message: Option<&'a str>,
    metrics: &'a Metrics,
    artifact_id: &'a ArtifactId,
    artifact_type: &'a str,
    tags: &'a [String],
    url: Option<&'a String>,
    inline: bool,
    result_id: &'a ResultId,
    audit_id: String,
    done: String,
    late: String,
}

/// The answer to a completion.
#[derive(Clone, Debug, PartialEq)]
pub enum CompletionOutcome {
    /// The result was for the current lease: the task is final, and the result and
    /// artifact rows were written (see [`Completion::into_records`]).
    Completed { task: Box<Task>, result_id: ResultId, completed_at: i64 },
    /// The lease is no longer current (expired, requeued, already completed): the result
    /// was recorded as late in the audit log and changed nothing.
    Late,
}

impl Completion {
    /// The artifact and result rows a completion of `task` wrote, built from the
    /// completion itself: its output moves into the result (and is copied once into the
    /// artifact when that keeps its content inline).
    pub fn into_records(self, task: &Task, result_id: ResultId, completed_at: i64) -> (Artifact, LlmResult) {
        let (url, content) = match self.artifact {
            ArtifactBody::S3 { url } => (Some(url), None),
            ArtifactBody::Inline => (None, self.output.clone()),
        };
        let artifact = Artifact {
            id: self.artifact_id,
            task_id: task.id.clone(),
            job_id: None,
            kind: self.artifact_type,
            created_at: completed_at,
            finalized: true,
            url,
            entity_refs: Vec::new(),
            tags: self.artifact_tags,
            content,
        };
        let result = LlmResult {
            id: result_id,
            task_id: task.id.clone(),
            worker_id: task.worker_id.clone().unwrap_or_else(|| WorkerId::from("unknown")),
            artifact_id: artifact.id.clone(),
            status: self.status,
            output: self.output,
            error_message: self.error_message,
            metrics: self.metrics,
            completed_at,
        };
        (artifact, result)
    }
}

/// Completes tasks in one transaction: for each completion whose lease is still the
/// task's current lease, the task becomes `completed` (success) or `failed` (error),
/// the lease is released, and an artifact, a result and an audit entry are written.
/// A result of an expired lease whose task was requeued but not leased again also
/// completes it (the requeued dispatch is then refused at claim); a result of a lease
/// that another lease superseded is late and changes nothing.
/// Outcomes are in the order of `completions`.
pub async fn complete<'c>(
    db: impl PgExecutor<'c>,
    completions: &[Completion],
    now: i64,
) -> sqlx::Result<Vec<CompletionOutcome>> {
    // A (task, lease) pair reported twice in one batch: only its first report can win.
    let mut seen = HashSet::new();
    let first: Vec<bool> = completions.iter().map(|c| seen.insert((&c.task_id, &c.lease_id))).collect();
    let result_ids: Vec<ResultId> = completions.iter().map(|_| ResultId::generate()).collect();
    let rows: Vec<CompleteRow> = completions
        .iter()
        .zip(&first)
        .zip(&result_ids)
        .filter(|((_, first), _)| **first)
        .map(|((c, _), result_id)| CompleteRow {
            task_id: &c.task_id,
            lease_id: &c.lease_id,
            final_status: c.status.final_task_status(),
            status: c.status,
            output: c.output.as_deref(),
            error_message: c.error_message.as_deref(),
            metrics: &c.metrics,
            artifact_id: &c.artifact_id,
            artifact_type: &c.artifact_type,
            tags: &c.artifact_tags,
            url: match &c.artifact {
                ArtifactBody::S3 { url } => Some(url),
                ArtifactBody::Inline => None,
            },
            inline: c.artifact == ArtifactBody::Inline,
            result_id,
            audit_id: new_id(),
            done: format!(
                "Status: {}, artifact: {}, duration: {}ms",
                c.status.as_str(),
                c.artifact_id,
                c.metrics.duration_ms
            ),
            late: format!("Late {} result for lease {} ignored: not the current lease", c.status.as_str(), c.lease_id),
        })
        .collect();
    // One statement: the task, lease, artifact, result and audit writes of the whole batch
    // commit together, in one round trip.
    // Serialized once, straight into the statement's parameter: the outputs are not copied.
    let done: Vec<Task> = sqlx::query_as(COMPLETE_SQL)
        .bind(sqlx::types::Json(&rows))
        .bind(now)
        .bind(completions.iter().map(|c| c.task_id.as_str()).collect::<Vec<_>>())
        .fetch_all(db)
        .await?;
    let mut done: HashMap<(TaskId, LeaseId), Task> =
        done.into_iter().filter_map(|t| t.lease_id.clone().map(|l| ((t.id.clone(), l), t))).collect();
    Ok(completions
        .iter()
        .zip(first)
        .zip(result_ids)
        .map(|((c, first), result_id)| {
            let task = if first { done.remove(&(c.task_id.clone(), c.lease_id.clone())) } else { None };
            match task {
                Some(task) => CompletionOutcome::Completed { task: Box::new(task), result_id, completed_at: now },
                None => CompletionOutcome::Late,
            }
        })
        .collect())
}
