//! The workload every fault runs under: receivers (reconnecting clients, each in one room) and senders
//! (reconnecting clients posting numbered messages with a `cmid`, retried until acked), then the verdict: every
//! acked message delivered to every receiver of its room exactly once and in seq order, and stored in the history
//! exactly once. The bookkeeping of acks and receipts and those checks are `switchyard_testkit::ledger`'s; this
//! drives the sockets, reads the history back and turns the findings into an [`Outcome`].
//!
//! It injects nothing; a scenario does that while the traffic runs, marking the moment with [`Traffic::inject`].
//! Latencies here are end to end on one clock (this process sends and receives), so they need no clock sync.

use crate::fleet::Tenant;
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchyard_client::{Auth, ClientError, ConnectOptions, ReconnectOptions, ReconnectingClient, SessionEvent};
use switchyard_protocol::client::ServerEvent;
use switchyard_testkit::ledger::{Finding, Ledger, Receipts};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long one attempt of a send may take before it is tried again with the same `cmid`.
const ATTEMPT: Duration = Duration::from_secs(12);
/// How long a message may keep failing before its sender gives up on it (it is then "unacked", not lost).
const GIVE_UP: Duration = Duration::from_secs(60);
/// Longest wait, after the senders stopped, for every receiver to hold every acked message.
const SETTLE: Duration = Duration::from_secs(60);
/// Longest wait for the history store to hold every acked message.
const STORE_SETTLE: Duration = Duration::from_secs(90);
/// Messages sent in the first this many ms are left out of the "before" latencies.
const WARMING: u64 = 1_000;
/// Sockets opened at once while setting up.
const CONNECT_CONCURRENCY: usize = 64;

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec {
    pub rooms: usize,
    /// Receivers in all; receiver `i` joins room `i % rooms`.
    pub receivers: usize,
    pub senders_per_room: usize,
    /// Messages per second per sender.
    pub rate_per_sender: f64,
}

/// What a receiver saw, kept by its task.
#[derive(Default)]
struct Seen {
    /// Every sequenced event, with the body of the traffic's own messages.
    receipts: Receipts,
    /// `gap` events: a resume that could not replay what was missed.
    gaps: u64,
    /// Reconnects, and when each completed (ms since start).
    reconnects: u64,
    reconnected_ms: Vec<u64>,
    /// Milliseconds since start at which the first message sent after the injection arrived.
    first_after_injection_ms: Option<u64>,
}

struct Receiver {
    room: usize,
    client: Arc<ReconnectingClient>,
    seen: Arc<Mutex<Seen>>,
}

/// State shared by every task of the traffic.
struct Shared {
    start: Instant,
    /// Milliseconds since start of the injection; `u64::MAX` until then.
    injected_ms: AtomicU64,
    /// Every acked message.
    ledger: Mutex<Ledger>,
    sent: AtomicUsize,
    gave_up: AtomicUsize,
    /// Latency of deliveries (ms) of messages sent before / after the injection.
    latency_before: Mutex<Histogram<u64>>,
    latency_after: Mutex<Histogram<u64>>,
    /// The slowest deliveries of messages sent after the injection: (latency ms, sent ms after the injection),
    /// one per message, the worst `SLOWEST_KEPT`; they say when during the fault the time was lost.
    slowest_after: Mutex<Vec<(u64, u64)>>,
}

/// How many of the slowest deliveries after the injection are reported.
const SLOWEST_KEPT: usize = 6;

impl Shared {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

pub struct Traffic {
    spec: Spec,
    url: String,
    tenant: Arc<Tenant>,
    room_names: Vec<String>,
    receivers: Vec<Receiver>,
    readers: JoinSet<()>,
    senders: JoinSet<()>,
    stop_sending: CancellationToken,
    shared: Arc<Shared>,
}

/// The verdict of one run.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub sent: usize,
    pub acked: usize,
    pub gave_up: usize,
    /// Deliveries of acked messages to receivers (each receiver counts once per message).
    pub delivered: usize,
    pub expected_deliveries: usize,
    /// Acked messages found in the history store with their body.
    pub stored: usize,
    /// Distinct acked messages missing from some receiver or from the store.
    pub lost: usize,
    /// Deliveries of a seq already delivered, plus messages posted at two seqs (live or stored).
    pub duplicated: usize,
    pub out_of_order: u64,
    pub gaps: u64,
    pub reconnects: u64,
    /// From the injection until every receiver had a message sent after it.
    pub recovery: Option<Duration>,
    pub p99_before_ms: u64,
    pub p99_after_ms: u64,
    /// The slowest deliveries after the injection: (latency ms, sent ms after the injection), slowest first.
    pub slowest_after: Vec<(u64, u64)>,
    /// A few examples of what went wrong, for the log.
    pub notes: Vec<String>,
}

