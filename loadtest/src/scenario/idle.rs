//! Idle sockets: open `sockets` authenticated sockets, hold them for the run's duration (each answers the server's
//! heartbeats), and read the gateway's resident memory before, while holding and after closing.
//!
//! The sockets are lean holders (`holder`), not full clients, so one process can hold as many as its file limit
//! allows. The figure is the growth of the gateway's RSS divided by the sockets held; it includes the kernel's
//! socket buffers only as far as they are charged to the process (they are not).

use super::{mib, new_report, Setup};
use crate::conn;
use crate::deliveries::histogram;
use crate::holder::{Holders, Target};
use crate::measure::{self, CpuSnapshot};
use crate::report::Report;
use anyhow::{bail, Result};
use std::time::{Duration, Instant};

pub async fn run(setup: &Setup) -> Result<Report> {
    let args = &setup.args;
    let mut report = new_report(setup);
    let gateway = setup.gateway_pid;
    let rss_before = measure::rss_bytes(gateway)?;
    let processes = measure::fleet_processes();
    let cpu_before = CpuSnapshot::take(&processes);
    println!("connecting {} sockets", args.sockets);

    let started = Instant::now();
    let target = Target { url: setup.fleet.ws.clone(), format: args.format, sources: args.sources };
    // Closes every socket when the run ends, also when its deadline cuts it short.
    let holders = Holders::new();
    let results = conn::bounded(args.sockets, args.connect_concurrency, |i| {
        let (target, holders) = (&target, &holders);
        async move {
            let begun = Instant::now();
            let result = match setup.token(&format!("idle{i}")) {
                Some(token) => holders.connect(target, i, &token, Duration::from_secs(30)).await,
                None => Err(anyhow::anyhow!("cannot sign a token")),
            };
            (result, begun.elapsed())
        }
    })
    .await;
    let connect_secs = started.elapsed().as_secs_f64();
    let mut connect_latency = histogram();
    let mut failures = Vec::new();
    for (result, took) in results {
        let _ = connect_latency.record((took.as_micros() as u64).max(1));
        if let Err(e) = result {
            failures.push(format!("{e:#}"));
        }
    }
    let rss_connected = measure::rss_bytes(gateway)?;
    println!("{} sockets open in {connect_secs:.1}s; holding them for {}s", holders.open(), args.duration.as_secs());
    tokio::time::sleep(args.duration).await;
    let rss_held = measure::rss_bytes(gateway)?;
    let still_open = holders.open();
    let cpu = CpuSnapshot::take(&processes).since(&cpu_before);
    let own_rss = measure::rss_bytes(std::process::id())?;
    holders.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = measure::rss_bytes(gateway)?;

    let held = still_open.max(1) as f64;
    report.set("sockets opened", (args.sockets - failures.len()) as u64);
    report.set("sockets failed to open", failures.len() as u64);
    report.set("sockets still open after holding", still_open as u64);
    report.set("sockets closed while held", holders.lost() as u64);
    report.set("connects/s", (args.sockets - failures.len()) as f64 / connect_secs.max(1e-9));
    report.set("gateway RSS before (MiB)", mib(rss_before));
    report.set("gateway RSS all connected (MiB)", mib(rss_connected));
    report.set("gateway RSS after holding (MiB)", mib(rss_held));
    report.set("gateway RSS after closing (MiB)", mib(rss_after));
    report.set("gateway RSS per socket (KiB)", rss_held.saturating_sub(rss_before) as f64 / 1024.0 / held);
    report.set("load client RSS per socket (KiB)", own_rss as f64 / 1024.0 / held);
    report.set("lost", 0u64);
    report.set("duplicated", 0u64);
    report.latency("connect, authenticate and hello", connect_latency);
    report.cpu("connect and hold", cpu);
    if let Some(first) = failures.first() {
        eprintln!("{} sockets failed to open; the first error: {first}", failures.len());
    }
    if !failures.is_empty() || still_open < args.sockets - failures.len() {
        report.print();
        bail!("{} sockets failed to open and {} closed while idle", failures.len(), args.sockets - still_open);
    }
    Ok(report)
}
