//! The router shard's metric catalogue: every metric it records, with its HELP text, described when it binds.
//!
//! It records nothing itself; the modules record where things happen.

use switchyard_service::telemetry::MetricSpec;

/// Every metric a router shard records.
pub const METRICS: &[MetricSpec] = &[
    MetricSpec::gauge("switchyard_router_owned_shards", "Shard leases this process holds."),
    MetricSpec::counter(
        "switchyard_router_shard_handoffs_total",
        "Shard leases acquired, released (fair share or shutdown) or lost (taken over or expired).",
    ),
    MetricSpec::histogram(
        "switchyard_router_publish_ack_duration_seconds",
        "One append to the events stream until JetStream's ack, by outcome (ok, duplicate, fenced, error).",
    ),
    MetricSpec::counter(
        "switchyard_router_events_appended_total",
        "Events sequenced and acknowledged by JetStream.",
    ),
    MetricSpec::counter(
        "switchyard_router_fenced_total",
        "Appends refused by the fence because this shard's owner was stale.",
    ),
    MetricSpec::gauge("switchyard_router_events_stream_bytes", "Bytes the events stream holds, read every 15 s."),
    MetricSpec::gauge(
        "switchyard_router_events_stream_max_bytes",
        "The events stream's max_bytes (0 for unbounded).",
    ),
    MetricSpec::counter(
        "switchyard_router_heads_from_store_total",
        "Rooms continued from the history store's head because the events stream held none of their events.",
    ),
    MetricSpec::counter(
        "switchyard_router_roster_conflicts_total",
        "Roster writes refused because another writer changed the room's members first (the command answers unavailable).",
    ),
    MetricSpec::counter(
        "switchyard_router_room_queue_full_total",
        "Commands refused (unavailable) because their room's queue was full.",
    ),
    MetricSpec::counter(
        "switchyard_router_user_reads_refused_total",
        "Per-user reads (rooms, unread counts) refused because too many were running.",
    ),
];
