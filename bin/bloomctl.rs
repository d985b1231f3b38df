//! `bloomctl`: operator CLI.

use std::time::Duration;

use anyhow::Context;
use bloom::config::{DbArgs, NatsArgs};
use clap::{Parser, Subcommand};

/// Operate a BLOOM runtime installation.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the database migrations.
    Migrate {
        #[command(flatten)]
        db: DbArgs,
    },
    /// NATS JetStream definitions.
    Nats {
        #[command(subcommand)]
        command: NatsCommand,
    },
}

#[derive(Subcommand, Debug)]
enum NatsCommand {
    /// Create or update the streams and consumers of `nats/*.json`.
    Apply {
        #[command(flatten)]
        nats: NatsArgs,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    bloom::telemetry::init("text");
    match Cli::parse().command {
        Command::Migrate { db } => {
            let pool = bloom::db::connect(db.database_url.expose(), &db.pool_options())
                .await
                .context("connecting to Postgres (DATABASE_URL)")?;
            bloom::db::migrate(&pool).await.context("applying migrations")?;
            println!("migrations applied");
        }
        Command::Nats { command: NatsCommand::Apply { nats } } => {
            let names = nats.names().map_err(anyhow::Error::msg)?;
            let client = tokio::time::timeout(Duration::from_secs(10), bloom::bus::connect(&nats.nats_url, "bloomctl"))
                .await
                .context("timed out connecting to NATS")??;
            let js = bloom::bus::jetstream(client, nats.timeout());
            bloom::bus::provision::apply(&js, &names, nats.lease_ttl()).await?;
            println!("streams {} and {} applied", names.tasks_stream(), names.results_stream());
        }
    }
    Ok(())
}
