//! `history_bench`: how long one history page takes in a room whose only message is followed by a long run of
//! non-message events (joins and leaves), against the CQL store or the embedded store.
//!
//! Each run writes, through the store's own `apply` (large batches, several at once), one message at seq 1 and
//! then `--events` events alternating `joined` and `left` into a fresh room of a fresh tenant. Then it times
//! `--pages` requests of each kind, one after the other after one untimed warm-up: the latest page (no bound) and
//! the page before seq `events + 2`. Every page must hold exactly the one message. It prints p50, p99 and the
//! slowest request with the command that produced them. It only talks to a loopback CQL server and does not start
//! it: run `cargo xtask services` first and pass (or export) its address. The keyspace (`--keyspace`, default
//! `switchyard_bench`) is created or migrated to this release's schema. It does not go through NATS or a
//! persistor; `persist_bench` measures that path.

use anyhow::{bail, Context, Result};
use futures::{StreamExt, TryStreamExt};
use std::time::{Duration, Instant};
use switchyard_persistor::store::cql::CqlStore;
use switchyard_persistor::store::embedded::EmbeddedStore;
use switchyard_persistor::store::{HistoryQuery, HistoryStore};
use switchyard_persistor::AnyStore;
use switchyard_protocol::internal::{EventBody, RoomEvent, INTERNAL_VERSION};
use switchyard_protocol::{limits, MessageId, ProjectId, RoomId, UserId};

/// Events per `apply` call while loading the room.
const LOAD_BATCH: usize = 10_000;

/// `apply` calls in flight at once while loading the room.
const LOAD_CONCURRENCY: usize = 4;

#[derive(Debug)]
struct Params {
    cql: Option<String>,
    keyspace: String,
    store: String,
    events: u64,
    pages: usize,
    limit: u32,
}

fn parse_args() -> Result<Params> {
    let mut params = Params {
        cql: std::env::var("SWITCHYARD_TEST_CQL").ok(),
        keyspace: "switchyard_bench".into(),
        store: "cql".into(),
        events: 1_000_000,
        pages: 50,
        limit: limits::HISTORY_DEFAULT_LIMIT,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let [name, value] = pair else { bail!("every option needs a value: {pair:?}") };
        match name.as_str() {
            "--cql" => params.cql = Some(value.clone()),
            "--keyspace" => params.keyspace = value.clone(),
            "--store" => {
                params.store = match value.as_str() {
                    "cql" | "embedded" => value.clone(),
                    other => bail!("--store cql|embedded, not {other}"),
                }
            }
            "--events" => params.events = value.parse()?,
            "--pages" => params.pages = value.parse()?,
            "--limit" => params.limit = value.parse()?,
            other => bail!("unknown option {other}; options: --cql --keyspace --store --events --pages --limit"),
        }
    }
    if params.events > 100_000_000 || params.pages == 0 || !(1..=limits::HISTORY_MAX_LIMIT).contains(&params.limit) {
        bail!("events at most 100,000,000, pages positive, limit 1..=100");
    }
    if let Some(cql) = &params.cql {
        require_loopback(cql)?;
    }
    Ok(params)
}

/// Refuse any CQL node that is not on this machine's loopback.
fn require_loopback(node: &str) -> Result<()> {
    let host = node.split([':', ',']).next().unwrap_or("");
    let loopback = host == "localhost" || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        bail!("refusing CQL node {node}: only loopback (127.0.0.0/8, localhost) servers are allowed");
    }
    Ok(())
}

/// The room's events: one message at seq 1, then `events` joins and leaves at seqs 2..=events + 1.
fn room_events(tenant: &ProjectId, room: &RoomId, events: u64, base_us: u64) -> Result<Vec<RoomEvent>> {
    let user = UserId::parse("bench").context("user id")?;
    let event = |seq: u64, body: EventBody| RoomEvent {
        v: INTERNAL_VERSION,
        tenant: tenant.clone(),
        room: room.clone(),
        seq,
        ts_us: base_us + seq,
        tally: Default::default(),
        expires_ms: None,
        body,
    };
    let mut out = Vec::with_capacity(events as usize + 1);
    out.push(event(
        1,
        EventBody::Msg {
            id: MessageId::generate(base_us / 1000),
            from: user.clone(),
            body: "the only message".into(),
            attrs: None,
            reply_to: None,
        },
    ));
    for seq in 2..=events + 1 {
        let body = if seq % 2 == 0 {
            EventBody::Joined { user: user.clone() }
        } else {
            EventBody::Left { user: user.clone(), by: None }
        };
        out.push(event(seq, body));
    }
    Ok(out)
}

/// Nearest-rank percentile of sorted durations, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
}

async fn bench(params: &Params, store: &AnyStore) -> Result<()> {
    let tenant = ProjectId::generate();
    let room = RoomId::parse("history-bench").context("room id")?;
    let base_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
    let events = room_events(&tenant, &room, params.events, base_us)?;

    let loaded = Instant::now();
    futures::stream::iter(events.chunks(LOAD_BATCH).map(|batch| store.apply(batch)))
        .buffer_unordered(LOAD_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .context("loading the room")?;
    let load_secs = loaded.elapsed().as_secs_f64();
    let last = store.last_seq(&tenant, &room).await?;
    if last != params.events + 1 {
        bail!("the store's last seq is {last} after loading, not {}", params.events + 1);
    }
    println!(
        "history_bench store={} events={} loaded_in={load_secs:.1}s events_per_sec={:.0}",
        params.store,
        events.len(),
        events.len() as f64 / load_secs
    );

    for (name, before) in [("latest", None), ("before_last", Some(params.events + 2))] {
        let query =
            HistoryQuery { tenant: tenant.clone(), room: room.clone(), before, after: None, limit: params.limit };
        let mut took = Vec::with_capacity(params.pages);
        for i in 0..=params.pages {
            let started = Instant::now();
            let page = store.history(&query).await?;
            let elapsed = started.elapsed();
            if page.messages.len() != 1 || page.messages[0].seq != 1 || page.more {
                bail!("the {name} page holds {:?} (more: {}), not the one message", page.messages, page.more);
            }
            // The first request warms up the connection and the statement; it is not counted.
            if i > 0 {
                took.push(elapsed);
            }
        }
        took.sort();
        println!(
            "history_bench store={} query={name} limit={} pages={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
            params.store,
            params.limit,
            took.len(),
            percentile_ms(&took, 50.0),
            percentile_ms(&took, 99.0),
            percentile_ms(&took, 100.0)
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let params = parse_args()?;
    let command: Vec<String> = std::env::args().collect();
    println!("history_bench command: {}", command.join(" "));
    let dir = tempfile::tempdir()?;
    let store = match params.store.as_str() {
        "cql" => {
            let node = params.cql.clone().context("--cql host:port (or SWITCHYARD_TEST_CQL) is needed for cql")?;
            AnyStore::Cql(CqlStore::connect(&[node], &params.keyspace).await?)
        }
        _ => AnyStore::Embedded(EmbeddedStore::open(&dir.path().join("history-bench.redb"))?),
    };
    bench(&params, &store).await
}
