//! The persistor's promise, tested end to end on the real servers: every event of the stream ends in the store
//! exactly once in effect, across SIGKILLs of the persistor process, redelivered creates, a poison event and a
//! 30-second outage of the real Cassandra.
//!
//! The persistor runs as a process of its own (the `switchyard-persistor` binary) where it gets killed or where its
//! dead-letter log line is checked, and in-process (the same `run_with_store`) where the test needs its store.
//! Events are appended straight to the events stream with the protocol's encoding, as router shards append them,
//! except in the outage test, which drives a whole fleet through WebSocket clients. The tests share one durable
//! consumer, so they run one at a time. This file does not test the stores' own semantics (the conformance suite
//! does).

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_client::{ClientOp, Format, Reply, ServerEvent};
use switchyard_persistor::ingest::dead_letter_headers;
use switchyard_persistor::store::cql::CqlStore;
use switchyard_persistor::store::embedded::EmbeddedStore;
use switchyard_persistor::store::{HistoryQuery, HistoryStore};
use switchyard_persistor::{AnyStore, PersistorConfig};
use switchyard_protocol::internal::{EventBody, RoomEvent, INTERNAL_VERSION};
use switchyard_protocol::shard::shard_of_room;
use switchyard_protocol::{codec, subjects, MessageId, ProjectId, RoomId, UserId};
use switchyard_testkit::{cql_node, nats_replicas, nats_servers, nats_url, Fleet, StoreKind};
use tokio_util::sync::CancellationToken;

/// The keyspace these tests write to.
const KEYSPACE: &str = "switchyard_durability";

/// One test at a time: they share the persistors' durable consumer (and one pauses Cassandra).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn jetstream() -> async_nats::jetstream::Context {
    let nats = async_nats::connect(nats_servers()).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(nats);
    // Router shards create the stream; these tests run none, so create it the same way when it is missing.
    js.get_or_create_stream(switchyard_router_shard::events_stream_config(
        &switchyard_router_shard::RouterConfig::default(),
    ))
    .await
    .expect("events stream");
    js
}

/// The shared consumer's (pending, ack pending); (0, 0) before any persistor created it.
async fn backlog(js: &async_nats::jetstream::Context) -> (u64, usize) {
    let stream = js.get_stream(subjects::EVENTS_STREAM).await.expect("events stream");
    match stream.consumer_info(subjects::PERSISTOR_CONSUMER).await {
        Ok(info) => (info.num_pending, info.num_ack_pending),
        Err(_) => (u64::MAX, 0),
    }
}

/// Wait until the consumer has nothing pending and nothing unacknowledged.
async fn wait_drained(js: &async_nats::jetstream::Context, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    loop {
        let (pending, ack_pending) = backlog(js).await;
        if pending == 0 && ack_pending == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {pending} pending, {ack_pending} unacked after {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn room(name: &str) -> RoomId {
    RoomId::parse(name).expect("room id")
}

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("user id")
}

/// Event time of `seq`: strictly increasing, as a room actor assigns it.
fn ts_us(seq: u64) -> u64 {
    1_760_000_000_000_000 + seq * 1_000
}

fn event(tenant: &ProjectId, room: &RoomId, seq: u64, body: EventBody) -> RoomEvent {
    RoomEvent {
        v: INTERNAL_VERSION,
        tenant: tenant.clone(),
        room: room.clone(),
        seq,
        ts_us: ts_us(seq),
        tally: Default::default(),
        expires_ms: None,
        body,
    }
}

fn msg(tenant: &ProjectId, room: &RoomId, seq: u64) -> RoomEvent {
    let body = EventBody::Msg {
        id: MessageId::generate(ts_us(seq) / 1000),
        from: user("alice"),
        body: format!("message {seq}"),
        attrs: None,
        reply_to: None,
    };
    event(tenant, room, seq, body)
}

/// Append one event to the events stream on its room's subject; its stream sequence.
async fn append(js: &async_nats::jetstream::Context, event: &RoomEvent) -> u64 {
    let subject = subjects::event_log(shard_of_room(&event.tenant, &event.room, 64), &event.tenant, &event.room);
    let payload = codec::encode(event).expect("encode event");
    js.publish(subject, payload).await.expect("publish").await.expect("stream ack").sequence
}

/// Append many events, a thousand acks in flight at a time.
async fn append_all(js: &async_nats::jetstream::Context, events: &[RoomEvent]) {
    for chunk in events.chunks(1_000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for event in chunk {
            let subject =
                subjects::event_log(shard_of_room(&event.tenant, &event.room, 64), &event.tenant, &event.room);
            let payload = codec::encode(event).expect("encode event");
            acks.push(js.publish(subject, payload).await.expect("publish"));
        }
        for ack in acks {
            ack.await.expect("stream ack");
        }
    }
}

/// Every message of a room in the store, paged forward 100 at a time: (seq, body) in store order.
async fn stored<S: HistoryStore>(store: &S, tenant: &ProjectId, room: &RoomId) -> Vec<(u64, Option<String>)> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let query =
            HistoryQuery { tenant: tenant.clone(), room: room.clone(), before: None, after: Some(after), limit: 100 };
        let page = store.history(&query).await.expect("history page");
        out.extend(page.messages.iter().map(|m| (m.seq, m.body.clone())));
        match page.messages.last() {
            Some(last) if page.more => after = last.seq,
            _ => return out,
        }
    }
}

