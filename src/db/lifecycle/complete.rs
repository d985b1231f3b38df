//! `complete`: results of leases, tasks `completed` or `failed` (batch).

use std::collections::{HashMap, HashSet};

use sqlx::types::Json;
use sqlx::PgExecutor;

use crate::db::rows::TaskRow;
use crate::domain::{
    new_id, Artifact, ArtifactBody, ArtifactId, DesiredFormat, ErrorKind, LeaseId, LlmResult, Metrics, Outcome, Policy,
    ResultId, ResultStatus, Task, TaskId, TaskStatus, WorkerId,
};

/// Batch completion: `$1` now, then one array per column of [`CompleteRows`] (`$2` the
/// completed task ids).
pub(super) const COMPLETE_SQL: &str = include_str!("complete.sql");

/// A result reported for one lease.
#[derive(Clone, Debug)]
pub struct Completion {
    pub task_id: TaskId,
    pub lease_id: LeaseId,
    pub outcome: Outcome,
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
    error_kind: Vec<Option<&'static str>>,
    retry_at: Vec<Option<i64>>,
}

impl<'a> CompleteRows<'a> {
    fn push(&mut self, c: &'a Completion, result_id: &'a ResultId) {
        self.task_id.push(c.task_id.as_str());
        self.lease_id.push(c.lease_id.as_str());
        let o = &c.outcome;
        self.final_status.push(o.status.final_task_status().as_str());
        self.status.push(o.status.as_str());
        self.output.push(o.output.as_deref());
        self.error_message.push(o.error_message.as_deref());
        self.metrics.push(Json(&o.metrics));
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
        let status = o.status.as_str();
        self.done.push(format!("Status: {status}, artifact: {}, duration: {}ms", c.artifact_id, o.metrics.duration_ms));
        self.late.push(format!("Late {status} result for lease {} ignored: not the current lease", c.lease_id));
        // Only errors are classified: a success's class, if a client sent one, means nothing.
        let kind = if o.status == ResultStatus::Error { o.error_kind } else { None };
        self.error_kind.push(kind.map(ErrorKind::as_str));
        self.retry_at.push(o.retry_at);
    }
}

/// The answer to a completion.
#[derive(Clone, Debug, PartialEq)]
pub enum CompletionOutcome {
    /// The result was for the current lease: the task is final (or, for an error tried
    /// again, queued to wait for its next attempt), and the result and artifact rows
    /// were written (see [`Completion::into_records`]).
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
            ArtifactBody::Inline => (None, self.outcome.output.clone()),
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
            outcome: self.outcome,
            completed_at,
        };
        (artifact, result)
    }
}

/// Completes tasks in one transaction: for each completion whose lease is still the
/// task's current lease, the task becomes `completed` (success) or `failed` (error),
/// the lease is released, and an artifact, a result and an audit entry are written.
/// A classified error its task's retry policy tries again (see `bloom_next_attempt_at`
/// in migration 0016) puts the task back `queued` without a dispatch, due at its next
/// attempt's time, with `wait_reason` and `last_error` saying why; the due duty
/// dispatches it then.
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
    // Borrowed columns are bound as they are (`as _`): the macro's check wants owned
    // values, Postgres checks the array types.
    let done = sqlx::query_file_as!(
        TaskRow,
        "src/db/lifecycle/complete.sql",
        now,
        rows.task_id as _,
        rows.lease_id as _,
        rows.final_status as _,
        rows.status as _,
        rows.output as _,
        rows.error_message as _,
        rows.metrics as _,
        rows.artifact_id as _,
        rows.artifact_type as _,
        rows.tags as _,
        rows.url as _,
        &rows.inline,
        rows.result_id as _,
        &rows.audit_id,
        &rows.done,
        &rows.late,
        rows.error_kind as _,
        rows.retry_at as _,
    )
    .fetch_all(db)
    .await?;
    let done = done.into_iter().map(Task::from);
    let mut done: HashMap<(TaskId, LeaseId), Task> =
        done.filter_map(|t| t.lease_id.clone().map(|l| ((t.id.clone(), l), t))).collect();
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
