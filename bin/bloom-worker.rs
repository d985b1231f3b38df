//! `bloom-worker`: pulls tasks from JetStream and runs them. Config → telemetry →
//! connect → run.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::get;
use bloom::config::{LogArgs, NatsArgs, WorkerArgs};
use bloom::metrics::Metrics;
use bloom::telemetry::ErrorChain;
use bloom::worker::{self, WorkerSettings};
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
    let settings = WorkerSettings::from_args(&cli.worker, &cli.nats).map_err(anyhow::Error::msg)?;
    let names = cli.nats.names().map_err(anyhow::Error::msg)?;
    if cli.log.check_config {
        println!("{cli:#?}");
        return Ok(());
    }
    // Bound first, so a port in use fails at once, before any connection is made.
    let listener = match cli.worker.http_port {
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
