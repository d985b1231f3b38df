//! `runtime_settings`: the key/value store behind the membridge configuration.

use std::collections::HashMap;

use sqlx::PgExecutor;

/// All settings.
pub async fn all(db: impl PgExecutor<'_>) -> sqlx::Result<HashMap<String, String>> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT key, value FROM runtime_settings").fetch_all(db).await?;
    Ok(rows.into_iter().collect())
}

/// Sets several keys in one statement.
pub async fn put(db: impl PgExecutor<'_>, pairs: &[(&str, String)]) -> sqlx::Result<()> {
    let keys: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
    let values: Vec<&str> = pairs.iter().map(|(_, v)| v.as_str()).collect();
    sqlx::query(
        "INSERT INTO runtime_settings (key, value) SELECT * FROM UNNEST($1::text[], $2::text[])
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
    )
    .bind(keys)
    .bind(values)
    .execute(db)
    .await?;
    Ok(())
}

/// The membridge settings as the original service persisted them.
#[derive(Clone, Debug, PartialEq)]
pub struct MembridgeSettings {
    pub url: String,
    pub admin_key: crate::config::Secret,
    pub connected: bool,
    pub last_test: Option<i64>,
}

/// Keys of the membridge settings.
const URL: &str = "membridge_server_url";
const ADMIN_KEY: &str = "admin_key";
const CONNECTED: &str = "connected";
const LAST_TEST: &str = "last_test";

/// The saved membridge settings, falling back to `default` for what was never saved.
pub async fn membridge(
    db: impl PgExecutor<'_>,
    default: &crate::membridge::Endpoint,
) -> sqlx::Result<MembridgeSettings> {
    let all = all(db).await?;
    Ok(MembridgeSettings {
        url: all.get(URL).cloned().unwrap_or_else(|| default.url.clone()),
        admin_key: all
            .get(ADMIN_KEY)
            .map(|k| crate::config::Secret::new(k.clone()))
            .unwrap_or_else(|| default.admin_key.clone()),
        connected: all.get(CONNECTED).is_some_and(|v| v == "true"),
        last_test: all.get(LAST_TEST).and_then(|v| v.parse().ok()),
    })
}

impl MembridgeSettings {
    /// The endpoint to call.
    pub fn endpoint(&self) -> crate::membridge::Endpoint {
        crate::membridge::Endpoint { url: self.url.clone(), admin_key: self.admin_key.clone() }
    }
}

/// Saves the membridge URL and admin key.
pub async fn save_membridge(db: impl PgExecutor<'_>, url: &str, admin_key: &str) -> sqlx::Result<()> {
    put(db, &[(URL, url.to_owned()), (ADMIN_KEY, admin_key.to_owned())]).await
}

/// Saves the result of a connection test.
pub async fn save_connection(db: impl PgExecutor<'_>, connected: bool, at: i64) -> sqlx::Result<()> {
    put(db, &[(CONNECTED, connected.to_string()), (LAST_TEST, at.to_string())]).await
}
