//! `switchyard-gateway`: read the configuration, start logging, serve until SIGINT or SIGTERM.

use switchyard_gateway::{run, GatewayConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    switchyard_service::init_logging();
    let config = switchyard_service::config_or_exit("switchyard-gateway", GatewayConfig::load());
    run(config, switchyard_service::shutdown_on_signals()).await?;
    Ok(())
}