/// `switchyard-persistor` processes, one after the other, each logging to a file of the guard's directory.
/// Dropping the guard kills the one still running, also when the test panics.
struct Persistors {
    dir: tempfile::TempDir,
    env: Vec<(String, String)>,
    started: usize,
    child: Option<Child>,
}

impl Persistors {
    fn new(extra: &[(&str, &str)]) -> Persistors {
        let mut env: Vec<(String, String)> = vec![
            ("SWITCHYARD_NATS_URL".into(), nats_url()),
            ("SWITCHYARD_NATS_REPLICAS".into(), nats_replicas().to_string()),
            ("SWITCHYARD_STORE".into(), format!("cql:{}", cql_node())),
            ("SWITCHYARD_CQL_KEYSPACE".into(), KEYSPACE.into()),
            ("SWITCHYARD_CQL_MIGRATE_ON_START".into(), "true".into()),
            // Redeliver what a killed persistor held after 3 s instead of 30.
            ("SWITCHYARD_ACK_WAIT_MS".into(), "3000".into()),
            ("SWITCHYARD_OUTAGE_RETRY_MAX_MS".into(), "1000".into()),
            ("RUST_LOG".into(), "warn,switchyard_persistor=info".into()),
            ("NO_COLOR".into(), "1".into()),
            // The redelivery count is read from the readable lines (`redelivered=N`).
            ("SWITCHYARD_LOG_FORMAT".into(), "pretty".into()),
        ];
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Persistors { dir: tempfile::tempdir().expect("temp dir"), env, started: 0, child: None }
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "a persistor is already running");
        let log = std::fs::File::create(self.dir.path().join(format!("persistor-{}.log", self.started)))
            .expect("persistor log file");
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard-persistor"))
            .env_remove("SWITCHYARD_CONFIG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start switchyard-persistor");
        self.started += 1;
        self.child = Some(child);
    }

    fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit.
    async fn terminate(&mut self) {
        let mut child = self.child.take().expect("a persistor is running");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait for the persistor") {
                assert!(status.success(), "persistor exited with {status} after SIGTERM:\n{}", self.logs());
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("persistor did not stop within 30 s of SIGTERM:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every incarnation's output, in order, without terminal colour codes.
    fn logs(&self) -> String {
        let text = (0..self.started)
            .map(|i| std::fs::read_to_string(self.dir.path().join(format!("persistor-{i}.log"))).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let mut plain = String::with_capacity(text.len());
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // Skip `ESC [ ... letter`.
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        plain
    }
}

impl Drop for Persistors {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// The sum of `redelivered=N` over the persistors' "batch holds redelivered events" lines.
fn redeliveries_logged(logs: &str) -> u64 {
    logs.lines()
        .filter(|line| line.contains("batch holds redelivered events"))
        .filter_map(|line| line.split("redelivered=").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok())
        .sum()
}

/// 100,000 events, the persistor SIGKILLed five times while writing them: the store ends with each exactly once,
/// and the killed persistors' unacknowledged events were redelivered (counted from the persistors' log lines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_five_times_loses_and_duplicates_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let js = jetstream().await;
    const ROOMS: u64 = 20;
    const PER_ROOM: u64 = 5_000;
    let tenant = ProjectId::generate();
    let rooms: Vec<RoomId> = (0..ROOMS).map(|r| room(&format!("kill-{r}"))).collect();
    // Interleave the rooms, each in seq order, as router shards append them.
    let events: Vec<RoomEvent> = (1..=PER_ROOM)
        .flat_map(|seq| rooms.iter().map(move |r| (r.clone(), seq)))
        .map(|(r, seq)| msg(&tenant, &r, seq))
        .collect();
    assert_eq!(events.len(), 100_000);

    let started = Instant::now();
    let mut persistors = Persistors::new(&[]);
    persistors.start();
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move { append_all(&js, &events).await })
    };
    for kill_no in 1..=5 {
        // Let this incarnation connect and write for a while, then kill it in the middle of its batches.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (_, ack_pending) = backlog(&js).await;
            if ack_pending > 0 {
                break;
            }
            assert!(Instant::now() < deadline, "persistor {kill_no} took nothing in 30 s:\n{}", persistors.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let (pending, ack_pending) = backlog(&js).await;
        persistors.sigkill();
        eprintln!("SIGKILL {kill_no} at {:?}: {pending} pending, {ack_pending} unacked", started.elapsed());
        persistors.start();
    }
    publisher.await.expect("publisher");
    wait_drained(&js, Duration::from_secs(240), "after five SIGKILLs").await;
    // The last one stops gracefully.
    persistors.terminate().await;
    eprintln!("all 100,000 events acked {:?} after the start", started.elapsed());

    let store = CqlStore::connect(&[cql_node()], KEYSPACE).await.expect("connect to Cassandra");
    let mut total = 0;
    for r in &rooms {
        let rows = stored(&store, &tenant, r).await;
        let want: Vec<(u64, Option<String>)> = (1..=PER_ROOM).map(|s| (s, Some(format!("message {s}")))).collect();
        assert_eq!(rows.len() as u64, PER_ROOM, "room {r}: {} rows", rows.len());
        assert_eq!(rows, want, "room {r}: every seq exactly once, with its own body");
        total += rows.len();
    }
    assert_eq!(total, 100_000);
    let redelivered = redeliveries_logged(&persistors.logs());
    eprintln!("{redelivered} redeliveries; whole test {:?}", started.elapsed());
    assert!(redelivered > 0, "the kills must have caused redeliveries:\n{}", persistors.logs());
}

/// A create delivered again after its edit, and after its delete, changes nothing: the edit stays, the deleted
/// message never returns. Through the real ingest path, on both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_redelivered_after_edit_and_delete_changes_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let js = jetstream().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let stores = [
        AnyStore::Cql(CqlStore::connect(&[cql_node()], KEYSPACE).await.expect("connect to Cassandra")),
        AnyStore::Embedded(EmbeddedStore::open(dir.path()).expect("embedded store")),
    ];
    for store in stores {
        let store = Arc::new(store);
        let shutdown = CancellationToken::new();
        let persistor = {
            let (store, shutdown) = (store.clone(), shutdown.clone());
            let config =
                PersistorConfig { nats_url: nats_url(), nats_replicas: nats_replicas(), ..PersistorConfig::default() };
            tokio::spawn(async move { switchyard_persistor::run_with_store(config, store, shutdown).await })
        };
        let tenant = ProjectId::generate();
        let r = room("redelivered");
        let create = msg(&tenant, &r, 1);
        let edit = event(&tenant, &r, 2, EventBody::Edit { target: 1, from: user("alice"), body: "edited".into() });
        let query = HistoryQuery { tenant: tenant.clone(), room: r.clone(), before: None, after: None, limit: 10 };

        append(&js, &create).await;
        append(&js, &edit).await;
        wait_drained(&js, Duration::from_secs(30), "create and edit").await;
        append(&js, &create).await;
        wait_drained(&js, Duration::from_secs(30), "the create again").await;
        let page = store.history(&query).await.expect("history");
        assert_eq!(page.messages.len(), 1, "{page:?}");
        assert_eq!(page.messages[0].body.as_deref(), Some("edited"), "the edit stays: {page:?}");
        assert!(page.messages[0].edited_ts.is_some());

        let second = msg(&tenant, &r, 3);
        let delete = event(&tenant, &r, 4, EventBody::Delete { target: 3, by: user("alice") });
        append(&js, &second).await;
        append(&js, &delete).await;
        wait_drained(&js, Duration::from_secs(30), "create and delete").await;
        append(&js, &second).await;
        append(&js, &create).await;
        append(&js, &edit).await;
        wait_drained(&js, Duration::from_secs(30), "the creates again").await;
        let page = store.history(&query).await.expect("history");
        assert_eq!(page.messages.len(), 2, "{page:?}");
        assert_eq!(page.messages[0].body.as_deref(), Some("edited"));
        let deleted = &page.messages[1];
        assert!(deleted.deleted && deleted.body.is_none(), "the deleted message never returns: {deleted:?}");

        shutdown.cancel();
        persistor.await.expect("persistor task").expect("persistor");
    }
}

