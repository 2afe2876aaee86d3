//! `switchyard-loadtest`: measures room fan-out against a running fleet — deliveries per second, end-to-end latency
//! percentiles, and lost or duplicated deliveries — and prints one summary line per run.
//!
//! It only targets loopback addresses (it refuses anything else), and every run is bounded in messages and time.
//! It does not start the fleet: run `cargo xtask up` first, or pass another fleet file.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_client::{Auth, Client, ClientOp, ConnectOptions, Format, Reply, ServerEvent};
use switchyard_protocol::{ErrorCode, RoomId};

/// One run's parameters, from `--name value` pairs.
#[derive(Debug)]
struct Params {
    fleet: String,
    subscribers: usize,
    senders: usize,
    messages: usize,
    format: Format,
    deadline: Duration,
}

fn parse_args() -> Result<Params> {
    let mut params = Params {
        fleet: ".dev/fleet.json".into(),
        subscribers: 100,
        senders: 4,
        messages: 400,
        format: Format::MsgPack,
        deadline: Duration::from_secs(120),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut pairs = args.chunks(2);
    for pair in &mut pairs {
        let [name, value] = pair else { bail!("every option needs a value: {pair:?}") };
        match name.as_str() {
            "--fleet" => params.fleet = value.clone(),
            "--subscribers" => params.subscribers = value.parse()?,
            "--senders" => params.senders = value.parse()?,
            "--messages" => params.messages = value.parse()?,
            "--format" => {
                params.format = match value.as_str() {
                    "json" => Format::Json,
                    "msgpack" => Format::MsgPack,
                    other => bail!("--format json|msgpack, not {other}"),
                }
            }
            "--deadline-secs" => params.deadline = Duration::from_secs(value.parse()?),
            other => bail!(
                "unknown option {other}; options: --fleet --subscribers --senders --messages --format --deadline-secs"
            ),
        }
    }
    if params.senders == 0 || params.subscribers == 0 || params.messages == 0 {
        bail!("subscribers, senders and messages must be positive");
    }
    if params.subscribers > 19_000 || params.messages > 1_000_000 {
        bail!("a run is bounded: at most 19,000 subscribers and 1,000,000 messages");
    }
    Ok(params)
}

/// Refuse any target that is not on this machine's loopback.
fn require_loopback(url: &str) -> Result<()> {
    let host = url.split("://").nth(1).unwrap_or("").split(['/', ':']).next().unwrap_or("");
    let loopback = host == "localhost" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("refusing to load {url}: only loopback (127.0.0.0/8, localhost) targets are allowed");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let params = parse_args()?;
    let fleet: Value = serde_json::from_str(
        &std::fs::read_to_string(&params.fleet)
            .with_context(|| format!("read {} (run `cargo xtask up`)", params.fleet))?,
    )?;
    let http = fleet["http"].as_str().context("fleet file has no http")?.to_owned();
    let ws = fleet["ws"].as_str().context("fleet file has no ws")?.to_owned();
    let api_key = fleet["api_key"].as_str().context("fleet file has no api_key")?.to_owned();
    require_loopback(&http)?;
    require_loopback(&ws)?;
    tokio::time::timeout(params.deadline, run(&params, &http, &ws, &api_key))
        .await
        .context("the run did not finish before its deadline")?
}

async fn token(http: &reqwest::Client, base: &str, api_key: &str, user: &str) -> Result<String> {
    let response = http
        .post(format!("{base}/v1/tokens"))
        .bearer_auth(api_key)
        .json(&json!({"user_id": user, "ttl_secs": 3600}))
        .send()
        .await?;
    let body: Value = response.json().await?;
    Ok(body["token"].as_str().with_context(|| format!("no token in {body}"))?.to_owned())
}

async fn connect(ws: &str, token: String, format: Format) -> Result<Client> {
    Ok(Client::connect(ConnectOptions::new(ws, Auth::Header(token)).with_format(format)).await?)
}

async fn run(params: &Params, http_base: &str, ws: &str, api_key: &str) -> Result<()> {
    let http = reqwest::Client::new();
    let run_id = switchyard_protocol::ids::random_base62(8);
    let room = format!("bench-{run_id}");
    let epoch = Instant::now();

    let mut subscribers = Vec::new();
    for i in 0..params.subscribers {
        let client =
            connect(ws, token(&http, http_base, api_key, &format!("sub{i}-{run_id}")).await?, params.format).await?;
        client.join(&room, None).await?;
        subscribers.push(client);
    }
    let mut senders = Vec::new();
    for i in 0..params.senders {
        let client =
            connect(ws, token(&http, http_base, api_key, &format!("snd{i}-{run_id}")).await?, params.format).await?;
        client.join(&room, None).await?;
        senders.push(Arc::new(client));
    }
    // Joins of later clients are events too: drain them so only messages are counted.
    for client in &subscribers {
        while client.next_event_timeout(Duration::from_millis(50)).await.is_some() {}
    }

    let receivers: Vec<_> = subscribers
        .into_iter()
        .map(|client| {
            let expected = params.messages;
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(expected);
                let mut last_seq = 0;
                let mut duplicates_or_reorders = 0usize;
                while latencies.len() < expected {
                    match client.next_event_timeout(Duration::from_secs(10)).await {
                        Some(ServerEvent::Msg { seq, body, .. }) => {
                            if seq <= last_seq {
                                duplicates_or_reorders += 1;
                                continue;
                            }
                            last_seq = seq;
                            let sent_us: u64 = body.split(' ').next().and_then(|t| t.parse().ok()).unwrap_or(0);
                            latencies.push((epoch.elapsed().as_micros() as u64).saturating_sub(sent_us));
                        }
                        Some(_) => {}
                        None => break,
                    }
                }
                (latencies, duplicates_or_reorders)
            })
        })
        .collect();

    let started = Instant::now();
    let per_sender = params.messages.div_ceil(params.senders);
    let mut sending = Vec::new();
    for (i, client) in senders.iter().enumerate() {
        let client = client.clone();
        let room = RoomId::parse(&room)?;
        let count = per_sender.min(params.messages.saturating_sub(i * per_sender));
        sending.push(tokio::spawn(async move {
            for _ in 0..count {
                loop {
                    let body = format!("{} payload", epoch.elapsed().as_micros());
                    let op = ClientOp::Send { room: room.clone(), body, attrs: None, reply_to: None, cmid: None };
                    match client.request(op).await? {
                        Reply::Ok(_) => break,
                        Reply::Err { code: ErrorCode::RateLimited, retry_after_ms, .. } => {
                            tokio::time::sleep(Duration::from_millis(retry_after_ms.unwrap_or(50))).await;
                        }
                        Reply::Err { code, message, .. } => bail!("send failed: {code}: {message}"),
                    }
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in sending {
        task.await??;
    }
    let mut latencies = Vec::new();
    let mut lost = 0usize;
    let mut duplicates = 0usize;
    for receiver in receivers {
        let (got, dups) = receiver.await?;
        lost += params.messages - got.len();
        duplicates += dups;
        latencies.extend(got);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    let deliveries = latencies.len();
    println!(
        "fanout subscribers={} senders={} messages={} format={:?}: deliveries={} in {:.2}s = {:.0}/s; latency p50={:.2}ms p99={:.2}ms max={:.2}ms; lost={} duplicated={}",
        params.subscribers,
        params.senders,
        params.messages,
        params.format,
        deliveries,
        elapsed.as_secs_f64(),
        deliveries as f64 / elapsed.as_secs_f64(),
        pct(0.50) as f64 / 1000.0,
        pct(0.99) as f64 / 1000.0,
        latencies.last().copied().unwrap_or(0) as f64 / 1000.0,
        lost,
        duplicates,
    );
    if lost > 0 || duplicates > 0 {
        bail!("{lost} deliveries lost and {duplicates} duplicated");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::require_loopback;

    #[test]
    fn only_loopback_targets_are_allowed() {
        for ok in ["http://127.0.0.1:8080", "ws://127.3.2.1:1/v1/ws", "http://localhost:9"] {
            assert!(require_loopback(ok).is_ok(), "{ok}");
        }
        for bad in ["http://10.0.0.1:80", "ws://192.168.1.2/v1/ws", "http://example.com", "http://8.8.8.8"] {
            assert!(require_loopback(bad).is_err(), "{bad}");
        }
    }
}
