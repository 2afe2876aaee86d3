//! Reconnect storm: `sockets` members of `rooms` rooms receive while one extra sender per room posts `rate`
//! messages per second in all. A third of the way through, every member's socket is dropped at once; each
//! reconnects after a full-jitter exponential backoff (capped at `max_backoff`) and resumes its room with
//! `join {since}`. Every member must still receive every acked message exactly once and in order.
//!
//! The senders' sockets are not dropped, so traffic continues through the storm.

use super::{cancel_after, new_report, wait_until, Setup};
use crate::conn::{self, full_jitter, Dialer};
use crate::deliveries::{histogram, stamped_body, Tally, Verdict};
use crate::measure::{self, CpuSnapshot};
use crate::report::Report;
use anyhow::{Context, Result};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_client::{Client, ClientOp, Reply};
use switchyard_protocol::RoomId;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const DRAIN_LIMIT: Duration = Duration::from_secs(60);
const BACKOFF_BASE: Duration = Duration::from_millis(100);

/// What a member task needs, shared.
struct Shared {
    dialer: Dialer,
    epoch: Instant,
    max_backoff: Duration,
    drop_all: CancellationToken,
    stop: CancellationToken,
    expected: watch::Receiver<Option<Arc<Vec<u64>>>>,
    /// Members back in their room after the drop.
    back: AtomicUsize,
    /// Highest seq each member has seen, for the settle wait.
    progress: Vec<AtomicU64>,
}

struct MemberResult {
    tally: Tally,
    reconnect: Option<Duration>,
    attempts: u32,
}

pub async fn run(setup: &Setup) -> Result<Report> {
    let args = &setup.args;
    let mut report = new_report(setup);
    let rooms: Vec<RoomId> =
        (0..args.rooms).map(|r| RoomId::parse(&format!("storm-{}-{r}", setup.run_id))).collect::<Result<_, _>>()?;
    let tokens: Vec<String> = (0..args.sockets).map(|i| setup.tenant.token(&format!("s{i}"))).collect::<Result<_>>()?;
    println!("connecting {} members and {} senders", args.sockets, rooms.len());
    let members: Vec<(Client, u64)> = conn::bounded(args.sockets, args.connect_concurrency, |i| {
        let (token, room) = (tokens[i].clone(), rooms[i % rooms.len()].clone());
        async move {
            let client = setup.dialer.connect(Some(token)).await.with_context(|| format!("member {i}"))?;
            let seq = client.join(room.as_str(), None).await?;
            anyhow::Ok((client, seq))
        }
    })
    .await
    .into_iter()
    .collect::<Result<_>>()?;
    let senders: Vec<Arc<Client>> = conn::bounded(rooms.len(), args.connect_concurrency, |r| {
        let (token, room) = (setup.token(&format!("sender{r}")), rooms[r].clone());
        async move {
            let client = setup.dialer.connect(token).await.with_context(|| format!("sender {r}"))?;
            client.join(room.as_str(), None).await?;
            anyhow::Ok(Arc::new(client))
        }
    })
    .await
    .into_iter()
    .collect::<Result<_>>()?;

    let (expected_tx, expected_rx) = watch::channel::<Option<Arc<Vec<u64>>>>(None);
    let shared = Arc::new(Shared {
        dialer: Dialer::new(&setup.fleet.ws, args.format, args.sources),
        epoch: setup.epoch,
        max_backoff: args.max_backoff,
        drop_all: CancellationToken::new(),
        stop: CancellationToken::new(),
        expected: expected_rx,
        back: AtomicUsize::new(0),
        progress: (0..members.len()).map(|_| AtomicU64::new(0)).collect(),
    });
    let last_join: Vec<u64> = (0..rooms.len())
        .map(|r| members.iter().skip(r).step_by(rooms.len()).map(|(_, s)| *s).max().unwrap_or(0))
        .collect();
    let own_join: Vec<u64> = members.iter().map(|(_, s)| *s).collect();
    let mut tasks = Vec::with_capacity(members.len());
    for (i, (client, _)) in members.into_iter().enumerate() {
        let r = i % rooms.len();
        tasks.push(tokio::spawn(member(shared.clone(), i, r, rooms[r].clone(), tokens[i].clone(), client)));
    }
    wait_until(Duration::from_secs(180), "every member seeing every join", || {
        (0..own_join.len()).all(|i| {
            let r = i % rooms.len();
            own_join[i] >= last_join[r] || shared.progress[i].load(Ordering::Relaxed) >= last_join[r]
        })
    })
    .await?;

    let processes = measure::fleet_processes();
    let cpu_before = CpuSnapshot::take(&processes);
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..rooms.len()).map(|_| AtomicU64::new(0)).collect());
    let mut sending = JoinSet::new();
    let per_room = args.rate / rooms.len() as f64;
    for (r, client) in senders.iter().enumerate() {
        sending.spawn(send(client.clone(), rooms[r].clone(), r, per_room, args.duration, acked.clone(), setup.epoch));
    }
    tokio::time::sleep(args.duration / 3).await;
    println!("dropping all {} member sockets", tasks.len());
    let dropped_at = Instant::now();
    shared.drop_all.cancel();
    let total = tasks.len();
    let all_back = wait_until(args.duration.max(Duration::from_secs(60)), "every member back", || {
        shared.back.load(Ordering::Relaxed) >= total
    })
    .await;
    let all_back_secs = all_back.as_ref().map(|_| dropped_at.elapsed().as_secs_f64()).ok();
    let mut failed_sends = 0u64;
    while let Some(done) = sending.join_next().await {
        failed_sends += done?;
    }
    let expected: Vec<u64> = acked.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let _ = expected_tx.send(Some(Arc::new(expected.clone())));
    let stopper = cancel_after(&shared.stop, DRAIN_LIMIT);
    let mut verdict = Verdict::default();
    let mut reconnect = histogram();
    let mut attempts = 0u64;
    for (i, task) in tasks.into_iter().enumerate() {
        let result = task.await?;
        verdict.add(expected[i % rooms.len()], result.tally.unique_in(&rooms[i % rooms.len()]));
        verdict.merge_tally(&result.tally);
        if let Some(d) = result.reconnect {
            let _ = reconnect.record((d.as_micros() as u64).max(1));
        }
        attempts += u64::from(result.attempts);
    }
    stopper.abort();
    let cpu = CpuSnapshot::take(&processes).since(&cpu_before);
    drop(senders);

    report.set("members", total as u64);
    report.set("members back after the drop", reconnect.len());
    report.set("reconnect attempts", attempts);
    if let Some(secs) = all_back_secs {
        report.set("all back within (s)", secs);
    }
    report.set("sends acked", expected.iter().sum::<u64>());
    report.set("sends failed", failed_sends);
    report.set("deliveries expected", verdict.expected);
    report.set("deliveries", verdict.delivered);
    report.set("lost", verdict.lost);
    report.set("duplicated", verdict.duplicated);
    report.set("delivered without an ack", verdict.unacked);
    report.latency("end-to-end", verdict.latency_us);
    report.latency("drop to resumed", reconnect);
    report.cpu("storm", cpu);
    all_back?;
    Ok(report)
}

