//! Syncs membridge's `/agents` into the workers table (the seed's worker sync): runs
//! every `membridge_interval` on the elected leader only.
//!
//! Mapping (as the seed): id and node_id from `name`; status as reported (new agents are
//! `unknown`, so not eligible for work); capabilities default to
//! `{claude_cli: true, max_concurrency: 1, labels: []}` since agents carry none;
//! `last_heartbeat` from `last_seen`, converted from Unix seconds to milliseconds (the
//! seed compared seconds with milliseconds). Workers absent from `/agents` and silent
//! for `membridge_stale_after` become `offline`, and their routed tasks go to the pool.

use serde::Deserialize;

use super::Reconciler;
use crate::db::settings;
use crate::db::workers::{self, SyncedAgent};
use crate::domain::{Capabilities, WorkerId, WorkerStatus};
use crate::membridge::Retry;
use crate::time::now_ms;

/// An agent as membridge reports it. Fields the seed fell back on are optional.
#[derive(Clone, Debug, Deserialize)]
pub struct Agent {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub last_seen: Option<f64>,
    #[serde(default)]
    pub capabilities: Option<serde_json::Value>,
    #[serde(default)]
    pub ip_addrs: Option<Vec<String>>,
    #[serde(default)]
    pub obs_count: Option<i32>,
    #[serde(default)]
    pub db_sha: Option<String>,
}

/// Maps an agent onto a worker row; `None` when it has no name.
pub fn map_agent(a: &Agent, now: i64) -> Option<SyncedAgent> {
    let id = a.name.clone().or_else(|| a.node_id.clone()).filter(|s| !s.is_empty())?;
    let caps = a.capabilities.as_ref();
    let capabilities = Capabilities {
        claude_cli: caps.and_then(|c| c.get("claude_cli")).and_then(|v| v.as_bool()).unwrap_or(true),
        max_concurrency: caps
            .and_then(|c| c.get("max_concurrency"))
            .and_then(|v| v.as_i64())
            .filter(|n| *n >= 1)
            .map_or(1, |n| n.min(32) as i32),
        labels: caps
            .and_then(|c| c.get("labels"))
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default(),
    };
    Some(SyncedAgent {
        id: WorkerId(id),
        url: a.url.clone(),
        status: a.status.as_deref().and_then(WorkerStatus::parse).unwrap_or(WorkerStatus::Unknown),
        capabilities,
        last_heartbeat: a.last_seen.filter(|s| *s > 0.0).map_or(now, |s| (s * 1000.0) as i64),
        ip_addrs: a.ip_addrs.clone().filter(|v| !v.is_empty()),
        obs_count: a.obs_count,
        db_sha: a.db_sha.clone(),
    })
}

/// What one sync did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub agents: usize,
    pub marked_offline: usize,
    pub rerouted: usize,
}

/// Runs one sync and logs/counts its outcome.
pub async fn run_logged(r: &Reconciler) {
    match run_once(r).await {
        Ok(report) => {
            r.metrics.membridge_sync_runs_total.inc();
            tracing::debug!(?report, "membridge sync");
        }
        Err(e) => {
            r.metrics.membridge_sync_errors_total.inc();
            tracing::warn!(error = %e, "membridge sync failed");
        }
    }
}

/// One sync.
pub async fn run_once(r: &Reconciler) -> anyhow::Result<SyncReport> {
    let ep = settings::membridge(&r.pool, &r.settings.membridge_default).await?.endpoint();
    let resp = r.membridge.call(&ep, reqwest::Method::GET, "/agents", None, Retry::Idempotent(1)).await?;
    if !resp.is_success() {
        anyhow::bail!("membridge /agents answered HTTP {}", resp.status);
    }
    let agents: Vec<Agent> = serde_json::from_slice(&resp.body)?;
    let now = now_ms();
    let mapped: Vec<SyncedAgent> = agents.iter().filter_map(|a| map_agent(a, now)).collect();
    let stale_cutoff = now - r.settings.membridge_stale_after.as_millis() as i64;
    let mut tx = r.pool.begin().await?;
    let offline = workers::sync_agents(&mut tx, &mapped, now, stale_cutoff).await?;
    tx.commit().await?;
    let rerouted = super::sweeper::reroute(r, &offline).await;
    Ok(SyncReport { agents: mapped.len(), marked_offline: offline.len(), rerouted })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_membridge_agents_with_seed_fallbacks_and_seconds_to_ms() {
        let a: Agent = serde_json::from_value(serde_json::json!({
            "name": "node-a", "url": "http://a:8001", "status": "online",
            "registered_at": 1700000000.5, "last_seen": 1700000100.25
        }))
        .unwrap();
        let w = map_agent(&a, 5).unwrap();
        assert_eq!(w.id.as_str(), "node-a");
        assert_eq!(w.status, WorkerStatus::Online);
        assert_eq!(w.capabilities, Capabilities::default());
        assert_eq!(w.last_heartbeat, 1_700_000_100_250);
        let fresh: Agent = serde_json::from_value(serde_json::json!({"name": "n", "url": "", "status": "unknown",
            "registered_at": 1.0, "last_seen": null}))
        .unwrap();
        let w = map_agent(&fresh, 42).unwrap();
        assert_eq!((w.status, w.last_heartbeat), (WorkerStatus::Unknown, 42));
        assert!(map_agent(&serde_json::from_value::<Agent>(serde_json::json!({})).unwrap(), 0).is_none());
    }
}
