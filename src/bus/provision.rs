//! Applies the stream and consumer definitions of `nats/*.json` idempotently.
//!
//! The files are compiled into the binaries (so a container needs no extra files) and
//! use the server's own JSON field names, with placeholders: `${NS}` (namespace),
//! `${ACK_WAIT_NS}` (the lease TTL in nanoseconds), `${REPLICAS}` (the streams' replicas;
//! consumers inherit them), `${TASK_MAX_AGE_NS}` (how long the tasks stream keeps a
//! message, 0 for ever) and `${TASK_DUPLICATE_WINDOW_NS}` (its de-duplication window, two
//! minutes or the maximum age if shorter: JetStream refuses a longer one), `${WORKER}`
//! (a worker's token), and `${POOL}` and
//! `${POOL_SUBJECT}` (the pool consumer of each priority and its subject).
//!
//! The tasks stream drops a dispatch nobody consumed after its maximum age. Without NATS
//! workers (tasks leased over REST, sent to HTTP agents) every dispatch would otherwise
//! stay in the stream for good; Postgres, not the message, says what is queued, and the
//! redispatch duty dispatches a task again when NATS workers have room and its dispatch
//! went unclaimed.
//!
//! Replicas: the runtime's processes create missing streams with the configured count
//! but leave an existing stream's count alone (processes configured differently during a
//! rollout must not scale a stream back and forth); `bloomctl nats apply` changes it in
//! place, which a cluster allows and a single server refuses above 1.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use serde::Deserialize;

use super::Names;
use crate::domain::{Priority, WorkerId};

const TASKS_STREAM: &str = include_str!("../../nats/tasks.stream.json");
const RESULTS_STREAM: &str = include_str!("../../nats/results.stream.json");
const POOL_CONSUMER: &str = include_str!("../../nats/pool.consumer.json");
const RESULTS_CONSUMER: &str = include_str!("../../nats/results.consumer.json");
const WORKER_CONSUMER: &str = include_str!("../../nats/worker.consumer.json");

/// Provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("definition {file} is invalid: {source}")]
    Definition { file: &'static str, source: serde_json::Error },
    #[error("creating stream {name}: {message}")]
    Stream { name: String, message: String },
    #[error(
        "stream {name}: the NATS server refused {replicas} replica(s) (BLOOM_NATS_REPLICAS): {message}; \
         a single server holds 1, a JetStream cluster of N servers up to N (at most 5)"
    )]
    Replicas { name: String, replicas: usize, message: String },
    #[error("creating consumer {name}: {message}")]
    Consumer { name: String, message: String },
    #[error("deleting stream {name}: {message}")]
    Delete { name: String, message: String },
}

#[derive(Deserialize)]
struct ConsumerFile {
    stream_name: String,
    config: consumer::pull::Config,
}

/// The shape of the streams and consumers: what the configuration decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamLayout {
    /// The tasks consumers' ack-wait.
    pub lease_ttl: Duration,
    /// Replicas of each stream (1 to 5).
    pub replicas: usize,
    /// How long the tasks stream keeps a message (zero: for ever).
    pub task_max_age: Duration,
}

/// How long the tasks stream keeps a message unless configured (`BLOOM_NATS_TASK_MAX_AGE_SECS`).
pub const DEFAULT_TASK_MAX_AGE_SECS: u64 = 86_400;

/// How long JetStream de-duplicates a dispatch published again (by `Nats-Msg-Id`), at most.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

impl StreamLayout {
    /// The tasks stream's de-duplication window: [`DUPLICATE_WINDOW`], or the maximum age
    /// when that is shorter (JetStream refuses a window longer than the age). A dispatch
    /// published again after it is delivered again, and its second claim refused.
    pub fn task_duplicate_window(&self) -> Duration {
        match self.task_max_age {
            Duration::ZERO => DUPLICATE_WINDOW,
            age => age.min(DUPLICATE_WINDOW),
        }
    }
}

/// What [`apply`] does with an existing stream whose replicas differ from the layout's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaChange {
    /// Change them (`bloomctl nats apply`).
    Change,
    /// Keep them and warn (a process starting).
    KeepExisting,
}

fn render(template: &str, names: &Names, layout: &StreamLayout, worker: Option<&WorkerId>) -> String {
    template
        .replace("${NS}", names.namespace())
        .replace("${ACK_WAIT_NS}", &layout.lease_ttl.as_nanos().to_string())
        .replace("${REPLICAS}", &layout.replicas.to_string())
        .replace("${TASK_MAX_AGE_NS}", &layout.task_max_age.as_nanos().to_string())
        .replace("${TASK_DUPLICATE_WINDOW_NS}", &layout.task_duplicate_window().as_nanos().to_string())
        .replace("${WORKER}", &worker.map(|w| names.worker_token(w)).unwrap_or_default())
}

/// The pool consumer of `priority`.
fn render_pool(names: &Names, layout: &StreamLayout, priority: Priority) -> String {
    render(POOL_CONSUMER, names, layout, None)
        .replace("${POOL_SUBJECT}", &names.pool_subject_of(priority))
        .replace("${POOL}", &names.pool_consumer_of(priority))
}

