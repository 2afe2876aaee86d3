//! Churn: around `sockets` open sockets, open `rate` new ones per second (connect, authenticate, `hello`, one
//! `ping`) and close as many of the oldest, for the run's duration. Reports connect latency, failures, and
//! whether the gateway's memory comes back once the churn stops.
//!
//! No messages flow; `fanout` and `dm` measure deliveries.

use super::{mib, new_report, Setup};
use crate::conn;
use crate::deliveries::histogram;
use crate::measure::{self, CpuSnapshot};
use crate::report::Report;
use anyhow::{bail, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_client::Client;

const TICK: Duration = Duration::from_millis(100);

pub async fn run(setup: &Setup) -> Result<Report> {
    let args = &setup.args;
    let mut report = new_report(setup);
    let next_user = Arc::new(AtomicUsize::new(0));
    let connect = || {
        let user = format!("churn{}", next_user.fetch_add(1, Ordering::Relaxed));
        let token = setup.token(&user);
        async move {
            let begun = Instant::now();
            let client = setup.dialer.connect(token).await?;
            client.ping().await?;
            anyhow::Ok((client, begun.elapsed()))
        }
    };
    println!("opening {} sockets", args.sockets);
    let mut open: VecDeque<Client> = VecDeque::new();
    for result in conn::bounded(args.sockets, args.connect_concurrency, |_| connect()).await {
        open.push_back(result?.0);
    }
    let rss_before = measure::rss_bytes(setup.gateway_pid)?;
    let processes = measure::fleet_processes();
    let cpu_before = CpuSnapshot::take(&processes);

    let per_tick = (args.rate * TICK.as_secs_f64()).max(1.0);
    let mut owed = 0.0;
    let mut latency = histogram();
    let (mut opened, mut closed) = (0u64, 0u64);
    let mut failures: Vec<String> = Vec::new();
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    let mut ticks = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                if start.elapsed() >= args.duration {
                    break;
                }
                owed += per_tick;
                while owed >= 1.0 {
                    owed -= 1.0;
                    pending.push(connect());
                    if let Some(old) = open.pop_front() {
                        drop(old);
                        closed += 1;
                    }
                }
            }
            Some(done) = pending.next(), if !pending.is_empty() => {
                settle(done, &mut open, &mut latency, &mut opened, &mut failures);
            }
        }
    }
    while let Some(done) = pending.next().await {
        settle(done, &mut open, &mut latency, &mut opened, &mut failures);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = CpuSnapshot::take(&processes).since(&cpu_before);
    let rss_churned = measure::rss_bytes(setup.gateway_pid)?;
    let still_open = open.iter().filter(|c| !c.is_closed()).count();
    let expected_open = open.len();
    drop(open);

    report.set("connects", opened);
    report.set("connects/s", opened as f64 / elapsed.max(1e-9));
    report.set("closes", closed);
    report.set("connect failures", failures.len() as u64);
    report.set("sockets open at the end", still_open as u64);
    report.set("gateway RSS before churn (MiB)", mib(rss_before));
    report.set("gateway RSS after churn (MiB)", mib(rss_churned));
    report.set("lost", 0u64);
    report.set("duplicated", 0u64);
    report.latency("connect, authenticate, hello and ping", latency);
    report.cpu("churn", cpu);
    if let Some(first) = failures.first() {
        report.print();
        bail!("{} connects failed; the first: {first}", failures.len());
    }
    if still_open < expected_open {
        report.print();
        bail!("{} sockets closed by the server during the churn", expected_open - still_open);
    }
    Ok(report)
}

fn settle(
    done: Result<(Client, Duration)>,
    open: &mut VecDeque<Client>,
    latency: &mut hdrhistogram::Histogram<u64>,
    opened: &mut u64,
    failures: &mut Vec<String>,
) {
    match done {
        Ok((client, took)) => {
            *opened += 1;
            let _ = latency.record((took.as_micros() as u64).max(1));
            open.push_back(client);
        }
        Err(e) => failures.push(format!("{e:#}")),
    }
}
