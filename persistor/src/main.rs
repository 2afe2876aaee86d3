//! `switchyard-persistor`: read the configuration, start logging, run until SIGINT or SIGTERM.

use anyhow::Context;
use switchyard_persistor::{run, PersistorConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    switchyard_service::init_logging();
    let config = PersistorConfig::load().context("invalid persistor configuration")?;
    run(config, switchyard_service::shutdown_on_signals()).await?;
    Ok(())
}
