//! Worker nodes and the seed's worker selection rule.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ids::WorkerId;

/// Liveness of a worker as last reported (by itself, an operator or membridge).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum WorkerStatus {
    Online,
    Offline,
    Syncing,
    Error,
    #[default]
    Unknown,
}

impl WorkerStatus {
    /// All statuses.
    pub const ALL: [WorkerStatus; 5] = [
        WorkerStatus::Online,
        WorkerStatus::Offline,
        WorkerStatus::Syncing,
        WorkerStatus::Error,
        WorkerStatus::Unknown,
    ];

    /// The status as stored and serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Online => "online",
            WorkerStatus::Offline => "offline",
            WorkerStatus::Syncing => "syncing",
            WorkerStatus::Error => "error",
            WorkerStatus::Unknown => "unknown",
        }
    }

    /// Parses a stored or client-supplied status.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// Who last described this worker; decides which liveness rule applies to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum WorkerSource {
    /// Registered over REST (`POST /api/runtime/workers`).
    #[default]
    Api,
    /// A `bloom-worker` process heartbeating over NATS.
    Nats,
    /// Synchronised from membridge's `/agents`.
    Membridge,
}

/// How a worker is reached (derived by Postgres from the row: a `bloom-worker`, or a
/// URL).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[sqlx(type_name = "text", rename_all = "lowercase")]
pub enum WorkerTransport {
    /// A `bloom-worker`: tasks reach it over NATS JetStream.
    Nats,
    /// An HTTP agent (the membridge agent): the reconcilers call its `/execute-task`.
    Http,
    /// A worker without a URL that leases its tasks itself over REST.
    #[default]
    Rest,
}

/// The most execution slots a worker registered over REST, or reported by membridge or
/// by an agent's health check, is taken to have (a `bloom-worker` announces up to 256).
pub const MAX_REGISTERED_CONCURRENCY: i64 = 32;

/// What a worker can do; each field defaults when absent
/// (`{claude_cli: true, max_concurrency: 1, labels: []}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct Capabilities {
    pub claude_cli: bool,
    /// 1..=[`MAX_REGISTERED_CONCURRENCY`] when registered over REST (a `bloom-worker`
    /// announces up to 256).
    #[schema(minimum = 1)]
    pub max_concurrency: i32,
    pub labels: Vec<String>,
    /// Any other key, as an HTTP agent's health check reported it (its flags:
    /// `self_update`, `restart`, `uninstall`, `clone`, `sync`, `process_control`).
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities { claude_cli: true, max_concurrency: 1, labels: Vec::new(), other: Map::new() }
    }
}

impl Capabilities {
    /// A `max_concurrency` reported from outside (membridge, an agent's health check):
    /// an integer of at least 1, taken as at most [`MAX_REGISTERED_CONCURRENCY`].
    pub fn reported_concurrency(value: &Value) -> Option<i32> {
        value.as_i64().filter(|n| *n >= 1).map(|n| n.min(MAX_REGISTERED_CONCURRENCY) as i32)
    }

    /// What of an HTTP agent's reported `capabilities` is merged into the stored ones:
    /// every key as reported, except that a key the runtime reads keeps its stored value
    /// unless the report's has its type: `claude_cli` a boolean, `max_concurrency` an
    /// integer of at least 1 (at most 32 is taken, as from membridge), `labels` an array
    /// of strings. A report with `"max_concurrency": "lots"` would otherwise make every
    /// read of the worker fail. `None` when the report is not an object.
    pub fn agent_report(reported: &Value) -> Option<Map<String, Value>> {
        let Value::Object(reported) = reported else { return None };
        let usable = |key: &str, value: &Value| -> Option<Value> {
            match key {
                "claude_cli" => value.is_boolean().then(|| value.clone()),
                "max_concurrency" => Self::reported_concurrency(value).map(Value::from),
                "labels" => value.as_array().filter(|a| a.iter().all(Value::is_string)).map(|_| value.clone()),
                _ => Some(value.clone()),
            }
        };
        Some(reported.iter().filter_map(|(k, v)| Some((k.clone(), usable(k, v)?))).collect())
    }
}

