//! The traffic ledger: the bookkeeping of a test that sends numbered messages into rooms while faults happen, and
//! its checks. [`Ledger`] holds every acked message (room, seq, body); [`Receipts`] holds the sequenced events one
//! receiver got, in arrival order; the checks say, as [`Finding`]s, what an acked message was not: delivered to
//! every receiver once, in order, gap-free and at its seq, stored once at its seq.
//!
//! It is pure bookkeeping: it opens no socket, reads no stream or store and waits for nothing (the callers drive
//! clients and read back what the servers hold: the fault suite's `traffic.rs`, `router-shard/tests/cluster.rs`),
//! and it judges nothing as fatal: each caller decides which findings fail it.

use std::collections::{BTreeMap, HashMap};

/// One thing an acked message, a receiver or a store got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Finding {
    #[error("room {room} seq {seq} acked for both {first:?} and {second:?}")]
    AckedSeqTwice { room: usize, seq: u64, first: String, second: String },
    #[error("{body:?} acked at seqs {first} and {second} of room {room}")]
    AckedBodyTwice { room: usize, body: String, first: u64, second: u64 },
    #[error("seq {seq} of room {room} ({body}) is missing")]
    Missing { room: usize, seq: u64, body: String },
    #[error("seq {seq} of room {room} is {got:?}, not the acked {body:?}")]
    WrongBody { room: usize, seq: u64, body: String, got: Option<String> },
    #[error("seq {seq} of room {room} came {times} times")]
    Duplicate { room: usize, seq: u64, times: usize },
    #[error("{body:?} came at {} seqs of room {room}: {seqs:?}", seqs.len())]
    BodyAtSeveralSeqs { room: usize, body: String, seqs: Vec<u64> },
    #[error("seq {seq} of room {room} came after seq {after}")]
    OutOfOrder { room: usize, seq: u64, after: u64 },
    #[error("seq {seq} of room {room} followed seq {after}: the seqs in between are missing")]
    Gap { room: usize, seq: u64, after: u64 },
    #[error("seq {seq} of room {room} ({body:?}) was never acked")]
    Unacked { room: usize, seq: u64, body: String },
}

impl Finding {
    /// The acked message (room, seq) this finding says was not delivered or stored as acked, if any.
    pub fn lost(&self) -> Option<(usize, u64)> {
        match self {
            Finding::Missing { room, seq, .. } | Finding::WrongBody { room, seq, .. } => Some((*room, *seq)),
            _ => None,
        }
    }

    /// How many deliveries or posts too many this finding counts (a seq twice, a body at two seqs).
    pub fn extra(&self) -> usize {
        match self {
            Finding::Duplicate { times, .. } => times.saturating_sub(1),
            Finding::BodyAtSeveralSeqs { seqs, .. } => seqs.len().saturating_sub(1),
            Finding::AckedSeqTwice { .. } | Finding::AckedBodyTwice { .. } => 1,
            _ => 0,
        }
    }
}

/// What one receiver got of its room: every sequenced event, in arrival order, with the body when it is a
/// message the ledger may know (`None` for other events).
#[derive(Debug, Clone, Default)]
pub struct Receipts {
    events: Vec<(u64, Option<String>)>,
    /// seq -> times received.
    counts: BTreeMap<u64, usize>,
}

impl Receipts {
    pub fn record(&mut self, seq: u64, body: Option<String>) {
        *self.counts.entry(seq).or_default() += 1;
        self.events.push((seq, body));
    }

    /// Whether seq `seq` arrived at least once.
    pub fn holds(&self, seq: u64) -> bool {
        self.counts.contains_key(&seq)
    }

    /// The seq of the first event received.
    pub fn first_seq(&self) -> Option<u64> {
        self.events.first().map(|(seq, _)| *seq)
    }

    /// The highest seq received (0 before any).
    pub fn last_seq(&self) -> u64 {
        self.counts.keys().next_back().copied().unwrap_or(0)
    }

    /// Every event in arrival order.
    pub fn events(&self) -> &[(u64, Option<String>)] {
        &self.events
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// What a check found: how many acked messages it expected and found, and what was wrong.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Check {
    /// Acked messages that had to be there.
    pub expected: usize,
    /// Of them, those that were there once, at their seq, with their body.
    pub found: usize,
    pub findings: Vec<Finding>,
}

impl Check {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// The findings that are not a [`Finding::Gap`] (for receivers that may miss events other than the messages
    /// the ledger knows).
    pub fn ignoring_gaps(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| !matches!(f, Finding::Gap { .. }))
    }
}

