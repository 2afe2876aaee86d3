//! `switchyard-gateway`: parse the command line, start logging, read the configuration, serve until SIGINT or
//! SIGTERM; or run a configuration command (`check-config`, `print-config`, `default-config`) and exit.

use clap::Parser;
use switchyard_gateway::{run, GatewayConfig};
use switchyard_service::cli::{ConfigArgs, ConfigCommand};

const BINARY: &str = "switchyard-gateway";

/// The WebSocket gateway of Switchyard: clients connect here; ops go to the router shards over NATS.
#[derive(Parser)]
#[command(name = BINARY, version = switchyard_service::VERSION)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<ConfigCommand>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        std::process::exit(command.run::<GatewayConfig>(&cli.config, BINARY));
    }
    switchyard_service::init_logging();
    let config = cli.config.load_or_exit::<GatewayConfig>(BINARY);
    run(config, switchyard_service::shutdown_on_signals()).await?;
    Ok(())
}
