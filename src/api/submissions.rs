//! Submissions: `POST /api/runtime/llm-tasks` (one task, the seed's route) and
//! `POST /api/runtime/llm-tasks/batch` (up to [`MAX_BATCH`] tasks in one transaction),
//! with idempotency keys.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::body::JsonBody;
use super::schemas::{ErrorBody, RequestBody};
use super::validate::FieldErrors;
use super::{ApiError, AppState};
use crate::db::lifecycle::Submitted;
use crate::domain::{NewTask, Task};

/// Header naming a submission's idempotency key (the body's `idempotency_key` too).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Header set on an answer that returns the task an earlier submission with the same
/// key created.
pub const REPLAYED: &str = "idempotent-replayed";
/// Most tasks of one batch submission.
pub const MAX_BATCH: usize = 1000;

/// `POST /api/runtime/llm-tasks` → 201 task. With an idempotency key (the
/// `Idempotency-Key` header or the `idempotency_key` field) already used within the
/// retention window: 200 with that submission's task (header `Idempotent-Replayed:
/// true`) when the request is the same, 409 when it differs.
#[utoipa::path(post, path = "/api/runtime/llm-tasks", tag = "tasks", request_body = NewTask,
    params(("Idempotency-Key" = Option<String>, Header, description = "1..255 visible ASCII characters; the same as the body's idempotency_key", pattern = "^[!-~]{1,255}$")),
    responses((status = 201, body = Task), (status = 200, description = "The task an earlier submission with the same idempotency key created", body = Task), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
#[tracing::instrument(name = "submit task", skip_all, fields(task.id))]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let mut new = NewTask::parse(&body)?;
    new.idempotency_key = key_of(&headers, new.idempotency_key.take())?;
    let answer = state.submitter.submit(new, crate::telemetry::current_carrier()).await?;
    if let Some(task) = answer.task() {
        tracing::Span::current().record("task.id", tracing::field::display(&task.id));
    }
    match answer {
        Submitted::Created(d) => Ok((StatusCode::CREATED, Json(d.task)).into_response()),
        Submitted::Scheduled(task) => Ok((StatusCode::CREATED, Json(task)).into_response()),
        Submitted::Existing(task) => {
            Ok((StatusCode::OK, [(REPLAYED, HeaderValue::from_static("true"))], Json(task)).into_response())
        }
        Submitted::KeyConflict { key, task_id } => Err(conflict(&key, &task_id)),
        Submitted::Withdrawn => Err(ApiError::internal("a single submission was withdrawn")),
    }
}

/// The submission's key: the header's, the body's, or 400 when they differ.
fn key_of(headers: &HeaderMap, body_key: Option<String>) -> Result<Option<String>, ApiError> {
    let Some(header) = headers.get(IDEMPOTENCY_KEY) else { return Ok(body_key) };
    let mut errors = FieldErrors::default();
    let key = match header.to_str() {
        Ok(k) if !k.is_empty() && k.chars().count() <= NewTask::MAX_KEY_CHARS => Some(k.to_owned()),
        _ => {
            errors.add(
                "idempotency_key",
                format!("The Idempotency-Key header must be 1 to {} visible ASCII characters", NewTask::MAX_KEY_CHARS),
            );
            None
        }
    };
    if let (Some(h), Some(b)) = (&key, &body_key) {
        if h != b {
            errors.add("idempotency_key", "The Idempotency-Key header and the idempotency_key field differ");
        }
    }
    errors.finish(key.or(body_key)).map_err(ApiError::from)
}

fn conflict(key: &str, task_id: &crate::domain::TaskId) -> ApiError {
    ApiError::Conflict(format!(
        "idempotency_key \"{key}\" was already used by a different request (task {task_id}); \
         use a new key for a new task"
    ))
}

/// Body of `POST /api/runtime/llm-tasks/batch`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct BatchBody {
    /// 1 to 1000 tasks, each as `POST /api/runtime/llm-tasks` takes it (each with its
    /// own optional `idempotency_key`).
    #[schema(min_items = 1, max_items = 1000)]
    pub tasks: Vec<NewTask>,
}

/// Answer of `POST /api/runtime/llm-tasks/batch`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct BatchResponse {
    /// One task per submitted one, in order: new, or the one its idempotency key created.
    pub tasks: Vec<Task>,
    /// Tasks this request created.
    pub created: usize,
    /// Tasks returned for idempotency keys already used by the same request.
    pub existing: usize,
}

