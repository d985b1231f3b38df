//! Health, readiness, the membridge configuration and the connection test.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use serde_json::Value;

use super::body::JsonBody;
use super::schemas::{ConfigInput, Connected, ErrorBody, Health, RequestBody, RuntimeConfigView, TestConnection};
use super::{ApiError, AppState};
use crate::db::{audit, settings};
use crate::domain::{AuditAction, NewAudit};
use crate::membridge::{Auth, Retry};

/// The seed's `RuntimeConfig`.
#[derive(Debug, Serialize)]
pub struct RuntimeConfig {
    pub membridge_server_url: String,
    pub admin_key_masked: String,
    pub connected: bool,
    pub last_test: Option<i64>,
}

/// The seed's `maskKey`: never more than the first and last four characters.
pub fn mask_key(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.is_empty() {
        String::new()
    } else if chars.len() <= 8 {
        "****".into()
    } else {
        let head: String = chars[..4].iter().collect();
        let tail: String = chars[chars.len() - 4..].iter().collect();
        format!("{head}****{tail}")
    }
}

async fn load(state: &AppState) -> Result<settings::MembridgeSettings, ApiError> {
    Ok(settings::membridge(&state.pool, &state.settings.membridge_default).await?)
}

fn view(s: &settings::MembridgeSettings) -> RuntimeConfig {
    RuntimeConfig {
        membridge_server_url: s.url.clone(),
        admin_key_masked: mask_key(s.admin_key.expose()),
        connected: s.connected,
        last_test: s.last_test,
    }
}

/// `GET /api/runtime/health` (open).
#[utoipa::path(get, path = "/api/runtime/health", tag = "runtime", responses((status = 200, body = Health), (status = 429, body = ErrorBody)))]
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    let db_ok = crate::db::ping(&state.pool).await;
    // The state every process shares; unknown when Postgres cannot tell.
    let mut membridge = serde_json::to_value(state.membridge.state().await.unwrap_or_default()).unwrap_or_default();
    membridge["sync"] =
        serde_json::to_value(settings::membridge_sync(&state.pool).await.unwrap_or_default()).unwrap_or_default();
    let nats_ok = state.nats.connection_state() == async_nats::connection::State::Connected;
    Json(Health {
        database: Connected { connected: db_ok },
        membridge,
        nats: Connected { connected: nats_ok },
        service: "bloom-runtime",
        status: "ok",
        storage: "postgresql",
        uptime: state.started.elapsed().as_secs_f64(),
    })
}

/// `GET /readyz`: 200 when Postgres and NATS are reachable, else 503.
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let db_ok = crate::db::ping(&state.pool).await;
    let nats_ok = state.nats.connection_state() == async_nats::connection::State::Connected;
    let status = if db_ok && nats_ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(super::schemas::Readiness { database: db_ok, nats: nats_ok }))
}

/// `GET /api/runtime/config`: the admin key is masked.
#[utoipa::path(get, path = "/api/runtime/config", tag = "runtime", responses((status = 200, body = RuntimeConfigView), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn get_config(State(state): State<AppState>) -> Result<Json<RuntimeConfig>, ApiError> {
    Ok(Json(view(&load(&state).await?)))
}

/// `POST /api/runtime/config` `{membridge_server_url, admin_key}`.
#[utoipa::path(post, path = "/api/runtime/config", tag = "runtime", request_body = ConfigInput, responses((status = 200, body = RuntimeConfigView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn set_config(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<RuntimeConfig>, ApiError> {
    let ConfigInput { membridge_server_url: url, admin_key: key, agent_key } = ConfigInput::parse(&body)?;
    let now = state.clock.now_ms();
    let mut tx = state.pool.begin().await?;
    settings::save_membridge(&mut *tx, &url, &key).await?;
    if let Some(agent_key) = &agent_key {
        settings::save_agent_key(&mut *tx, agent_key).await?;
    }
    let detail = format!("Updated membridge URL to {url}");
    audit::insert(
        &mut *tx,
        &[NewAudit::new(AuditAction::ConfigUpdated, "runtime_config", "singleton", "admin", detail)],
        now,
    )
    .await?;
    tx.commit().await?;
    Ok(Json(view(&load(&state).await?)))
}

/// `POST /api/runtime/test-connection` (open, strictly rate limited): checks membridge's
/// `/health`, then that the admin key is accepted. Always 200 with `{connected, ...}`.
#[utoipa::path(post, path = "/api/runtime/test-connection", tag = "runtime", responses((status = 200, body = TestConnection), (status = 429, body = ErrorBody)))]
pub async fn test_connection(State(state): State<AppState>) -> Result<Json<TestConnection>, ApiError> {
    let ep = load(&state).await?.endpoint();
    let client = &state.membridge;
    let outcome = match client.call(&ep, reqwest::Method::GET, "/health", None, Retry::Idempotent(1), Auth::Open).await
    {
        Err(e) => Err(e.to_string()),
        Ok(r) if !r.is_success() => Err(format!("HTTP {}", r.status)),
        Ok(r) => {
            let health = r.json().unwrap_or(Value::Null);
            // `/health` needs no key: check the key on an authenticated route.
            match client.call(&ep, reqwest::Method::GET, "/agents", None, Retry::Idempotent(1), Auth::Checked).await {
                Ok(a) if a.status == 401 || a.status == 403 => Err(format!("HTTP {}: admin key rejected", a.status)),
                Ok(_) => Ok(health),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    let now = state.clock.now_ms();
    let connected = outcome.is_ok();
    let mut tx = state.pool.begin().await?;
    settings::save_connection(&mut *tx, connected, now).await?;
    if let Ok(health) = &outcome {
        let detail = format!("Connection OK: {health}");
        audit::insert(
            &mut *tx,
            &[NewAudit::new(AuditAction::ConnectionTest, "runtime_config", "singleton", "admin", detail)],
            now,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Json(match outcome {
        Ok(health) => TestConnection { connected: true, health: Some(health), error: None },
        Err(error) => TestConnection { connected: false, health: None, error: Some(error) },
    }))
}

#[cfg(test)]
mod tests {
    use super::mask_key;

    #[test]
    fn masks_like_the_seed() {
        assert_eq!(mask_key(""), "");
        assert_eq!(mask_key("short"), "****");
        assert_eq!(mask_key("12345678"), "****");
        assert_eq!(mask_key("abcd123456wxyz"), "abcd****wxyz");
    }
}