/// A message body: `<sender>:<n>:<sent_ms>`; unique per run.
fn body(sender: usize, n: u64, sent_ms: u64) -> String {
    format!("s{sender}:{n}:{sent_ms}")
}

/// The send time of a body `body` made; `None` for any other text.
fn sent_ms_of(body: &str) -> Option<u64> {
    let mut parts = body.strip_prefix('s')?.split(':');
    let (_sender, _n, sent_ms) =
        (parts.next()?.parse::<u64>().ok()?, parts.next()?.parse::<u64>().ok()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    sent_ms.parse().ok()
}

/// Connect a reconnecting client for `user` through `url`, with the client library's default backoff.
pub async fn connect(url: &str, token: String) -> Result<ReconnectingClient, ClientError> {
    let mut options = ConnectOptions::new(url, Auth::Header(token));
    options.connect_timeout = Duration::from_secs(20);
    options.request_timeout = ATTEMPT;
    ReconnectingClient::connect(options, ReconnectOptions::default()).await
}

impl Traffic {
    /// Connect and join every receiver and sender, then start sending.
    pub async fn start(url: &str, tenant: &Tenant, spec: Spec) -> Result<Traffic> {
        let run = hex::encode(rand::random::<[u8; 3]>());
        let room_names: Vec<String> = (0..spec.rooms).map(|r| format!("chaos-{run}-{r}")).collect();
        let hist = || Histogram::<u64>::new_with_bounds(1, 600_000, 3).expect("valid histogram bounds");
        let shared = Arc::new(Shared {
            start: Instant::now(),
            injected_ms: AtomicU64::new(u64::MAX),
            ledger: Mutex::new(Ledger::new(spec.rooms)),
            sent: AtomicUsize::new(0),
            gave_up: AtomicUsize::new(0),
            latency_before: Mutex::new(hist()),
            latency_after: Mutex::new(hist()),
            slowest_after: Mutex::new(Vec::new()),
        });
        let mut traffic = Traffic {
            spec: spec.clone(),
            url: url.to_owned(),
            tenant: Arc::new(tenant.clone()),
            room_names,
            receivers: Vec::new(),
            readers: JoinSet::new(),
            senders: JoinSet::new(),
            stop_sending: CancellationToken::new(),
            shared,
        };
        traffic.connect_receivers().await?;
        traffic.start_senders().await?;
        Ok(traffic)
    }

    async fn connect_receivers(&mut self) -> Result<()> {
        let (url, rooms) = (self.url.clone(), self.room_names.clone());
        let tenant = self.tenant.clone();
        let joined: Vec<Result<(usize, ReconnectingClient)>> =
            futures::StreamExt::collect(futures::StreamExt::buffer_unordered(
                futures::stream::iter((0..self.spec.receivers).map(|i| {
                    let (url, rooms, tenant) = (url.clone(), rooms.clone(), tenant.clone());
                    async move {
                        let room = i % rooms.len();
                        let client = connect(&url, tenant.token(&format!("r{i}")))
                            .await
                            .with_context(|| format!("receiver {i} connecting"))?;
                        client.join(&rooms[room], None).await.with_context(|| format!("receiver {i} joining"))?;
                        Ok((room, client))
                    }
                })),
                CONNECT_CONCURRENCY,
            ))
            .await;
        for result in joined {
            let (room, client) = result?;
            let client = Arc::new(client);
            let seen = Arc::new(Mutex::new(Seen::default()));
            self.readers.spawn(read_events(client.clone(), seen.clone(), self.shared.clone()));
            self.receivers.push(Receiver { room, client, seen });
        }
        Ok(())
    }

    async fn start_senders(&mut self) -> Result<()> {
        let period = Duration::from_secs_f64(1.0 / self.spec.rate_per_sender.max(0.01));
        for room in 0..self.spec.rooms {
            for k in 0..self.spec.senders_per_room {
                let index = room * self.spec.senders_per_room + k;
                let client = Arc::new(
                    connect(&self.url, self.tenant.token(&format!("s{index}")))
                        .await
                        .with_context(|| format!("sender {index} connecting"))?,
                );
                let name = self.room_names[room].clone();
                client.join(&name, None).await.with_context(|| format!("sender {index} joining"))?;
                // A sender's own events are read and dropped, so its event queue never fills.
                let drain = client.clone();
                let stop = self.stop_sending.clone();
                self.readers.spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            event = drain.next_event() => if matches!(event, None | Some(SessionEvent::Ended(_))) { return },
                        }
                    }
                });
                let (shared, stop) = (self.shared.clone(), self.stop_sending.clone());
                self.senders.spawn(send_loop(client, index, room, name, period, shared, stop));
            }
        }
        Ok(())
    }

    /// Mark now as the injection; messages sent from now on count as "after".
    pub fn inject(&self) -> Instant {
        self.shared.injected_ms.store(self.shared.now_ms(), Ordering::Relaxed);
        Instant::now()
    }

    /// The name of room `index`.
    pub fn room_name(&self, index: usize) -> &str {
        &self.room_names[index]
    }

    /// A token of this traffic's tenant for `user`.
    pub fn token(&self, user: &str) -> String {
        self.tenant.token(user)
    }

    /// When receivers completed a reconnect after `since`, in ms after it.
    pub fn reconnect_times_ms(&self, since: Instant) -> Vec<u64> {
        let since_ms = since.saturating_duration_since(self.shared.start).as_millis() as u64;
        self.receivers
            .iter()
            .flat_map(|r| {
                let seen = r.seen.lock().unwrap_or_else(|p| p.into_inner());
                seen.reconnected_ms.iter().filter(|t| **t >= since_ms).map(|t| t - since_ms).collect::<Vec<_>>()
            })
            .collect()
    }

    /// Receivers that completed a reconnect (and resumed) after `since`.
    pub fn reconnected_since(&self, since: Instant) -> usize {
        let since_ms = since.saturating_duration_since(self.shared.start).as_millis() as u64;
        self.receivers
            .iter()
            .filter(|r| r.seen.lock().unwrap_or_else(|p| p.into_inner()).reconnected_ms.iter().any(|t| *t >= since_ms))
            .count()
    }

    /// Receivers connected now.
    pub fn connected(&self) -> usize {
        self.receivers.iter().filter(|r| r.client.is_connected()).count()
    }

    /// Acked messages so far.
    pub fn acked(&self) -> usize {
        self.shared.ledger.lock().unwrap_or_else(|p| p.into_inner()).acked()
    }

    /// Stop sending, wait for deliveries and for the store, and judge. `history_url` is where a fresh client reads
    /// history from.
    pub async fn finish(mut self, history_url: &str) -> Result<Outcome> {
        self.stop_sending.cancel();
        while self.senders.join_next().await.is_some() {}
        let ledger: Ledger = self.shared.ledger.lock().unwrap_or_else(|p| p.into_inner()).clone();

        // Wait until every receiver holds every acked message of its room, or nothing moves for a while.
        let deadline = Instant::now() + SETTLE;
        loop {
            let missing: usize = self
                .receivers
                .iter()
                .map(|r| ledger.undelivered(r.room, &r.seen.lock().unwrap_or_else(|p| p.into_inner()).receipts, 0))
                .sum();
            if missing == 0 || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let mut out = Outcome {
            sent: self.shared.sent.load(Ordering::Relaxed),
            acked: ledger.acked(),
            gave_up: self.shared.gave_up.load(Ordering::Relaxed),
            ..Outcome::default()
        };
        for conflict in ledger.conflicts() {
            out.duplicated += conflict.extra();
            if out.notes.len() < 5 {
                out.notes.push(conflict.to_string());
            }
        }
        let mut lost: BTreeSet<(usize, u64)> = BTreeSet::new();
        let injected_ms = self.shared.injected_ms.load(Ordering::Relaxed);
        let mut recovery_ms: Option<u64> = Some(0);
        for (i, r) in self.receivers.iter().enumerate() {
            let seen = r.seen.lock().unwrap_or_else(|p| p.into_inner());
            // Every acked message of the room (receivers join before the first send). A receiver sees other
            // events only from its join on, and may miss some that are not messages: gaps are not counted.
            let check = ledger.check_receiver(r.room, &seen.receipts, 0);
            out.expected_deliveries += check.expected;
            out.delivered += check.found;
            for finding in check.ignoring_gaps() {
                out.duplicated += finding.extra();
                if matches!(finding, Finding::OutOfOrder { .. }) {
                    out.out_of_order += 1;
                }
                if finding.lost().is_some_and(|key| lost.insert(key)) && out.notes.len() < 5 {
                    out.notes.push(format!("receiver {i}: {finding}"));
                }
            }
            out.gaps += seen.gaps;
            out.reconnects += seen.reconnects;
            if injected_ms != u64::MAX {
                recovery_ms = match (recovery_ms, seen.first_after_injection_ms) {
                    (Some(worst), Some(at)) => Some(worst.max(at.saturating_sub(injected_ms))),
                    _ => None,
                };
            }
        }
        out.recovery = if injected_ms == u64::MAX { None } else { recovery_ms.map(Duration::from_millis) };

        // The store: every acked message once, at its seq, with its body.
        let reader = connect(history_url, self.tenant.token("auditor")).await.context("history reader connecting")?;
        let deadline = Instant::now() + STORE_SETTLE;
        let mut stored_sets: Vec<BTreeMap<u64, String>> = vec![BTreeMap::new(); ledger.rooms()];
        loop {
            let mut complete = true;
            for (room, stored) in stored_sets.iter_mut().enumerate() {
                let expected = ledger.room(room);
                if expected.keys().all(|s| stored.contains_key(s)) {
                    continue;
                }
                match read_history(&reader, &self.room_names[room]).await {
                    Ok(read) => *stored = read,
                    // Counted below as missing from the store, unless a later read succeeds.
                    Err(error) if out.notes.len() < 10 => out.notes.push(format!("reading history: {error:#}")),
                    Err(_) => {}
                }
                complete &= expected.keys().all(|s| stored.contains_key(s));
            }
            if complete || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        reader.close().await;
        for (room, stored) in stored_sets.iter().enumerate() {
            // Only the traffic's own messages; one whose sender gave up may be stored without an ack.
            let ours = stored.iter().filter(|(_, body)| sent_ms_of(body).is_some()).map(|(seq, b)| (*seq, b.as_str()));
            let check = ledger.check_store(room, ours);
            out.stored += check.found;
            for finding in check.findings.iter().filter(|f| !matches!(f, Finding::Unacked { .. })) {
                out.duplicated += finding.extra();
                if finding.lost().is_some_and(|key| lost.insert(key)) && out.notes.len() < 10 {
                    out.notes.push(format!("history store: {finding}"));
                }
            }
        }
        out.lost = lost.len();
        out.p99_before_ms =
            self.shared.latency_before.lock().unwrap_or_else(|p| p.into_inner()).value_at_quantile(0.99);
        out.p99_after_ms = self.shared.latency_after.lock().unwrap_or_else(|p| p.into_inner()).value_at_quantile(0.99);
        out.slowest_after = self.shared.slowest_after.lock().unwrap_or_else(|p| p.into_inner()).clone();

        for r in &self.receivers {
            r.client.close().await;
        }
        self.readers.abort_all();
        Ok(out)
    }
}

/// Read a room's whole history: seq -> body.
async fn read_history(reader: &ReconnectingClient, room: &str) -> Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    // Without `after` the newest page comes back; from seq 0 pages go forward.
    let mut after = Some(0);
    loop {
        let (page, more) = tokio::time::timeout(ATTEMPT, reader.history(room, None, after, Some(100)))
            .await
            .context("history timed out")?
            .context("history")?;
        for message in &page {
            if let Some(body) = &message.body {
                out.insert(message.seq, body.clone());
            }
        }
        match page.last() {
            Some(last) if more => after = Some(last.seq),
            _ => return Ok(out),
        }
    }
}

