//! The gateway's metrics plumbing: the process-wide Prometheus recorder (from `switchyard_service::telemetry`,
//! shared with router shards and persistors started in the same process), and pre-registered counters for the
//! per-frame metrics, so the delivery path pays one atomic add per frame rather than a registry lookup.
//!
//! [`METRICS`] lists every metric the gateway records, with its HELP text; other metrics are recorded where they
//! happen. Labels are bounded: op names, close codes, subprotocols,
//! reasons; never a tenant, user, room or token.

use metrics::Counter;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::OnceLock;
use switchyard_protocol::client::{Format, OP_NAMES, SERVER_EVENT_OPS, SERVER_FRAME_OPS};
use switchyard_service::telemetry::MetricSpec;

/// Every metric the gateway records, with its HELP text (described once the gateway binds).
pub const METRICS: &[MetricSpec] = &[
    MetricSpec::gauge("switchyard_gateway_open_sockets", "Open WebSocket sockets by subprotocol (json or msgpack)."),
    MetricSpec::counter(
        "switchyard_gateway_frames_received_total",
        "Client frames by op; invalid when the frame did not parse.",
    ),
    MetricSpec::counter("switchyard_gateway_frames_sent_total", "Frames written to clients, by op."),
    MetricSpec::counter("switchyard_gateway_deliveries_total", "Room events handed to session queues."),
    MetricSpec::histogram(
        "switchyard_gateway_outbound_queue_depth_frames",
        "Frames waiting in a session's outbound queue, sampled every 32nd event a session takes.",
    ),
    MetricSpec::counter(
        "switchyard_gateway_closes_total",
        "Sockets ended, by the server's close code, or client when the client closed.",
    ),
    MetricSpec::counter(
        "switchyard_gateway_slow_consumer_closes_total",
        "Sessions closed with 4009 because their outbound queue overflowed.",
    ),
    MetricSpec::counter("switchyard_gateway_authentications_total", "Tokens accepted."),
    MetricSpec::counter("switchyard_gateway_auth_failures_total", "Tokens refused, by reason."),
    MetricSpec::counter(
        "switchyard_gateway_revocation_checks_skipped_total",
        "Token revocation checks skipped because Redis did not answer (the token was accepted).",
    ),
    MetricSpec::counter(
        "switchyard_gateway_revoked_sessions_total",
        "Sessions closed because their token or user was revoked.",
    ),
    MetricSpec::counter(
        "switchyard_gateway_unauthenticated_refused_total",
        "Upgrades without a token refused because max_unauthenticated sockets already waited for their auth frame.",
    ),
    MetricSpec::histogram(
        "switchyard_gateway_nats_request_duration_seconds",
        "One NATS request attempt to a router shard or persistor, by target and outcome.",
    ),
    MetricSpec::histogram(
        "switchyard_gateway_presend_hook_duration_seconds",
        "One call of a tenant's pre-send hook, by outcome (allow, deny, modify, or how it failed).",
    ),
    MetricSpec::counter("switchyard_gateway_rate_limited_total", "Ops refused by the per-connection rate limit."),
    MetricSpec::counter(
        "switchyard_gateway_tenant_rate_limited_total",
        "Messages refused by the fleet-wide tenant message rate.",
    ),
    MetricSpec::counter(
        "switchyard_gateway_tenant_rate_unchecked_total",
        "Messages let through without the tenant rate check because Redis did not answer.",
    ),
    MetricSpec::counter(
        "switchyard_gateway_socket_quota_refused_total",
        "Sockets refused by a tenant's or user's connection quota.",
    ),
    MetricSpec::counter(
        "switchyard_gateway_socket_quota_unchecked_total",
        "Sockets let in without the connection quota check because Redis did not answer.",
    ),
    MetricSpec::counter(
        "switchyard_gateway_live_gaps_total",
        "Gaps seen in a live room stream, filled from the events stream.",
    ),
    MetricSpec::gauge(
        "switchyard_gateway_rooms_subscribed",
        "Rooms with a session on this gateway (one NATS subscription each).",
    ),
    MetricSpec::counter("switchyard_gateway_http_requests_total", "HTTP responses by status class."),
];

/// The process's Prometheus handle, installing the recorder on first use.
pub fn prometheus() -> PrometheusHandle {
    switchyard_service::telemetry::prometheus()
}

struct FrameCounters {
    received: Vec<(&'static str, Counter)>,
    received_invalid: Counter,
    sent: Vec<(&'static str, Counter)>,
}

fn frame_counters() -> &'static FrameCounters {
    static COUNTERS: OnceLock<FrameCounters> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        // The recorder must be in place before handles are taken, or they would record nowhere.
        let _ = prometheus();
        FrameCounters {
            received: OP_NAMES
                .iter()
                .map(|op| (*op, metrics::counter!("switchyard_gateway_frames_received_total", "op" => *op)))
                .collect(),
            received_invalid: metrics::counter!("switchyard_gateway_frames_received_total", "op" => "invalid"),
            sent: SERVER_FRAME_OPS
                .iter()
                .chain(SERVER_EVENT_OPS)
                .map(|op| (*op, metrics::counter!("switchyard_gateway_frames_sent_total", "op" => *op)))
                .collect(),
        }
    })
}

/// Count a client frame by its op; `None` for a frame that did not parse.
pub fn frame_received(op: Option<&str>) {
    let counters = frame_counters();
    match op.and_then(|op| counters.received.iter().find(|(name, _)| *name == op)) {
        Some((_, counter)) => counter.increment(1),
        None => counters.received_invalid.increment(1),
    }
}

/// Count a frame written to a client, by its op.
pub fn frame_sent(op: &'static str) {
    if let Some((_, counter)) = frame_counters().sent.iter().find(|(name, _)| *name == op) {
        counter.increment(1);
    }
}

/// Count a refused authentication by its reason (a fixed word, never anything from the token).
pub fn auth_failure(reason: &'static str) {
    metrics::counter!("switchyard_gateway_auth_failures_total", "reason" => reason).increment(1);
}

/// The `subprotocol` label of a session's format.
pub fn subprotocol_label(format: Format) -> &'static str {
    match format {
        Format::Json => "json",
        Format::MsgPack => "msgpack",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_has_a_counter_of_its_own() {
        let counters = frame_counters();
        let received: Vec<&str> = counters.received.iter().map(|(op, _)| *op).collect();
        assert_eq!(received, OP_NAMES);
        let sent: Vec<&str> = counters.sent.iter().map(|(op, _)| *op).collect();
        assert_eq!(sent.len(), SERVER_FRAME_OPS.len() + SERVER_EVENT_OPS.len());
        // `typing`, `read` and `presence` are both ops and events; each list has them once.
        let mut distinct = sent.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), sent.len(), "{sent:?}");
        for op in SERVER_FRAME_OPS.iter().chain(SERVER_EVENT_OPS) {
            frame_sent(op);
        }
        let rendered = prometheus().render();
        for op in SERVER_FRAME_OPS.iter().chain(SERVER_EVENT_OPS) {
            let line = format!("switchyard_gateway_frames_sent_total{{op=\"{op}\"}}");
            assert!(rendered.contains(&line), "{line} missing");
        }
    }
}
