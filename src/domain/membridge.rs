//! The state of the connection to the membridge control plane.

use serde::{Deserialize, Serialize};

/// Connection state, reported by health endpoints (the seed's field names, plus
/// `status`). Persisted, so every process reports the state of the last call any of
/// them made (see `db::settings::membridge_state`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientState {
    pub consecutive_failures: u32,
    pub last_success: Option<i64>,
    pub last_error: Option<String>,
    pub connected: bool,
    /// `unknown` (no call since the endpoint was configured), `connected` or
    /// `disconnected`.
    #[serde(default)]
    pub status: ConnectionStatus,
}

/// What the last calls to membridge showed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionStatus {
    #[default]
    Unknown,
    Connected,
    Disconnected,
}

/// Where membridge is and how to authenticate.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    pub url: String,
    pub admin_key: super::Secret,
}
