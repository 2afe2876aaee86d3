//! The router shard: claims virtual shards through leases, and for each room of its shards keeps membership and
//! assigns the gap-free per-room `seq`, appending every event to the events stream before anyone hears of it.
//!
//! Start it with [`run`], or [`bind`] (which binds the metrics listener, so tests learn its address) and
//! [`BoundRouter::serve`]; it stops, releasing its leases, when the shutdown token fires. It serves `/healthz`,
//! `/readyz` and `/metrics` on `metrics_addr`, holds no client connections and writes no history (persistors do).

pub mod config;
mod context;
mod direct;
mod leases;
mod memberships;
mod presence;
mod room;
mod room_core;
mod shard;
mod stream_usage;
mod telemetry;
mod user_reads;

pub use config::RouterConfig;
pub use context::events_stream_config;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use switchyard_service::ops::OpsListener;
use tokio_util::sync::CancellationToken;

/// Why a router shard could not run.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// NATS could not be reached (or its URL is unusable).
    #[error(transparent)]
    NatsConnect(#[from] switchyard_service::nats::ConnectError),
    /// The events stream could not be opened or created.
    #[error("NATS: events stream: {0}")]
    EventsStream(#[source] async_nats::jetstream::context::CreateStreamError),
    /// A KV bucket could not be opened or created.
    #[error("NATS: {0}")]
    Bucket(#[source] switchyard_service::nats::EnsureKvError),
    #[error(transparent)]
    Metrics(#[from] switchyard_service::ops::OpsError),
}

/// A router shard whose metrics listener is bound, not connected to NATS yet.
pub struct BoundRouter {
    config: RouterConfig,
    ops: OpsListener,
    nats: Arc<OnceLock<async_nats::Client>>,
    shutdown: CancellationToken,
}

/// Bind the metrics listener. `/readyz` answers 200 once connected to NATS, and 503 again once stopping.
pub async fn bind(config: RouterConfig, shutdown: CancellationToken) -> Result<BoundRouter, RouterError> {
    let nats: Arc<OnceLock<async_nats::Client>> = Arc::new(OnceLock::new());
    let ready = {
        let (nats, shutdown) = (nats.clone(), shutdown.clone());
        Arc::new(move || {
            !shutdown.is_cancelled()
                && nats.get().is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
        })
    };
    switchyard_service::telemetry::describe(telemetry::METRICS);
    let ops = OpsListener::bind(config.metrics_addr, ready).await?;
    Ok(BoundRouter { config, ops, nats, shutdown })
}

impl BoundRouter {
    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.ops.local_addr()
    }

    /// Connect and keep leases until the shutdown token fires; then hand every shard over and return.
    pub async fn serve(self) -> Result<(), RouterError> {
        let stop_ops = CancellationToken::new();
        let ops = self.ops.spawn(stop_ops.clone());
        let result = serve(self.config, self.nats, self.shutdown).await;
        stop_ops.cancel();
        let _ = ops.await;
        result
    }
}

async fn serve(
    config: RouterConfig,
    nats: Arc<OnceLock<async_nats::Client>>,
    shutdown: CancellationToken,
) -> Result<(), RouterError> {
    let ctx = Arc::new(context::RouterContext::connect(config).await?);
    let _ = nats.set(ctx.nats.clone());
    switchyard_service::nats::spawn_cluster_watch(&ctx.nats, &ctx.config.nats_url, &shutdown);
    tracing::info!(router_id = %ctx.config.router_id, shards = ctx.config.shard_count, "router shard started");
    let usage = tokio::spawn(stream_usage::report(ctx.clone(), shutdown.clone()));
    leases::LeaseKeeper::new(ctx.clone()).run(shutdown).await;
    usage.abort();
    if let Err(error) = ctx.nats.flush().await {
        tracing::warn!(%error, "cannot flush NATS on shutdown");
    }
    tracing::info!(router_id = %ctx.config.router_id, "router shard stopped");
    Ok(())
}

/// Run a router shard until `shutdown` fires.
pub async fn run(config: RouterConfig, shutdown: CancellationToken) -> Result<(), RouterError> {
    bind(config, shutdown).await?.serve().await
}