/// Keep `(latency, sent)` among the `SLOWEST_KEPT` slowest, one entry per sent time (a message reaches several
/// receivers).
fn keep_slowest(slowest: &Mutex<Vec<(u64, u64)>>, latency: u64, sent: u64) {
    let mut slowest = slowest.lock().unwrap_or_else(|p| p.into_inner());
    if slowest.len() == SLOWEST_KEPT && slowest.last().is_some_and(|&(worst_kept, _)| latency <= worst_kept) {
        return;
    }
    match slowest.iter_mut().find(|(_, at)| *at == sent) {
        Some(entry) => entry.0 = entry.0.max(latency),
        None => slowest.push((latency, sent)),
    }
    slowest.sort_unstable_by(|a, b| b.cmp(a));
    slowest.truncate(SLOWEST_KEPT);
}

async fn read_events(client: Arc<ReconnectingClient>, seen: Arc<Mutex<Seen>>, shared: Arc<Shared>) {
    while let Some(event) = client.next_event().await {
        let now = shared.now_ms();
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            SessionEvent::Event(event) => {
                if let Some((_, seq)) = event.room_seq() {
                    // Only the traffic's own bodies: a scenario may post others (of its own format) in the room.
                    let ours = match &event {
                        ServerEvent::Msg { body, .. } => sent_ms_of(body).map(|_| body.clone()),
                        ServerEvent::Edit { .. }
                        | ServerEvent::Delete { .. }
                        | ServerEvent::Reaction { .. }
                        | ServerEvent::Pin { .. }
                        | ServerEvent::Joined { .. }
                        | ServerEvent::Left { .. }
                        | ServerEvent::Moderation { .. }
                        | ServerEvent::RoomDeleted { .. }
                        | ServerEvent::Erased { .. }
                        | ServerEvent::Typing { .. }
                        | ServerEvent::Read { .. }
                        | ServerEvent::Presence { .. } => None,
                    };
                    seen.receipts.record(seq, ours);
                }
                if let ServerEvent::Msg { body, .. } = event {
                    if let Some(sent_ms) = sent_ms_of(&body) {
                        let latency = now.saturating_sub(sent_ms).max(1);
                        let injected = shared.injected_ms.load(Ordering::Relaxed);
                        // The first second's messages also pay for first subscriptions and connections warming up.
                        let histogram = match sent_ms {
                            _ if sent_ms >= injected => Some(&shared.latency_after),
                            _ if sent_ms >= WARMING => Some(&shared.latency_before),
                            _ => None,
                        };
                        if let Some(histogram) = histogram {
                            let _ = histogram.lock().unwrap_or_else(|p| p.into_inner()).record(latency);
                        }
                        if sent_ms >= injected {
                            keep_slowest(&shared.slowest_after, latency, sent_ms - injected);
                        }
                        if sent_ms >= injected && seen.first_after_injection_ms.is_none() {
                            seen.first_after_injection_ms = Some(now);
                        }
                    }
                }
            }
            SessionEvent::Gap { .. } => seen.gaps += 1,
            SessionEvent::Reconnected(_) => {
                seen.reconnects += 1;
                seen.reconnected_ms.push(now);
            }
            SessionEvent::Ended(_) => return,
            _ => {}
        }
    }
}

