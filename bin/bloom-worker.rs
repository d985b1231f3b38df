//! `bloom-worker`: pulls tasks from JetStream and runs them. Config → telemetry →
//! connect → run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use bloom::config::{LogArgs, NatsArgs, WorkerArgs};
use bloom::domain::{Capabilities, WorkerId};
use bloom::metrics::Metrics;
use bloom::telemetry::ErrorChain;
use bloom::worker::{self, Executor, WorkerSettings};
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// A BLOOM runtime worker.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _telemetry = bloom::telemetry::init(&cli.log.log_format, "bloom-worker");
    bloom::telemetry::exit_status("bloom-worker", run(cli).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    cli.worker.validate().map_err(anyhow::Error::msg)?;
    let names = cli.nats.names().map_err(anyhow::Error::msg)?;
    if cli.log.check_config {
        println!("{cli:#?}");
        return Ok(());
    }
    let w = &cli.worker;
    let executor = match w.executor.as_str() {
        "builtin" => Executor::Builtin,
        _ => Executor::Command { command: w.executor_command.clone(), max_output_bytes: w.executor_max_output_bytes },
    };
    let settings = WorkerSettings {
        id: WorkerId(w.id()),
        capabilities: Capabilities {
            claude_cli: w.claude_cli,
            max_concurrency: w.max_concurrency,
            labels: w.labels.iter().filter(|l| !l.is_empty()).cloned().collect(),
        },
        executor,
        lease_ttl: cli.nats.lease_ttl(),
        beat_interval: Duration::from_millis(w.beat_interval_ms.max(100)),
        shutdown_grace: Duration::from_secs(w.shutdown_grace_secs),
        request_timeout: cli.nats.timeout(),
        claim_timeout: Duration::from_millis(w.claim_timeout_ms.max(100)),
    };
    // Bound first, so a port in use fails at once, before any connection is made.
    let listener = match w.http_port {
        0 => None,
        port => {
            let addr = SocketAddr::from(([0, 0, 0, 0], port));
            Some(bloom::process::bind(addr, "BLOOM_WORKER_HTTP_PORT").await?)
        }
    };
    let client = bloom::bus::connect(&cli.nats.nats_url, &format!("bloom-worker {}", settings.id))
        .await
        .context("connecting to NATS (NATS_URL)")?;
    let metrics = Arc::new(Metrics::default());
    let cancel = CancellationToken::new();
    bloom::process::cancel_on_signal(cancel.clone());
    if let Some(listener) = listener {
        let m = metrics.clone();
        let router = axum::Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/metrics", get(move || async move { m.render() }));
        let c = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = bloom::process::serve_on(listener, router, c).await {
                tracing::error!(error = %ErrorChain(&e), "worker HTTP server failed");
            }
        });
    }
    worker::run(client, names, settings, metrics, cancel).await
}
