//! Syncs membridge's `/agents` into the workers table (the seed's worker sync): runs
//! every `membridge_interval` on the elected leader only.
//!
//! Mapping (as the seed): id and node_id from `name`, else `node_id`, else `id`; status
//! as reported (new agents are `unknown`, so not eligible for work); capabilities from
//! the agent's `capabilities` or top-level `max_concurrency`/`labels`, defaulting to
//! `{claude_cli: true, max_concurrency: 1, labels: []}`; `last_heartbeat` from
//! `last_seen`, converted from Unix seconds to milliseconds (the seed compared seconds
//! with milliseconds), and left as it was when membridge never saw the agent.
//!
//! A node that registered itself (`POST /api/runtime/workers`) keeps what it said of
//! itself: its capabilities and URL win, and membridge supplies liveness only (its
//! status, unless `unknown`, and `last_seen`). See [`workers::sync_agents`].
//!
//! Staleness (the seed's 60 s rule, `membridge_stale_after`): workers absent from
//! `/agents` and silent that long become `offline`; while membridge cannot be read
//! (down, or the key rejected), the workers it reported become `offline` once its last
//! successful sync is that old. Either way their routed tasks go to the pool. Every
//! run's outcome is saved (`membridge.sync` in `GET /api/runtime/health`).

use serde::Deserialize;

use super::Reconciler;
use crate::db::settings::{self, SyncState};
use crate::db::workers::{self, SyncedAgent};
use crate::domain::{Capabilities, WorkerId, WorkerStatus};
use crate::membridge::{Auth, Retry};

/// An agent as membridge reports it. Fields the seed fell back on are optional.
#[derive(Clone, Debug, Deserialize)]
pub struct Agent {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub node_id: Option<String>,
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub last_seen: Option<f64>,
    #[serde(default)]
    pub capabilities: Option<serde_json::Value>,
    #[serde(default)]
    pub max_concurrency: Option<serde_json::Value>,
    #[serde(default)]
    pub labels: Option<serde_json::Value>,
    #[serde(default)]
    pub ip_addrs: Option<Vec<String>>,
    #[serde(default)]
    pub obs_count: Option<i32>,
    #[serde(default)]
    pub db_sha: Option<String>,
}

