//! `persist_bench`: how many events per second the persistor writes into its store, through its real ingest path
//! (the durable JetStream consumer, batching, store writes, acks), into Cassandra and into the embedded store.
//!
//! Each run first lets a persistor drain whatever the shared consumer still holds, then appends `--events` room
//! messages (spread over `--rooms` rooms of a fresh tenant) to the events stream with no persistor running, then
//! starts one persistor and times it from start to the moment the consumer has nothing pending and nothing
//! unacknowledged. It checks every room's last seq in the store afterwards. It only talks to loopback servers and
//! does not start them: run `cargo xtask services` first and pass (or export) their addresses.

use anyhow::{bail, Context, Result};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_persistor::store::cql::CqlStore;
use switchyard_persistor::store::embedded::EmbeddedStore;
use switchyard_persistor::store::HistoryStore;
use switchyard_persistor::{AnyStore, PersistorConfig};
use switchyard_protocol::internal::{EventBody, RoomEvent, INTERNAL_VERSION};
use switchyard_protocol::shard::shard_of_room;
use switchyard_protocol::{codec, subjects, MessageId, ProjectId, RoomId, UserId};
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct Params {
    nats: String,
    cql: Option<String>,
    stores: Vec<String>,
    events: u64,
    rooms: u64,
    body_bytes: usize,
    batch_max: usize,
    in_flight: usize,
    /// Replicas of the events stream when the benchmark creates it (3 on a NATS cluster).
    replicas: usize,
}

fn parse_args() -> Result<Params> {
    let mut params = Params {
        nats: std::env::var("SWITCHYARD_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        cql: std::env::var("SWITCHYARD_TEST_CQL").ok(),
        stores: vec!["cql".into(), "embedded".into()],
        events: 200_000,
        rooms: 1_000,
        body_bytes: 100,
        batch_max: PersistorConfig::default().batch_max,
        in_flight: PersistorConfig::default().batches_in_flight,
        replicas: std::env::var("SWITCHYARD_TEST_NATS_REPLICAS").ok().and_then(|r| r.parse().ok()).unwrap_or(1),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let [name, value] = pair else { bail!("every option needs a value: {pair:?}") };
        match name.as_str() {
            "--nats" => params.nats = value.clone(),
            "--cql" => params.cql = Some(value.clone()),
            "--store" => {
                params.stores = match value.as_str() {
                    "both" => vec!["cql".into(), "embedded".into()],
                    "cql" | "embedded" => vec![value.clone()],
                    other => bail!("--store cql|embedded|both, not {other}"),
                }
            }
            "--events" => params.events = value.parse()?,
            "--rooms" => params.rooms = value.parse()?,
            "--body-bytes" => params.body_bytes = value.parse()?,
            "--batch-max" => params.batch_max = value.parse()?,
            "--in-flight" => params.in_flight = value.parse()?,
            "--replicas" => params.replicas = value.parse()?,
            other => bail!(
                "unknown option {other}; options: --nats --cql --store --events --rooms --body-bytes --batch-max \
                 --in-flight --replicas"
            ),
        }
    }
    if params.events == 0 || params.rooms == 0 || params.events > 5_000_000 || params.body_bytes > 60_000 {
        bail!("events (1..=5,000,000) and rooms must be positive, body at most 60,000 bytes");
    }
    if !(1..=5).contains(&params.replicas) {
        bail!("--replicas is 1..=5");
    }
    for url in params.nats.split(',') {
        require_loopback(url.trim())?;
    }
    if let Some(cql) = &params.cql {
        require_loopback(&format!("cql://{cql}"))?;
    }
    Ok(params)
}

/// Refuse any target that is not on this machine's loopback.
fn require_loopback(url: &str) -> Result<()> {
    let host = url.split("://").nth(1).unwrap_or("").split(['/', ':', ',']).next().unwrap_or("");
    let loopback = host == "localhost" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("refusing {url}: only loopback (127.0.0.0/8, localhost) servers are allowed");
    }
    Ok(())
}

/// The shared consumer's pending plus unacknowledged events (`None` before a persistor created it).
async fn backlog(js: &async_nats::jetstream::Context) -> Result<Option<u64>> {
    let stream = js.get_stream(subjects::EVENTS_STREAM).await.context("events stream")?;
    Ok(stream.consumer_info(subjects::PERSISTOR_CONSUMER).await.ok().map(|i| i.num_pending + i.num_ack_pending as u64))
}

/// A persistor running in this process on `store`, the same `run_with_store` the binary calls.
struct Running {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), switchyard_persistor::PersistorError>>,
}

