//! Abuse at the edge: a client that stops reading, thousands of sockets dropped at once, floods at ten times the
//! per-connection and per-tenant limits, and sockets that connect and never send a byte. Each runs beside counted
//! traffic of well-behaved clients, whose losses, duplicates and latency are judged as in every scenario.

use super::{pick, wait_until, with_traffic, Latency};
use crate::fleet::Shape;
use crate::report::Row;
use crate::traffic::Spec;
use crate::Config;
use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_client::{Auth, Client, ClientError, ConnectOptions, ErrorCode};
use tokio::io::AsyncReadExt;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The slow client must be closed this soon after it stops reading.
const SLOW_CLOSE: Duration = Duration::from_secs(5);
/// Every dropped socket must be back within this.
const ALL_BACK: Duration = Duration::from_secs(60);
/// Connections posting large messages (15 KiB, 14 a second each: under the per-connection op rate) into the slow
/// client's room: about 1.3 MB/s, enough to fill its 1 MiB outbound queue and socket buffers well within
/// `SLOW_CLOSE`.
const FILLERS: usize = 6;
/// Growth of the gateway's RSS allowed while a client does not read.
const SLOW_MEMORY_GROWTH: u64 = 64 << 20;

pub async fn slow_reader(config: &Config) -> Result<Row> {
    let mut row = Row::new("slow-reader", "a client in a busy room stops reading");
    row.bound = None;
    let shape = Shape { gateways: 1, routers: 1, persistors: 1, ..Shape::default() };
    let spec = Spec { rooms: 1, receivers: 20, senders_per_room: 4, rate_per_sender: 5.0 };
    with_traffic(config, row, shape, spec, Latency::Kept, async |fleet, traffic, row| {
        let room = traffic.room_name(0).to_owned();
        let mut slow = RawSocket::open(fleet.gateways[0].port, &traffic.token("slow")).await?;
        slow.join(&room).await?;
        // Large messages into the same room fill the slow client's queue within seconds.
        let fillers: Vec<Arc<Client>> = futures::future::try_join_all(
            (0..FILLERS).map(|i| plain_client(fleet.gateway_ws_url(0), traffic.token(&format!("filler{i}")))),
        )
        .await?;
        for filler in &fillers {
            filler.join(&room, None).await?;
        }
        let rss_before = fleet.gateway_rss(0)?;
        let closes_before = fleet.gateway_metric(0, "switchyard_gateway_slow_consumer_closes_total").await?;
        let stop_filling = tokio_util::sync::CancellationToken::new();
        let mut filling = JoinSet::new();
        for filler in fillers {
            let stop = stop_filling.clone();
            let room = room.clone();
            filling.spawn(async move {
                let padding = "x".repeat(15 * 1024);
                let mut tick = tokio::time::interval(Duration::from_millis(70));
                let mut n = 0u64;
                while !stop.is_cancelled() {
                    tick.tick().await;
                    n += 1;
                    let _ = filler.send(&room, format!("filler {n} {padding}")).await;
                }
            });
        }
        // From here the slow client reads nothing.
        let at = traffic.inject();
        let mut rss_peak = rss_before;
        let mut closed_after = None;
        while at.elapsed() < SLOW_CLOSE * 3 {
            rss_peak = rss_peak.max(fleet.gateway_rss(0)?);
            if fleet.gateway_metric(0, "switchyard_gateway_slow_consumer_closes_total").await? > closes_before {
                closed_after = Some(at.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop_filling.cancel();
        while filling.join_next().await.is_some() {}
        row.recovery = closed_after;
        row.bound = Some(SLOW_CLOSE);
        let code = slow.close_code(Duration::from_secs(10)).await;
        row.details.push(format!("close_code={code:?}"));
        row.details.push(format!("rss_growth_kib={}", rss_peak.saturating_sub(rss_before) / 1024));
        row.check(code == Some(4009), format!("the slow client was closed with {code:?}, not 4009"));
        row.check(closed_after.is_some(), "the slow client was never closed".to_owned());
        row.check(
            rss_peak.saturating_sub(rss_before) <= SLOW_MEMORY_GROWTH,
            format!("gateway RSS grew {} KiB while the client did not read", (rss_peak - rss_before) / 1024),
        );
        Ok(())
    })
    .await
}

pub async fn mass_drop(config: &Config) -> Result<Row> {
    let sockets = pick(config, 1_000, 5_000);
    let mut row = Row::new("mass-drop", format!("{sockets} sockets cut at once"));
    row.bound = Some(ALL_BACK);
    let spec = Spec { rooms: sockets / 50, receivers: sockets, senders_per_room: 1, rate_per_sender: 0.5 };
    with_traffic(config, row, Shape::default(), spec, Latency::MayRise, async |fleet, traffic, row| {
        let at = traffic.inject();
        fleet.balancer.cut_all();
        let back = wait_until(ALL_BACK + Duration::from_secs(5), || traffic.reconnected_since(at) == sockets).await;
        let all_back = at.elapsed();
        row.check(back, format!("only {} of {sockets} sockets came back", traffic.reconnected_since(at)));
        // The recovery here is every socket back, not the first message after the cut.
        row.recovery = Some(all_back);
        let mut times = traffic.reconnect_times_ms(at);
        times.sort_unstable();
        if times.is_empty() {
            bail!("no socket reconnected");
        }
        let at_q = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        row.details.push(format!(
            "reconnect_ms p10={} p50={} p90={} max={}",
            at_q(0.1),
            at_q(0.5),
            at_q(0.9),
            times[times.len() - 1]
        ));
        // Full jitter spreads the first attempts over the backoff base; without it they come back in one burst.
        row.check(at_q(0.9) - at_q(0.1) >= 150, "reconnects were not spread (p10..p90 under 150 ms)".to_owned());
        Ok(())
    })
    .await
}

pub async fn flood(config: &Config) -> Result<Row> {
    let seconds = pick(config, 10u64, 30);
    let row = Row::new("flood", format!("{seconds}s at 10x the op rate of a connection and the msg rate of a tenant"));
    // One gateway, so the flood lands where the well-behaved clients are.
    let shape = Shape { gateways: 1, ..Shape::default() };
    let spec = Spec { rooms: 4, receivers: 40, senders_per_room: 1, rate_per_sender: 5.0 };
    with_traffic(config, row, shape, spec, Latency::Kept, async |fleet, traffic, row| {
        // The abusing tenant: 100 msgs/s for the whole tenant, with a small burst; the gateway allows 20 ops/s per
        // connection. What the tenant is allowed through is legitimate load, not the fault: a large burst (the
        // first 200 messages at the flood's full 1,000/s) only measures the fleet's capacity, which debug builds
        // on two cores lack for a fraction of a second.
        let (tenant_rate, tenant_burst) = (100, 20);
        let abuser =
            fleet.create_tenant(serde_json::json!({"msgs_per_sec": tenant_rate, "msgs_burst": tenant_burst})).await?;
        // Each flooding connection sends to a room of its own: what the tenant is allowed through then costs one
        // delivery, so the scenario measures what refusing the excess costs the others, not the tenant's fan-out.
        let single = plain_client(fleet.gateway_ws_url(0), abuser.token("single")).await?;
        single.join("flooded", None).await?;
        let many: Vec<Arc<Client>> = futures::future::try_join_all(
            (0..50).map(|i| plain_client(fleet.gateway_ws_url(0), abuser.token(&format!("many{i}")))),
        )
        .await?;
        for (i, client) in many.iter().enumerate() {
            client.join(&format!("flooded-{i}"), None).await?;
        }
        let single_counts = Arc::new(Counts::default());
        let tenant_counts = Arc::new(Counts::default());
        let until = Instant::now() + Duration::from_secs(seconds);
        traffic.inject();
        let mut flooding = JoinSet::new();
        // 200 ops/s on one connection: ten times its 20.
        flooding.spawn(pace(single, "flooded".to_owned(), 200.0, until, single_counts.clone()));
        // 50 connections at 20/s each (within their own limit): 1,000 msgs/s, ten times the tenant's 100.
        for (i, client) in many.into_iter().enumerate() {
            flooding.spawn(pace(client, format!("flooded-{i}"), 20.0, until, tenant_counts.clone()));
        }
        while flooding.join_next().await.is_some() {}
        let (s, t) = (&single_counts, &tenant_counts);
        let unchecked = fleet.gateway_metric(0, "switchyard_gateway_tenant_rate_unchecked_total").await?;
        row.details.push(format!(
            "one connection: acked={} limited={} closed_4008={}; tenant: acked={} limited={}; rate checks skipped={}",
            s.acked.load(Ordering::Relaxed),
            s.limited.load(Ordering::Relaxed),
            s.closed.load(Ordering::Relaxed),
            t.acked.load(Ordering::Relaxed),
            t.limited.load(Ordering::Relaxed),
            unchecked as u64,
        ));
        row.check(
            s.limited.load(Ordering::Relaxed) > 0 || s.closed.load(Ordering::Relaxed) > 0,
            "the flooding connection was neither limited nor closed".to_owned(),
        );
        // The tenant's cap: 100/s plus its burst, with a fifth of slack for the window edges.
        let tenant_cap = (tenant_rate * seconds + tenant_burst) * 6 / 5;
        let tenant_acked = t.acked.load(Ordering::Relaxed) as u64;
        row.check(
            tenant_acked <= tenant_cap,
            format!("the tenant got {tenant_acked} messages through (cap {tenant_cap})"),
        );
        row.check(t.limited.load(Ordering::Relaxed) > 0, "the tenant flood was never limited".to_owned());
        Ok(())
    })
    .await
}

pub async fn idle_sockets(config: &Config) -> Result<Row> {
    let sockets = 1_000;
    let deadline = Duration::from_millis(pick(config, 3_000, 10_000));
    let row = Row::new("idle-sockets", format!("{sockets} TCP sockets that never send a byte"));
    let shape = Shape {
        gateways: 1,
        gateway_toml: format!("header_read_timeout_ms = {}\n", deadline.as_millis()),
        ..Shape::default()
    };
    let spec = Spec { rooms: 2, receivers: 10, senders_per_room: 1, rate_per_sender: 5.0 };
    with_traffic(config, row, shape, spec, Latency::Kept, async |fleet, traffic, row| {
        let port = fleet.gateways[0].port;
        traffic.inject();
        let mut open = JoinSet::new();
        for i in 0..sockets {
            // 50 at a time, so the listen backlog never overflows (a dropped handshake would never reach the
            // gateway, and the gateway cannot close what it never accepted).
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            open.spawn(async move {
                let started = Instant::now();
                let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let mut buf = [0u8; 64];
                // Wait for the server to close (EOF or reset); give up well after the deadline.
                let _ = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf)).await;
                Ok::<_, std::io::Error>(started.elapsed())
            });
        }
        let mut times = Vec::new();
        while let Some(done) = open.join_next().await {
            match done {
                Ok(Ok(took)) => times.push(took),
                Ok(Err(error)) => row.fail(format!("an idle socket could not connect: {error}")),
                Err(error) => row.fail(format!("an idle socket's task failed: {error}")),
            }
        }
        times.sort_unstable();
        let (first, last) = (times.first().copied(), times.last().copied());
        row.recovery = last;
        row.bound = Some(deadline + Duration::from_secs(2));
        row.details.push(format!("closed_between_s={:.2}..{:.2}", secs(first), secs(last)));
        row.check(times.len() == sockets, format!("{} of {sockets} idle sockets closed", times.len()));
        row.check(
            first.is_some_and(|f| f + Duration::from_millis(250) >= deadline),
            format!("an idle socket was closed before the deadline ({:.2}s)", secs(first)),
        );
        Ok(())
    })
    .await
}

fn secs(d: Option<Duration>) -> f64 {
    d.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN)
}