/// Every acked message, per room: seq -> body. Conflicting acks (one seq twice, one body at two seqs) are kept as
/// findings.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    rooms: Vec<BTreeMap<u64, String>>,
    /// Per room, body -> the seq it was acked at.
    bodies: Vec<HashMap<String, u64>>,
    conflicts: Vec<Finding>,
}

impl Ledger {
    pub fn new(rooms: usize) -> Ledger {
        Ledger { rooms: vec![BTreeMap::new(); rooms], bodies: vec![HashMap::new(); rooms], conflicts: Vec::new() }
    }

    /// Count an ack: message `body` got seq `seq` in room `room`. The same ack again changes nothing.
    pub fn ack(&mut self, room: usize, seq: u64, body: impl Into<String>) {
        let body = body.into();
        if let Some(first) = self.rooms[room].get(&seq) {
            if *first != body {
                self.conflicts.push(Finding::AckedSeqTwice { room, seq, first: first.clone(), second: body });
            }
            return;
        }
        if let Some(first) = self.bodies[room].get(&body) {
            self.conflicts.push(Finding::AckedBodyTwice { room, body, first: *first, second: seq });
            return;
        }
        self.bodies[room].insert(body.clone(), seq);
        self.rooms[room].insert(seq, body);
    }

    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Acked messages in all rooms.
    pub fn acked(&self) -> usize {
        self.rooms.iter().map(BTreeMap::len).sum()
    }

    /// Room `room`'s acked messages: seq -> body.
    pub fn room(&self, room: usize) -> &BTreeMap<u64, String> {
        &self.rooms[room]
    }

    /// The highest acked seq of `room` (0 before any).
    pub fn last_seq(&self, room: usize) -> u64 {
        self.rooms[room].keys().next_back().copied().unwrap_or(0)
    }

    /// Acks that contradict earlier ones.
    pub fn conflicts(&self) -> &[Finding] {
        &self.conflicts
    }

    /// Acked messages of `room` from seq `since` on that `receipts` does not hold (yet).
    pub fn undelivered(&self, room: usize, receipts: &Receipts, since: u64) -> usize {
        self.rooms[room].range(since..).filter(|(seq, _)| !receipts.holds(**seq)).count()
    }

    /// Check one receiver of `room` whose view starts at seq `since`: its first event, for a receiver that joined
    /// late; 1, for one that must hold every event the room ever had (a [`Finding::Gap`] also when its first event
    /// is later); 0, for one that must hold every acked message but whose other events may start anywhere. Every
    /// acked message from `since` on received once, at its seq, with its body; every event in order and gap-free;
    /// no body at two seqs.
    pub fn check_receiver(&self, room: usize, receipts: &Receipts, since: u64) -> Check {
        let acked = &self.rooms[room];
        let mut check = Check { expected: acked.range(since..).count(), ..Check::default() };
        let mut at: HashMap<u64, Option<&str>> = HashMap::with_capacity(receipts.events.len());
        let mut bodies: HashMap<&str, Vec<u64>> = HashMap::new();
        let mut highest: Option<u64> = None;
        for (seq, body) in &receipts.events {
            let (seq, body) = (*seq, body.as_deref());
            match highest {
                Some(after) if seq <= after => check.findings.push(Finding::OutOfOrder { room, seq, after }),
                Some(after) if seq > after + 1 => check.findings.push(Finding::Gap { room, seq, after }),
                None if seq > since && since > 0 => check.findings.push(Finding::Gap { room, seq, after: since - 1 }),
                _ => {}
            }
            highest = Some(highest.map_or(seq, |h| h.max(seq)));
            at.entry(seq).or_insert(body);
            if let Some(body) = body {
                let seqs = bodies.entry(body).or_default();
                if !seqs.contains(&seq) {
                    seqs.push(seq);
                }
            }
        }
        for (seq, times) in &receipts.counts {
            if *times > 1 {
                check.findings.push(Finding::Duplicate { room, seq: *seq, times: *times });
            }
        }
        let mut several: Vec<(&str, Vec<u64>)> = bodies.into_iter().filter(|(_, seqs)| seqs.len() > 1).collect();
        several.sort_unstable();
        for (body, seqs) in several {
            check.findings.push(Finding::BodyAtSeveralSeqs { room, body: body.to_owned(), seqs });
        }
        for (seq, body) in acked.range(since..) {
            match at.get(seq) {
                None => check.findings.push(Finding::Missing { room, seq: *seq, body: body.clone() }),
                Some(got) if *got != Some(body.as_str()) => check.findings.push(Finding::WrongBody {
                    room,
                    seq: *seq,
                    body: body.clone(),
                    got: got.map(str::to_owned),
                }),
                Some(_) => check.found += 1,
            }
        }
        check
    }

