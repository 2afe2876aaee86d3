//! `switchyard-router-shard`: read the configuration, start logging, run until SIGINT or SIGTERM.

use switchyard_router_shard::{run, RouterConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    switchyard_service::init_logging();
    let config = switchyard_service::config_or_exit("switchyard-router-shard", RouterConfig::load());
    run(config, switchyard_service::shutdown_on_signals()).await?;
    Ok(())
}
