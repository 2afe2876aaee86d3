//! Router shards as real processes, under crashes, pauses and scale-out: SIGKILL, SIGSTOP past the lease TTL, and
//! going from one process to three and back, each while clients keep sending. Every acked message must reach every
//! subscribed session exactly once and in seq order, each room's seq must stay gap-free in the events stream, and
//! the history store must hold every acked message exactly once.
//!
//! Gateways and the persistor run in-process (`switchyard-testkit`); router shards run as child processes of the
//! `switchyard-router-shard` binary, killed by a drop guard also when a test panics (`switchyard_testkit::process`);
//! the acks and receipts are counted and checked by `switchyard_testkit::ledger`. This file does not test what
//! a single process does (the gateway's end-to-end tests do that).

use nix::sys::signal::Signal;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchyard_client::{Client, ClientError, ClientOp, ErrorCode, Format, Reply, ServerEvent};
use switchyard_persistor::store::{HistoryQuery, HistoryStore};
use switchyard_protocol::internal::{EventBody, RoomEvent};
use switchyard_protocol::shard::shard_of_room;
use switchyard_protocol::{codec, subjects, ProjectId, RoomId, ShardId};
use switchyard_testkit::ledger::{Finding, Ledger, Receipts};
use switchyard_testkit::process::ManagedChild;
use switchyard_testkit::{nats_replicas, nats_servers, nats_url, wait_for_balanced_shards, Fleet, StoreKind, Tenant};
use tokio::task::JoinHandle;

const SHARDS: u16 = switchyard_protocol::limits::DEFAULT_SHARD_COUNT;
/// How long one attempt of a send may take at the client; the gateway answers `unavailable` before that.
const ATTEMPT: Duration = Duration::from_secs(15);
/// How long a single message may keep failing before the test calls it lost.
const GIVE_UP: Duration = Duration::from_secs(45);

/// The tests share one NATS and its leases bucket: one cluster at a time, router shards included.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Router-shard child processes, each with its log in the guard's directory. Dropping the guard resumes and kills
/// every process still running (each is a `ManagedChild` stopped by SIGKILL), so none outlives the test, also when
/// it panics.
struct Routers {
    procs: Vec<(String, ManagedChild)>,
    dir: tempfile::TempDir,
}

impl Routers {
    fn new() -> Routers {
        Routers { dir: tempfile::tempdir().expect("temp dir"), procs: Vec::new() }
    }

    /// Start one more router shard logging warnings; its index.
    fn spawn(&mut self) -> usize {
        self.spawn_logging("warn")
    }

    /// Start one more router shard with `RUST_LOG` set to `filter`; its index.
    fn spawn_logging(&mut self, filter: &str) -> usize {
        let index = self.procs.len();
        let id = format!("proc-router-{index}-{}", switchyard_protocol::ids::random_base62(6));
        let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard-router-shard"));
        command
            .env_remove("SWITCHYARD_CONFIG")
            .env("SWITCHYARD_NATS_URL", nats_url())
            .env("SWITCHYARD_NATS_REPLICAS", nats_replicas().to_string())
            .env("SWITCHYARD_ROUTER_ID", &id)
            .env("SWITCHYARD_SHARD_COUNT", SHARDS.to_string())
            .env("SWITCHYARD_METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", filter);
        let log = self.dir.path().join(format!("{id}.log"));
        let mut child =
            ManagedChild::spawn(&id, command, &log, Duration::from_secs(10)).expect("start switchyard-router-shard");
        child.stop_with_sigkill();
        self.procs.push((id, child));
        index
    }

    fn id(&self, index: usize) -> &str {
        &self.procs[index].0
    }

    fn index_of(&self, id: &str) -> usize {
        self.procs.iter().position(|(p, _)| p == id).unwrap_or_else(|| panic!("{id} is not one of ours"))
    }

    /// Ids of the processes not killed or terminated by the test.
    fn live(&self) -> Vec<String> {
        self.procs.iter().filter(|(_, c)| c.live_pid().is_some()).map(|(id, _)| id.clone()).collect()
    }

    fn signal(&mut self, index: usize, signal: Signal) {
        self.procs[index].1.signal(signal).expect("signal router shard");
    }

    /// SIGKILL, and reap it.
    fn kill(&mut self, index: usize) {
        self.procs[index].1.kill();
    }

