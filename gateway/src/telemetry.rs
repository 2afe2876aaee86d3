//! The gateway's metrics plumbing: the process-wide Prometheus recorder (from `switchyard_service::telemetry`,
//! shared with router shards and persistors started in the same process), and pre-registered counters for the
//! per-frame metrics, so the delivery path pays one atomic add per frame rather than a registry lookup.
//!
//! Other metrics are recorded where they happen. Labels are bounded: op names, close codes, subprotocols,
//! reasons; never a tenant, user, room or token.

use metrics::Counter;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::OnceLock;
use switchyard_protocol::client::{Format, OP_NAMES, SERVER_EVENT_OPS, SERVER_FRAME_OPS};

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
