//! Room fan-out: `rooms` rooms of `members` sockets each, `senders_per_room` of whom send at a fixed total rate;
//! every member must receive every acked message of its room once and in seq order. The same load then runs
//! against the floor (a bare broadcast server in a process of its own) and the report gives the ratio of CPU
//! spent per delivery.
//!
//! Deliveries per second follow the offered rate; capacity is read as deliveries per CPU-second of the server.

use super::{cancel_after, mib, new_report, record_cpu, wait_until, Setup};
use crate::conn::{self, Dialer};
use crate::deliveries::{histogram, stamped_body, Tally, Verdict};
use crate::floor::Floor;
use crate::measure::{self, CpuSnapshot};
use crate::report::Report;
use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_client::{Client, ClientOp, Reply};
use switchyard_protocol::client::ServerEvent;
use switchyard_protocol::RoomId;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long members may take to receive the last messages once sending stopped.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How long the join events of the setup may take to reach every member.
const SETTLE_LIMIT: Duration = Duration::from_secs(180);

/// Where one half of the comparison sends its load.
struct Endpoint<'a> {
    label: &'static str,
    dialer: &'a Dialer,
    /// Whether sockets authenticate (the fleet) or not (the floor).
    authenticate: bool,
    server_pid: u32,
}

/// One half's measurements.
struct Measured {
    verdict: Verdict,
    ack_latency_us: Histogram<u64>,
    acked: u64,
    refused: u64,
    failed: u64,
    connect_secs: f64,
    settle_secs: f64,
    /// From the first send to the last delivery (or the drain limit).
    elapsed: Duration,
    /// CPU seconds by process name over the sending and draining.
    cpu: BTreeMap<String, f64>,
    server_rss: u64,
}

pub async fn run(setup: &Setup) -> Result<Report> {
    let mut report = new_report(setup);
    let fleet = Endpoint { label: "fleet", dialer: &setup.dialer, authenticate: true, server_pid: setup.gateway_pid };
    let on_fleet = measure_one(setup, &fleet).await.context("fan-out against the fleet")?;
    add(&mut report, "fleet", on_fleet, "switchyard-gate");
    let fleet_per_core = report_rate(&report, "fleet");
    if setup.args.floor {
        let floor_server = Floor::spawn().await?;
        let dialer = Dialer::new(&floor_server.ws, setup.args.format, setup.args.sources);
        let floor = Endpoint { label: "floor", dialer: &dialer, authenticate: false, server_pid: floor_server.pid };
        let on_floor = measure_one(setup, &floor).await.context("fan-out against the floor")?;
        add(&mut report, "floor", on_floor, "floor");
        let floor_per_core = report_rate(&report, "floor");
        if floor_per_core > 0.0 {
            report.set("gateway / floor deliveries per core-second", fleet_per_core / floor_per_core);
        }
    }
    Ok(report)
}

fn report_rate(report: &Report, label: &str) -> f64 {
    report.to_json()["results"][format!("{label}: deliveries per server core-second")].as_f64().unwrap_or(0.0)
}

fn add(report: &mut Report, label: &str, m: Measured, server: &str) {
    let secs = m.elapsed.as_secs_f64().max(1e-9);
    let server_secs = record_cpu(report, label, m.cpu, server);
    report.set(format!("{label}: connect and join (s)"), m.connect_secs);
    report.set(format!("{label}: join events settled (s)"), m.settle_secs);
    report.set(format!("{label}: sends acked"), m.acked);
    report.set(format!("{label}: sends refused or failed"), m.refused + m.failed);
    report.set(format!("{label}: deliveries expected"), m.verdict.expected);
    report.set(format!("{label}: deliveries"), m.verdict.delivered);
    report.set(format!("{label}: deliveries/s"), m.verdict.delivered as f64 / secs);
    report.set(format!("{label}: server CPU (s)"), server_secs);
    if server_secs > 0.0 {
        report.set(format!("{label}: deliveries per server core-second"), m.verdict.delivered as f64 / server_secs);
    }
    report.set(format!("{label}: server RSS (MiB)"), mib(m.server_rss));
    report.set(format!("{label}: lost"), m.verdict.lost);
    report.set(format!("{label}: duplicated or out of order"), m.verdict.duplicated);
    report.set(format!("{label}: delivered without an ack"), m.verdict.unacked);
    // The run fails on these, summed over both halves.
    let lost = report.get_u64("lost") + m.verdict.lost;
    let duplicated = report.get_u64("duplicated") + m.verdict.duplicated;
    report.set("lost", lost);
    report.set("duplicated", duplicated);
    report.latency(&format!("{label} end-to-end"), m.verdict.latency_us);
    report.latency(&format!("{label} send ack"), m.ack_latency_us);
}

