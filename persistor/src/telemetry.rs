//! The persistor's metric catalogue: every metric it records, with its HELP text, described when it binds.
//!
//! It records nothing itself; the ingest loop and the retention sweep record where things happen.

use switchyard_service::telemetry::MetricSpec;

/// Every metric a persistor records.
pub const METRICS: &[MetricSpec] = &[
    MetricSpec::counter("switchyard_persistor_events_written_total", "Events written to the store and acked."),
    MetricSpec::counter(
        "switchyard_persistor_store_errors_total",
        "Failed store writes (held and retried, or isolated when rejected).",
    ),
    MetricSpec::counter(
        "switchyard_persistor_dead_letters_total",
        "Events moved to the dead-letter stream: rejected max_deliver times, or undecodable.",
    ),
    MetricSpec::counter(
        "switchyard_persistor_redeliveries_total",
        "Events delivered again after a crash, an ack timeout or a nak.",
    ),
    MetricSpec::gauge("switchyard_persistor_lag_events", "Events still pending for the persistors' consumer."),
    MetricSpec::histogram("switchyard_persistor_batch_size_events", "Events per store write."),
    MetricSpec::histogram("switchyard_persistor_write_duration_seconds", "Time of one store write attempt."),
    MetricSpec::counter(
        "switchyard_persistor_expired_swept_total",
        "Events past their retention removed by the store's retention sweep.",
    ),
];
