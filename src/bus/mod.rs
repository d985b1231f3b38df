//! NATS JetStream: connection, names, provisioning and the outbox dispatcher.

pub mod dispatcher;
pub mod names;
pub mod provision;

use std::time::Duration;

pub use dispatcher::Dispatcher;
pub use names::Names;

/// The servers of a `NATS_URL`: one URL, or several separated by commas.
pub fn server_urls(url: &str) -> Vec<&str> {
    url.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()
}

/// Connects to NATS, to any of the servers `url` lists (comma separated) and, once
/// connected, to any server of the cluster (the servers announce each other). The client
/// reconnects forever on its own, to whichever server answers, at once after losing a
/// connection and then with a back-off of up to 4 s between rounds; the returned client
/// is usable (requests fail fast) while it is disconnected.
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                async_nats::Event::Connected => tracing::info!("nats connected"),
                other => tracing::debug!(event = %other, "nats event"),
            }
        })
        .connect(server_urls(url))
        .await
}

/// A JetStream context whose publish acknowledgements time out after `timeout`.
pub fn jetstream(client: async_nats::Client, timeout: Duration) -> async_nats::jetstream::Context {
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(timeout);
    js
}

/// Tells worker `worker_id` to stop pulling (`draining`) or to pull again: a
/// [`crate::protocol::DrainNotice`] on the drain subject, which every worker hears.
/// Best effort: Postgres holds the state, a draining worker's claims find it full, and a
/// worker whose beat disagrees is told again by the reconciler that records the beat.
pub async fn tell_draining(
    client: &async_nats::Client,
    names: &names::Names,
    worker_id: crate::domain::WorkerId,
    draining: bool,
) {
    let notice = crate::protocol::DrainNotice { worker_id, draining };
    let body = serde_json::to_vec(&notice).expect("a drain notice serializes");
    if let Err(e) = client.publish(names.drain_subject(), body.into()).await {
        tracing::warn!(error = %e, worker.id = %notice.worker_id, "drain notice not sent; the next beat repeats it");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_nats_url_lists_one_or_several_servers() {
        assert_eq!(super::server_urls("nats://a:4222"), ["nats://a:4222"]);
        assert_eq!(
            super::server_urls("nats://a:4222, nats://b:4222,,nats://c:4222 "),
            ["nats://a:4222", "nats://b:4222", "nats://c:4222"]
        );
    }
}