async fn measure_one(setup: &Setup, endpoint: &Endpoint<'_>) -> Result<Measured> {
    let args = &setup.args;
    let (rooms, per_room, senders_per_room) = (args.rooms, args.members, args.senders_per_room);
    let room_ids: Vec<RoomId> = (0..rooms)
        .map(|r| RoomId::parse(&format!("fan-{}-{}-{r}", endpoint.label, setup.run_id)))
        .collect::<Result<_, _>>()?;
    println!("{}: connecting {} sockets and joining {rooms} rooms", endpoint.label, rooms * per_room);

    let started = Instant::now();
    let joined = conn::bounded(rooms * per_room, args.connect_concurrency, |i| {
        let room = room_ids[i / per_room].clone();
        let token = if endpoint.authenticate { setup.token(&format!("m{i}")) } else { None };
        async move {
            let client = endpoint.dialer.connect(token).await.with_context(|| format!("socket {i}"))?;
            let seq = client.join(room.as_str(), None).await.with_context(|| format!("socket {i} joining {room}"))?;
            anyhow::Ok((Arc::new(client), seq))
        }
    })
    .await
    .into_iter()
    .collect::<Result<Vec<_>>>()?;
    let connect_secs = started.elapsed().as_secs_f64();

    // Readers start at once, so the join events of the setup are read (and skipped) while others join.
    let (expected_tx, expected_rx) = watch::channel::<Option<Arc<Vec<u64>>>>(None);
    let stop = CancellationToken::new();
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..joined.len()).map(|_| AtomicU64::new(0)).collect());
    let mut readers = Vec::with_capacity(joined.len());
    for (i, (client, _)) in joined.iter().enumerate() {
        readers.push(tokio::spawn(read(
            client.clone(),
            i / per_room,
            room_ids[i / per_room].clone(),
            expected_rx.clone(),
            stop.clone(),
            progress.clone(),
            i,
            setup.epoch,
        )));
    }
    let last_join: Vec<u64> = (0..rooms)
        .map(|r| joined[r * per_room..(r + 1) * per_room].iter().map(|(_, s)| *s).max().unwrap_or(0))
        .collect();
    let settle = wait_until(SETTLE_LIMIT, "every member seeing every join", || {
        joined.iter().enumerate().all(|(i, (_, own))| {
            let room = i / per_room;
            *own >= last_join[room] || progress[i].load(Ordering::Relaxed) >= last_join[room]
        })
    })
    .await?;

    let processes = cpu_targets(endpoint);
    let cpu_before = CpuSnapshot::take(&processes);
    let send_start = Instant::now();
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..rooms).map(|_| AtomicU64::new(0)).collect());
    let per_sender_rate = args.rate / (rooms * senders_per_room) as f64;
    let mut senders = JoinSet::new();
    for r in 0..rooms {
        for k in 0..senders_per_room {
            let client = joined[r * per_room + k].0.clone();
            senders.spawn(send_at_rate(
                client,
                room_ids[r].clone(),
                r,
                per_sender_rate,
                args.duration,
                acked.clone(),
                setup.epoch,
            ));
        }
    }
    let mut ack_latency_us = histogram();
    let (mut refused, mut failed) = (0, 0);
    while let Some(done) = senders.join_next().await {
        let s = done?;
        let _ = ack_latency_us.add(&s.ack_latency_us);
        refused += s.refused;
        failed += s.failed;
    }
    let expected: Vec<u64> = acked.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let _ = expected_tx.send(Some(Arc::new(expected.clone())));
    let stopper = cancel_after(&stop, DRAIN_LIMIT);
    let mut verdict = Verdict::default();
    for (i, reader) in readers.into_iter().enumerate() {
        let tally = reader.await?;
        let room = &room_ids[i / per_room];
        verdict.add(expected[i / per_room], tally.unique_in(room));
        verdict.merge_tally(&tally);
    }
    let elapsed = send_start.elapsed();
    stopper.abort();
    let cpu = CpuSnapshot::take(&processes).since(&cpu_before);
    let server_rss = measure::rss_bytes(endpoint.server_pid).unwrap_or(0);
    drop(joined);
    // Let the closes reach the server before the next half starts.
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(Measured {
        verdict,
        ack_latency_us,
        acked: expected.iter().sum(),
        refused,
        failed,
        connect_secs,
        settle_secs: settle.as_secs_f64(),
        elapsed,
        cpu,
        server_rss,
    })
}