/// What a flooding client got back.
#[derive(Default)]
struct Counts {
    acked: AtomicUsize,
    limited: AtomicUsize,
    closed: AtomicUsize,
}

/// Send to `room` at `rate` per second until `until`, each send on its own task so the pace never waits for
/// replies.
async fn pace(client: Arc<Client>, room: String, rate: f64, until: Instant, counts: Arc<Counts>) {
    let room: Arc<str> = room.into();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut sends = JoinSet::new();
    let mut n = 0u64;
    while Instant::now() < until {
        tick.tick().await;
        n += 1;
        let (sender, counts, room) = (client.clone(), counts.clone(), room.clone());
        sends.spawn(async move {
            match sender.send(&room, format!("flood {n}")).await {
                Ok(_) => counts.acked.fetch_add(1, Ordering::Relaxed),
                Err(ClientError::Server { code: ErrorCode::RateLimited, .. }) => {
                    counts.limited.fetch_add(1, Ordering::Relaxed)
                }
                Err(ClientError::Closed(Some(close))) if close.code == 4008 => {
                    counts.closed.fetch_add(1, Ordering::Relaxed)
                }
                Err(_) => 0,
            };
        });
        if client.close_info().is_some() {
            break;
        }
    }
    while sends.join_next().await.is_some() {}
}

