//! The API's one error type: every handler returns it, and it maps to the original
//! service's status codes and `{"error": ...}` bodies. 5xx bodies are opaque; the cause
//! is logged once, inside the request span.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::validate::FieldErrors;
use crate::db::lifecycle::TransitionError;

/// An error answered to the client.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("validation failed")]
    Validation(FieldErrors),
    #[error("{0}")]
    BadRequest(String),
    /// A request the API cannot act on, answered 400 `{"error": ...}` (unlike
    /// [`ApiError::BadRequest`], a body that could not be read).
    #[error("{0}")]
    Invalid(String),
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    BadGateway(String),
    /// A non-2xx answer of an upstream (membridge), passed on with its status.
    #[error("{1}")]
    Upstream(StatusCode, String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<FieldErrors> for ApiError {
    fn from(errors: FieldErrors) -> Self {
        ApiError::Validation(errors)
    }
}

impl ApiError {
    /// An internal error; the message is logged, not sent.
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        ApiError::Internal(e.to_string())
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Validation(_) | ApiError::BadRequest(_) | ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Upstream(s, _) => *s,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if crate::db::is_stale_session(&e) {
            // A migration changed a statement under this process's sessions: new ones
            // replace them, and the request can be sent again.
            tracing::warn!(error = %e, "database sessions out of date with the schema; replacing them");
            crate::db::retire_sessions();
            ApiError::Unavailable("Database schema changed; retry".into())
        } else if crate::db::is_unavailable(&e) {
            tracing::warn!(error = %e, "database unavailable");
            ApiError::Unavailable("Database unavailable; retry later".into())
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<TransitionError> for ApiError {
    fn from(e: TransitionError) -> Self {
        match e {
            TransitionError::NotFound(m) => ApiError::NotFound(m),
            TransitionError::Conflict(m) => ApiError::Conflict(m),
            TransitionError::NoWorker => ApiError::Unavailable(e.to_string()),
            TransitionError::NoUrl(_) => ApiError::Invalid(e.to_string()),
            TransitionError::Db(e) => ApiError::from(e),
        }
    }
}

/// Any error: `error` is a message, or for a 400 zod's `flatten()` object
/// (`{formErrors: [...], fieldErrors: {field: [...]}}`). A body that could not be read
/// (invalid JSON, too large) also carries the message as `message`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl ErrorBody {
    /// `{"error": message}`.
    pub fn message(message: impl Into<String>) -> ErrorBody {
        ErrorBody { error: serde_json::Value::String(message.into()), message: None }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = match &self {
            ApiError::Validation(errors) => {
                ErrorBody { error: serde_json::to_value(errors).unwrap_or(serde_json::Value::Null), message: None }
            }
            ApiError::Internal(cause) => {
                tracing::error!(error = %cause, "request failed");
                ErrorBody::message("Internal Server Error")
            }
            // A body that could not be read: the original's error handler answered these
            // as `{"message": ...}`; both keys are sent.
            ApiError::BadRequest(_) | ApiError::PayloadTooLarge => {
                ErrorBody { message: Some(self.to_string()), ..ErrorBody::message(self.to_string()) }
            }
            other => ErrorBody::message(other.to_string()),
        };
        (status, Json(body)).into_response()
    }
}
