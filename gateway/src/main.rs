//! `switchyard-gateway`: read the configuration, start logging, serve until SIGINT or SIGTERM.

use anyhow::Context;
use switchyard_gateway::{run, GatewayConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    switchyard_service::init_logging();
    let config = GatewayConfig::load().context("invalid gateway configuration")?;
    run(config, switchyard_service::shutdown_on_signals()).await?;
    Ok(())
}
