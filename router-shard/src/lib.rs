//! The router shard: claims virtual shards through leases, and for each room of its shards keeps membership and
//! assigns the gap-free per-room `seq`, appending every event to the events stream before anyone hears of it.
//!
//! Start it with [`run`]; it stops, releasing its leases, when the shutdown token fires. It holds no client
//! connections and writes no history (persistors do).

pub mod config;
mod context;
mod leases;
mod presence;
mod room;
mod shard;

pub use config::RouterConfig;
pub use context::events_stream_config;

use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Why a router shard could not run.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("NATS: {0}")]
    Nats(String),
}

/// Run a router shard until `shutdown` fires.
pub async fn run(config: RouterConfig, shutdown: CancellationToken) -> Result<(), RouterError> {
    let ctx = Arc::new(context::RouterContext::connect(config).await?);
    tracing::info!(router_id = %ctx.config.router_id, shards = ctx.config.shard_count, "router shard started");
    leases::LeaseKeeper::new(ctx.clone()).run(shutdown).await;
    if let Err(error) = ctx.nats.flush().await {
        tracing::warn!(%error, "cannot flush NATS on shutdown");
    }
    tracing::info!(router_id = %ctx.config.router_id, "router shard stopped");
    Ok(())
}
