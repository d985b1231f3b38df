//! `bloom-reconciler`: the control plane. Config → telemetry → connect → run duties.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bloom::artifacts::ArtifactStore;
use bloom::config::{DbArgs, LogArgs, MembridgeArgs, NatsArgs, ReconcilerArgs, S3Args};
use bloom::metrics::Metrics;
use bloom::reconciler::{self, Reconciler, ReconcilerSettings};
use bloom::telemetry::ErrorChain;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// The BLOOM runtime reconciler.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    reconciler: ReconcilerArgs,
    #[command(flatten)]
    membridge: MembridgeArgs,
    #[command(flatten)]
    s3: S3Args,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _telemetry = bloom::telemetry::init(&cli.log.log_format, "bloom-reconciler");
    bloom::telemetry::exit_status("bloom-reconciler", run(cli).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let names = cli.nats.names().map_err(anyhow::Error::msg)?;
    if cli.log.check_config {
        println!("{cli:#?}");
        return Ok(());
    }
    let settings = ReconcilerSettings::from_args(&cli.reconciler, &cli.nats, &cli.membridge, &cli.db);

    // Bound first, so a port in use fails at once, before any connection is made.
    let listener = match cli.reconciler.http_port {
        0 => None,
        port => {
            let addr = SocketAddr::from(([0, 0, 0, 0], port));
            Some(bloom::process::bind(addr, "BLOOM_RECONCILER_HTTP_PORT").await?)
        }
    };
    let pool = bloom::db::connect(cli.db.database_url.expose(), &cli.db.pool_options())
        .await
        .context("connecting to Postgres (DATABASE_URL)")?;
    let nats =
        bloom::bus::connect(&cli.nats.nats_url, "bloom-reconciler").await.context("connecting to NATS (NATS_URL)")?;
    let metrics = Arc::new(Metrics::default());
    let artifacts = ArtifactStore::from_settings(cli.s3.settings(), metrics.clone()).await;
    let cancel = CancellationToken::new();
    bloom::process::cancel_on_signal(cancel.clone());
    let rec = Reconciler::new(pool, nats, names, artifacts, metrics, settings, &cancel).await?;
    if let Some(listener) = listener {
        let router = reconciler::router(rec.clone());
        let c = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = bloom::process::serve_on(listener, router, c).await {
                tracing::error!(error = %ErrorChain(&e), "reconciler HTTP server failed");
            }
        });
    }
    tracing::info!("bloom-reconciler running");
    rec.run(cancel).await
}