/// A rendered definition: the typed configuration and the fields the file sets.
struct Definition<T> {
    config: T,
    fields: serde_json::Value,
}

fn parse<T: serde::de::DeserializeOwned>(file: &'static str, text: &str) -> Result<Definition<T>, ProvisionError> {
    let invalid = |source| ProvisionError::Definition { file, source };
    let fields: serde_json::Value = serde_json::from_str(text).map_err(invalid)?;
    Ok(Definition { config: serde_json::from_value(fields.clone()).map_err(invalid)?, fields })
}

/// The fields `wanted` sets that `existing` (a configuration the server reports, with
/// its defaults filled in) holds with another value.
fn differing(wanted: &serde_json::Value, existing: &impl serde::Serialize) -> Vec<String> {
    let existing = serde_json::to_value(existing).unwrap_or_default();
    let Some(wanted) = wanted.as_object() else { return Vec::new() };
    wanted.iter().filter(|(k, v)| existing.get(k.as_str()) != Some(*v)).map(|(k, _)| k.clone()).collect()
}

/// Creates the stream, or updates it where it differs from the definition (an
/// unchanged stream costs one read: no proposal to the cluster's meta leader).
async fn apply_stream(
    js: &jetstream::Context,
    def: Definition<stream::Config>,
    replicas: ReplicaChange,
) -> Result<(), ProvisionError> {
    let Definition { mut config, fields } = def;
    let name = config.name.clone();
    // A single server refuses to create a stream with several replicas, but accepts
    // (and ignores) them in an update: its streams report no cluster.
    let mut clustered = true;
    let existing = match js.get_stream(&name).await {
        Ok(s) => {
            clustered = s.cached_info().cluster.as_ref().is_some_and(|c| c.name.is_some());
            Some(s.cached_info().config.clone())
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            None
        }
        Err(e) => return Err(ProvisionError::Stream { name, message: e.to_string() }),
    };
    let wanted = config.num_replicas;
    let had = existing.as_ref().map(|c| c.num_replicas);
    let refused = |message: String| {
        if wanted > 1 && had != Some(wanted) {
            ProvisionError::Replicas { name: name.clone(), replicas: wanted, message }
        } else {
            ProvisionError::Stream { name: name.clone(), message }
        }
    };
    let Some(existing) = existing else {
        return js.create_stream(config).await.map(|_| ()).map_err(|e| refused(e.to_string()));
    };
    let mut changed = differing(&fields, &existing);
    if existing.num_replicas != wanted {
        match replicas {
            ReplicaChange::Change if wanted > 1 && !clustered => {
                return Err(refused("the server is not part of a JetStream cluster".into()));
            }
            ReplicaChange::Change => {
                tracing::info!(stream = %name, from = existing.num_replicas, to = wanted, "changing the stream's replicas");
            }
            ReplicaChange::KeepExisting => {
                tracing::warn!(
                    stream = %name, replicas = existing.num_replicas, configured = wanted,
                    "the stream keeps its replicas; `bloomctl nats apply` changes them"
                );
                config.num_replicas = existing.num_replicas;
                changed.retain(|f| f != "num_replicas");
            }
        }
    }
    if changed.is_empty() {
        return Ok(());
    }
    tracing::info!(stream = %name, fields = ?changed, "updating the stream");
    js.update_stream(&config).await.map(|_| ()).map_err(|e| refused(e.to_string()))
}

/// Creates the consumer, or updates it where it differs from the definition (e.g. a
/// changed lease TTL).
async fn apply_consumer(js: &jetstream::Context, def: Definition<ConsumerFile>) -> Result<(), ProvisionError> {
    let Definition { config: file, fields } = def;
    let name = file.config.durable_name.clone().unwrap_or_default();
    let err = |e: &dyn std::fmt::Display| ProvisionError::Consumer { name: name.clone(), message: e.to_string() };
    let stream = js.get_stream(&file.stream_name).await.map_err(|e| err(&e))?;
    match stream.consumer_info(&name).await {
        Ok(info) => {
            let changed = differing(&fields["config"], &info.config);
            if changed.is_empty() {
                return Ok(());
            }
            tracing::info!(consumer = %name, fields = ?changed, "updating the consumer");
            stream.update_consumer(file.config).await.map(|_| ()).map_err(|e| err(&e))
        }
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
            stream.create_consumer(file.config).await.map(|_| ()).map_err(|e| err(&e))
        }
        Err(e) => Err(err(&e)),
    }
}

/// Creates or updates the streams and the shared consumers.
pub async fn apply(
    js: &jetstream::Context,
    names: &Names,
    layout: &StreamLayout,
    replicas: ReplicaChange,
) -> Result<(), ProvisionError> {
    apply_stream(js, parse("tasks.stream.json", &render(TASKS_STREAM, names, layout, None))?, replicas).await?;
    apply_stream(js, parse("results.stream.json", &render(RESULTS_STREAM, names, layout, None))?, replicas).await?;
    for priority in Priority::all_descending() {
        apply_consumer(js, parse("pool.consumer.json", &render_pool(names, layout, priority))?).await?;
    }
    apply_consumer(js, parse("results.consumer.json", &render(RESULTS_CONSUMER, names, layout, None))?).await?;
    Ok(())
}