/// The processes whose CPU a half reports: the fleet's, this process, and the floor when it is the server.
fn cpu_targets(endpoint: &Endpoint<'_>) -> BTreeMap<u32, String> {
    let mut processes = measure::fleet_processes();
    processes.insert(std::process::id(), "loadtest".into());
    if endpoint.label == "floor" {
        processes.insert(endpoint.server_pid, "floor".into());
    }
    processes
}

#[allow(clippy::too_many_arguments)]
async fn read(
    client: Arc<Client>,
    room_index: usize,
    room: RoomId,
    mut expected: watch::Receiver<Option<Arc<Vec<u64>>>>,
    stop: CancellationToken,
    progress: Arc<Vec<AtomicU64>>,
    me: usize,
    epoch: Instant,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        if let Some(expected) = expected.borrow().as_ref() {
            if tally.unique_in(&room) >= expected[room_index] {
                break;
            }
        }
        tokio::select! {
            event = client.next_event() => match event {
                Some(event) => {
                    tally.record(&event, epoch);
                    if let ServerEvent::Joined { seq, .. } | ServerEvent::Msg { seq, .. } = &event {
                        progress[me].fetch_max(*seq, Ordering::Relaxed);
                    }
                }
                None => break,
            },
            changed = expected.changed() => if changed.is_err() { break },
            _ = stop.cancelled() => break,
        }
    }
    tally
}

struct SenderResult {
    ack_latency_us: Histogram<u64>,
    refused: u64,
    failed: u64,
}

/// Send to `room` at `rate` per second for `duration`, without waiting for one ack before the next send.
async fn send_at_rate(
    client: Arc<Client>,
    room: RoomId,
    room_index: usize,
    rate: f64,
    duration: Duration,
    acked: Arc<Vec<AtomicU64>>,
    epoch: Instant,
) -> SenderResult {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.001));
    // Start at a random point of the period so senders do not tick together.
    tokio::time::sleep(period.mul_f64(rand::random::<f64>())).await;
    let end = Instant::now() + duration;
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight = JoinSet::new();
    let mut n = 0u64;
    loop {
        ticks.tick().await;
        if Instant::now() >= end {
            break;
        }
        n += 1;
        let client = client.clone();
        let op = ClientOp::Send {
            room: room.clone(),
            body: stamped_body(epoch, &format!("{room_index}:{n}")),
            attrs: None,
            reply_to: None,
            cmid: None,
        };
        inflight.spawn(async move {
            let sent = Instant::now();
            (client.request(op).await, sent.elapsed())
        });
    }
    let mut result = SenderResult { ack_latency_us: histogram(), refused: 0, failed: 0 };
    while let Some(done) = inflight.join_next().await {
        match done {
            Ok((Ok(Reply::Ok(_)), took)) => {
                acked[room_index].fetch_add(1, Ordering::Relaxed);
                let _ = result.ack_latency_us.record((took.as_micros() as u64).max(1));
            }
            Ok((Ok(Reply::Err { .. }), _)) => result.refused += 1,
            _ => result.failed += 1,
        }
    }
    result
}
