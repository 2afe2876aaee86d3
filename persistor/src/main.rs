//! `switchyard-persistor`: read the configuration, start logging, and either run until SIGINT or SIGTERM, or, as
//! `switchyard-persistor migrate`, bring the CQL schema to this release's version and exit.

use anyhow::{bail, Context};
use switchyard_persistor::{migrate, run, PersistorConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    switchyard_service::init_logging();
    let config = switchyard_service::config_or_exit("switchyard-persistor", PersistorConfig::load());
    match std::env::args().nth(1).as_deref() {
        None => run(config, switchyard_service::shutdown_on_signals()).await?,
        Some("migrate") => {
            let outcome = migrate(&config).await.context("migration failed")?;
            println!(
                "history schema of keyspace {} at version {} (was {})",
                config.cql_keyspace, outcome.to, outcome.from
            );
        }
        Some(other) => bail!("unknown argument {other:?}: run without arguments, or `migrate`"),
    }
    Ok(())
}
