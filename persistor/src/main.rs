//! `switchyard-persistor`: parse the command line, read the configuration, start logging (and traces), and either run until
//! SIGINT or SIGTERM, or, as `switchyard-persistor migrate`, bring the CQL schema to this release's version and
//! exit; or run a configuration command (`check-config`, `print-config`, `default-config`) and exit.

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard_persistor::{migrate, run, PersistorConfig};
use switchyard_service::cli::{ConfigArgs, ConfigCommand};

const BINARY: &str = "switchyard-persistor";

/// The persistor of Switchyard: writes the events stream to the history store and answers history reads.
#[derive(Parser)]
#[command(name = BINARY, version = switchyard_service::VERSION)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Config(ConfigCommand),
    /// Bring the CQL schema to this release's version and exit (once per upgrade, before the new persistors
    /// start).
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Config(command)) = cli.command {
        std::process::exit(command.run::<PersistorConfig>(&cli.config, BINARY));
    }
    let config = cli.config.load_or_exit::<PersistorConfig>(BINARY);
    // Held to the end of main: dropping it sends the spans still buffered.
    let _traces = switchyard_service::init_logging_with(BINARY, &config.traces);
    match cli.command {
        None => run(config, switchyard_service::shutdown_on_signals()).await?,
        Some(Command::Migrate) => {
            let outcome = migrate(&config).await.context("migration failed")?;
            println!(
                "history schema of keyspace {} at version {} (was {})",
                config.cql_keyspace, outcome.to, outcome.from
            );
        }
        Some(Command::Config(_)) => {}
    }
    Ok(())
}
