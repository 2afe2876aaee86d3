//! The gateway's drain, on the real binary: a `switchyard-gateway` process holding 1,000 WebSocket sessions (both
//! formats, 50 rooms, 100 of them sending) gets SIGTERM. Every socket must get `bye` and then close 1001, the
//! `reconnect_after_ms` values must spread over the configured window, `/readyz` and new upgrades must answer 503
//! while it drains, every message acked (before or during the drain) must be in the history store, and the process
//! must exit cleanly inside its grace period. Its JSON log lines from sessions must carry the session id and no
//! token.
//!
//! The router shard and the persistor run in-process (`switchyard-testkit`) on the real NATS and Redis; the
//! gateway process is killed by a drop guard also when the test panics. This file does not test router-shard or
//! persistor shutdown.

mod support;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{nats_replicas, nats_url, redis_url, Fleet, JwtSigner};
use switchyard_client::{Auth, Client, ClientError, ClientOp, ConnectOptions, ErrorCode, Format, Reply};
use switchyard_persistor::store::{HistoryQuery, HistoryStore};
use switchyard_protocol::{ProjectId, RoomId};

const SOCKETS: usize = 1_000;
const ROOMS: usize = 50;
const SENDERS: usize = 100;
/// The gateway's `drain_reconnect_window_ms`.
const WINDOW_MS: u64 = 8_000;
/// The gateway's `drain_grace_ms`: the process must exit within it.
const GRACE: Duration = Duration::from_secs(15);

/// The gateway process, SIGKILLed when dropped if it still runs.
struct GatewayProcess {
    child: Option<Child>,
    url: String,
    dir: tempfile::TempDir,
}

impl GatewayProcess {
    fn start(admin_token: &str) -> GatewayProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let config = dir.path().join("gateway.toml");
        // Limits that would get in the way of a thousand sockets from one address and a hundred busy senders.
        std::fs::write(&config, "ops_per_sec = 10000\nops_burst = 10000\n").expect("write config");
        let log = |name: &str| std::fs::File::create(dir.path().join(name)).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard-gateway"))
            .env("SWITCHYARD_CONFIG", &config)
            .env("SWITCHYARD_LISTEN", format!("127.0.0.1:{port}"))
            .env("SWITCHYARD_NATS_URL", nats_url())
            .env("SWITCHYARD_NATS_REPLICAS", nats_replicas().to_string())
            .env("SWITCHYARD_REDIS_URL", redis_url())
            .env("SWITCHYARD_ADMIN_TOKEN", admin_token)
            .env("SWITCHYARD_TENANT_MSGS_PER_SEC", "1000000")
            .env("SWITCHYARD_TENANT_MSGS_BURST", "1000000")
            .env("SWITCHYARD_DRAIN_RECONNECT_WINDOW_MS", WINDOW_MS.to_string())
            .env("SWITCHYARD_DRAIN_GRACE_MS", GRACE.as_millis().to_string())
            .env("SWITCHYARD_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,switchyard_gateway::ws::session=debug")
            .stdin(Stdio::null())
            .stdout(log("stdout.log"))
            .stderr(log("stderr.log"))
            .spawn()
            .expect("start switchyard-gateway");
        GatewayProcess { child: Some(child), url: format!("http://127.0.0.1:{port}"), dir }
    }

    fn logs(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("stdout.log"), read("stderr.log"))
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A thousand sockets need a thousand descriptors in this process; raise the soft limit if it is lower.
fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
        }
    }
}

