//! The gateway's metrics plumbing: the process-wide Prometheus recorder (from `switchyard_service::telemetry`,
//! shared with router shards and persistors started in the same process), and pre-registered counters for the
//! per-frame metrics, so the delivery path pays one atomic add per frame rather than a registry lookup.
//!
//! Other metrics are recorded where they happen. Labels are bounded: op names, close codes, subprotocols,
//! reasons; never a tenant, user, room or token.

use metrics::Counter;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::OnceLock;
use switchyard_protocol::client::{Format, ServerEvent, ServerFrame, OP_NAMES};

/// The process's Prometheus handle, installing the recorder on first use.
pub fn prometheus() -> PrometheusHandle {
    switchyard_service::telemetry::prometheus()
}

/// Ops of the frames a server sends: replies, control frames and events.
const SENT_OPS: &[&str] = &[
    "hello", "ok", "err", "pong", "bye", "msg", "edit", "delete", "reaction", "joined", "left", "typing", "read",
    "presence",
];

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
            sent: SENT_OPS
                .iter()
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

/// The op name of a server frame.
pub fn server_frame_op(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Hello { .. } => "hello",
        ServerFrame::Ok { .. } => "ok",
        ServerFrame::Err { .. } => "err",
        ServerFrame::Pong { .. } => "pong",
        ServerFrame::Bye { .. } => "bye",
    }
}

/// The op name of a server event.
pub fn server_event_op(event: &ServerEvent) -> &'static str {
    match event {
        ServerEvent::Msg { .. } => "msg",
        ServerEvent::Edit { .. } => "edit",
        ServerEvent::Delete { .. } => "delete",
        ServerEvent::Reaction { .. } => "reaction",
        ServerEvent::Joined { .. } => "joined",
        ServerEvent::Left { .. } => "left",
        ServerEvent::Typing { .. } => "typing",
        ServerEvent::Read { .. } => "read",
        ServerEvent::Presence { .. } => "presence",
    }
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
    fn every_server_op_has_a_counter() {
        let bye = ServerFrame::Bye { code: 1001, reason: String::new(), reconnect_after_ms: None };
        assert!(SENT_OPS.contains(&server_frame_op(&bye)));
        for op in ["msg", "edit", "delete", "reaction", "joined", "left", "typing", "read", "presence"] {
            assert!(SENT_OPS.contains(&op), "{op}");
        }
    }
}
