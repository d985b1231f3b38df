//! `bloom-api`: the REST API. Config → telemetry → connect → serve.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use bloom::api::{self, ApiSettings};
use bloom::artifacts::ArtifactStore;
use bloom::config::{ApiArgs, DbArgs, LogArgs, MembridgeArgs, NatsArgs, S3Args};
use bloom::metrics::Metrics;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// The BLOOM runtime REST API.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    api: ApiArgs,
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
    let _telemetry = bloom::telemetry::init(&cli.log.log_format, "bloom-api");
    bloom::telemetry::exit_status("bloom-api", run(cli).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = ApiSettings::from_args(&cli.api, &cli.nats, &cli.membridge, &cli.db).map_err(anyhow::Error::msg)?;
    let names = cli.nats.names().map_err(anyhow::Error::msg)?;
    let limits = cli.api.concurrency_limits().map_err(anyhow::Error::msg)?;
    let budgets = cli.api.budgets().map_err(anyhow::Error::msg)?;
    let addr: SocketAddr = format!("{}:{}", cli.api.host, cli.api.port)
        .parse()
        .context("BLOOM_RUNTIME_HOST/BLOOM_RUNTIME_PORT do not form a socket address")?;
    if cli.log.check_config {
        println!("{cli:#?}");
        return Ok(());
    }
    // Bound first, so a port in use fails at once, before any connection is made.
    let listener = bloom::process::bind(addr, "BLOOM_RUNTIME_HOST/BLOOM_RUNTIME_PORT").await?;

    let pool = bloom::db::connect(cli.db.database_url.expose(), &cli.db.pool_options())
        .await
        .context("connecting to Postgres (DATABASE_URL)")?;
    if cli.api.migrate_on_start {
        bloom::db::migrate(&pool).await.context("applying migrations")?;
    }
    let clock = bloom::time::Clock::system();
    for limit in &limits {
        bloom::db::concurrency::set(&pool, limit, true, clock.now_ms()).await.context("setting concurrency limits")?;
    }
    for budget in &budgets {
        bloom::db::budgets::set(&pool, budget, true, clock.now_ms()).await.context("setting budgets")?;
    }
    let nats = bloom::bus::connect(&cli.nats.nats_url, "bloom-api").await.context("connecting to NATS (NATS_URL)")?;
    let metrics = Arc::new(Metrics::default());
    let artifacts = ArtifactStore::from_settings(cli.s3.settings(), metrics.clone()).await;
    let cancel = CancellationToken::new();
    bloom::process::cancel_on_signal(cancel.clone());
    let state = api::build_state(pool, nats, names, settings, artifacts, metrics, clock, cancel.clone()).await?;
    tracing::info!(%addr, "bloom-api serving");
    bloom::process::serve_on(listener, api::router(state), cancel).await?;
    Ok(())
}