    /// SIGTERM, and wait for a clean exit (it releases its leases first).
    async fn terminate(&mut self, index: usize) {
        self.signal(index, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.procs[index].1.exit_status() {
                assert!(status.success(), "router shard exited with {status} after SIGTERM: {}", self.logs(index));
                return;
            }
            assert!(Instant::now() < deadline, "router shard did not stop within 30 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM every process still running, so their leases are free at once for the next test; then fail the test
    /// if any of them, killed ones included, panicked (a panic is a bug even when the test's checks pass).
    async fn shutdown(mut self) {
        for index in 0..self.procs.len() {
            if self.procs[index].1.live_pid().is_some() {
                self.terminate(index).await;
            }
        }
        for index in 0..self.procs.len() {
            let logs = self.logs(index);
            assert!(!logs.contains("panicked at"), "router shard {} panicked:\n{logs}", self.procs[index].0);
        }
    }

    fn logs(&self, index: usize) -> String {
        std::fs::read_to_string(self.procs[index].1.log()).unwrap_or_default()
    }
}

/// The router shard holding `shard`'s lease now, if any.
async fn owner_of(shard: ShardId) -> Option<String> {
    let nats = async_nats::connect(nats_servers()).await.expect("connect to NATS");
    let leases = async_nats::jetstream::new(nats).get_key_value(subjects::LEASES_BUCKET).await.expect("leases bucket");
    let owner = leases.get(subjects::lease_key(shard)).await.expect("read lease")?;
    Some(String::from_utf8_lossy(&owner).into_owned())
}

/// Wait until `routers` hold every shard between them, none more than its fair share (a killed process's leases
/// must have expired first).
async fn settle(routers: &[String]) {
    wait_for_balanced_shards(routers).await;
}

/// A gateway fleet (no in-process router shards) whose per-session and per-tenant limits do not get in the way.
async fn gateways(command_timeout_ms: u64) -> Fleet {
    Fleet::start_with(2, 0, |config| {
        config.ops_per_sec = 100_000;
        config.ops_burst = 100_000;
        config.tenant_msgs_per_sec = 1_000_000;
        config.tenant_msgs_burst = 1_000_000;
        config.command_timeout_ms = command_timeout_ms;
    })
    .await
}

/// One acknowledged message.
#[derive(Debug, Clone)]
struct Ack {
    room: usize,
    seq: u64,
    body: String,
    /// When the successful attempt started and ended.
    started: Instant,
    ended: Instant,
}

/// How the clients send.
#[derive(Clone, Copy)]
struct Pace {
    /// Messages per client, at most.
    per_client: usize,
    /// Pause between two sends of one client.
    gap: Duration,
}

/// Clients in rooms, each sending messages with a unique `cmid` and retrying the same op until it is acked.
struct Traffic {
    tenant: ProjectId,
    rooms: Vec<RoomId>,
    /// Per session: its room and the sequenced events it received (with the body of messages).
    sessions: Vec<(usize, Arc<Mutex<Receipts>>)>,
    clients: Vec<Arc<Client>>,
    readers: Vec<JoinHandle<()>>,
    senders: Vec<JoinHandle<Result<(), String>>>,
    acked: Arc<Mutex<Vec<Ack>>>,
    progress: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Attempts that failed and were retried.
    retries: Arc<AtomicUsize>,
}

impl Traffic {
    /// Connect `clients` sessions (alternating gateways, and formats every second client) spread over `rooms`
    /// rooms, join them, then start sending.
    async fn start(fleet: &Fleet, tenant: &Tenant, clients: usize, rooms: usize, pace: Pace) -> Traffic {
        let room_ids: Vec<RoomId> = (0..rooms).map(|r| RoomId::parse(&format!("room-{r}")).expect("room id")).collect();
        let mut sessions = Vec::new();
        let mut connected = Vec::new();
        let mut readers = Vec::new();
        for i in 0..clients {
            let format = if (i / 2) % 2 == 0 { Format::Json } else { Format::MsgPack };
            let token = fleet.token(tenant, &format!("user-{i}")).await;
            let client = Arc::new(fleet.connect(i % 2, &token, format).await);
            let room = i % rooms;
            client.join(room_ids[room].as_str(), None).await.expect("join");
            let seen = Arc::new(Mutex::new(Receipts::default()));
            let (reader_client, reader_seen, room_id) = (client.clone(), seen.clone(), room_ids[room].clone());
            readers.push(tokio::spawn(async move {
                while let Some(event) = reader_client.next_event().await {
                    if let Some((event_room, seq, body)) = sequenced(event) {
                        if event_room == room_id {
                            reader_seen.lock().unwrap().record(seq, body);
                        }
                    }
                }
            }));
            sessions.push((room, seen));
            connected.push(client);
        }
        let acked = Arc::new(Mutex::new(Vec::new()));
        let progress = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let retries = Arc::new(AtomicUsize::new(0));
        let mut senders = Vec::new();
        for (i, client) in connected.iter().enumerate() {
            let (client, acked, progress, stop, retries) =
                (client.clone(), acked.clone(), progress.clone(), stop.clone(), retries.clone());
            let (room, room_id) = (i % rooms, room_ids[i % rooms].clone());
            senders.push(tokio::spawn(async move {
                for k in 0..pace.per_client {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let body = format!("user-{i}/{k}");
                    let op = ClientOp::Send {
                        room: room_id.clone(),
                        body: body.clone(),
                        attrs: None,
                        reply_to: None,
                        cmid: Some(format!("c{i}-{k}")),
                    };
                    let (seq, started, ended) = send_until_acked(&client, op, &retries).await?;
                    acked.lock().unwrap().push(Ack { room, seq, body, started, ended });
                    progress.fetch_add(1, Ordering::Relaxed);
                    if !pace.gap.is_zero() {
                        tokio::time::sleep(pace.gap).await;
                    }
                }
                Ok(())
            }));
        }
        Traffic {
            tenant: ProjectId::parse(&tenant.project_id).expect("project id"),
            rooms: room_ids,
            sessions,
            clients: connected,
            readers,
            senders,
            acked,
            progress,
            stop,
            retries,
        }
    }

    fn acked_count(&self) -> usize {
        self.progress.load(Ordering::Relaxed)
    }

    /// Wait until at least `count` messages were acked.
    async fn wait_for_acks(&self, count: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.acked_count() < count {
            assert!(Instant::now() < deadline, "only {} of {count} messages acked in {limit:?}", self.acked_count());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Send `count` messages to `room` at once, each from one of the room's sessions in turn, each retried until
    /// acked like the steady traffic; they are awaited with it.
    fn burst(&mut self, room: usize, count: usize) {
        let members: Vec<usize> = (0..self.clients.len()).filter(|i| i % self.rooms.len() == room).collect();
        for j in 0..count {
            let i = members[j % members.len()];
            let (client, acked, progress, retries) =
                (self.clients[i].clone(), self.acked.clone(), self.progress.clone(), self.retries.clone());
            let body = format!("burst-{j}");
            let op = ClientOp::Send {
                room: self.rooms[room].clone(),
                body: body.clone(),
                attrs: None,
                reply_to: None,
                cmid: Some(format!("b{j}")),
            };
            self.senders.push(tokio::spawn(async move {
                let (seq, started, ended) = send_until_acked(&client, op, &retries).await?;
                acked.lock().unwrap().push(Ack { room, seq, body, started, ended });
                progress.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }));
        }
    }

    /// Ask the steady senders to stop after their current message.
    fn stop_sending(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Wait for every sender; panics on a message that could not be sent.
    async fn finish_sending(&mut self) {
        for sender in self.senders.drain(..) {
            if let Err(error) = sender.await.expect("sender task") {
                panic!("a message failed for good: {error}");
            }
        }
    }

    /// The shard of room `room`.
    fn shard(&self, room: usize) -> ShardId {
        shard_of_room(&self.tenant, &self.rooms[room], SHARDS)
    }

    /// Check sessions, the events stream and the store against what was acked (the checks are the ledger's);
    /// returns the number of acks.
    async fn verify(&mut self, fleet: &Fleet) -> usize {
        let acked = self.acked.lock().unwrap().clone();
        // Per room, seq -> body, and no two acks for one seq or one body.
        let mut ledger = Ledger::new(self.rooms.len());
        for ack in &acked {
            ledger.ack(ack.room, ack.seq, ack.body.clone());
        }
        assert!(ledger.conflicts().is_empty(), "conflicting acks: {:?}", ledger.conflicts());
        assert_eq!(ledger.acked(), acked.len(), "a message was acked twice");

        // Every session: gap-free, in order, every acked message since it joined exactly once.
        let deadline = Instant::now() + Duration::from_secs(30);
        for (index, (room, seen)) in self.sessions.iter().enumerate() {
            let last = ledger.last_seq(*room);
            loop {
                let got = seen.lock().unwrap().last_seq();
                if got >= last {
                    break;
                }
                assert!(Instant::now() < deadline, "session {index} has seq {got} of room {room}, expected {last}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let seen = seen.lock().unwrap().clone();
            // What was sent before this session joined its room is not its to receive.
            let check = ledger.check_receiver(*room, &seen, seen.first_seq().unwrap_or(1));
            assert!(check.is_clean(), "session {index}: {}", lines(&check.findings));
        }

        // The events stream: each room's seqs 1..=n, consecutive, each acked message exactly once.
        let js = async_nats::jetstream::new(async_nats::connect(nats_servers()).await.expect("connect to NATS"));
        for room in 0..self.rooms.len() {
            let events = room_events(&js, self.shard(room), &self.tenant, &self.rooms[room]).await;
            let mut stream = Receipts::default();
            for event in events {
                let body = match event.body {
                    EventBody::Msg { body, .. } => Some(body),
                    _ => None,
                };
                stream.record(event.seq, body);
            }
            let check = ledger.check_receiver(room, &stream, 1);
            assert!(check.is_clean(), "the events stream of room {room}: {}", lines(&check.findings));
        }

        // The history store: every acked message exactly once, at its seq (the persistor may lag a little).
        let deadline = Instant::now() + Duration::from_secs(30);
        for room in 0..self.rooms.len() {
            loop {
                let stored = stored_messages(fleet, &self.tenant, &self.rooms[room]).await;
                let check = ledger.check_store(room, stored.iter().map(|(seq, body)| (*seq, body.as_str())));
                let twice: Vec<&Finding> = check.findings.iter().filter(|f| f.extra() > 0).collect();
                assert!(twice.is_empty(), "room {room}: a message is stored twice: {twice:?}");
                if check.is_clean() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "room {room}: {} of {} acked messages in the store, {} stored: {}",
                    check.found,
                    check.expected,
                    stored.len(),
                    lines(&check.findings)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        acked.len()
    }

    /// Close the sessions and stop the readers.
    async fn close(self) {
        for client in &self.clients {
            let _ = client.close().await;
        }
        for reader in self.readers {
            reader.abort();
        }
    }
}

/// The findings of a check, one a line (the first 20).
fn lines(findings: &[Finding]) -> String {
    let shown: Vec<String> = findings.iter().take(20).map(|f| format!("\n  {f}")).collect();
    format!("{} finding(s):{}", findings.len(), shown.concat())
}

/// Send `op` until it is acked, repeating the same op (same cmid) after `unavailable` or a timeout; the acked seq
/// and when the successful attempt started and ended.
async fn send_until_acked(
    client: &Client,
    op: ClientOp,
    retries: &AtomicUsize,
) -> Result<(u64, Instant, Instant), String> {
    let give_up = Instant::now() + GIVE_UP;
    loop {
        let started = Instant::now();
        let failure = match client.request_with_timeout(op.clone(), ATTEMPT).await {
            Ok(Reply::Ok(fields)) => {
                let seq = fields.get("seq").and_then(|v| v.as_u64()).ok_or("ok without seq")?;
                return Ok((seq, started, Instant::now()));
            }
            Ok(Reply::Err { code: ErrorCode::Unavailable, message, .. }) => format!("unavailable: {message}"),
            Ok(Reply::Err { code, message, .. }) => return Err(format!("{op:?} refused: {code:?} {message}")),
            Err(ClientError::Timeout(what)) => format!("timeout waiting for the {what}"),
            Err(error) => return Err(format!("{op:?} failed: {error}")),
        };
        retries.fetch_add(1, Ordering::Relaxed);
        if Instant::now() > give_up {
            return Err(format!("{op:?} still failing after {GIVE_UP:?}: {failure}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A room event's room, seq and, for a message, its body; `None` for what is not sequenced.
fn sequenced(event: ServerEvent) -> Option<(RoomId, u64, Option<String>)> {
    match event {
        ServerEvent::Msg { room, seq, body, .. } => Some((room, seq, Some(body))),
        ServerEvent::Edit { room, seq, .. }
        | ServerEvent::Delete { room, seq, .. }
        | ServerEvent::Reaction { room, seq, .. }
        | ServerEvent::Joined { room, seq, .. }
        | ServerEvent::Left { room, seq, .. } => Some((room, seq, None)),
        _ => None,
    }
}

/// Every event of a room in the events stream, in stream order, read with an ordered consumer on its subject.
async fn room_events(
    js: &async_nats::jetstream::Context,
    shard: ShardId,
    tenant: &ProjectId,
    room: &RoomId,
) -> Vec<RoomEvent> {
    use futures::StreamExt;
    let subject = subjects::event_log(shard, tenant, room);
    let stream = js.get_stream(subjects::EVENTS_STREAM).await.expect("events stream");
    let last = match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => codec::decode::<RoomEvent>(&message.payload).expect("decode last event").seq,
        Err(_) => return Vec::new(),
    };
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject.clone(),
            ..Default::default()
        })
        .await
        .expect("ordered consumer");
    let mut messages = consumer.messages().await.expect("consume room events");
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while events.last().map(|e: &RoomEvent| e.seq) != Some(last) || events.len() < last as usize {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(remaining, messages.next())
            .await
            .unwrap_or_else(|_| panic!("read only {} of {last} events of {subject}", events.len()))
            .expect("events end")
            .expect("event message");
        events.push(codec::decode::<RoomEvent>(&message.payload).expect("decode event"));
        if events.len() > 2 * last as usize + 10 {
            panic!("{subject} holds more events than its last seq {last}");
        }
    }
    events
}

/// Every message of a room in the history store: (seq, body).
async fn stored_messages(fleet: &Fleet, tenant: &ProjectId, room: &RoomId) -> Vec<(u64, String)> {
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let query =
            HistoryQuery { tenant: tenant.clone(), room: room.clone(), before: None, after: Some(after), limit: 100 };
        let page = fleet.store.history(&query).await.expect("history page");
        for message in &page.messages {
            all.push((message.seq, message.body.clone().unwrap_or_default()));
            after = after.max(message.seq);
        }
        if !page.more || page.messages.is_empty() {
            return all;
        }
    }
}

/// The time from `since` until every room in `rooms` had a send that started after `since` acked.
fn recovery(acked: &[Ack], rooms: &[usize], since: Instant) -> Option<Duration> {
    rooms
        .iter()
        .map(|room| {
            acked.iter().filter(|a| a.room == *room && a.started >= since).map(|a| a.ended.duration_since(since)).min()
        })
        .try_fold(Duration::ZERO, |worst, room| room.map(|d| worst.max(d)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_of_a_router_shard_loses_nothing() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let test_started = Instant::now();
    let mut routers = Routers::new();
    for _ in 0..3 {
        routers.spawn();
    }
    settle(&routers.live()).await;
    let fleet = gateways(10_000).await;
    let tenant = fleet.create_tenant().await;
    let mut traffic = Traffic::start(&fleet, &tenant, 100, 10, Pace { per_client: 100, gap: Duration::ZERO }).await;

    // The victim owns room 0's shard, so some of the traffic depends on it.
    let victim = routers.index_of(&owner_of(traffic.shard(0)).await.expect("room 0's shard has an owner"));
    let mut victim_rooms = Vec::new();
    for room in 0..traffic.rooms.len() {
        if owner_of(traffic.shard(room)).await.as_deref() == Some(routers.id(victim)) {
            victim_rooms.push(room);
        }
    }
    traffic.wait_for_acks(3_000, Duration::from_secs(60)).await;
    let killed_at = Instant::now();
    routers.kill(victim);
    let acked_at_kill = traffic.acked_count();

    traffic.finish_sending().await;
    let failover = recovery(&traffic.acked.lock().unwrap(), &victim_rooms, killed_at)
        .expect("a room of the killed router shard never served a send started after the kill");
    let total = traffic.verify(&fleet).await;
    assert_eq!(total, 10_000);
    println!(
        "SIGKILL failover: the killed router shard's rooms {victim_rooms:?} served again {:.2} s after the kill \
         ({acked_at_kill} acked before it, {} retried attempts, {total} messages, test ran {:.1} s)",
        failover.as_secs_f64(),
        traffic.retries.load(Ordering::Relaxed),
        test_started.elapsed().as_secs_f64()
    );
    assert!(failover < Duration::from_secs(10), "failover took {failover:?}");
    traffic.close().await;
    fleet.stop().await;
    routers.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_owner_cannot_break_room_order() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let test_started = Instant::now();
    let mut routers = Routers::new();
    for _ in 0..3 {
        // The room actor reports each fenced append at info level: the evidence that the fence did the work.
        routers.spawn_logging("warn,switchyard_router_shard::room=info");
    }
    settle(&routers.live()).await;
    let fleet = gateways(10_000).await;
    let tenant = fleet.create_tenant().await;
    let pace = Pace { per_client: 100_000, gap: Duration::from_millis(20) };
    let mut traffic = Traffic::start(&fleet, &tenant, 24, 3, pace).await;
    let paused = routers.index_of(&owner_of(traffic.shard(0)).await.expect("room 0's shard has an owner"));
    traffic.wait_for_acks(300, Duration::from_secs(30)).await;

    // A burst right before the pause, so the owner holds commands (in its socket, its subscription or its room
    // actor's queue) that it will only get to after another owner took the room over.
    traffic.burst(0, 60);
    tokio::time::sleep(Duration::from_millis(5)).await;
    routers.signal(paused, Signal::SIGSTOP);
    let paused_at = Instant::now();
    let before_pause = traffic.acked_count();
    // Past the lease TTL (6 s) and a claim tick: someone else must own the shard now.
    let deadline = paused_at + Duration::from_secs(20);
    loop {
        let owner = owner_of(traffic.shard(0)).await;
        if owner.as_deref().is_some_and(|o| o != routers.id(paused)) && paused_at.elapsed() > Duration::from_secs(8) {
            break;
        }
        assert!(Instant::now() < deadline, "no other router shard took room 0's shard while its owner was paused");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let taken_over = paused_at.elapsed();
    // Keep the old owner paused a little longer while the new one serves. NATS still counts the paused process in
    // the shard's queue group, so part of the commands wait for it; those are answered (fenced) after it resumes,
    // or time out and are retried by their clients.
    let acked_room0 = |traffic: &Traffic| traffic.acked.lock().unwrap().iter().filter(|a| a.room == 0).count();
    let room0_before = acked_room0(&traffic);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let room0_while_paused = acked_room0(&traffic) - room0_before;
    routers.signal(paused, Signal::SIGCONT);
    let paused_for = paused_at.elapsed();
    // Let the resumed process run into its fences and lose its leases under traffic.
    tokio::time::sleep(Duration::from_secs(4)).await;
    traffic.stop_sending();
    traffic.finish_sending().await;
    let total = traffic.verify(&fleet).await;
    let log = routers.logs(paused);
    println!(
        "SIGSTOP: owner paused {:.1} s, shard taken over after {:.1} s; {total} messages acked ({before_pause} before \
         the pause, {room0_while_paused} in the paused owner's room during the takeover), {} retried attempts; the resumed owner logged a lost lease: {}, and {} fenced appends; test ran {:.1} s",
        paused_for.as_secs_f64(),
        taken_over.as_secs_f64(),
        traffic.retries.load(Ordering::Relaxed),
        log.contains("lease taken over"),
        log.matches("fenced: another writer appended").count(),
        test_started.elapsed().as_secs_f64()
    );
    assert!(log.contains("lease taken over"), "the resumed owner did not notice it lost its lease: {log}");
    traffic.close().await;
    fleet.stop().await;
    routers.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaling_one_to_three_and_back_loses_nothing() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let test_started = Instant::now();
    let mut routers = Routers::new();
    let first = routers.spawn();
    settle(&routers.live()).await;
    let fleet = gateways(10_000).await;
    let tenant = fleet.create_tenant().await;
    let pace = Pace { per_client: 100_000, gap: Duration::from_millis(30) };
    let mut traffic = Traffic::start(&fleet, &tenant, 40, 8, pace).await;
    traffic.wait_for_acks(200, Duration::from_secs(30)).await;

    let scale_started = Instant::now();
    let second = routers.spawn();
    let third = routers.spawn();
    settle(&routers.live()).await;
    let scaled_out = scale_started.elapsed();
    let at_three = traffic.acked_count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(traffic.acked_count() > at_three, "no traffic served with three router shards");

    let scale_started = Instant::now();
    routers.terminate(second).await;
    routers.terminate(third).await;
    settle(&routers.live()).await;
    let scaled_in = scale_started.elapsed();
    let at_one = traffic.acked_count();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(traffic.acked_count() > at_one, "no traffic served after going back to one router shard");
    assert_eq!(routers.live(), vec![routers.id(first).to_owned()]);

    traffic.stop_sending();
    traffic.finish_sending().await;
    let total = traffic.verify(&fleet).await;
    println!(
        "scaling: 1 -> 3 settled in {:.1} s, 3 -> 1 (SIGTERM) in {:.1} s; {total} messages, {} retried attempts, \
         test ran {:.1} s",
        scaled_out.as_secs_f64(),
        scaled_in.as_secs_f64(),
        traffic.retries.load(Ordering::Relaxed),
        test_started.elapsed().as_secs_f64()
    );
    traffic.close().await;
    fleet.stop().await;
    routers.shutdown().await;
}

/// Join `room` until acked, repeating after `unavailable` or a timeout.
async fn join_until_acked(client: Arc<Client>, room: RoomId) -> Result<(), String> {
    let give_up = Instant::now() + GIVE_UP;
    loop {
        match client.request_with_timeout(ClientOp::Join { room: room.clone(), since: None }, ATTEMPT).await {
            Ok(Reply::Ok(_)) => return Ok(()),
            Ok(Reply::Err { code: ErrorCode::Unavailable, .. }) | Err(ClientError::Timeout(_)) => {}
            Ok(Reply::Err { code, message, .. }) => return Err(format!("join refused: {code:?} {message}")),
            Err(error) => return Err(format!("join failed: {error}")),
        }
        if Instant::now() > give_up {
            return Err(format!("join of {room} still failing after {GIVE_UP:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resumed_owner_cannot_undo_membership_changes() {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut routers = Routers::new();
    for _ in 0..2 {
        routers.spawn();
    }
    settle(&routers.live()).await;
    let fleet = gateways(10_000).await;
    let tenant = fleet.create_tenant().await;
    let project = ProjectId::parse(&tenant.project_id).expect("project id");
    let room = RoomId::parse("members").expect("room id");
    let shard = shard_of_room(&project, &room, SHARDS);
    let mut clients = Vec::new();
    for i in 0..16 {
        let token = fleet.token(&tenant, &format!("user-{i}")).await;
        clients.push(Arc::new(fleet.connect(i % 2, &token, Format::Json).await));
    }
    // user-0 creates the room: its owner now has the roster cached.
    clients[0].join(room.as_str(), None).await.expect("first join");
    let paused = routers.index_of(&owner_of(shard).await.expect("the room's shard has an owner"));

    // Joins the owner holds when it is paused, and joins the next owner serves while it is.
    let mut joins = Vec::new();
    for client in &clients[1..8] {
        joins.push(tokio::spawn(join_until_acked(client.clone(), room.clone())));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    routers.signal(paused, Signal::SIGSTOP);
    let paused_at = Instant::now();
    loop {
        if owner_of(shard).await.as_deref().is_some_and(|o| o != routers.id(paused)) {
            break;
        }
        assert!(paused_at.elapsed() < Duration::from_secs(20), "nobody took the paused owner's shard over");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for client in &clients[8..] {
        joins.push(tokio::spawn(join_until_acked(client.clone(), room.clone())));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    routers.signal(paused, Signal::SIGCONT);
    for join in joins {
        join.await.expect("join task").expect("join");
    }

    // Every member whose join was acked is in the stored roster and may send.
    let nats = async_nats::connect(nats_servers()).await.expect("connect to NATS");
    let rooms = async_nats::jetstream::new(nats).get_key_value(subjects::ROOMS_BUCKET).await.expect("rooms bucket");
    let stored = rooms.get(subjects::roster_key(&project, &room)).await.expect("read roster").expect("roster");
    let roster: switchyard_protocol::internal::Roster = codec::decode(&stored).expect("decode roster");
    let missing: Vec<usize> =
        (0..clients.len()).filter(|i| !roster.members.keys().any(|u| u.as_str() == format!("user-{i}"))).collect();
    let retries = AtomicUsize::new(0);
    let mut refused = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        let op = ClientOp::Send {
            room: room.clone(),
            body: format!("hello from {i}"),
            attrs: None,
            reply_to: None,
            cmid: Some(format!("hello-{i}")),
        };
        if let Err(error) = send_until_acked(client, op, &retries).await {
            refused.push((i, error));
        }
    }
    assert!(missing.is_empty(), "acked joins missing from the stored roster: users {missing:?}");
    assert!(refused.is_empty(), "members whose join was acked cannot send: {refused:?}");
    for client in &clients {
        let _ = client.close().await;
    }
    fleet.stop().await;
    routers.shutdown().await;
}

/// A room's history as the store holds it: (seq, body, deleted, edited).
async fn history_rows(fleet: &Fleet, tenant: &ProjectId, room: &RoomId) -> Vec<(u64, Option<String>, bool, bool)> {
    let query = HistoryQuery { tenant: tenant.clone(), room: room.clone(), before: None, after: None, limit: 100 };
    let page = fleet.store.history(&query).await.expect("history page");
    page.messages.into_iter().map(|m| (m.seq, m.body, m.deleted, m.edited_ts.is_some())).collect()
}

/// A room whose events all left the events stream, served by router shards that lost every cached fact of it
/// (SIGKILLed and replaced), continues its seq after the last event it ever had; its history keeps every message,
/// edit and delete; `join {since}` across the missing range answers `resume_gap`, and replays what the stream holds.
async fn a_room_outlives_its_events_in_the_stream(store: StoreKind) {
    let _turn = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut routers = Routers::new();
    for _ in 0..2 {
        routers.spawn();
    }
    settle(&routers.live()).await;
    let fleet = Fleet::start_on(store, 1, 0, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
    })
    .await;
    let tenant = fleet.create_tenant().await;
    let project = ProjectId::parse(&tenant.project_id).expect("project id");
    let room = RoomId::parse(&format!("years-{}", switchyard_protocol::ids::random_base62(6))).expect("room id");
    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    assert_eq!(alice.join(room.as_str(), None).await.expect("join"), 1);
    assert_eq!(alice.send(room.as_str(), "first").await.expect("send").seq, 2);
    assert_eq!(alice.send(room.as_str(), "second").await.expect("send").seq, 3);
    let edit = ClientOp::Edit { room: room.clone(), seq: 2, body: "first, edited".into() };
    assert!(matches!(alice.request(edit).await.expect("edit"), Reply::Ok(_)));
    let delete = ClientOp::Delete { room: room.clone(), seq: 3 };
    assert!(matches!(alice.request(delete).await.expect("delete"), Reply::Ok(_)));
    let last_seq = 5;

    // Wait until the store holds the room's last event, then drop the room's events from the stream.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fleet.store.last_seq(&project, &room).await.expect("last seq") < last_seq {
        assert!(Instant::now() < deadline, "the store never caught up with the room");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = history_rows(&fleet, &project, &room).await;
    assert_eq!(
        before,
        vec![(2, Some("first, edited".into()), false, true), (3, None, true, false)],
        "history before the purge"
    );
    let nats = async_nats::connect(nats_servers()).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(nats);
    let shard = shard_of_room(&project, &room, SHARDS);
    let subject = subjects::event_log(shard, &project, &room);
    let purged = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("events stream")
        .purge()
        .filter(subject.clone())
        .await
        .expect("purge the room's subject");
    assert_eq!(purged.purged, last_seq, "the stream held the room's events");

    // Every router shard loses what it knew of the room.
    for index in 0..2 {
        routers.kill(index);
    }
    for _ in 0..2 {
        routers.spawn();
    }
    settle(&routers.live()).await;

    let retries = AtomicUsize::new(0);
    let op = ClientOp::Send {
        room: room.clone(),
        body: "third".into(),
        attrs: None,
        reply_to: None,
        cmid: Some("c3".into()),
    };
    let (seq, _, _) = send_until_acked(&alice, op, &retries).await.expect("send after the purge");
    assert_eq!(seq, last_seq + 1, "the room's seq restarted after its events left the stream");
    let after = history_rows(&fleet, &project, &room).await;
    let mut expected = before.clone();
    expected.push((last_seq + 1, Some("third".into()), false, false));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut after = after;
    while after != expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = history_rows(&fleet, &project, &room).await;
    }
    assert_eq!(after, expected, "history after the room continued");

    // Resume: from before the purged range is a gap; from inside what the stream holds, an exact replay.
    let bob = fleet.connect(0, &fleet.token(&tenant, "bob").await, Format::MsgPack).await;
    match bob.request(ClientOp::Join { room: room.clone(), since: Some(1) }).await.expect("join since 1") {
        Reply::Err { code, .. } => assert_eq!(code, ErrorCode::ResumeGap),
        Reply::Ok(fields) => panic!("a join since a purged seq replayed nothing and said ok: {fields:?}"),
    }
    let join_point = bob.join(room.as_str(), Some(last_seq)).await.expect("join since the last purged seq");
    let mut replayed = Vec::new();
    while let Some(event) = bob.next_event_timeout(Duration::from_millis(500)).await {
        if let Some((_, seq, _)) = sequenced(event) {
            replayed.push(seq);
        }
    }
    // The refused resume still made bob a member (seq last + 2): the replay holds the new message and that join.
    assert_eq!(join_point, last_seq + 2, "bob's own joined follows the new message");
    assert_eq!(replayed, vec![last_seq + 1, last_seq + 2], "the replay after the purged range");
    println!(
        "room continued at seq {seq} after its {purged} events left the stream; history kept",
        purged = purged.purged
    );
    let _ = alice.close().await;
    let _ = bob.close().await;
    fleet.stop().await;
    routers.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_outlives_its_events_in_the_stream_on_the_embedded_store() {
    a_room_outlives_its_events_in_the_stream(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_room_outlives_its_events_in_the_stream_on_cql() {
    a_room_outlives_its_events_in_the_stream(StoreKind::Cql).await;
}
