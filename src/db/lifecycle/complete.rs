//! `complete`: results of leases, tasks `completed` or `failed` (batch).

use std::collections::{HashMap, HashSet};

use sqlx::types::Json;
use sqlx::PgExecutor;

use crate::domain::{
    new_id, Artifact, ArtifactBody, ArtifactId, LeaseId, LlmResult, Metrics, ResultId, ResultStatus, Task, TaskId,
    WorkerId,
};

/// Batch completion: `$1` now, then one array per column of [`CompleteRows`] (`$2` the
/// completed task ids).
pub(super) const COMPLETE_SQL: &str = "WITH r AS (
            SELECT * FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::jsonb[],
                                 $9::text[], $10::text[], $11::jsonb[], $12::text[], $13::boolean[], $14::text[],
                                 $15::text[], $16::text[], $17::text[])
                AS r(task_id, lease_id, final_status, status, output, error_message, metrics, artifact_id,
                     artifact_type, tags, url, inline, result_id, audit_id, done, late)),
         t AS (
            UPDATE llm_tasks t SET status = r.final_status, updated_at = $1, lease_id = r.lease_id,
                   worker_id = COALESCE(t.worker_id, (SELECT l.worker_id FROM leases l WHERE l.id = r.lease_id)),
                   routed_to = NULL
            FROM r WHERE t.id = ANY($2) AND t.id = r.task_id AND (
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
            SELECT artifact_id, task_id, NULL, artifact_type, $1, true, url, '[]'::jsonb, tags,
                   CASE WHEN inline THEN output END FROM w),
         res AS (
            INSERT INTO llm_results (id, task_id, worker_id, artifact_id, status, output, error_message, metrics,
                                     completed_at)
            SELECT result_id, task_id, worker, artifact_id, status, output, error_message, metrics, $1 FROM w),
         a AS (
            INSERT INTO audit_logs (id, timestamp, action, entity_type, entity_id, actor, detail)
            SELECT audit_id, $1, 'task_completed', 'llm_task', task_id, worker, done FROM w
            UNION ALL
            SELECT audit_id, $1, 'result_late', 'llm_task', task_id, 'reconciler', late
            FROM r WHERE NOT EXISTS (SELECT 1 FROM w WHERE w.task_id = r.task_id AND w.lease_id = r.lease_id))
         SELECT * FROM t";

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

/// The columns of [`COMPLETE_SQL`]'s rows, one entry per completion, in its order.
#[derive(Default)]
struct CompleteRows<'a> {
    task_id: Vec<&'a str>,
    lease_id: Vec<&'a str>,
    final_status: Vec<&'static str>,
    status: Vec<&'static str>,
    output: Vec<Option<&'a str>>,
    error_message: Vec<Option<&'a str>>,
    metrics: Vec<Json<&'a Metrics>>,
    artifact_id: Vec<&'a str>,
    artifact_type: Vec<&'a str>,
    tags: Vec<Json<&'a [String]>>,
    url: Vec<Option<&'a str>>,
    inline: Vec<bool>,
    result_id: Vec<&'a str>,
    audit_id: Vec<String>,
    done: Vec<String>,
    late: Vec<String>,
}

impl<'a> CompleteRows<'a> {
    fn push(&mut self, c: &'a Completion, result_id: &'a ResultId) {
        self.task_id.push(c.task_id.as_str());
        self.lease_id.push(c.lease_id.as_str());
        self.final_status.push(c.status.final_task_status().as_str());
        self.status.push(c.status.as_str());
        self.output.push(c.output.as_deref());
        self.error_message.push(c.error_message.as_deref());
        self.metrics.push(Json(&c.metrics));
        self.artifact_id.push(c.artifact_id.as_str());
        self.artifact_type.push(&c.artifact_type);
        self.tags.push(Json(c.artifact_tags.as_slice()));
        self.url.push(match &c.artifact {
            ArtifactBody::S3 { url } => Some(url.as_str()),
            ArtifactBody::Inline => None,
        });
        self.inline.push(c.artifact == ArtifactBody::Inline);
        self.result_id.push(result_id.as_str());
        self.audit_id.push(new_id());
        let status = c.status.as_str();
        self.done.push(format!("Status: {status}, artifact: {}, duration: {}ms", c.artifact_id, c.metrics.duration_ms));
        self.late.push(format!("Late {status} result for lease {} ignored: not the current lease", c.lease_id));
    }
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
    let mut rows = CompleteRows::default();
    for ((c, first), result_id) in completions.iter().zip(&first).zip(&result_ids) {
        if *first {
            rows.push(c, result_id);
        }
    }
    // One statement: the task, lease, artifact, result and audit writes of the whole batch
    // commit together, in one round trip. The outputs are borrowed into the statement's
    // parameters, not copied.
    let done: Vec<Task> = sqlx::query_as(COMPLETE_SQL)
        .bind(now)
        .bind(rows.task_id)
        .bind(rows.lease_id)
        .bind(rows.final_status)
        .bind(rows.status)
        .bind(rows.output)
        .bind(rows.error_message)
        .bind(rows.metrics)
        .bind(rows.artifact_id)
        .bind(rows.artifact_type)
        .bind(rows.tags)
        .bind(rows.url)
        .bind(rows.inline)
        .bind(rows.result_id)
        .bind(rows.audit_id)
        .bind(rows.done)
        .bind(rows.late)
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
