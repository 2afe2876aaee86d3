//! `switchyard-router-shard`: read the configuration, start logging, run until SIGINT or SIGTERM.

use anyhow::Context;
use switchyard_router_shard::{run, RouterConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    switchyard_service::init_logging();
    let config = RouterConfig::load().context("invalid router shard configuration")?;
    run(config, switchyard_service::shutdown_on_signals()).await?;
    Ok(())
}
