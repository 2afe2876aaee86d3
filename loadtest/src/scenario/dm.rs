//! Direct messages: `users` sockets, one per user; random pairs exchange `rate` direct messages per second in
//! all. Each message reaches both users' sessions (the recipient's and the sender's own), so each user must
//! receive, per conversation, every acked message once and in seq order.
//!
//! Conversations are created by their first message; their setup events are not counted.

use super::{cancel_after, new_report, Setup};
use crate::conn;
use crate::deliveries::{histogram, stamped_body, Tally, Verdict};
use crate::measure::{self, CpuSnapshot};
use crate::report::Report;
use anyhow::{Context, Result};
use rand::Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_client::Client;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const DRAIN_LIMIT: Duration = Duration::from_secs(30);

pub async fn run(setup: &Setup) -> Result<Report> {
    let args = &setup.args;
    let mut report = new_report(setup);
    let users: Vec<String> = (0..args.users).map(|i| format!("d{i}")).collect();
    println!("connecting {} users", users.len());
    let clients: Vec<Arc<Client>> = conn::bounded(users.len(), args.connect_concurrency, |i| {
        let token = setup.token(&users[i]);
        async move { anyhow::Ok(Arc::new(setup.dialer.connect(token).await.with_context(|| format!("user {i}"))?)) }
    })
    .await
    .into_iter()
    .collect::<Result<_>>()?;

    let (expected_tx, expected_rx) = watch::channel::<Option<Arc<Vec<u64>>>>(None);
    let stop = CancellationToken::new();
    let readers: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| tokio::spawn(read(c.clone(), i, expected_rx.clone(), stop.clone(), setup.epoch)))
        .collect();

    let processes = measure::fleet_processes();
    let cpu_before = CpuSnapshot::take(&processes);
    let start = Instant::now();
    let involved: Arc<Vec<AtomicU64>> = Arc::new((0..users.len()).map(|_| AtomicU64::new(0)).collect());
    let period = Duration::from_secs_f64(1.0 / args.rate);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight = JoinSet::new();
    let mut n = 0u64;
    while start.elapsed() < args.duration {
        ticks.tick().await;
        let (a, b) = {
            let mut rng = rand::rng();
            let a = rng.random_range(0..users.len());
            let b = (a + rng.random_range(1..users.len())) % users.len();
            (a, b)
        };
        n += 1;
        let client = clients[a].clone();
        let to = users[b].clone();
        let body = stamped_body(setup.epoch, &format!("dm{n}"));
        inflight.spawn(async move {
            let sent = Instant::now();
            (a, b, client.dm(&to, body).await.is_ok(), sent.elapsed())
        });
    }
    let (mut acked, mut failed) = (0u64, 0u64);
    let mut ack_latency = histogram();
    while let Some(done) = inflight.join_next().await {
        match done {
            Ok((a, b, true, took)) => {
                acked += 1;
                involved[a].fetch_add(1, Ordering::Relaxed);
                involved[b].fetch_add(1, Ordering::Relaxed);
                let _ = ack_latency.record((took.as_micros() as u64).max(1));
            }
            _ => failed += 1,
        }
    }
    let expected: Vec<u64> = involved.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let _ = expected_tx.send(Some(Arc::new(expected.clone())));
    let stopper = cancel_after(&stop, DRAIN_LIMIT);
    let mut verdict = Verdict::default();
    for (i, reader) in readers.into_iter().enumerate() {
        let tally = reader.await?;
        verdict.add(expected[i], tally.unique_total());
        verdict.merge_tally(&tally);
    }
    let elapsed = start.elapsed().as_secs_f64();
    stopper.abort();
    let cpu = CpuSnapshot::take(&processes).since(&cpu_before);
    drop(clients);

    report.set("direct messages acked", acked);
    report.set("direct messages refused or failed", failed);
    report.set("deliveries expected", verdict.expected);
    report.set("deliveries", verdict.delivered);
    report.set("deliveries/s", verdict.delivered as f64 / elapsed.max(1e-9));
    report.set("lost", verdict.lost);
    report.set("duplicated", verdict.duplicated);
    report.set("delivered without an ack", verdict.unacked);
    report.latency("end-to-end", verdict.latency_us);
    report.latency("send ack", ack_latency);
    report.cpu("sending", cpu);
    Ok(report)
}

async fn read(
    client: Arc<Client>,
    me: usize,
    mut expected: watch::Receiver<Option<Arc<Vec<u64>>>>,
    stop: CancellationToken,
    epoch: Instant,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        if let Some(expected) = expected.borrow().as_ref() {
            if tally.unique_total() >= expected[me] {
                break;
            }
        }
        tokio::select! {
            event = client.next_event() => match event {
                Some(event) => tally.record(&event, epoch),
                None => break,
            },
            changed = expected.changed() => if changed.is_err() { break },
            _ = stop.cancelled() => break,
        }
    }
    tally
}
