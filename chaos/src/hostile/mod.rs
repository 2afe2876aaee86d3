//! The hostile-client fuzzer: one seed is one plan (`gen`) of valid and hostile frames from the sockets of several
//! users of several fresh tenants, driven against a real fleet over raw WebSockets (`socket`), then judged
//! (`check`) against the contract and a reference model of room membership.
//!
//! It starts no processes (the scenario's fleet does), injects no faults, and never retries: every answer is judged
//! as it came. The process-level checks (panics, exits) are the scenario's, which holds the fleet.

pub mod check;
pub mod gen;
pub mod rng;
pub mod socket;

use crate::fleet::{Fleet, Tenant};
use anyhow::{Context, Result};
use check::{Finals, Stats};
use gen::{observed_rooms, project_placeholder, users, Attack, Expect, Info, Payload, Plan, Reply, Req, Role, What};
use serde_json::{json, Value};
use socket::Sock;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// What one seed came to.
#[derive(Debug, Clone)]
pub struct SeedOutcome {
    pub seed: u64,
    pub violations: Vec<String>,
    pub stats: Stats,
    pub took: Duration,
    /// Every frame of the seed in time order, when it had violations (for the kept logs).
    pub dump: Option<String>,
}

/// Tenant limits high enough that the fleet-wide message rate never refuses the fuzzer.
fn no_caps() -> Value {
    json!({"msgs_per_sec": 1_000_000u32, "msgs_burst": 1_000_000u32})
}

/// The real project ids, to put in place of the plan's placeholders.
struct Ids {
    project_ids: Vec<String>,
}

impl Ids {
    fn subst(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for (j, id) in self.project_ids.iter().enumerate() {
            out = out.replace(&project_placeholder(j), id);
        }
        out
    }

    fn req(&self, mut req: Req) -> Req {
        if let Payload::Text(text) = &req.payload {
            req.payload = Payload::Text(self.subst(text));
        }
        req.info.room = req.info.room.map(|r| self.subst(&r));
        req.info.user = req.info.user.map(|u| self.subst(&u));
        req
    }
}

/// A request built here (setup and the quiet point), answered like any other and judged with the rest.
fn request(op: &str, rid: u64, fields: Value, room: Option<&str>) -> Req {
    let mut frame = json!({"op": op, "rid": rid});
    if let (Some(map), Value::Object(extra)) = (frame.as_object_mut(), fields) {
        map.extend(extra);
    }
    let mut info = Info {
        op: op.to_owned(),
        room: room.map(str::to_owned),
        user: None,
        body: None,
        cmid: gen::Cmid::None,
        seq: None,
        emoji: None,
        remove: false,
        since: false,
    };
    if op == "rooms" {
        info.room = None;
    }
    Req {
        payload: Payload::Text(frame.to_string()),
        reply: Some(Reply::Rid(rid)),
        expect: Expect::Answer,
        info,
        known_bug: None,
    }
}

