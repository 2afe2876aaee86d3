//! What every task of a router shard shares: its NATS connections, the events stream, the KV buckets and the
//! configuration. Built once at start; read-only afterwards.
//!
//! This module holds handles; it does no work of its own beyond creating the stream and buckets.

use crate::config::RouterConfig;
use crate::RouterError;
use async_nats::jetstream::{self, kv, stream};
use std::time::Duration;
use switchyard_protocol::subjects;

/// Shared, read-only handles.
pub(crate) struct RouterContext {
    /// Core NATS, for commands, replies and live events.
    pub nats: async_nats::Client,
    /// JetStream, for appending to the events stream.
    pub js: jetstream::Context,
    /// The events stream, for reading a room's last event.
    pub events: stream::Stream,
    /// Rooms and memberships.
    pub rooms: kv::Store,
    /// Shard leases and router liveness.
    pub leases: kv::Store,
    pub config: RouterConfig,
}

impl RouterContext {
    pub async fn connect(config: RouterConfig) -> Result<Self, RouterError> {
        let name = format!("switchyard-router-shard {}", config.router_id);
        let nats = switchyard_service::nats::connect(&config.nats_url, &config.nats_auth, name, true).await?;
        let js = jetstream::new(nats.clone());
        let events = switchyard_service::nats::retry_at_start("the events stream", || {
            js.get_or_create_stream(events_stream_config(&config))
        })
        .await
        .map_err(RouterError::EventsStream)?;
        let rooms_bucket = kv::Config {
            bucket: subjects::ROOMS_BUCKET.to_owned(),
            history: 1,
            num_replicas: config.nats_replicas,
            ..Default::default()
        };
        let rooms =
            switchyard_service::nats::retry_at_start("the rooms bucket", || ensure_kv(&js, rooms_bucket.clone()))
                .await?;
        let leases_bucket = kv::Config {
            bucket: subjects::LEASES_BUCKET.to_owned(),
            history: 1,
            max_age: config.lease_ttl(),
            storage: stream::StorageType::Memory,
            num_replicas: config.nats_replicas,
            ..Default::default()
        };
        let leases =
            switchyard_service::nats::retry_at_start("the leases bucket", || ensure_kv(&js, leases_bucket.clone()))
                .await?;
        Ok(RouterContext { nats, js, events, rooms, leases, config })
    }
}

/// The events stream's settings, as a router shard creates it (an existing stream keeps its own).
pub fn events_stream_config(config: &RouterConfig) -> stream::Config {
    stream::Config {
        name: subjects::EVENTS_STREAM.to_owned(),
        subjects: vec![subjects::EVENTS_STREAM_SUBJECTS.to_owned()],
        storage: stream::StorageType::File,
        // Bounds `join {since}`: older events answer `resume_gap` (history still has them).
        max_age: Duration::from_secs(config.stream_max_age_secs),
        duplicate_window: Duration::from_secs(config.stream_duplicate_window_secs),
        num_replicas: config.nats_replicas,
        allow_direct: true,
        // A full stream refuses new appends: dropping its oldest events could drop some the store lacks.
        max_bytes: match config.stream_max_bytes {
            0 => -1,
            bound => i64::try_from(bound).unwrap_or(i64::MAX),
        },
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// Open a KV bucket, creating it if it does not exist yet.
async fn ensure_kv(js: &jetstream::Context, config: kv::Config) -> Result<kv::Store, RouterError> {
    switchyard_service::nats::ensure_kv(js, config).await.map_err(RouterError::Bucket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_events_stream_is_bounded_only_when_asked_and_refuses_rather_than_drops() {
        let mut config = RouterConfig::default();
        let unbounded = events_stream_config(&config);
        assert_eq!(unbounded.max_bytes, -1);
        assert_eq!(unbounded.discard, stream::DiscardPolicy::New);
        config.stream_max_bytes = 8 << 30;
        config.stream_max_age_secs = 3_600;
        config.stream_duplicate_window_secs = 60;
        let bounded = events_stream_config(&config);
        assert_eq!(bounded.max_bytes, 8 << 30);
        assert_eq!(bounded.discard, stream::DiscardPolicy::New);
        assert_eq!((bounded.max_age, bounded.duplicate_window), (Duration::from_secs(3_600), Duration::from_secs(60)));
    }
}