fn start(params: &Params, store: Arc<AnyStore>) -> Running {
    let config = PersistorConfig {
        nats_url: params.nats.clone(),
        nats_replicas: params.replicas,
        batch_max: params.batch_max,
        batches_in_flight: params.in_flight,
        ..PersistorConfig::default()
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(switchyard_persistor::run_with_store(config, store, shutdown.clone()));
    Running { shutdown, task }
}

impl Running {
    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await.context("persistor task")?.context("persistor")?;
        Ok(())
    }
}

/// Wait until the consumer exists and holds nothing; the time it took.
async fn drained(js: &async_nats::jetstream::Context, limit: Duration) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if backlog(js).await? == Some(0) {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("the persistor did not drain the consumer within {limit:?} ({:?} left)", backlog(js).await?);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn bench(params: &Params, js: &async_nats::jetstream::Context, kind: &str, store: AnyStore) -> Result<()> {
    let store = Arc::new(store);
    // 1. Empty the consumer of anything older.
    let persistor = start(params, store.clone());
    drained(js, Duration::from_secs(600)).await?;
    persistor.stop().await?;

    // 2. Append the events with no persistor running.
    let tenant = ProjectId::generate();
    let rooms: Vec<RoomId> =
        (0..params.rooms).map(|r| RoomId::parse(&format!("bench-{r}")).expect("room id")).collect();
    let from = UserId::parse("bench").expect("user id");
    let body = "x".repeat(params.body_bytes);
    let per_room = params.events.div_ceil(params.rooms);
    let base_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
    let appended = Instant::now();
    let mut acks = Vec::with_capacity(1_000);
    let mut count = 0u64;
    'fill: for seq in 1..=per_room {
        for room in &rooms {
            if count == params.events {
                break 'fill;
            }
            let ts_us = base_us + seq * 1_000;
            let event = RoomEvent {
                v: INTERNAL_VERSION,
                tenant: tenant.clone(),
                room: room.clone(),
                seq,
                ts_us,
                tally: Default::default(),
                expires_ms: None,
                body: EventBody::Msg {
                    id: MessageId::generate(ts_us / 1000),
                    from: from.clone(),
                    body: body.clone(),
                    attrs: None,
                    reply_to: None,
                },
            };
            let subject = subjects::event_log(shard_of_room(&tenant, room, 64), &tenant, room);
            acks.push(js.publish(subject, codec::encode(&event)?).await.context("publish")?);
            if acks.len() == 1_000 {
                for ack in acks.drain(..) {
                    ack.await.context("stream ack")?;
                }
            }
            count += 1;
        }
    }
    for ack in acks.drain(..) {
        ack.await.context("stream ack")?;
    }
    let append_secs = appended.elapsed().as_secs_f64();

    // 3. One persistor, timed from its start until everything is written and acknowledged.
    let persistor = start(params, store.clone());
    let took = drained(js, Duration::from_secs(1_800)).await?;
    persistor.stop().await?;

    // 4. The store holds every room up to its last seq.
    let mut short = 0;
    for (i, room) in rooms.iter().enumerate() {
        let want = (params.events / params.rooms) + u64::from((i as u64) < params.events % params.rooms);
        if store.last_seq(&tenant, room).await? != want {
            short += 1;
        }
    }
    if short > 0 {
        bail!("{short} rooms do not hold their last seq after the run");
    }
    println!(
        "persist_bench store={kind} events={count} rooms={} body_bytes={} batch_max={} in_flight={} \
         appended_in={append_secs:.1}s written_in={:.1}s events_per_sec={:.0}",
        params.rooms,
        params.body_bytes,
        params.batch_max,
        params.in_flight,
        took.as_secs_f64(),
        count as f64 / took.as_secs_f64()
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let params = parse_args()?;
    let servers: Vec<&str> = params.nats.split(',').map(str::trim).collect();
    let nats = async_nats::connect(servers).await.context("connect to NATS")?;
    let js = async_nats::jetstream::new(nats);
    js.get_or_create_stream(switchyard_router_shard::events_stream_config(&switchyard_router_shard::RouterConfig {
        nats_replicas: params.replicas,
        ..switchyard_router_shard::RouterConfig::default()
    }))
    .await
    .context("events stream")?;
    let dir = tempfile::tempdir()?;
    for kind in &params.stores {
        let store = match kind.as_str() {
            "cql" => {
                let node = params.cql.clone().context("--cql host:port (or SWITCHYARD_TEST_CQL) is needed for cql")?;
                AnyStore::Cql(CqlStore::connect(&[node], "switchyard_bench").await?)
            }
            _ => AnyStore::Embedded(EmbeddedStore::open(&dir.path().join("bench.redb"))?),
        };
        bench(&params, &js, kind, store).await?;
    }
    Ok(())
}
