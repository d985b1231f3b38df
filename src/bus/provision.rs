//! Applies the stream and consumer definitions of `nats/*.json` idempotently.
//!
//! The files are compiled into the binaries (so a container needs no extra files) and
//! use the server's own JSON field names, with three placeholders: `${NS}` (namespace),
//! `${ACK_WAIT_NS}` (the lease TTL in nanoseconds) and `${WORKER}` (a worker's token).

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use serde::Deserialize;

use super::Names;
use crate::domain::WorkerId;

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

fn render(template: &str, names: &Names, ack_wait: Duration, worker: Option<&WorkerId>) -> String {
    let mut s =
        template.replace("${NS}", names.namespace()).replace("${ACK_WAIT_NS}", &ack_wait.as_nanos().to_string());
    if let Some(w) = worker {
        s = s.replace("${WORKER}", &names.worker_token(w));
    }
    s
}

fn parse<T: serde::de::DeserializeOwned>(file: &'static str, text: &str) -> Result<T, ProvisionError> {
    serde_json::from_str(text).map_err(|source| ProvisionError::Definition { file, source })
}

async fn apply_stream(js: &jetstream::Context, cfg: stream::Config) -> Result<(), ProvisionError> {
    let name = cfg.name.clone();
    js.create_or_update_stream(cfg)
        .await
        .map(|_| ())
        .map_err(|e| ProvisionError::Stream { name, message: e.to_string() })
}

async fn apply_consumer(js: &jetstream::Context, file: ConsumerFile) -> Result<(), ProvisionError> {
    let name = file.config.durable_name.clone().unwrap_or_default();
    let err = |e: &dyn std::fmt::Display| ProvisionError::Consumer { name: name.clone(), message: e.to_string() };
    let stream = js.get_stream(&file.stream_name).await.map_err(|e| err(&e))?;
    match stream.create_consumer(file.config.clone()).await {
        Ok(_) => Ok(()),
        // An existing consumer with another config (e.g. a changed lease TTL): update it.
        Err(create) => {
            stream.update_consumer(file.config).await.map(|_| ()).map_err(|e| err(&format!("{create}; update: {e}")))
        }
    }
}

/// Creates or updates the streams and the shared consumers.
pub async fn apply(js: &jetstream::Context, names: &Names, lease_ttl: Duration) -> Result<(), ProvisionError> {
    apply_stream(js, parse("tasks.stream.json", &render(TASKS_STREAM, names, lease_ttl, None))?).await?;
    apply_stream(js, parse("results.stream.json", &render(RESULTS_STREAM, names, lease_ttl, None))?).await?;
    apply_consumer(js, parse("pool.consumer.json", &render(POOL_CONSUMER, names, lease_ttl, None))?).await?;
    apply_consumer(js, parse("results.consumer.json", &render(RESULTS_CONSUMER, names, lease_ttl, None))?).await?;
    Ok(())
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
    lease_ttl: Duration,
    worker: &WorkerId,
) -> Result<(), ProvisionError> {
    apply_consumer(js, parse("worker.consumer.json", &render(WORKER_CONSUMER, names, lease_ttl, Some(worker)))?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_definition_parses_after_rendering() {
        let n = Names::new("t").unwrap();
        let ttl = Duration::from_secs(7);
        let s: stream::Config = parse("tasks", &render(TASKS_STREAM, &n, ttl, None)).unwrap();
        assert_eq!(s.name, n.tasks_stream());
        assert_eq!(s.subjects, vec![n.tasks_subjects()]);
        assert_eq!(s.retention, stream::RetentionPolicy::WorkQueue);
        let r: stream::Config = parse("results", &render(RESULTS_STREAM, &n, ttl, None)).unwrap();
        assert_eq!(r.subjects, vec![n.results_subject()]);
        let p: ConsumerFile = parse("pool", &render(POOL_CONSUMER, &n, ttl, None)).unwrap();
        assert_eq!(p.config.ack_wait, ttl);
        assert_eq!(p.config.filter_subject, n.pool_subject());
        let w = WorkerId::from("w.1");
        let wc: ConsumerFile = parse("worker", &render(WORKER_CONSUMER, &n, ttl, Some(&w))).unwrap();
        assert_eq!(wc.config.filter_subject, n.worker_subject(&w));
        assert_eq!(wc.config.durable_name.as_deref(), Some(n.worker_consumer(&w).as_str()));
        let rc: ConsumerFile = parse("results consumer", &render(RESULTS_CONSUMER, &n, ttl, None)).unwrap();
        assert_eq!(rc.stream_name, n.results_stream());
    }
}