/// How long a starting process (or `bloomctl nats apply`) retries provisioning before it
/// gives up (and exits, to be restarted).
pub const START_PATIENCE: Duration = Duration::from_secs(60);

/// [`apply`], retrying failures every second up to `patience`: a cluster busy electing
/// leaders or moving a stream's replicas (right after a replica change) times requests
/// out for a while. A definition or a replica count the server refuses is not retried.
pub async fn apply_patiently(
    js: &jetstream::Context,
    names: &Names,
    layout: &StreamLayout,
    replicas: ReplicaChange,
    patience: Duration,
) -> Result<(), ProvisionError> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match apply(js, names, layout, replicas).await {
            Ok(()) => return Ok(()),
            Err(e @ (ProvisionError::Definition { .. } | ProvisionError::Replicas { .. })) => return Err(e),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "provisioning NATS failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// [`apply_patiently`] as a process starts: the streams keep the replicas they have.
pub async fn apply_at_start(
    js: &jetstream::Context,
    names: &Names,
    layout: &StreamLayout,
    patience: Duration,
) -> Result<(), ProvisionError> {
    apply_patiently(js, names, layout, ReplicaChange::KeepExisting, patience).await
}

/// Deletes the namespace's streams, and with them their consumers and every message
/// in them; returns the names of those that existed. Streams already gone are skipped.
pub async fn delete(js: &jetstream::Context, names: &Names) -> Result<Vec<String>, ProvisionError> {
    let mut deleted = Vec::new();
    for name in [names.tasks_stream(), names.results_stream()] {
        match js.delete_stream(&name).await {
            Ok(_) => deleted.push(name),
            Err(e)
                if matches!(e.kind(), jetstream::context::DeleteStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {}
            Err(e) => return Err(ProvisionError::Delete { name, message: e.to_string() }),
        }
    }
    Ok(deleted)
}

/// Creates or updates one worker's direct consumer.
pub async fn apply_worker_consumer(
    js: &jetstream::Context,
    names: &Names,
    layout: &StreamLayout,
    worker: &WorkerId,
) -> Result<(), ProvisionError> {
    apply_consumer(js, parse("worker.consumer.json", &render(WORKER_CONSUMER, names, layout, Some(worker)))?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_definition_parses_after_rendering() {
        let n = Names::new("t").unwrap();
        let ttl = Duration::from_secs(7);
        let layout = StreamLayout { lease_ttl: ttl, replicas: 3, task_max_age: Duration::from_secs(60) };
        let ttl = &layout;
        let s: stream::Config = parse("tasks", &render(TASKS_STREAM, &n, ttl, None)).unwrap().config;
        assert_eq!(s.num_replicas, 3);
        assert_eq!(s.name, n.tasks_stream());
        assert_eq!(s.subjects, vec![n.tasks_subjects()]);
        assert_eq!(s.retention, stream::RetentionPolicy::WorkQueue);
        assert_eq!(s.max_age, Duration::from_secs(60));
        assert_eq!(s.duplicate_window, Duration::from_secs(60), "no longer than the maximum age");
        let forever = StreamLayout { task_max_age: Duration::ZERO, ..layout };
        let s: stream::Config = parse("tasks", &render(TASKS_STREAM, &n, &forever, None)).unwrap().config;
        assert_eq!((s.max_age, s.duplicate_window), (Duration::ZERO, Duration::from_secs(120)));
        let r: stream::Config = parse("results", &render(RESULTS_STREAM, &n, ttl, None)).unwrap().config;
        assert_eq!(r.subjects, vec![n.results_subject()]);
        assert_eq!(r.num_replicas, 3);
        for priority in Priority::all_descending() {
            let p: ConsumerFile = parse("pool", &render_pool(&n, ttl, priority)).unwrap().config;
            assert_eq!(p.config.ack_wait, layout.lease_ttl);
            assert_eq!(p.config.num_replicas, 0, "consumers inherit the stream's replicas");
            assert_eq!(p.config.filter_subject, n.pool_subject_of(priority));
            assert_eq!(p.config.durable_name, Some(n.pool_consumer_of(priority)));
        }
        let w = WorkerId::from("w.1");
        let wc: ConsumerFile = parse("worker", &render(WORKER_CONSUMER, &n, ttl, Some(&w))).unwrap().config;
        assert_eq!(wc.config.filter_subject, n.worker_subject(&w));
        assert_eq!(wc.config.durable_name.as_deref(), Some(n.worker_consumer(&w).as_str()));
        let rc: ConsumerFile = parse("results consumer", &render(RESULTS_CONSUMER, &n, ttl, None)).unwrap().config;
        assert_eq!(rc.stream_name, n.results_stream());
    }
}