async fn plain_client(url: String, token: String) -> Result<Arc<Client>> {
    let mut options = ConnectOptions::new(url, Auth::Header(token));
    options.connect_timeout = Duration::from_secs(20);
    Ok(Arc::new(Client::connect(options).await.context("connecting a plain client")?))
}

/// A WebSocket held by hand, on a socket with a small receive buffer, so it can stop reading.
struct RawSocket {
    stream: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
}

impl RawSocket {
    async fn open(port: u16, token: &str) -> Result<RawSocket> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let tcp = socket.connect(([127, 0, 0, 1], port).into()).await?;
        let mut request = format!("ws://127.0.0.1:{port}/v1/ws").into_client_request()?;
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
        let (stream, _) = tokio_tungstenite::client_async(request, tcp).await.context("raw WebSocket upgrade")?;
        let mut raw = RawSocket { stream };
        raw.until(|text| text.contains("\"hello\"")).await?;
        Ok(raw)
    }

    async fn join(&mut self, room: &str) -> Result<()> {
        let frame = serde_json::json!({"op": "join", "rid": 1, "room": room}).to_string();
        self.stream.send(Message::Text(frame.into())).await?;
        self.until(|text| text.contains("\"ok\"") && text.contains("\"rid\":1")).await
    }

    async fn until(&mut self, done: impl Fn(&str) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(20), self.stream.next()).await {
                Ok(Some(Ok(Message::Text(text)))) if done(text.as_str()) => return Ok(()),
                Ok(Some(Ok(_))) => {}
                other => bail!("raw socket: {other:?}"),
            }
        }
        bail!("raw socket: nothing matched in time")
    }

    /// Read everything that is buffered, up to the close frame; its code.
    async fn close_code(&mut self, limit: Duration) -> Option<u16> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match tokio::time::timeout(limit, self.stream.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => {}
                _ => return None,
            }
        }
        None
    }
}