async fn member(shared: Arc<Shared>, me: usize, r: usize, room: RoomId, token: String, client: Client) -> MemberResult {
    let mut tally = Tally::default();
    let mut result = MemberResult { tally: Tally::default(), reconnect: None, attempts: 0 };
    // Until the drop (or a close by the server, which is resumed the same way).
    if read(&shared, me, r, &room, &client, &mut tally, &shared.drop_all).await == Ended::Done {
        result.tally = tally;
        return result;
    }
    let dropped = Instant::now();
    drop(client);
    let client = loop {
        tokio::time::sleep(full_jitter(result.attempts, BACKOFF_BASE, shared.max_backoff)).await;
        result.attempts += 1;
        if shared.stop.is_cancelled() {
            result.tally = tally;
            return result;
        }
        let Ok(client) = shared.dialer.connect(Some(token.clone())).await else { continue };
        let since = tally.last_any.get(&room).copied();
        if client.join(room.as_str(), since).await.is_ok() {
            break client;
        }
    };
    result.reconnect = Some(dropped.elapsed());
    shared.back.fetch_add(1, Ordering::Relaxed);
    read(&shared, me, r, &room, &client, &mut tally, &CancellationToken::new()).await;
    result.tally = tally;
    result
}

/// Why a member stopped reading.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The storm began.
    Dropped,
    /// The server closed the socket.
    Closed,
    /// Every expected message arrived, or the run stopped.
    Done,
}

/// Read into `tally` until `until` fires, the socket closes, the expected messages arrived or the run stops.
async fn read(
    shared: &Shared,
    me: usize,
    r: usize,
    room: &RoomId,
    client: &Client,
    tally: &mut Tally,
    until: &CancellationToken,
) -> Ended {
    let mut expected = shared.expected.clone();
    loop {
        if let Some(expected) = expected.borrow().as_ref() {
            if tally.unique_in(room) >= expected[r] {
                return Ended::Done;
            }
        }
        tokio::select! {
            event = client.next_event() => match event {
                Some(event) => {
                    tally.record(&event, shared.epoch);
                    if let Some(seq) = tally.last_any.get(room) {
                        shared.progress[me].fetch_max(*seq, Ordering::Relaxed);
                    }
                }
                None => return Ended::Closed,
            },
            changed = expected.changed() => if changed.is_err() { return Ended::Done },
            _ = until.cancelled() => return Ended::Dropped,
            _ = shared.stop.cancelled() => return Ended::Done,
        }
    }
}

/// Post to `room` at `rate` per second for `duration`; the number of sends that failed.
async fn send(
    client: Arc<Client>,
    room: RoomId,
    r: usize,
    rate: f64,
    duration: Duration,
    acked: Arc<Vec<AtomicU64>>,
    epoch: Instant,
) -> u64 {
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = Instant::now() + duration;
    let mut inflight = JoinSet::new();
    let mut n = 0u64;
    while Instant::now() < end {
        ticks.tick().await;
        n += 1;
        let (client, room) = (client.clone(), room.clone());
        let body = stamped_body(epoch, &format!("{r}:{n}"));
        inflight.spawn(async move {
            client.request(ClientOp::Send { room, body, attrs: None, reply_to: None, cmid: None }).await
        });
    }
    let mut failed = 0;
    while let Some(done) = inflight.join_next().await {
        match done {
            Ok(Ok(Reply::Ok(_))) => {
                acked[r].fetch_add(1, Ordering::Relaxed);
            }
            _ => failed += 1,
        }
    }
    failed
}