/// Run one seed on `fleet`.
pub async fn run_seed(fleet: &Fleet, seed: u64) -> Result<SeedOutcome> {
    let started = Instant::now();
    let plan = gen::plan(seed);
    let tenants: Vec<Tenant> =
        futures::future::try_join_all((0..gen::TENANTS).map(|_| fleet.create_tenant(no_caps()))).await?;
    let ids = Arc::new(Ids { project_ids: tenants.iter().map(|t| t.project_id.clone()).collect() });
    let epoch = Instant::now();
    let url = fleet.ws_url();
    let socks: Vec<Arc<Sock>> = futures::future::try_join_all(plan.sockets.iter().map(|spec| {
        let token = tenants[spec.tenant].token(&spec.user);
        let url = url.clone();
        let spec = spec.clone();
        async move { Sock::connect(&url, &token, spec, epoch).await.map(Arc::new) }
    }))
    .await
    .context("connecting the fuzzer's sockets")?;
    let mut violations = Vec::new();
    let mut next_rid = plan.next_rid.clone();
    // The observers create their rooms and join them: each room's seq 1 is its observer's `joined`.
    let setups = (0..gen::TENANTS).map(|t| {
        let obs = plan.observer(t);
        let sock = socks[obs].clone();
        let mut rid = next_rid[obs];
        async move {
            let mut problems = Vec::new();
            for room in observed_rooms(t) {
                rid += 1;
                let create =
                    request("create", rid, json!({"room": room.name, "private": room.private}), Some(&room.name));
                let answer = sock.request(create, Duration::from_secs(15)).await;
                if answer.as_ref().and_then(|a| a.get("op")).and_then(Value::as_str) != Some("ok") {
                    problems.push(format!("setup: t{t} observer's create of {} answered {answer:?}", room.name));
                }
                rid += 1;
                let join = request("join", rid, json!({"room": room.name}), Some(&room.name));
                let answer = sock.request(join, Duration::from_secs(15)).await;
                let seq = answer.as_ref().and_then(|a| a.get("seq")).and_then(Value::as_u64);
                if seq != Some(1) {
                    problems
                        .push(format!("setup: t{t} observer's join of {} answered {answer:?}, not seq 1", room.name));
                }
            }
            (obs, rid + 1, problems)
        }
    });
    for (obs, rid, problems) in futures::future::join_all(setups).await {
        next_rid[obs] = rid;
        violations.extend(problems);
    }
    // Drive the plan: one task per socket, each sending its frames at their offsets.
    let t0 = tokio::time::Instant::now();
    let mut drivers = JoinSet::new();
    for (i, sock) in socks.iter().enumerate() {
        let actions: Vec<gen::Action> = plan.actions.iter().filter(|a| a.sock == i).cloned().collect();
        let (sock, ids) = (sock.clone(), ids.clone());
        drivers.spawn(async move {
            for action in actions {
                tokio::time::sleep_until(t0 + Duration::from_millis(action.at_ms)).await;
                if sock.server_closed() {
                    break;
                }
                match action.what {
                    What::Frame(req) => {
                        let hold = tokio::time::Instant::now() + Duration::from_secs(15);
                        while sock.pending() >= gen::MAX_IN_FLIGHT && tokio::time::Instant::now() < hold {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        sock.send(ids.req(req));
                    }
                    What::Oversize => {
                        sock.send_oversize();
                        break;
                    }
                    What::Attack { .. } => {}
                }
            }
        });
    }
    let attacks: Vec<(u64, usize, Attack)> = plan
        .actions
        .iter()
        .filter_map(|a| match a.what {
            What::Attack { tenant, attack } => Some((a.at_ms, tenant, attack)),
            _ => None,
        })
        .collect();
    let mut attacking = JoinSet::new();
    for (at_ms, tenant, attack) in attacks {
        let tenants = tenants.clone();
        let url = url.clone();
        attacking.spawn(async move {
            tokio::time::sleep_until(t0 + Duration::from_millis(at_ms)).await;
            run_attack(&url, &tenants, tenant, attack).await.err().map(|e| format!("t{tenant}: {attack:?}: {e}"))
        });
    }
    while drivers.join_next().await.is_some() {}
    while let Some(done) = attacking.join_next().await {
        if let Ok(Some(problem)) = done {
            violations.push(problem);
        }
    }
    // Let every answer come (each has 15 s), then let the observers catch up with every ack.
    let deadline = Instant::now() + check::ANSWER_WITHIN + Duration::from_secs(1);
    while Instant::now() < deadline && socks.iter().any(|s| !s.server_closed() && s.pending() > 0) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !observers_caught_up(&plan, &socks) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The quiet point: members of every observed room, rooms of every user.
    let mut finals = Finals::default();
    let mut asks = Vec::new();
    for t in 0..gen::TENANTS {
        let obs = plan.observer(t);
        for room in observed_rooms(t) {
            next_rid[obs] += 1;
            let req = request("members", next_rid[obs], json!({"room": room.name}), Some(&room.name));
            asks.push((obs, (t, room.name.clone(), true), req));
        }
        for user in users(t) {
            let Some(k) = (0..socks.len()).find(|k| {
                plan.sockets[*k].tenant == t
                    && plan.sockets[*k].user == user
                    && plan.sockets[*k].role == Role::User
                    && !socks[*k].server_closed()
            }) else {
                continue;
            };
            next_rid[k] += 1;
            asks.push((k, (t, user.clone(), false), request("rooms", next_rid[k], json!({}), None)));
        }
    }
    let answers = futures::future::join_all(asks.into_iter().map(|(k, key, req)| {
        let sock = socks[k].clone();
        async move { (key, sock.request(req, Duration::from_secs(15)).await) }
    }))
    .await;
    for ((t, name, members), answer) in answers {
        match answer {
            Some(a) if members => {
                finals.members.insert((t, name), a);
            }
            Some(a) => {
                finals.rooms.insert((t, name), a);
            }
            None => {}
        }
    }
    for sock in &socks {
        sock.close();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs: Vec<socket::SockLog> = socks.iter().map(|s| s.snapshot()).collect();
    let (found, stats) = check::judge(&plan, &logs, &finals);
    violations.extend(found);
    let dump = (!violations.is_empty()).then(|| dump(&plan, &logs));
    Ok(SeedOutcome { seed, violations, stats, took: started.elapsed(), dump })
}

/// Every frame sent and received in the seed, one line each, in time order (ms since the sockets connected).
fn dump(plan: &Plan, logs: &[socket::SockLog]) -> String {
    let cut = |text: String| -> String {
        if text.len() > 600 {
            let head: String = text.chars().take(500).collect();
            format!("{head}...({} bytes)", text.len())
        } else {
            text
        }
    };
    let mut lines: Vec<(Duration, usize, String)> = Vec::new();
    for (i, log) in logs.iter().enumerate() {
        let name = plan.sockets[i].name(i);
        for sent in &log.sent {
            lines.push((sent.at, 0, format!("{name:<16} -> {}", cut(sent.req.describe()))));
            if let Some(answer) = &sent.answer {
                lines.push((answer.at, answer.pos, format!("{name:<16} <- {}", cut(answer.frame.to_string()))));
            }
        }
        for e in log.events.iter().chain(&log.ridless) {
            lines.push((e.at, e.pos, format!("{name:<16} <- {}", cut(e.frame.to_string()))));
        }
        if let Some(at) = log.oversize_at {
            lines.push((at, 0, format!("{name:<16} -> <a frame of 70 KB>")));
        }
        if let Some((code, reason)) = &log.close {
            lines.push((Duration::MAX, 0, format!("{name:<16} #  closed by the server: {code} {reason:?}")));
        }
    }
    lines.sort_by_key(|(at, pos, _)| (*at, *pos));
    let mut out = String::new();
    for (at, _, line) in lines {
        let ms = if at == Duration::MAX { "end".to_owned() } else { at.as_millis().to_string() };
        out.push_str(&format!("{ms:>7} {line}\n"));
    }
    out
}

/// Whether every observer has received every seq some socket was acked in its rooms.
fn observers_caught_up(plan: &Plan, socks: &[Arc<Sock>]) -> bool {
    for t in 0..gen::TENANTS {
        let obs = &socks[plan.observer(t)];
        for room in observed_rooms(t) {
            let acked =
                socks.iter().filter(|s| s.spec.tenant == t).map(|s| s.max_acked_seq(&room.name)).max().unwrap_or(0);
            if obs.last_seq(&room.name) < acked {
                return false;
            }
        }
    }
    true
}

/// One attack on authentication; `Err` with what went wrong when it was not refused as the contract says.
async fn run_attack(url: &str, tenants: &[Tenant], t: usize, attack: Attack) -> Result<()> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let pid = tenants[t].project_id.clone();
    let token = match attack {
        Attack::ForgedTenant { other } => {
            Some(tenants[other].sign(&json!({"sub": "alice", "pid": pid, "exp": now + 600})))
        }
        Attack::BadSubject => Some(tenants[t].sign(&json!({"sub": "al ice\r\n", "pid": pid, "exp": now + 600}))),
        Attack::Expired => Some(tenants[t].sign(&json!({"sub": "alice", "pid": pid, "exp": now - 3600}))),
        Attack::GarbageAuthFrame | Attack::NotAuthFirst => None,
    };
    let mut request = url.into_client_request()?;
    if let Some(token) = &token {
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    }
    let connected = tokio::time::timeout(Duration::from_secs(15), tokio_tungstenite::connect_async(request)).await?;
    let mut stream = match (connected, token.is_some()) {
        (Err(tokio_tungstenite::tungstenite::Error::Http(response)), true) => {
            let status = response.status().as_u16();
            anyhow::ensure!(status == 401, "refused with HTTP {status}, not 401");
            return Ok(());
        }
        (Err(error), _) => anyhow::bail!("the upgrade failed with {error}"),
        (Ok(_), true) => anyhow::bail!("ADMITTED: the upgrade succeeded with a token that must be refused"),
        (Ok((stream, _)), false) => stream,
    };
    use futures::{SinkExt, StreamExt};
    let first = match attack {
        Attack::GarbageAuthFrame => json!({"op": "auth", "token": "sytok_\r\n\0garbage"}).to_string(),
        _ => json!({"op": "join", "rid": 1, "room": "lobby"}).to_string(),
    };
    stream.send(Message::Text(first.into())).await?;
    let mut bye = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => {
                let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                match frame.get("op").and_then(Value::as_str) {
                    Some("bye") => bye = frame.get("code").and_then(Value::as_u64),
                    _ => anyhow::bail!("ADMITTED: got {text} before authenticating"),
                }
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                let code = frame.map(|f| u16::from(f.code));
                anyhow::ensure!(
                    code == Some(4001) && bye == Some(4001),
                    "closed with {code:?} after bye {bye:?}, not 4001"
                );
                return Ok(());
            }
            Ok(Some(Ok(_))) => {}
            other => anyhow::bail!("the socket ended without a close frame: {other:?}"),
        }
    }
    anyhow::bail!("not closed within 10 s")
}