    /// Check what a store holds of `room`, `(seq, body)` for each stored message in any order: every acked message
    /// at its seq with its body, no body stored twice, and (as [`Finding::Unacked`]) each stored message nobody
    /// acked. A seq stored twice is a [`Finding::Duplicate`].
    pub fn check_store<'a>(&self, room: usize, stored: impl IntoIterator<Item = (u64, &'a str)>) -> Check {
        let acked = &self.rooms[room];
        let mut check = Check { expected: acked.len(), ..Check::default() };
        let mut at: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
        let mut bodies: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (seq, body) in stored {
            at.entry(seq).or_default().push(body);
            bodies.entry(body).or_default().push(seq);
        }
        for (seq, held) in &at {
            if held.len() > 1 {
                check.findings.push(Finding::Duplicate { room, seq: *seq, times: held.len() });
            }
        }
        for (body, mut seqs) in bodies {
            seqs.sort_unstable();
            seqs.dedup();
            if seqs.len() > 1 {
                check.findings.push(Finding::BodyAtSeveralSeqs { room, body: body.to_owned(), seqs });
            }
        }
        for (seq, body) in acked {
            match at.get(seq).map(Vec::as_slice) {
                None => check.findings.push(Finding::Missing { room, seq: *seq, body: body.clone() }),
                Some([got, ..]) if *got == body.as_str() => check.found += 1,
                Some(got) => check.findings.push(Finding::WrongBody {
                    room,
                    seq: *seq,
                    body: body.clone(),
                    got: got.first().map(|g| (*g).to_owned()),
                }),
            }
        }
        for (seq, held) in at {
            if !acked.contains_key(&seq) {
                for body in held {
                    check.findings.push(Finding::Unacked { room, seq, body: body.to_owned() });
                }
            }
        }
        check
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Room 0 with messages acked at seqs 2, 3 and 5 (seq 1 and 4 are joins).
    fn ledger() -> Ledger {
        let mut ledger = Ledger::new(2);
        ledger.ack(0, 2, "a");
        ledger.ack(0, 3, "b");
        ledger.ack(0, 5, "c");
        ledger
    }

    fn receipts(events: &[(u64, Option<&str>)]) -> Receipts {
        let mut receipts = Receipts::default();
        for (seq, body) in events {
            receipts.record(*seq, body.map(str::to_owned));
        }
        receipts
    }

    const ALL: &[(u64, Option<&str>)] = &[(1, None), (2, Some("a")), (3, Some("b")), (4, None), (5, Some("c"))];

    #[test]
    fn a_receiver_with_everything_in_order_is_clean() {
        let check = ledger().check_receiver(0, &receipts(ALL), 1);
        assert_eq!(check, Check { expected: 3, found: 3, findings: Vec::new() });
    }

    #[test]
    fn a_missing_delivery_is_reported_with_the_gap_it_leaves() {
        let check = ledger().check_receiver(0, &receipts(&[ALL[0], ALL[1], ALL[3], ALL[4]]), 1);
        assert_eq!(check.found, 2);
        assert_eq!(
            check.findings,
            vec![Finding::Gap { room: 0, seq: 4, after: 2 }, Finding::Missing { room: 0, seq: 3, body: "b".into() }]
        );
        assert_eq!(check.findings[1].lost(), Some((0, 3)));
        assert_eq!(check.ignoring_gaps().count(), 1);
        assert_eq!(ledger().undelivered(0, &receipts(&[ALL[0], ALL[1], ALL[3], ALL[4]]), 1), 1);
    }

    #[test]
    fn a_gap_of_unknown_events_is_reported() {
        let check = ledger().check_receiver(0, &receipts(&[ALL[0], ALL[1], ALL[2], ALL[4]]), 1);
        assert_eq!(check.findings, vec![Finding::Gap { room: 0, seq: 5, after: 3 }]);
        assert_eq!(check.found, 3);
        // A view that starts later than `since` starts with a gap.
        let late = ledger().check_receiver(0, &receipts(&ALL[2..]), 1);
        assert!(late.findings.contains(&Finding::Gap { room: 0, seq: 3, after: 0 }));
        assert!(late.findings.contains(&Finding::Missing { room: 0, seq: 2, body: "a".into() }));
        // From its first event on, nothing is missing.
        assert!(ledger().check_receiver(0, &receipts(&ALL[2..]), 3).is_clean());
    }

    #[test]
    fn a_duplicate_delivery_is_reported_once_with_its_count() {
        let mut events = ALL.to_vec();
        events.push((5, Some("c")));
        events.push((5, Some("c")));
        let check = ledger().check_receiver(0, &receipts(&events), 1);
        assert_eq!(check.found, 3);
        assert!(check.findings.contains(&Finding::Duplicate { room: 0, seq: 5, times: 3 }));
        assert_eq!(check.findings.iter().filter(|f| matches!(f, Finding::OutOfOrder { .. })).count(), 2);
        assert_eq!(check.findings.iter().map(Finding::extra).sum::<usize>(), 2);
    }

    #[test]
    fn out_of_order_delivery_is_reported() {
        let check = ledger().check_receiver(0, &receipts(&[ALL[0], ALL[2], ALL[1], ALL[3], ALL[4]]), 1);
        assert!(check.findings.contains(&Finding::OutOfOrder { room: 0, seq: 2, after: 3 }), "{check:?}");
        assert_eq!(check.found, 3, "every message is there, only late");
    }

    #[test]
    fn a_wrong_body_and_a_body_at_two_seqs_are_reported() {
        let events = [(1, None), (2, Some("a")), (3, Some("a")), (4, None), (5, Some("c"))];
        let check = ledger().check_receiver(0, &receipts(&events), 1);
        assert_eq!(check.found, 2);
        assert!(check.findings.contains(&Finding::WrongBody {
            room: 0,
            seq: 3,
            body: "b".into(),
            got: Some("a".into())
        }));
        assert!(check.findings.contains(&Finding::BodyAtSeveralSeqs { room: 0, body: "a".into(), seqs: vec![2, 3] }));
    }

    #[test]
    fn conflicting_acks_are_kept_and_a_repeated_ack_is_not_one() {
        let mut ledger = ledger();
        ledger.ack(0, 2, "a");
        assert!(ledger.conflicts().is_empty());
        ledger.ack(0, 2, "z");
        ledger.ack(0, 9, "b");
        assert_eq!(
            ledger.conflicts(),
            [
                Finding::AckedSeqTwice { room: 0, seq: 2, first: "a".into(), second: "z".into() },
                Finding::AckedBodyTwice { room: 0, body: "b".into(), first: 3, second: 9 }
            ]
        );
        assert_eq!(ledger.acked(), 3);
        assert_eq!(ledger.last_seq(0), 5);
        assert_eq!(ledger.last_seq(1), 0);
    }

    #[test]
    fn a_store_is_checked_for_missing_twice_stored_and_unacked_messages() {
        let ledger = ledger();
        let clean = ledger.check_store(0, [(5, "c"), (2, "a"), (3, "b")]);
        assert_eq!(clean, Check { expected: 3, found: 3, findings: Vec::new() });

        let check = ledger.check_store(0, [(2, "a"), (5, "c"), (6, "c"), (7, "d")]);
        assert_eq!(check.found, 2);
        assert_eq!(
            check.findings,
            vec![
                Finding::BodyAtSeveralSeqs { room: 0, body: "c".into(), seqs: vec![5, 6] },
                Finding::Missing { room: 0, seq: 3, body: "b".into() },
                Finding::Unacked { room: 0, seq: 6, body: "c".into() },
                Finding::Unacked { room: 0, seq: 7, body: "d".into() },
            ]
        );
        let twice = ledger.check_store(0, [(2, "a"), (2, "a"), (3, "b"), (5, "c")]);
        assert_eq!(twice.findings, vec![Finding::Duplicate { room: 0, seq: 2, times: 2 }]);
        assert_eq!(twice.found, 3);
    }

    #[test]
    fn findings_read_as_sentences() {
        let text = Finding::Missing { room: 1, seq: 7, body: "s1:2:3".into() }.to_string();
        assert_eq!(text, "seq 7 of room 1 (s1:2:3) is missing");
        let text = Finding::Gap { room: 0, seq: 9, after: 6 }.to_string();
        assert!(text.contains("followed seq 6"), "{text}");
    }
}
