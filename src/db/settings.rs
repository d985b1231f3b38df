//! `runtime_settings`: the key/value store behind the membridge configuration.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;

use crate::domain::{ClientState, ConnectionStatus};

/// All settings.
pub async fn all(db: impl PgExecutor<'_>) -> sqlx::Result<HashMap<String, String>> {
    let rows = sqlx::query!("SELECT key, value FROM runtime_settings").fetch_all(db).await?;
    Ok(rows.into_iter().map(|r| (r.key, r.value)).collect())
}

/// Sets several keys in one statement.
pub async fn put(db: impl PgExecutor<'_>, pairs: &[(&str, String)]) -> sqlx::Result<()> {
    let keys: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
    let values: Vec<&str> = pairs.iter().map(|(_, v)| v.as_str()).collect();
    sqlx::query!(
        "INSERT INTO runtime_settings (key, value) SELECT * FROM UNNEST($1::text[], $2::text[])
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        keys as _,
        values as _
    )
    .execute(db)
    .await?;
    Ok(())
}

/// The membridge settings as the original service persisted them.
#[derive(Clone, Debug, PartialEq)]
pub struct MembridgeSettings {
    pub url: String,
    pub admin_key: crate::domain::Secret,
    pub connected: bool,
    pub last_test: Option<i64>,
}

/// Keys of the membridge settings.
const URL: &str = "membridge_server_url";
const ADMIN_KEY: &str = "admin_key";
const CONNECTED: &str = "connected";
const LAST_TEST: &str = "last_test";
const STATE: &str = "membridge_state";
const SYNC: &str = "membridge_sync";
const AGENT_KEY: &str = "membridge_agent_key";

/// The key membridge agents require: the saved one, else `default` (`MEMBRIDGE_AGENT_KEY`).
pub async fn agent_key(
    db: impl PgExecutor<'_>,
    default: &crate::domain::Secret,
) -> sqlx::Result<crate::domain::Secret> {
    let saved =
        sqlx::query_scalar!("SELECT value FROM runtime_settings WHERE key = $1", AGENT_KEY).fetch_optional(db).await?;
    Ok(saved.map(crate::domain::Secret::new).unwrap_or_else(|| default.clone()))
}

/// Saves the key membridge agents require.
pub async fn save_agent_key(db: impl PgExecutor<'_>, key: &str) -> sqlx::Result<()> {
    put(db, &[(AGENT_KEY, key.to_owned())]).await
}

/// The saved membridge settings, falling back to `default` for what was never saved.
pub async fn membridge(db: impl PgExecutor<'_>, default: &crate::domain::Endpoint) -> sqlx::Result<MembridgeSettings> {
    let all = all(db).await?;
    Ok(MembridgeSettings {
        url: all.get(URL).cloned().unwrap_or_else(|| default.url.clone()),
        admin_key: all
            .get(ADMIN_KEY)
            .map(|k| crate::domain::Secret::new(k.clone()))
            .unwrap_or_else(|| default.admin_key.clone()),
        connected: all.get(CONNECTED).is_some_and(|v| v == "true"),
        last_test: all.get(LAST_TEST).and_then(|v| v.parse().ok()),
    })
}

impl MembridgeSettings {
    /// The endpoint to call.
    pub fn endpoint(&self) -> crate::domain::Endpoint {
        crate::domain::Endpoint { url: self.url.clone(), admin_key: self.admin_key.clone() }
    }
}

/// Saves the membridge URL and admin key. The connection state starts again as
/// `unknown`: nothing is known of the new endpoint until a call to it succeeds.
pub async fn save_membridge(db: impl PgExecutor<'_>, url: &str, admin_key: &str) -> sqlx::Result<()> {
    let unknown = serde_json::to_string(&ClientState::default()).expect("state serializes");
    put(db, &[(URL, url.to_owned()), (ADMIN_KEY, admin_key.to_owned()), (CONNECTED, "false".into()), (STATE, unknown)])
        .await
}

/// The membridge connection state as the last call of any process left it.
pub async fn membridge_state(db: impl PgExecutor<'_>) -> sqlx::Result<ClientState> {
    let saved =
        sqlx::query_scalar!("SELECT value FROM runtime_settings WHERE key = $1", STATE).fetch_optional(db).await?;
    Ok(saved.and_then(|v| serde_json::from_str(&v).ok()).unwrap_or_default())
}

/// Records the outcome of one membridge call in one statement: the connection state
/// (failures counted across processes) and the original's `connected`/`last_test`.
pub async fn record_membridge_call(db: impl PgExecutor<'_>, outcome: Result<(), &str>, now: i64) -> sqlx::Result<()> {
    let ok = outcome.is_ok();
    let first = ClientState {
        consecutive_failures: u32::from(!ok),
        last_success: ok.then_some(now),
        last_error: outcome.err().map(str::to_owned),
        connected: ok,
        status: if ok { ConnectionStatus::Connected } else { ConnectionStatus::Disconnected },
    };
    sqlx::query!(
        "WITH s AS (
            INSERT INTO runtime_settings (key, value) VALUES ($1, $2)
            ON CONFLICT (key) DO UPDATE SET value = CASE WHEN $3 THEN EXCLUDED.value ELSE (
                runtime_settings.value::jsonb || jsonb_build_object(
                    'consecutiveFailures', COALESCE((runtime_settings.value::jsonb->>'consecutiveFailures')::int, 0) + 1,
                    'lastError', $4::text, 'connected', false, 'status', 'disconnected'))::text END)
         INSERT INTO runtime_settings (key, value) VALUES ($5, $3::text), ($6, $7::text)
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        STATE,
        serde_json::to_string(&first).expect("state serializes"),
        ok,
        first.last_error,
        CONNECTED,
        LAST_TEST,
        now.to_string()
    )
    .execute(db)
    .await?;
    Ok(())
}

/// What the last membridge agent sync did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncState {
    /// When the last sync ran (ms since the epoch).
    pub last_run: Option<i64>,
    /// When a sync last read `/agents` and stored it.
    pub last_success: Option<i64>,
    pub ok: bool,
    pub error: Option<String>,
    /// Agents membridge listed in the last successful sync.
    pub agents: usize,
}

/// The state of the membridge agent sync.
pub async fn membridge_sync(db: impl PgExecutor<'_>) -> sqlx::Result<SyncState> {
    let saved =
        sqlx::query_scalar!("SELECT value FROM runtime_settings WHERE key = $1", SYNC).fetch_optional(db).await?;
    Ok(saved.and_then(|v| serde_json::from_str(&v).ok()).unwrap_or_default())
}

/// Saves the state of the membridge agent sync.
pub async fn save_membridge_sync(db: impl PgExecutor<'_>, state: &SyncState) -> sqlx::Result<()> {
    put(db, &[(SYNC, serde_json::to_string(state).expect("sync state serializes"))]).await
}

/// Saves the result of a connection test.
pub async fn save_connection(db: impl PgExecutor<'_>, connected: bool, at: i64) -> sqlx::Result<()> {
    put(db, &[(CONNECTED, connected.to_string()), (LAST_TEST, at.to_string())]).await
}