/// Maps an agent onto a worker row; `None` when it has no name, node id or id.
pub fn map_agent(a: &Agent) -> Option<SyncedAgent> {
    let id = [&a.name, &a.node_id, &a.id].into_iter().flatten().find(|s| !s.is_empty())?.clone();
    let caps = a.capabilities.as_ref();
    let field = |key: &str| caps.and_then(|c| c.get(key)).filter(|v| !v.is_null());
    let capabilities = Capabilities {
        claude_cli: field("claude_cli").and_then(|v| v.as_bool()).unwrap_or(true),
        max_concurrency: field("max_concurrency")
            .or(a.max_concurrency.as_ref())
            .and_then(Capabilities::reported_concurrency)
            .unwrap_or(1),
        labels: field("labels")
            .or(a.labels.as_ref())
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default(),
        ..Capabilities::default()
    };
    Some(SyncedAgent {
        id: WorkerId(id),
        url: a.url.clone(),
        status: a.status.as_deref().and_then(WorkerStatus::parse).unwrap_or(WorkerStatus::Unknown),
        capabilities,
        last_heartbeat: a.last_seen.filter(|s| *s > 0.0).map(|s| (s * 1000.0) as i64),
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

/// Runs one sync, saves and counts its outcome; after a failed one, applies the
/// staleness rule to the workers membridge reported.
pub async fn run_logged(r: &Reconciler) {
    let now = r.clock.now_ms();
    let previous = settings::membridge_sync(&r.pool).await.unwrap_or_default();
    let state = match run_once(r).await {
        Ok(report) => {
            r.metrics.membridge_sync_runs_total.inc();
            if previous.last_run.is_some() && !previous.ok {
                tracing::info!(agents = report.agents, "membridge sync succeeded again");
            }
            tracing::debug!(?report, "membridge sync");
            SyncState { last_run: Some(now), last_success: Some(now), ok: true, error: None, agents: report.agents }
        }
        Err(e) => {
            r.metrics.membridge_sync_errors_total.inc();
            let error = format!("{e:#}");
            if failure_is_news(&previous, &error) {
                tracing::warn!(error, "membridge sync failed (the same failure again is logged at debug level)");
            } else {
                tracing::debug!(error, "membridge sync failed again");
            }
            if let Err(e) = expire_unobserved(r, previous.last_success, now).await {
                tracing::warn!(error = %e, "marking workers membridge no longer reports offline failed");
            }
            SyncState { last_run: Some(now), ok: false, error: Some(error), ..previous }
        }
    };
    if let Err(e) = settings::save_membridge_sync(&r.pool, &state).await {
        tracing::warn!(error = %e, "membridge sync state not saved");
    }
}

/// Whether a failed sync is worth a warning: the first failure after a success (or the
/// first run), or a failure unlike the last one. A membridge that stays down (none runs at
/// the configured URL, say) is reported once, not at every interval; the failures are
/// still counted (`bloom_membridge_sync_errors_total`) and saved for the health route.
fn failure_is_news(previous: &SyncState, error: &str) -> bool {
    previous.ok || previous.error.as_deref() != Some(error)
}

/// While membridge cannot be read, the workers it reported are as stale as its last
/// successful sync: once that is older than `membridge_stale_after`, they go offline.
async fn expire_unobserved(r: &Reconciler, last_success: Option<i64>, now: i64) -> anyhow::Result<()> {
    let cutoff = now - r.settings.membridge_stale_after.as_millis() as i64;
    if last_success.unwrap_or(0) >= cutoff {
        return Ok(());
    }
    let offline = workers::expire_membridge_workers(&r.pool, now).await?;
    if !offline.is_empty() {
        tracing::warn!(
            workers = offline.len(),
            "membridge unreachable past the staleness limit: its workers are offline"
        );
        r.metrics.workers_marked_offline_total.add(offline.len() as u64);
        super::sweeper::reroute(r, &offline).await;
    }
    Ok(())
}

/// One sync.
pub async fn run_once(r: &Reconciler) -> anyhow::Result<SyncReport> {
    let ep = settings::membridge(&r.pool, &r.settings.membridge_default).await?.endpoint();
    let resp =
        r.membridge.call(&ep, reqwest::Method::GET, "/agents", None, Retry::Idempotent(1), Auth::Checked).await?;
    if !resp.is_success() {
        anyhow::bail!("membridge /agents answered HTTP {}", resp.status);
    }
    let agents: Vec<Agent> = serde_json::from_slice(&resp.body)?;
    let now = r.clock.now_ms();
    let mapped: Vec<SyncedAgent> = agents.iter().filter_map(map_agent).collect();
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
    fn a_failure_is_reported_once_until_it_changes_or_a_sync_succeeds() {
        let failed =
            |error: &str| SyncState { last_run: Some(1), ok: false, error: Some(error.into()), ..Default::default() };
        assert!(failure_is_news(&SyncState::default(), "connection refused"), "the first run");
        let succeeded = SyncState { last_run: Some(1), last_success: Some(1), ok: true, ..Default::default() };
        assert!(failure_is_news(&succeeded, "connection refused"), "after a success");
        assert!(!failure_is_news(&failed("connection refused"), "connection refused"), "the same again");
        assert!(failure_is_news(&failed("connection refused"), "membridge /agents answered HTTP 401"));
    }

    #[test]
    fn maps_membridge_agents_with_seed_fallbacks_and_seconds_to_ms() {
        let a: Agent = serde_json::from_value(serde_json::json!({
            "name": "node-a", "url": "http://a:8001", "status": "online",
            "registered_at": 1700000000.5, "last_seen": 1700000100.25
        }))
        .unwrap();
        let w = map_agent(&a).unwrap();
        assert_eq!(w.id.as_str(), "node-a");
        assert_eq!(w.status, WorkerStatus::Online);
        assert_eq!(w.capabilities, Capabilities::default());
        assert_eq!(w.last_heartbeat, Some(1_700_000_100_250));
        // Never seen by membridge: no heartbeat is made up.
        let fresh: Agent = serde_json::from_value(serde_json::json!({"name": "n", "url": "", "status": "unknown",
            "registered_at": 1.0, "last_seen": null}))
        .unwrap();
        let w = map_agent(&fresh).unwrap();
        assert_eq!((w.status, w.last_heartbeat), (WorkerStatus::Unknown, None));
        assert!(map_agent(&serde_json::from_value::<Agent>(serde_json::json!({})).unwrap()).is_none());
    }

    #[test]
    fn id_and_capabilities_fall_back_like_the_seed() {
        let agent = |v: serde_json::Value| map_agent(&serde_json::from_value::<Agent>(v).unwrap()).unwrap();
        assert_eq!(agent(serde_json::json!({"node_id": "n1", "id": "i1"})).id.as_str(), "n1");
        assert_eq!(agent(serde_json::json!({"name": "", "id": "i1"})).id.as_str(), "i1");
        let top = agent(serde_json::json!({"id": "i", "max_concurrency": 4, "labels": ["gpu"]}));
        assert_eq!(
            top.capabilities,
            Capabilities { max_concurrency: 4, labels: vec!["gpu".into()], ..Capabilities::default() }
        );
        let nested = agent(serde_json::json!({"id": "i", "max_concurrency": 4,
            "capabilities": {"claude_cli": false, "max_concurrency": 2}}));
        assert_eq!(
            nested.capabilities,
            Capabilities { claude_cli: false, max_concurrency: 2, ..Capabilities::default() }
        );
    }
}
