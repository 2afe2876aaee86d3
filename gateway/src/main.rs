//! `switchyard-gateway`: parse the command line, read the configuration, start logging (and traces), serve until SIGINT or
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
    let config = cli.config.load_or_exit::<GatewayConfig>(BINARY);
    // Held to the end of main: dropping it sends the spans still buffered.
    let _traces = switchyard_service::init_logging_with(BINARY, &config.traces);
    run(config, switchyard_service::shutdown_on_signals()).await?;
    Ok(())
}