/// A poison event (a value the store cannot hold) is retried, then dead-lettered after `max_deliver` deliveries
/// with a log line, while the events around it are written; an undecodable event is dead-lettered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_event_is_dead_lettered_while_traffic_flows() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let js = jetstream().await;
    let mut persistors =
        Persistors::new(&[("SWITCHYARD_MAX_DELIVER", "3"), ("SWITCHYARD_REDELIVERY_BACKOFF_MS", "300")]);
    persistors.start();
    let store = CqlStore::connect(&[cql_node()], KEYSPACE).await.expect("connect to Cassandra");
    wait_drained(&js, Duration::from_secs(60), "before the test").await;

    let tenant = ProjectId::generate();
    let steady = room("steady");
    let poisoned = room("poisoned");
    const STEADY: u64 = 3_000;
    // Steady traffic, about 1,000 events a second, around the poison event.
    let traffic = {
        let (js, tenant, steady) = (js.clone(), tenant.clone(), steady.clone());
        tokio::spawn(async move {
            for chunk in (1..=STEADY).collect::<Vec<_>>().chunks(100) {
                let events: Vec<RoomEvent> = chunk.iter().map(|seq| msg(&tenant, &steady, *seq)).collect();
                append_all(&js, &events).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let poison = event(
        &tenant,
        &poisoned,
        1,
        EventBody::Edit { target: u64::MAX, from: user("mallory"), body: "beyond any bigint".into() },
    );
    let poison_seq = append(&js, &poison).await;
    let garbage_subject = subjects::event_log(shard_of_room(&tenant, &poisoned, 64), &tenant, &poisoned);
    let garbage_seq = js
        .publish(garbage_subject, bytes::Bytes::from_static(b"\xc1 not msgpack"))
        .await
        .expect("publish")
        .await
        .expect("stream ack")
        .sequence;

    // Both reach the dead-letter stream, the poison one after exactly three deliveries.
    let dead = js.get_stream(subjects::DEAD_LETTER_STREAM).await.expect("dead-letter stream");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found: BTreeMap<u64, (String, String)> = BTreeMap::new();
    let mut next = 1;
    let mut steady_when_dead = 0;
    while found.len() < 2 {
        assert!(Instant::now() < deadline, "dead letters seen: {found:?}\n{}", persistors.logs());
        let last = dead.get_info().await.expect("dead-letter stream info").state.last_sequence;
        while next <= last {
            if let Ok(letter) = dead.get_raw_message(next).await {
                let header = |name: &str| letter.headers.get(name).map(|v| v.as_str().to_owned()).unwrap_or_default();
                let stream_seq: u64 = header(dead_letter_headers::STREAM_SEQ).parse().unwrap_or(0);
                if stream_seq == poison_seq || stream_seq == garbage_seq {
                    let want: Vec<u8> = if stream_seq == poison_seq {
                        codec::encode(&poison).expect("encode").to_vec()
                    } else {
                        b"\xc1 not msgpack".to_vec()
                    };
                    assert_eq!(letter.payload.to_vec(), want, "a dead letter carries the event's own bytes");
                    found.insert(
                        stream_seq,
                        (header(dead_letter_headers::DELIVERIES), header(dead_letter_headers::REASON)),
                    );
                    if stream_seq == poison_seq {
                        steady_when_dead = store.last_seq(&tenant, &steady).await.expect("last seq");
                    }
                }
            }
            next += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (deliveries, reason) = &found[&poison_seq];
    assert_eq!(deliveries, "3", "dead-lettered after max_deliver deliveries: {reason}");
    assert!(reason.contains("rejected"), "{reason}");
    let (deliveries, reason) = &found[&garbage_seq];
    assert_eq!(deliveries, "1", "an undecodable event is dead-lettered at once: {reason}");
    assert!(reason.contains("undecodable"), "{reason}");
    assert!(steady_when_dead > 0, "steady traffic was written while the poison event was being retried");

    traffic.await.expect("traffic");
    wait_drained(&js, Duration::from_secs(60), "after the poison").await;
    let rows = stored(&store, &tenant, &steady).await;
    assert_eq!(rows.len() as u64, STEADY, "every steady event written once");
    assert_eq!(store.last_seq(&tenant, &poisoned).await.expect("last seq"), 0, "nothing of the poison was written");
    persistors.terminate().await;
    let logs = persistors.logs();
    assert_eq!(logs.lines().filter(|l| l.contains("event dead-lettered")).count(), 2, "{logs}");
    assert!(logs.contains("the store rejected an event; it will be retried"), "{logs}");
}

/// Keeps the paused Cassandra from staying paused when the test fails.
struct Paused(Pid);

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// The real Cassandra stops (SIGSTOP) for 30 s while clients send and receive through a fleet on the CQL store:
/// every send is acked and delivered live as before, the events wait in JetStream, and once Cassandra is back the
/// persistor writes every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cassandra_outage_keeps_live_delivery_and_loses_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let pid: i32 = std::env::var("SWITCHYARD_TEST_CQL_PID")
        .expect("SWITCHYARD_TEST_CQL_PID is not set: run the tests with `cargo xtask test` (or source `cargo xtask services`)")
        .parse()
        .expect("SWITCHYARD_TEST_CQL_PID is a pid");
    let js = jetstream().await;
    let fleet = Fleet::start_on(StoreKind::Cql, 1, 1, |config| {
        config.ops_per_sec = 10_000;
        config.ops_burst = 10_000;
    })
    .await;
    let tenant = fleet.create_tenant().await;
    let r = room("outage");
    let sender = fleet.connect(0, &fleet.token(&tenant, "sender").await, Format::Json).await;
    let receiver = Arc::new(fleet.connect(0, &fleet.token(&tenant, "receiver").await, Format::MsgPack).await);
    sender.join(r.as_str(), None).await.expect("join");
    receiver.join(r.as_str(), None).await.expect("join");
    let received = {
        let (receiver, r) = (receiver.clone(), r.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(event) = receiver.next_event_timeout(Duration::from_secs(10)).await {
                if let ServerEvent::Msg { room, seq, body, .. } = event {
                    if room == r {
                        seen.push((seq, body));
                        if seen.last().is_some_and(|(_, b)| b == "last") {
                            break;
                        }
                    }
                }
            }
            seen
        })
    };

    // Send every 50 ms: 3 s before, 30 s during and 3 s after the outage.
    let mut acked: Vec<(u64, String)> = Vec::new();
    let mut slowest_during = Duration::ZERO;
    let mut paused: Option<Paused> = None;
    let mut backlog_at_resume = (0, 0);
    let started = Instant::now();
    let mut k = 0;
    loop {
        let now = started.elapsed();
        if paused.is_none() && now >= Duration::from_secs(3) && now < Duration::from_secs(33) {
            kill(Pid::from_raw(pid), Signal::SIGSTOP).expect("SIGSTOP Cassandra");
            paused = Some(Paused(Pid::from_raw(pid)));
            eprintln!("Cassandra stopped at {now:?}");
        }
        if paused.is_some() && now >= Duration::from_secs(33) {
            backlog_at_resume = backlog(&js).await;
            drop(paused.take());
            eprintln!("Cassandra resumed at {now:?} with {backlog_at_resume:?} (pending, unacked) in JetStream");
        }
        let body = if now >= Duration::from_secs(36) { "last".to_owned() } else { format!("m{k}") };
        let op = ClientOp::Send {
            room: r.clone(),
            body: body.clone(),
            attrs: None,
            reply_to: None,
            cmid: Some(format!("c{k}")),
        };
        let sent = Instant::now();
        match sender.request_with_timeout(op, Duration::from_secs(10)).await {
            Ok(Reply::Ok(fields)) => {
                let seq = fields.get("seq").and_then(|v| v.as_u64()).expect("ok with seq");
                acked.push((seq, body.clone()));
            }
            other => panic!("send {k} at {now:?} failed during the outage test: {other:?}"),
        }
        if paused.is_some() {
            slowest_during = slowest_during.max(sent.elapsed());
        }
        if body == "last" {
            break;
        }
        k += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(paused);
    let seen = received.await.expect("receiver");
    eprintln!("{} sends acked; slowest ack during the outage {slowest_during:?}", acked.len());
    assert!(acked.len() > 400, "sending went on through the outage: only {} acked", acked.len());
    assert!(slowest_during < Duration::from_secs(2), "live path slowed by the outage: {slowest_during:?}");
    let live: Vec<(u64, String)> = seen.into_iter().collect();
    assert_eq!(live, acked, "the receiver got every acked message live, once and in order");
    assert!(
        backlog_at_resume.0 + backlog_at_resume.1 as u64 > 0,
        "events must have waited in JetStream while Cassandra was stopped"
    );

    // Every acked message reaches the store once Cassandra is back.
    let tenant_id = ProjectId::parse(&tenant.project_id).expect("project id");
    let last = acked.last().expect("acked").0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while fleet.store.last_seq(&tenant_id, &r).await.unwrap_or(0) < last {
        assert!(Instant::now() < deadline, "the persistor did not catch up within 90 s of Cassandra's return");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_drained(&js, Duration::from_secs(60), "after the outage").await;
    let rows: Vec<(u64, String)> = stored(&*fleet.store, &tenant_id, &r)
        .await
        .into_iter()
        .map(|(seq, body)| (seq, body.unwrap_or_default()))
        .collect();
    assert_eq!(rows, acked, "the store holds every acked message exactly once");
    fleet.stop().await;
}

#[test]
fn redelivery_lines_are_counted() {
    let logs = "2026 INFO switchyard_persistor::ingest: batch holds redelivered events redelivered=12 batch=512\n\
                2026 INFO switchyard_persistor::ingest: batch holds redelivered events redelivered=3 batch=40\n\
                2026 WARN other redelivered=99";
    assert_eq!(redeliveries_logged(logs), 15);
}

/// `switchyard-persistor migrate` run by three pods at once: one migrates under the NATS lock, the others wait and
/// find the schema current; then a persistor that requires the schema starts on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_take_turns() {
    let _turn = ONE_AT_A_TIME.lock().await;
    use switchyard_persistor::store::cql::SCHEMA_VERSION;
    let keyspace = format!("sy_migrate_{}", switchyard_protocol::ids::random_base62(10).to_ascii_lowercase());
    let config = PersistorConfig {
        nats_url: nats_url(),
        nats_replicas: nats_replicas(),
        store: format!("cql:{}", cql_node()),
        cql_keyspace: keyspace,
        ..PersistorConfig::default()
    };
    // Before any migration a persistor refuses to open the store.
    match AnyStore::open(&config).await {
        Err(error) => assert!(error.to_string().contains("switchyard-persistor migrate"), "{error}"),
        Ok(_) => panic!("a persistor must refuse a keyspace with no schema"),
    }
    let (a, b, c) = tokio::join!(
        switchyard_persistor::migrate(&config),
        switchyard_persistor::migrate(&config),
        switchyard_persistor::migrate(&config)
    );
    let mut froms: Vec<i32> = [a, b, c]
        .into_iter()
        .map(|r| r.expect("migrate"))
        .map(|o| {
            assert_eq!(o.to, SCHEMA_VERSION);
            o.from
        })
        .collect();
    froms.sort();
    assert_eq!(froms, vec![0, SCHEMA_VERSION, SCHEMA_VERSION], "exactly one run found no schema");
    AnyStore::open(&config).await.expect("a persistor starts on the migrated schema");
}

/// When the store refuses every write (here: its `messages` table dropped under a running persistor), nothing is
/// dead-lettered: the events are held like an outage and all written once the table is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_refusing_everything_dead_letters_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let js = jetstream().await;
    let keyspace = format!("sy_refusing_{}", switchyard_protocol::ids::random_base62(10).to_ascii_lowercase());
    let store = Arc::new(AnyStore::Cql(CqlStore::connect(&[cql_node()], &keyspace).await.expect("connect")));
    let shutdown = CancellationToken::new();
    let config = PersistorConfig {
        nats_url: nats_url(),
        nats_replicas: nats_replicas(),
        max_deliver: 2,
        redelivery_backoff_ms: vec![100],
        outage_retry_max_ms: 500,
        ..PersistorConfig::default()
    };
    let persistor = {
        let (store, shutdown) = (store.clone(), shutdown.clone());
        tokio::spawn(async move { switchyard_persistor::run_with_store(config, store, shutdown).await })
    };
    wait_drained(&js, Duration::from_secs(30), "before the test").await;
    // A write the store took just before it starts refusing: it must not make the refused events look like poison.
    let tenant = ProjectId::generate();
    append(&js, &msg(&tenant, &room("written-before"), 1)).await;
    wait_drained(&js, Duration::from_secs(30), "the write before the table is dropped").await;
    let dead = js.get_stream(subjects::DEAD_LETTER_STREAM).await.expect("dead-letter stream");
    let dead_before = dead.get_info().await.expect("dead-letter info").state.last_sequence;

    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_node(cql_node())
        .build()
        .await
        .expect("CQL session");
    session.query_unpaged(format!("DROP TABLE {keyspace}.messages"), ()).await.expect("drop messages");

    let r = room("refused");
    for seq in 1..=5 {
        append(&js, &msg(&tenant, &r, seq)).await;
    }
    // Well past max_deliver deliveries at the nak backoff: still nothing dead-lettered, the events are held.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (pending, ack_pending) = backlog(&js).await;
    assert!(pending + ack_pending as u64 > 0, "the events must be held while every write is refused");
    let dead_now = dead.get_info().await.expect("dead-letter info").state.last_sequence;
    assert_eq!(dead_now, dead_before, "no healthy event may be dead-lettered when the store refuses everything");

    session
        .query_unpaged(
            format!(
                "CREATE TABLE {keyspace}.messages (tenant text, room text, bucket bigint, seq bigint, id text, \
                 sender text, body text, attrs text, reply_to bigint, ts_us bigint, edited_us bigint, \
                 deleted boolean, pinned boolean, has_replies boolean, PRIMARY KEY ((tenant, room, bucket), seq)) \
                 WITH CLUSTERING ORDER BY (seq ASC)"
            ),
            (),
        )
        .await
        .expect("recreate messages");
    wait_drained(&js, Duration::from_secs(60), "after the table is back").await;
    let rows = stored(&*store, &tenant, &r).await;
    assert_eq!(rows.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    assert_eq!(dead.get_info().await.expect("dead-letter info").state.last_sequence, dead_before);
    shutdown.cancel();
    persistor.await.expect("persistor task").expect("persistor");
}