/// A REST registration: the body of `POST /api/runtime/workers` as the seed's
/// `registerWorkerSchema` reads it (absent fields take their defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = RegisterWorker)]
pub struct Registration {
    #[schema(value_type = String, min_length = 1, max_length = 128)]
    pub name: WorkerId,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "Registration::default_status")]
    pub status: WorkerStatus,
    #[serde(default)]
    pub capabilities: Capabilities,
    #[serde(default)]
    pub ip_addrs: Vec<String>,
    /// Kept when absent or empty (`unknown` for a new worker). An agent that gives it is
    /// sent queued tasks by the runtime ([`Worker::takes_pushed_tasks`]).
    #[serde(default)]
    #[schema(max_length = 64)]
    pub agent_version: Option<String>,
    /// Kept when absent (empty for a new worker).
    #[serde(default)]
    #[schema(max_length = 512)]
    pub os_info: Option<String>,
    /// Kept when absent or empty (`manual` for a new worker).
    #[serde(default)]
    #[schema(max_length = 64)]
    pub install_method: Option<String>,
}

impl Registration {
    fn default_status() -> WorkerStatus {
        WorkerStatus::Online
    }
}

/// `workers.agent_version` of a worker that has not said its version.
pub const UNKNOWN_AGENT_VERSION: &str = "unknown";
/// `workers.agent_version` after `agent-uninstall` removed the agent's service.
pub const UNINSTALLED_AGENT_VERSION: &str = "uninstalled";

/// A row of `workers`, serialized exactly as the seed's `WorkerNode`.
///
/// `active_leases` is the worker's active leases, counted when the row is read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Worker {
    pub id: WorkerId,
    pub node_id: String,
    pub url: String,
    pub status: WorkerStatus,
    pub capabilities: Capabilities,
    pub last_heartbeat: Option<i64>,
    pub ip_addrs: Vec<String>,
    pub obs_count: i32,
    pub db_sha: String,
    pub registered_at: i64,
    pub active_leases: i32,
    /// The agent's version; `unknown` until it says, `uninstalled` after agent-uninstall.
    pub agent_version: String,
    /// Free text, e.g. `<hostname> / <PRETTY_NAME>`.
    pub os_info: String,
    /// `manual` or `script`.
    pub install_method: String,
    /// How the runtime reaches it (an addition to the upstream shape).
    pub transport: WorkerTransport,
    #[serde(skip)]
    pub source: WorkerSource,
    /// Since when (epoch ms) it is being drained: it takes no new lease and finishes those
    /// it holds (an addition, shown only while draining).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_since: Option<i64>,
}

impl Worker {
    /// Free execution slots.
    pub fn free_capacity(&self) -> i32 {
        self.capabilities.max_concurrency - self.active_leases
    }

    /// The runtime sends it queued tasks by itself (the reconcilers' agent dispatch): an
    /// HTTP agent that identified itself as one, listed by membridge or giving its version
    /// (as the membridge agent does when it registers, and as an `agent-health` check
    /// records), and was not uninstalled since. A worker that registered a URL and no
    /// version leases its own tasks over REST, as the original's workers did;
    /// `POST /llm-tasks/:id/dispatch` still sends it a task when asked. The statements
    /// that pick agents write the same rule (`db::workers`, `lifecycle::assign`).
    pub fn takes_pushed_tasks(&self) -> bool {
        self.transport == WorkerTransport::Http
            && self.agent_version != UNINSTALLED_AGENT_VERSION
            && (self.source == WorkerSource::Membridge || self.agent_version != UNKNOWN_AGENT_VERSION)
    }

    /// The worker may take a new lease: online, runs the Claude CLI, has a free slot, is
    /// not being drained.
    pub fn is_eligible(&self) -> bool {
        self.status == WorkerStatus::Online
            && self.capabilities.claude_cli
            && self.free_capacity() > 0
            && self.draining_since.is_none()
    }
}

