//! The events stream's fill level as gauges, sampled by every router shard: the bytes it holds and its bound
//! (`stream_max_bytes`, 0 when unbounded), so an alert can fire well before a full stream refuses appends.
//!
//! It does not change the stream: a stream that exists keeps the settings it was created with.

use crate::context::RouterContext;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the stream's state is read.
const SAMPLE_EVERY: Duration = Duration::from_secs(15);

/// Read the stream's state every [`SAMPLE_EVERY`] until `shutdown` fires.
pub(crate) async fn report(ctx: Arc<RouterContext>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stream = ctx.events.clone();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match stream.info().await {
            Ok(info) => {
                metrics::gauge!("switchyard_router_events_stream_bytes").set(info.state.bytes as f64);
                metrics::gauge!("switchyard_router_events_stream_max_bytes").set(info.config.max_bytes.max(0) as f64);
            }
            Err(error) => tracing::debug!(%error, "cannot read the events stream's state"),
        }
    }
}
