//! Resume: `clients + 1` members join a room and go away, the room gets `events` messages of `body_bytes` each
//! (posted through the tenant's HTTP API), then one member resumes all of them with `join {since}`, and then the
//! other `clients` resume them at once. Reports the time from the
//! join to the last replayed event, and the gateway's RSS growth while the concurrent replays run (sampled every
//! 20 ms). Every client must receive every missed event exactly once, in seq order, before its `ok`.
//!
//! It measures replay only: no live traffic flows meanwhile (`storm` resumes under load).

use super::{mib, new_report, Setup};
use crate::conn;
use crate::deliveries::histogram;
use crate::measure;
use crate::report::Report;
use anyhow::{bail, Context, Result};
use futures::stream::{self, StreamExt};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_client::{Client, ServerEvent};

/// HTTP posts in flight while the room is filled.
const POSTS_IN_FLIGHT: usize = 32;

pub async fn run(setup: &Setup) -> Result<Report> {
    let args = &setup.args;
    let mut report = new_report(setup);
    let room = format!("resume-{}", setup.run_id);
    let writer = setup.dialer.connect(setup.token("writer")).await?;
    let mut since = writer.join(&room, None).await?;
    // Every reader is a member that went away: it joins once now, so its resume later replays exactly the posted
    // events (a member's repeated join creates no event) and each resumes from the same point.
    let readers: Vec<String> =
        std::iter::once("alone".to_owned()).chain((0..args.clients).map(|i| format!("reader{i}"))).collect();
    for reader in &readers {
        let member = setup.dialer.connect(setup.token(reader)).await?;
        since = since.max(member.join(&room, None).await?);
        member.close().await;
    }
    let last = since + args.events as u64;

    println!("posting {} messages of {} bytes to {room}", args.events, args.body_bytes);
    let http = reqwest::Client::new();
    let url = format!("{}/v1/rooms/{room}/messages", setup.fleet.http);
    let body = "r".repeat(args.body_bytes);
    let posted = Instant::now();
    let results: Vec<Result<()>> = stream::iter(0..args.events)
        .map(|_| {
            let request = http
                .post(&url)
                .bearer_auth(&setup.tenant.api_key)
                .json(&json!({"from": "writer", "body": body}))
                .send();
            async move {
                let response = request.await?;
                if !response.status().is_success() {
                    bail!("posting a message: {} {}", response.status(), response.text().await.unwrap_or_default());
                }
                Ok(())
            }
        })
        .buffer_unordered(POSTS_IN_FLIGHT)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    println!("posted in {:.1} s", posted.elapsed().as_secs_f64());

    // One client alone.
    let alone = setup.dialer.connect(setup.token("alone")).await?;
    let (took, delivered) = resume(Arc::new(alone), &room, since, last).await?;
    report.set("one client: join to last event (ms)", took.as_secs_f64() * 1000.0);
    report.set("one client: events replayed", delivered);

    // Many at once, with the gateway's RSS sampled meanwhile.
    let clients: Vec<Arc<Client>> = conn::bounded(args.clients, args.connect_concurrency, |i| {
        let token = setup.token(&readers[i + 1]);
        async move { setup.dialer.connect(token).await.map(Arc::new) }
    })
    .await
    .into_iter()
    .collect::<Result<_, _>>()?;
    let rss_before = measure::rss_bytes(setup.gateway_pid)?;
    let peak = Arc::new(AtomicU64::new(rss_before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling, pid) = (peak.clone(), sampling.clone(), setup.gateway_pid);
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                if let Ok(rss) = measure::rss_bytes(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let started = Instant::now();
    let outcomes = futures::future::join_all(clients.iter().map(|c| resume(c.clone(), &room, since, last))).await;
    let all_done = started.elapsed();
    sampling.store(false, Ordering::Relaxed);
    sampler.await.context("RSS sampler")?;
    let mut latency = histogram();
    let mut replayed = 0;
    for outcome in outcomes {
        let (took, delivered) = outcome?;
        let _ = latency.record((took.as_micros() as u64).max(1));
        replayed += delivered;
    }
    let peak = peak.load(Ordering::Relaxed);
    report.set("clients resuming at once", clients.len() as u64);
    report.set("events replayed to them", replayed);
    report.set("all of them done (ms)", all_done.as_secs_f64() * 1000.0);
    report.set("gateway RSS before (MiB)", mib(rss_before));
    report.set("gateway RSS peak during (MiB)", mib(peak));
    report.set("gateway RSS growth (MiB)", mib(peak.saturating_sub(rss_before)));
    report.latency("join to last replayed event, concurrent clients", latency);
    Ok(report)
}

/// Join `room` with `since` and read its events until `last`: how long from the join to the last event, and how
/// many events arrived. Fails on a gap, a repeat or an error.
async fn resume(client: Arc<Client>, room: &str, since: u64, last: u64) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let reader = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut seen = since;
            while seen < last {
                let event = client
                    .next_event_timeout(Duration::from_secs(30))
                    .await
                    .with_context(|| format!("the replay stopped after seq {seen} of {last}"))?;
                let ServerEvent::Msg { seq, .. } = event else { continue };
                if seq != seen + 1 {
                    bail!("replay went from seq {seen} to {seq}");
                }
                seen = seq;
            }
            Ok(started.elapsed())
        })
    };
    let point = client.join(room, Some(since)).await.context("join with since")?;
    let took = reader.await.context("replay reader")??;
    if point != last {
        bail!("the join point is {point}, not the last posted seq {last}");
    }
    Ok((took, last - since))
}
