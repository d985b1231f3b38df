//! NATS JetStream: connection, names, provisioning and the outbox dispatcher.

pub mod dispatcher;
pub mod names;
pub mod provision;

use std::time::Duration;

pub use dispatcher::Dispatcher;
pub use names::Names;

/// Connects to NATS. The client reconnects forever on its own; the returned client is
/// usable (requests fail fast) while it is disconnected.
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
        .connect(url)
        .await
}

/// A JetStream context whose publish acknowledgements time out after `timeout`.
pub fn jetstream(client: async_nats::Client, timeout: Duration) -> async_nats::jetstream::Context {
    let mut js = async_nats::jetstream::new(client);
    js.set_timeout(timeout);
    js
}