/// `POST /api/runtime/llm-tasks/batch` `{tasks: [...]}`: all or nothing. Every task is
/// validated first (a 400 names each failure as `tasks[i].field`); then all are
/// committed in one transaction with their outbox rows. A key already used by a
/// different request fails the whole batch with 409 (nothing is created); one used by
/// the same request returns its task. 201 when anything was created, else 200.
#[utoipa::path(post, path = "/api/runtime/llm-tasks/batch", tag = "tasks", request_body = BatchBody,
    responses((status = 201, body = BatchResponse), (status = 200, description = "Every task was created before (idempotency keys)", body = BatchResponse), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
#[tracing::instrument(name = "submit batch", skip_all, fields(tasks))]
pub async fn create_batch(State(state): State<AppState>, JsonBody(body): JsonBody) -> Result<Response, ApiError> {
    let tasks = parse_batch(&body)?;
    drop(body);
    tracing::Span::current().record("tasks", tasks.len());
    let answers = state.submitter.submit_many(tasks, crate::telemetry::current_carrier()).await?;
    let conflicts: Vec<String> = answers
        .iter()
        .enumerate()
        .filter_map(|(i, a)| match a {
            Submitted::KeyConflict { key, task_id } => Some(format!(
                "tasks[{i}]: idempotency_key \"{key}\" was already used by a different request (task {task_id})"
            )),
            _ => None,
        })
        .collect();
    if !conflicts.is_empty() {
        return Err(ApiError::Conflict(format!("Nothing was created. {}", conflicts.join("; "))));
    }
    let (mut created, mut existing) = (0, 0);
    let mut tasks = Vec::with_capacity(answers.len());
    for answer in answers {
        match answer {
            Submitted::Created(d) => {
                created += 1;
                tasks.push(d.task);
            }
            Submitted::Scheduled(t) => {
                created += 1;
                tasks.push(t);
            }
            Submitted::Existing(t) => {
                existing += 1;
                tasks.push(t);
            }
            Submitted::KeyConflict { .. } | Submitted::Withdrawn => {
                return Err(ApiError::internal("a batch answer without a task"));
            }
        }
    }
    let status = if created > 0 { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(BatchResponse { tasks, created, existing })).into_response())
}

/// Reads a batch body: every task validated, each failure named `tasks[i].field`.
fn parse_batch(body: &Value) -> Result<Vec<NewTask>, ApiError> {
    let mut errors = FieldErrors::default();
    let items = match body.get("tasks") {
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_BATCH => items,
        Some(Value::Array(_)) => {
            errors.add("tasks", format!("Expected between 1 and {MAX_BATCH} tasks"));
            return Err(errors.into());
        }
        Some(_) => {
            errors.add("tasks", "Expected array");
            return Err(errors.into());
        }
        None if body.is_object() => {
            errors.add("tasks", "Required");
            return Err(errors.into());
        }
        None => {
            errors.form.push("Expected object".into());
            return Err(errors.into());
        }
    };
    let mut tasks = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        match NewTask::parse(item) {
            Ok(t) => tasks.push(t),
            Err(ApiError::Validation(e)) => {
                for msg in e.form {
                    errors.add(&format!("tasks[{i}]"), msg);
                }
                for (field, msgs) in e.fields {
                    for msg in msgs {
                        errors.add(&format!("tasks[{i}].{field}"), msg);
                    }
                }
            }
            Err(other) => return Err(other),
        }
    }
    errors.finish(tasks).map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn batch_failures_name_the_index_and_field() {
        let body = json!({"tasks": [
            {"context_id": "c", "agent_slug": "a", "prompt": "p"},
            {"context_id": "c", "agent_slug": "a", "prompt": "", "priority": 7},
            "nope"
        ]});
        let Err(ApiError::Validation(e)) = parse_batch(&body) else { panic!("expected a validation error") };
        assert_eq!(e.fields["tasks[1].prompt"], vec!["String must contain at least 1 character(s)"]);
        assert_eq!(e.fields["tasks[1].priority"], vec!["Number must be less than or equal to 2"]);
        assert_eq!(e.fields["tasks[2]"], vec!["Expected object, received string"]);
        assert_eq!(e.fields.len(), 3, "{e:?}");
    }

    #[test]
    fn a_batch_has_one_to_a_thousand_tasks() {
        for body in [json!({"tasks": []}), json!({"tasks": vec![json!({}); MAX_BATCH + 1]}), json!({})] {
            let Err(ApiError::Validation(e)) = parse_batch(&body) else { panic!("expected a validation error") };
            assert!(e.fields.contains_key("tasks"), "{e:?}");
        }
    }

    #[test]
    fn header_and_body_keys_must_agree() {
        let mut headers = HeaderMap::new();
        assert_eq!(key_of(&headers, Some("b".into())).unwrap(), Some("b".into()));
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("h"));
        assert_eq!(key_of(&headers, None).unwrap(), Some("h".into()));
        assert_eq!(key_of(&headers, Some("h".into())).unwrap(), Some("h".into()));
        assert!(matches!(key_of(&headers, Some("b".into())), Err(ApiError::Validation(_))));
    }
}