/// Send numbered messages at a fixed pace until stopped; each is retried with its `cmid` until acked or `GIVE_UP`.
async fn send_loop(
    client: Arc<ReconnectingClient>,
    index: usize,
    room: usize,
    name: String,
    period: Duration,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        n += 1;
        let sent_ms = shared.now_ms();
        let text = body(index, n, sent_ms);
        let cmid = switchyard_client::new_cmid();
        shared.sent.fetch_add(1, Ordering::Relaxed);
        let first = Instant::now();
        loop {
            match tokio::time::timeout(ATTEMPT, client.send_with_cmid(&name, text.clone(), cmid.clone())).await {
                Ok(Ok(sent)) => {
                    shared.ledger.lock().unwrap_or_else(|p| p.into_inner()).ack(room, sent.seq, text);
                    break;
                }
                // Refused (a shard changing hands, a draining gateway) or cut off: the same cmid again shortly.
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
            if first.elapsed() > GIVE_UP {
                shared.gave_up.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
}

/// Fail with the outcome's notes when `condition` does not hold.
pub fn require(condition: bool, what: &str) -> Result<()> {
    if !condition {
        bail!("{what}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_traffics_bodies_carry_a_send_time() {
        assert_eq!(sent_ms_of(&body(3, 17, 12_345)), Some(12_345));
        for other in ["filler 1 xxx", "s1:2", "s1:2:3:4", "sx:2:3", "flood 9", ""] {
            assert_eq!(sent_ms_of(other), None, "{other}");
        }
    }
}