/// One acked message.
#[derive(Debug, Clone)]
struct Ack {
    room: usize,
    seq: u64,
    body: String,
    after_sigterm: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_a_thousand_sockets_without_losing_an_ack() {
    raise_fd_limit(4 * SOCKETS as u64);
    let test_started = Instant::now();
    let mut fleet = Fleet::start(0, 1).await;
    let mut gateway = GatewayProcess::start(&fleet.admin_token);
    // The fleet's helpers (tenants, JWT keys, WebSocket URLs) address gateway 0: the process.
    fleet.gateways.push(gateway.url.clone());
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(response) = http.get(format!("{}/readyz", gateway.url)).send().await {
            if response.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the gateway process never became ready: {}", gateway.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let tenant = fleet.create_tenant().await;
    let signer = JwtSigner::hs256(&format!("drain-test-secret-{}", switchyard_protocol::ids::random_base62(16)));
    fleet.set_jwt(&tenant, &signer).await;
    let rooms: Vec<RoomId> = (0..ROOMS).map(|r| RoomId::parse(&format!("drain-{r}")).expect("room")).collect();

    // A thousand sessions, connected and joined 100 at a time; each has a reader so its events never back up.
    let mut clients: Vec<Arc<Client>> = Vec::with_capacity(SOCKETS);
    let mut readers = Vec::with_capacity(SOCKETS);
    let connect_started = Instant::now();
    for batch in (0..SOCKETS).collect::<Vec<_>>().chunks(100) {
        let mut joins = Vec::new();
        for &i in batch {
            let token = signer.token(&tenant, &format!("user-{i}"), 600, serde_json::json!({}));
            let format = if i % 2 == 0 { Format::Json } else { Format::MsgPack };
            let mut options = ConnectOptions::new(fleet.ws_url(0), Auth::Header(token)).with_format(format);
            options.connect_timeout = Duration::from_secs(30);
            options.request_timeout = Duration::from_secs(30);
            let room = rooms[i % ROOMS].clone();
            joins.push(tokio::spawn(async move {
                let client = Client::connect(options).await.expect("connect");
                client.join(room.as_str(), None).await.expect("join");
                client
            }));
        }
        for join in joins {
            let client = Arc::new(join.await.expect("connect task"));
            let reader = client.clone();
            readers.push(tokio::spawn(async move { while reader.next_event().await.is_some() {} }));
            clients.push(client);
        }
    }
    let connect_took = connect_started.elapsed();

    // A socket that never reads after the upgrade: its session has to wait for a close frame that never comes,
    // which keeps the drain going long enough to look at /readyz and a new upgrade during it.
    let (_silent, _) = {
        let token = signer.token(&tenant, "silent", 600, serde_json::json!({}));
        let url = format!("{}?token={token}", fleet.ws_url(0));
        tokio_tungstenite::connect_async(url).await.expect("silent socket")
    };

    // Senders: each sends in its room until the drain refuses or closes it.
    let sigterm_sent = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Ack>>> = Arc::new(Mutex::new(Vec::new()));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for (i, client) in clients.iter().enumerate().take(SENDERS) {
        let (client, acked, acked_count, sigterm_sent) =
            (client.clone(), acked.clone(), acked_count.clone(), sigterm_sent.clone());
        let room = rooms[i % ROOMS].clone();
        senders.push(tokio::spawn(async move {
            // Returns (refused with unavailable, cut off by the close).
            let mut k = 0u64;
            loop {
                let body = format!("sender-{i}/{k}");
                let op = ClientOp::Send {
                    room: room.clone(),
                    body: body.clone(),
                    attrs: None,
                    reply_to: None,
                    cmid: Some(format!("s{i}-{k}")),
                };
                let after_sigterm = sigterm_sent.load(Ordering::SeqCst);
                match client.request(op).await {
                    Ok(Reply::Ok(fields)) => {
                        let seq = fields.get("seq").and_then(Value::as_u64).expect("ok carries seq");
                        let after_sigterm = after_sigterm || sigterm_sent.load(Ordering::SeqCst);
                        acked.lock().unwrap().push(Ack { room: i % ROOMS, seq, body, after_sigterm });
                        acked_count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Reply::Err { code: ErrorCode::Unavailable, .. }) => return (true, false),
                    Ok(Reply::Err { code, message, .. }) => panic!("send refused: {code:?} {message}"),
                    Err(ClientError::Closed(_)) => return (false, true),
                    Err(error) => panic!("send failed: {error}"),
                }
                k += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    let wait_for = Instant::now() + Duration::from_secs(60);
    while acked_count.load(Ordering::Relaxed) < 300 {
        assert!(Instant::now() < wait_for, "only {} messages acked in 60 s", acked_count.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGTERM, with traffic in flight.
    let pid = Pid::from_raw(gateway.child.as_ref().expect("running").id() as i32);
    sigterm_sent.store(true, Ordering::SeqCst);
    let sigterm_at = Instant::now();
    kill(pid, Signal::SIGTERM).expect("SIGTERM");

    // While it drains: not ready, and no new upgrades.
    let mut saw_not_ready = false;
    let mut refused_upgrade = None;
    while sigterm_at.elapsed() < Duration::from_secs(2) && !(saw_not_ready && refused_upgrade.is_some()) {
        if !saw_not_ready {
            if let Ok(response) = http.get(format!("{}/readyz", gateway.url)).send().await {
                saw_not_ready = response.status() == 503;
            }
        }
        if saw_not_ready && refused_upgrade.is_none() {
            let token = signer.token(&tenant, "late", 600, serde_json::json!({}));
            refused_upgrade = Some(match fleet.try_connect(0, Auth::Header(token)).await {
                Ok(_) => "admitted".to_owned(),
                Err(ClientError::Http { status, .. }) => status.to_string(),
                Err(error) => error.to_string(),
            });
        }
    }
    assert!(saw_not_ready, "/readyz never answered 503 during the drain");
    assert_eq!(refused_upgrade.as_deref(), Some("503"), "an upgrade during the drain");

    // The process exits on its own, cleanly, inside its grace period.
    let status = loop {
        let child = gateway.child.as_mut().expect("running");
        if let Some(status) = child.try_wait().expect("wait for the gateway") {
            break status;
        }
        assert!(sigterm_at.elapsed() < GRACE + Duration::from_secs(5), "the gateway is still running past its grace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_after = sigterm_at.elapsed();
    gateway.child = None;
    assert!(status.success(), "the gateway exited with {status}: {}", gateway.logs());
    assert!(exited_after < GRACE, "the gateway took {exited_after:?} to exit, its grace is {GRACE:?}");

    // Every socket: bye, then close 1001, with a reconnect delay inside the window.
    let mut delays = Vec::with_capacity(SOCKETS);
    for (i, client) in clients.iter().enumerate() {
        let info = client.wait_closed(Duration::from_secs(5)).await.unwrap_or_else(|| panic!("socket {i} is open"));
        assert_eq!(info.code, 1001, "socket {i} closed with {info}");
        let bye = info.bye.unwrap_or_else(|| panic!("socket {i} closed with 1001 but without bye"));
        assert_eq!(bye.code, 1001, "socket {i}: bye {bye:?}");
        let delay = bye.reconnect_after_ms.unwrap_or_else(|| panic!("socket {i}: bye without reconnect_after_ms"));
        assert!(delay < WINDOW_MS, "socket {i}: reconnect_after_ms {delay} is outside the {WINDOW_MS} ms window");
        delays.push(delay);
    }
    // Spread over the window: every tenth of it holds a fair share (uniform: 100 each; 50 is far in the tail).
    let mut tenths = [0usize; 10];
    for delay in &delays {
        tenths[(delay * 10 / WINDOW_MS) as usize] += 1;
    }
    delays.sort_unstable();
    let (min, median, max) = (delays[0], delays[SOCKETS / 2], delays[SOCKETS - 1]);
    assert!(tenths.iter().all(|n| *n >= 50), "reconnect delays bunch up: {tenths:?} per tenth of the window");
    assert!(min < WINDOW_MS / 20 && max > WINDOW_MS * 19 / 20, "delays span only {min}..{max} ms");

    let mut refused = 0;
    let mut cut_off = 0;
    for sender in senders {
        let (was_refused, was_cut_off) = sender.await.expect("sender task");
        refused += usize::from(was_refused);
        cut_off += usize::from(was_cut_off);
    }
    for reader in readers {
        reader.abort();
    }

    // No acked message is lost: each is in the history store at its seq.
    let acked = acked.lock().unwrap().clone();
    let acked_during_drain = acked.iter().filter(|a| a.after_sigterm).count();
    let project = ProjectId::parse(&tenant.project_id).expect("project id");
    let deadline = Instant::now() + Duration::from_secs(30);
    for (r, room) in rooms.iter().enumerate() {
        let expected: Vec<&Ack> = acked.iter().filter(|a| a.room == r).collect();
        loop {
            let stored = stored_messages(&fleet, &project, room).await;
            let missing: Vec<&&Ack> = expected
                .iter()
                .filter(|a| !stored.iter().any(|(seq, body)| *seq == a.seq && *body == a.body))
                .collect();
            if missing.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "room {r}: acked messages missing from history: {missing:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    // JSON logs: session lines carry the session id, and no line holds a token or the admin token.
    let logs = gateway.logs();
    let mut session_lines = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let entry: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        // A JWT starts with its base64 header ({"typ":"JWT",... or {"alg":...).
        let jwt = line.contains("eyJ0eXAi") || line.contains("eyJhbGci");
        assert!(!jwt && !line.contains(&fleet.admin_token), "a secret in the log: {line}");
        assert!(!line.contains(&tenant.api_key), "the API key in the log: {line}");
        if entry["target"] == "switchyard_gateway::ws::session" {
            session_lines += 1;
            let session = entry["spans"]
                .as_array()
                .and_then(|spans| spans.iter().find(|s| s["name"] == "session"))
                .unwrap_or_else(|| panic!("a session log line without the session span: {line}"));
            assert!(session["session"].as_str().is_some_and(|id| id.starts_with("ss_")), "{line}");
            assert_eq!(session["tenant"], tenant.project_id.as_str(), "{line}");
        }
    }
    assert!(session_lines >= SOCKETS, "only {session_lines} session log lines for {SOCKETS} sockets");

    println!(
        "drain of {SOCKETS} sockets: connected in {:.1} s; exited {:.2} s after SIGTERM (grace {} s); \
         reconnect_after_ms min {min} median {median} max {max} (window {WINDOW_MS}), per tenth {tenths:?}; \
         {} messages acked ({acked_during_drain} of them after SIGTERM), {refused} senders refused with \
         unavailable, {cut_off} cut off by the close; test ran {:.1} s",
        connect_took.as_secs_f64(),
        exited_after.as_secs_f64(),
        GRACE.as_secs(),
        acked.len(),
        test_started.elapsed().as_secs_f64()
    );
    fleet.stop().await;
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