/// The seed's `pickWorker`: among eligible workers, the one that already holds an active
/// lease for the same context (sticky), else the one with the most free capacity.
/// `sticky` is the worker holding an active lease for the task's context, if any.
/// Ties keep the input order (the sort is stable, as in the seed).
pub fn pick_worker<'a>(workers: &'a [Worker], sticky: Option<&WorkerId>) -> Option<&'a Worker> {
    let eligible: Vec<&Worker> = workers.iter().filter(|w| w.is_eligible()).collect();
    if let Some(id) = sticky {
        if let Some(w) = eligible.iter().find(|w| &w.id == id) {
            return Some(w);
        }
    }
    let mut best: Option<&Worker> = None;
    for w in eligible {
        if best.map_or(true, |b| w.free_capacity() > b.free_capacity()) {
            best = Some(w);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_agents_report_keeps_its_flags_and_only_the_known_keys_of_their_types() {
        let merged = |v: Value| Capabilities::agent_report(&v).map(Value::Object);
        let flags = json!({"clone": true, "sync": false, "anything": {"nested": 1}});
        assert_eq!(merged(flags.clone()), Some(flags));
        let good = json!({"claude_cli": false, "max_concurrency": 4, "labels": ["gpu"]});
        assert_eq!(merged(good.clone()), Some(good));
        let bad = json!({"claude_cli": "yes", "max_concurrency": "lots", "labels": "gpu", "clone": true});
        assert_eq!(merged(bad), Some(json!({"clone": true})));
        for n in [json!(0), json!(-1), json!(4.0), json!(null)] {
            assert_eq!(merged(json!({"max_concurrency": n})), Some(json!({})), "{n}");
        }
        assert_eq!(merged(json!({"max_concurrency": 1000})), Some(json!({"max_concurrency": 32})));
        assert_eq!(merged(json!({"labels": ["a", 1]})), Some(json!({})));
        assert_eq!(merged(json!(["not", "an", "object"])), None);
        // What the listings read back: the known keys and the rest side by side.
        let stored = json!({"claude_cli": true, "max_concurrency": 2, "labels": [], "clone": true});
        let caps: Capabilities = serde_json::from_value(stored.clone()).unwrap();
        assert_eq!((caps.max_concurrency, caps.other.get("clone")), (2, Some(&json!(true))));
        assert_eq!(serde_json::to_value(&caps).unwrap(), stored);
    }

    fn worker(id: &str, status: WorkerStatus, max: i32, active: i32) -> Worker {
        Worker {
            id: WorkerId::from(id),
            node_id: id.into(),
            url: String::new(),
            status,
            capabilities: Capabilities { max_concurrency: max, ..Capabilities::default() },
            last_heartbeat: None,
            ip_addrs: vec![],
            obs_count: 0,
            db_sha: String::new(),
            registered_at: 0,
            active_leases: active,
            agent_version: UNKNOWN_AGENT_VERSION.into(),
            os_info: String::new(),
            install_method: "manual".into(),
            transport: WorkerTransport::Rest,
            source: WorkerSource::Api,
            draining_since: None,
        }
    }

    #[test]
    fn picks_most_free_capacity_among_eligible() {
        let ws = vec![
            worker("a", WorkerStatus::Online, 2, 1),
            worker("b", WorkerStatus::Online, 4, 1),
            worker("c", WorkerStatus::Offline, 8, 0),
            worker("d", WorkerStatus::Online, 1, 1),
        ];
        assert_eq!(pick_worker(&ws, None).unwrap().id.as_str(), "b");
    }

    #[test]
    fn sticky_wins_when_eligible_and_is_ignored_when_full() {
        let ws = vec![worker("a", WorkerStatus::Online, 2, 1), worker("b", WorkerStatus::Online, 4, 0)];
        assert_eq!(pick_worker(&ws, Some(&"a".into())).unwrap().id.as_str(), "a");
        let full = vec![worker("a", WorkerStatus::Online, 1, 1), worker("b", WorkerStatus::Online, 4, 0)];
        assert_eq!(pick_worker(&full, Some(&"a".into())).unwrap().id.as_str(), "b");
    }

    #[test]
    fn only_a_worker_that_said_it_is_an_agent_is_sent_tasks() {
        let http = |source: WorkerSource, version: &str| Worker {
            url: "http://agent:8001".into(),
            transport: WorkerTransport::Http,
            source,
            agent_version: version.into(),
            ..worker("a", WorkerStatus::Online, 2, 0)
        };
        assert!(!http(WorkerSource::Api, UNKNOWN_AGENT_VERSION).takes_pushed_tasks(), "a URL alone");
        assert!(http(WorkerSource::Api, "0.4.0").takes_pushed_tasks(), "it gave its version");
        assert!(http(WorkerSource::Membridge, UNKNOWN_AGENT_VERSION).takes_pushed_tasks(), "membridge lists it");
        assert!(!http(WorkerSource::Membridge, UNINSTALLED_AGENT_VERSION).takes_pushed_tasks(), "uninstalled");
        let nats =
            Worker { transport: WorkerTransport::Nats, source: WorkerSource::Nats, ..http(WorkerSource::Nats, "0.1") };
        assert!(!nats.takes_pushed_tasks(), "a bloom-worker pulls its own");
        assert!(!worker("r", WorkerStatus::Online, 2, 0).takes_pushed_tasks(), "no URL");
    }

    #[test]
    fn unknown_agents_and_non_claude_workers_are_not_eligible() {
        let mut no_cli = worker("a", WorkerStatus::Online, 2, 0);
        no_cli.capabilities.claude_cli = false;
        let ws = vec![worker("u", WorkerStatus::Unknown, 2, 0), no_cli];
        assert!(pick_worker(&ws, None).is_none());
    }
}
