//! Judging what one socket received: per room, every `msg` once and in seq order, with its end-to-end latency
//! taken from the send time the sender wrote at the start of the body.
//!
//! It does not know what was sent; a scenario compares these counts with the acked sends afterwards.

use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::time::Instant;
use switchyard_protocol::client::ServerEvent;
use switchyard_protocol::RoomId;

/// A new latency histogram in microseconds, from 1 µs to 10 minutes at 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// A message body that carries its send time, in microseconds since the run's epoch.
pub fn stamped_body(epoch: Instant, tag: &str) -> String {
    format!("{} {tag}", epoch.elapsed().as_micros())
}

/// What one socket received.
#[derive(Debug)]
pub struct Tally {
    /// Highest `msg` seq per room; a `msg` at or below it is a duplicate or out of order.
    last_msg: HashMap<RoomId, u64>,
    /// Highest seq of any sequenced event per room: where a resume starts.
    pub last_any: HashMap<RoomId, u64>,
    /// `msg` events received once and in order, per room.
    pub unique: HashMap<RoomId, u64>,
    /// `msg` events received again or out of order.
    pub duplicated: u64,
    pub latency_us: Histogram<u64>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            last_msg: HashMap::new(),
            last_any: HashMap::new(),
            unique: HashMap::new(),
            duplicated: 0,
            latency_us: histogram(),
        }
    }
}

impl Tally {
    pub fn record(&mut self, event: &ServerEvent, epoch: Instant) {
        let Some((room, seq)) = event.room_seq() else { return };
        let last_any = self.last_any.entry(room.clone()).or_insert(0);
        *last_any = (*last_any).max(seq);
        let ServerEvent::Msg { body, .. } = event else { return };
        let last = self.last_msg.entry(room.clone()).or_insert(0);
        if seq <= *last {
            self.duplicated += 1;
            return;
        }
        *last = seq;
        *self.unique.entry(room.clone()).or_insert(0) += 1;
        if let Some(sent_us) = body.split(' ').next().and_then(|t| t.parse::<u64>().ok()) {
            let now_us = epoch.elapsed().as_micros() as u64;
            let _ = self.latency_us.record(now_us.saturating_sub(sent_us).max(1));
        }
    }

    pub fn unique_total(&self) -> u64 {
        self.unique.values().sum()
    }

    pub fn unique_in(&self, room: &RoomId) -> u64 {
        self.unique.get(room).copied().unwrap_or(0)
    }
}

/// The totals of many sockets against what was acked.
#[derive(Debug)]
pub struct Verdict {
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Deliveries of messages whose send was never acked (the send timed out after the append).
    pub unacked: u64,
    pub latency_us: Histogram<u64>,
}

impl Default for Verdict {
    fn default() -> Self {
        Verdict { expected: 0, delivered: 0, lost: 0, duplicated: 0, unacked: 0, latency_us: histogram() }
    }
}

impl Verdict {
    /// Add one socket's tally for a room it should have received `expected` messages in.
    pub fn add(&mut self, expected: u64, received: u64) {
        self.expected += expected;
        self.delivered += received;
        self.lost += expected.saturating_sub(received);
        self.unacked += received.saturating_sub(expected);
    }

    pub fn merge_tally(&mut self, tally: &Tally) {
        self.duplicated += tally.duplicated;
        let _ = self.latency_us.add(&tally.latency_us);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(room: &RoomId, seq: u64, body: &str) -> ServerEvent {
        ServerEvent::Msg {
            room: room.clone(),
            seq,
            id: switchyard_protocol::MessageId::generate(1),
            from: switchyard_protocol::UserId::parse("u").unwrap(),
            body: body.into(),
            attrs: None,
            reply_to: None,
            ts: 1,
        }
    }

    #[test]
    fn counts_once_in_order_and_flags_repeats() {
        let epoch = Instant::now();
        let room = RoomId::parse("r").unwrap();
        let mut tally = Tally::default();
        for seq in [3, 5, 5, 4, 9] {
            tally.record(&msg(&room, seq, &stamped_body(epoch, "x")), epoch);
        }
        assert_eq!(tally.unique_in(&room), 3);
        assert_eq!(tally.duplicated, 2);
        assert_eq!(tally.last_any[&room], 9);
        assert_eq!(tally.latency_us.len(), 3);
        let mut verdict = Verdict::default();
        verdict.add(4, tally.unique_in(&room));
        verdict.merge_tally(&tally);
        assert_eq!((verdict.lost, verdict.duplicated, verdict.unacked), (1, 2, 0));
    }
}
