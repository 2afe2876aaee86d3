//! The judgement of one seed: what every socket sent and saw, held against the contract and against a reference
//! model of each observed room built from its observer's gap-free view (who is a member at every seq).
//!
//! It asserts only what the contract guarantees (`../shared/protocol-v1.md` and the choices in
//! `docs/PROTOCOL.md`): where an outcome depends on a race the contract leaves open, it checks the answer's code
//! and nothing else. It does no I/O.

use super::gen::{
    allowed_codes, dm_participants, observed_rooms, users, Cmid, Expect, Plan, Reply, Role, CONTRACT_CODES,
    DOCUMENTED_CLOSES, OBSERVER, TENANTS,
};
use super::socket::{Recv, SockLog};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

/// An answer later than this is a violation, even when it came.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(15);

/// Counts for the row's details.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub sent: usize,
    pub ok: usize,
    pub codes: BTreeMap<String, usize>,
    pub events: usize,
    /// Sequenced events delivered to a socket twice (also violations).
    pub duplicated: usize,
    /// Answers that showed a known product bug (`gen::KNOWN_BUGS`), by name.
    pub known_bugs: BTreeMap<&'static str, usize>,
}

/// The answers of the quiet point after the seed: `members` of every observed room (asked by its observer) and
/// `rooms` of every user (asked on one of their sockets).
#[derive(Debug, Clone, Default)]
pub struct Finals {
    pub members: HashMap<(usize, String), Value>,
    pub rooms: HashMap<(usize, String), Value>,
}

fn s<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn n(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

const SEQUENCED: &[&str] = &["msg", "edit", "delete", "reaction", "pin", "joined", "left", "moderation"];

/// The tag the fuzzer puts at the start of every body: tenant and user of the sender.
fn tag(body: &str) -> Option<(usize, &str)> {
    let inner = body.strip_prefix('⟦')?;
    let (inner, _) = inner.split_once('⟧')?;
    let mut parts = inner.splitn(3, '/');
    let tenant = parts.next()?.parse().ok()?;
    let user = parts.next()?;
    Some((tenant, user))
}

/// One observed room as its observer saw it.
struct Timeline {
    /// seq -> event.
    events: BTreeMap<u64, Value>,
    /// members[s]: the members after the event at seq s (index 0 unused).
    members: Vec<BTreeSet<String>>,
    last: u64,
    /// Everyone who was a member at some seq.
    ever: BTreeSet<String>,
    /// The observer's view had a gap or a duplicate: nothing is judged against it.
    broken: bool,
}

impl Timeline {
    fn member(&self, user: &str, seq: u64) -> bool {
        self.members.get(seq as usize).is_some_and(|m| m.contains(user))
    }
}

struct Judge<'a> {
    plan: &'a Plan,
    logs: &'a [SockLog],
    v: Vec<String>,
    stats: Stats,
    /// (tenant, room) -> timeline.
    timelines: HashMap<(usize, String), Timeline>,
}

/// Judge one seed; the violations found, and counts.
pub fn judge(plan: &Plan, logs: &[SockLog], finals: &Finals) -> (Vec<String>, Stats) {
    let mut j = Judge { plan, logs, v: Vec::new(), stats: Stats::default(), timelines: HashMap::new() };
    j.answers();
    j.timelines();
    j.deliveries();
    j.acks();
    j.counts();
    j.dms();
    j.finals(finals);
    (j.v, j.stats)
}

impl Judge<'_> {
    fn name(&self, i: usize) -> String {
        self.plan.sockets[i].name(i)
    }

    /// The users who ever had a session in tenant `t`.
    fn connected(t: usize, user: &str) -> bool {
        user == OBSERVER || users(t).iter().any(|u| u == user)
    }

    /// Every answer: exactly one, in time, with a code of the contract that fits the frame and the op.
    fn answers(&mut self) {
        for (i, log) in self.logs.iter().enumerate() {
            let spec = &self.plan.sockets[i];
            let name = self.name(i);
            for stray in &log.stray {
                self.v.push(format!("{name}: {stray}"));
            }
            match (&log.close, spec.role, log.oversize_at) {
                (Some((1009, _)), Role::Kamikaze, Some(_)) => {}
                (close, Role::Kamikaze, Some(_)) => self.v.push(format!(
                    "{name}: a frame over 64 KiB was answered with close {close:?}, not 1009 (dropped: {})",
                    log.dropped
                )),
                (Some((4008, _)), _, _) => {}
                (Some((code, reason)), _, _) => {
                    self.v.push(format!("{name}: closed by the server with {code} {reason:?}"));
                }
                (None, _, _) => {}
            }
            if let Some((code, _)) = &log.close {
                if !DOCUMENTED_CLOSES.contains(code) {
                    self.v.push(format!("{name}: close code {code} is not one the contract documents"));
                }
                match log.bye.as_ref().and_then(|b| n(b, "code")) {
                    Some(bye) if bye == u64::from(*code) => {}
                    other => self.v.push(format!("{name}: closed with {code} after bye {other:?}")),
                }
            }
            if log.dropped {
                self.v.push(format!("{name}: the connection ended without a close frame"));
            }
            let closed = log.server_closed();
            let (mut want_pong, mut want_answer, mut want_refused) = (0, 0, 0);
            for sent in &log.sent {
                self.stats.sent += 1;
                match (&sent.req.reply, &sent.answer) {
                    (None, _) => {}
                    (Some(Reply::NoRid), _) => match sent.req.expect {
                        Expect::Pong => want_pong += 1,
                        Expect::Answer => want_answer += 1,
                        _ => want_refused += 1,
                    },
                    (Some(Reply::Rid(rid)), None) => {
                        if !closed {
                            self.v.push(format!(
                                "{name}: no answer to rid {rid} within {}s: {}",
                                ANSWER_WITHIN.as_secs(),
                                sent.req.describe()
                            ));
                        }
                    }
                    (Some(Reply::Rid(_)), Some(answer)) => {
                        let took = answer.at.saturating_sub(sent.at);
                        if took > ANSWER_WITHIN {
                            self.v.push(format!(
                                "{name}: answered after {:.1}s: {}",
                                took.as_secs_f64(),
                                sent.req.describe()
                            ));
                        }
                        if let Some(problem) = self.judge_answer(&sent.req.expect, &sent.req.info.op, &answer.frame) {
                            match sent.req.known_bug {
                                Some(bug) if matches!(s(&answer.frame, "op"), Some("ok" | "pong")) => {
                                    *self.stats.known_bugs.entry(bug).or_default() += 1
                                }
                                _ => self.v.push(format!(
                                    "{name}: {problem}: {} -> {}",
                                    sent.req.describe(),
                                    answer.frame
                                )),
                            }
                        } else if let Some(problem) = self.shape(sent, &answer.frame) {
                            self.v.push(format!("{name}: {problem}: {} -> {}", sent.req.describe(), answer.frame));
                        }
                    }
                }
            }
            // Typing is never answered.
            for sent in &log.sent {
                if sent.req.reply.is_none() && sent.answer.is_some() {
                    self.v.push(format!("{name}: a typing frame was answered: {}", sent.req.describe()));
                }
            }
            let (mut pongs, mut oks, mut errs) = (0, 0, 0);
            for r in &log.ridless {
                match s(&r.frame, "op") {
                    Some("pong") => pongs += 1,
                    Some("ok") => oks += 1,
                    _ => {
                        errs += 1;
                        if let Some(problem) = self.judge_answer(&Expect::Refused(vec!["bad_request"]), "", &r.frame) {
                            if !problem.starts_with("refused with") {
                                self.v.push(format!("{name}: an answer without rid: {problem}: {}", r.frame));
                            }
                        }
                    }
                }
            }
            if !closed {
                let (got, want) = (pongs + oks + errs, want_pong + want_answer + want_refused);
                if got != want {
                    self.v.push(format!(
                        "{name}: {got} answers without a rid for {want} frames whose rid cannot be read or is absent"
                    ));
                }
                if oks > want_answer {
                    self.v.push(format!(
                        "{name}: {oks} ok answers without a rid, but only {want_answer} such frames were valid: a \
                         frame that must be refused was accepted"
                    ));
                }
                if pongs > want_pong + want_answer {
                    self.v.push(format!("{name}: {pongs} pongs without a rid for {want_pong} pings without one"));
                }
            }
        }
    }

    /// Whether an answer fits what was expected; the problem when it does not.
    fn judge_answer(&mut self, expect: &Expect, op: &str, answer: &Value) -> Option<String> {
        let kind = s(answer, "op").unwrap_or("");
        let code = s(answer, "code").unwrap_or("");
        let message = s(answer, "message").unwrap_or("");
        if kind == "ok" || kind == "pong" {
            self.stats.ok += 1;
        } else {
            *self.stats.codes.entry(code.to_owned()).or_default() += 1;
        }
        if kind == "err" {
            if !CONTRACT_CODES.contains(&code) {
                return Some(format!("error code {code:?} is not one of the contract's"));
            }
            match code {
                "internal" => return Some(format!("answered internal ({message})")),
                "unavailable" => return Some(format!("answered unavailable with no fault injected ({message})")),
                "unauthorized" => return Some("answered unauthorized on an authenticated WebSocket".to_owned()),
                "rate_limited" => {
                    return answer.get("retry_after_ms").is_none().then(|| "rate_limited without retry_after_ms".into())
                }
                "forbidden" if message.contains("quota") => return None,
                _ => {}
            }
            if message.is_empty() {
                return Some("an err without a message".to_owned());
            }
        }
        match expect {
            Expect::Pong if kind == "pong" => None,
            Expect::Pong => Some(format!("a ping answered {kind}")),
            Expect::Silent => Some("answered".to_owned()),
            Expect::Refused(codes) if kind == "err" => (!codes.contains(&code))
                .then(|| format!("refused with {code}, the contract says {}", codes.join(" or "))),
            Expect::Refused(codes) => {
                Some(format!("ACCEPTED a frame the contract refuses ({}): answered {kind}", codes.join(" or ")))
            }
            Expect::Answer if kind == "ok" => None,
            Expect::Answer if kind == "err" => (!allowed_codes(op).contains(&code))
                .then(|| format!("{op} answered {code}, which is not an answer this op can get")),
            Expect::Answer => Some(format!("{op} answered {kind}")),
        }
    }

    /// The result fields of an `ok`: the ones the contract lists, and the room asked for.
    fn shape(&self, sent: &super::socket::Sent, answer: &Value) -> Option<String> {
        if s(answer, "op") != Some("ok") {
            return None;
        }
        let info = &sent.req.info;
        let need: &[&str] = match info.op.as_str() {
            "send" | "dm" => &["room", "id", "seq", "ts"],
            "join" | "read" | "react" | "edit" | "delete" | "pin" | "unpin" | "ban" | "unban" | "mute" | "unmute"
            | "slow_mode" | "freeze" | "unfreeze" => &["room", "seq"],
            "create" | "leave" | "invite" | "kick" => &["room"],
            "history" => &["room", "messages", "more"],
            "members" => &["members"],
            "rooms" => &["rooms"],
            "presence" => &["users"],
            _ => &[],
        };
        if let Some(missing) = need.iter().find(|k| answer.get(**k).is_none()) {
            return Some(format!("an ok without {missing}"));
        }
        // A repeated cmid answers the first ok; which room it names is not pinned down (see docs/chaos.md).
        if let (Some(room), Some(got), false) = (&info.room, s(answer, "room"), matches!(info.cmid, Cmid::Pooled(_))) {
            if room != got {
                return Some(format!("an ok for room {got:?}, asked about {room:?}"));
            }
        }
        None
    }

    /// Build each observed room's timeline from its observer, checking that view: gap-free, each event allowed by
    /// the membership and roles before it.
    fn timelines(&mut self) {
        for t in 0..TENANTS {
            let obs = self.plan.observer(t);
            let log = &self.logs[obs];
            for room in observed_rooms(t) {
                let mut tl = Timeline {
                    events: BTreeMap::new(),
                    members: vec![BTreeSet::new(), [OBSERVER.to_owned()].into()],
                    last: 1,
                    ever: [OBSERVER.to_owned()].into(),
                    broken: false,
                };
                let name = format!("t{t}/{}", room.name);
                for e in log.events.iter().filter(|e| s(&e.frame, "room") == Some(room.name.as_str())) {
                    let op = s(&e.frame, "op").unwrap_or("");
                    if !SEQUENCED.contains(&op) {
                        continue;
                    }
                    let Some(seq) = n(&e.frame, "seq") else {
                        self.v.push(format!("observer of {name}: a {op} without seq: {}", e.frame));
                        continue;
                    };
                    if seq != tl.last + 1 {
                        self.v.push(format!(
                            "observer of {name}: seq {seq} after {} (a {} in the observer's view): {}",
                            tl.last,
                            if seq <= tl.last { "duplicate or step back" } else { "gap" },
                            e.frame
                        ));
                        if seq <= tl.last {
                            self.stats.duplicated += 1;
                        }
                        tl.broken = true;
                        break;
                    }
                    let before = tl.members[tl.members.len() - 1].clone();
                    let mut after = before.clone();
                    let actor = match op {
                        "msg" | "edit" => s(&e.frame, "from"),
                        "delete" | "pin" | "moderation" => s(&e.frame, "by"),
                        _ => s(&e.frame, "user"),
                    }
                    .unwrap_or("")
                    .to_owned();
                    let problem = match op {
                        "joined" if before.contains(&actor) => Some("joined for a user who already was a member"),
                        "joined" => {
                            after.insert(actor.clone());
                            tl.ever.insert(actor.clone());
                            None
                        }
                        "left" if actor == OBSERVER => Some("the observer (the room's only admin) left or was kicked"),
                        "left" if !before.contains(&actor) => Some("left for a user who was not a member"),
                        "left" => {
                            after.remove(&actor);
                            match s(&e.frame, "by") {
                                Some(by) if by != OBSERVER => Some("kicked by someone who is not an admin"),
                                _ => None,
                            }
                        }
                        // The observer, the rooms' only admin, moderates nothing: nobody may.
                        "moderation" => Some("a moderation action in a room whose only admin takes none"),
                        _ if !before.contains(&actor) => Some("sequenced for a user who was not a member"),
                        _ => self.target_problem(&tl, op, &e.frame),
                    };
                    if let Some(problem) = problem {
                        self.v.push(format!("observer of {name}: seq {seq}: {problem}: {}", e.frame));
                    }
                    if let Some(problem) = self.body_problem(t, &e.frame) {
                        self.v.push(format!("observer of {name}: {problem}: {}", e.frame));
                    }
                    tl.events.insert(seq, e.frame.clone());
                    tl.members.push(after);
                    tl.last = seq;
                }
                self.timelines.insert((t, room.name.clone()), tl);
            }
        }
    }

    /// For edit, delete, reaction and pin: the target is a message not deleted before, and the actor may touch it.
    fn target_problem(&self, tl: &Timeline, op: &str, e: &Value) -> Option<&'static str> {
        let target = n(e, "target")?;
        let Some(original) = tl.events.get(&target).filter(|o| s(o, "op") == Some("msg")) else {
            return Some("targets a seq that is not a message");
        };
        let deleted = tl.events.values().any(|x| s(x, "op") == Some("delete") && n(x, "target") == Some(target));
        if deleted {
            return Some("targets a deleted message");
        }
        match op {
            "edit" if s(e, "from") != s(original, "from") => Some("an edit by someone who is not the author"),
            "delete" if s(e, "by") != s(original, "from") && s(e, "by") != Some(OBSERVER) => {
                Some("a delete by someone who is neither the author nor an admin")
            }
            "pin" if s(e, "by") != Some(OBSERVER) => Some("a pin by someone who is not an admin"),
            _ => None,
        }
    }

    /// A body's tag names the tenant it was delivered in and the user it is from.
    fn body_problem(&self, t: usize, e: &Value) -> Option<String> {
        let body = s(e, "body")?;
        let (tenant, user) = tag(body)?;
        if tenant != t {
            return Some(format!("CROSS-TENANT: a body sent in tenant {tenant} delivered in tenant {t}"));
        }
        let from = s(e, "from").unwrap_or("");
        (from != user).then(|| format!("a body sent by {user} delivered as from {from:?}"))
    }

    /// Every event each socket received: order, origin, and, in observed rooms, membership and identity with the
    /// observer's view.
    fn deliveries(&mut self) {
        for (i, log) in self.logs.iter().enumerate() {
            let spec = &self.plan.sockets[i];
            let (t, me) = (spec.tenant, spec.user.as_str());
            let name = self.name(i);
            let mut last: HashMap<String, u64> = HashMap::new();
            // Watches that may have taken effect: every well-formed one (an answer without rid cannot be matched).
            let watched: HashSet<String> = log
                .sent
                .iter()
                .filter(|x| x.req.info.op == "watch" && x.req.expect == Expect::Answer)
                .flat_map(|x| watch_users(&x.req))
                .collect();
            let mut received: HashMap<String, Vec<&Recv>> = HashMap::new();
            for e in &log.events {
                self.stats.events += 1;
                let op = s(&e.frame, "op").unwrap_or("");
                let room = s(&e.frame, "room").unwrap_or("").to_owned();
                match op {
                    _ if SEQUENCED.contains(&op) => {
                        let Some(seq) = n(&e.frame, "seq") else {
                            self.v.push(format!("{name}: a {op} without seq: {}", e.frame));
                            continue;
                        };
                        let prev = last.insert(room.clone(), seq).unwrap_or(0);
                        if seq <= prev {
                            if seq == prev {
                                self.stats.duplicated += 1;
                            }
                            self.v.push(format!(
                                "{name}: {room} seq {seq} after seq {prev} ({}): {}",
                                if seq == prev { "delivered twice" } else { "out of order" },
                                e.frame
                            ));
                        }
                        if let Some(problem) = self.body_problem(t, &e.frame) {
                            self.v.push(format!("{name}: {problem}: {}", e.frame));
                        }
                        if let Some((a, b)) = dm_participants(&room) {
                            if me != a && me != b {
                                self.v.push(format!("{name}: an event of someone else's conversation: {}", e.frame));
                            }
                            let from = s(&e.frame, "from").or(s(&e.frame, "by")).or(s(&e.frame, "user")).unwrap_or(a);
                            if from != a && from != b {
                                self.v.push(format!("{name}: a conversation event by a non-participant: {}", e.frame));
                            }
                        } else if spec.role != Role::Observer {
                            if let Some(tl) = observed(&self.timelines, t, &room) {
                                match tl.events.get(&seq) {
                                    None => self.v.push(format!(
                                        "{name}: {room} seq {seq}, which its observer never saw (last {}): {}",
                                        tl.last, e.frame
                                    )),
                                    Some(o) if *o != e.frame => self.v.push(format!(
                                        "{name}: {room} seq {seq} is not the event its observer saw: got {} , the \
                                         observer saw {o}",
                                        e.frame
                                    )),
                                    Some(_) => {}
                                }
                                if !tl.member(me, seq) && !tl.member(me, seq - 1) {
                                    self.v.push(format!(
                                        "{name}: received {room} seq {seq} while {me} was not a member: {}",
                                        e.frame
                                    ));
                                }
                                received.entry(room.clone()).or_default().push(e);
                            }
                        }
                    }
                    "typing" | "read" => {
                        let user = s(&e.frame, "user").unwrap_or("");
                        if op == "typing" && user == me {
                            self.v.push(format!("{name}: its own typing came back: {}", e.frame));
                        }
                        if let Some(tl) = observed(&self.timelines, t, &room) {
                            if !tl.ever.contains(user) {
                                self.v.push(format!("{name}: a {op} in {room} from a user never in it: {}", e.frame));
                            }
                            if op == "read" && n(&e.frame, "seq").is_some_and(|q| q > tl.last) {
                                self.v.push(format!("{name}: a read marker past the room's last seq: {}", e.frame));
                            }
                        }
                    }
                    "presence" => {
                        let user = s(&e.frame, "user").unwrap_or("");
                        if !Self::connected(t, user) {
                            self.v.push(format!(
                                "{name}: CROSS-TENANT presence: {user} never connected in this tenant: {}",
                                e.frame
                            ));
                        }
                        if !watched.contains(user) {
                            self.v.push(format!("{name}: presence of a user this socket never watched: {}", e.frame));
                        }
                    }
                    _ => self.v.push(format!("{name}: an unknown server frame: {}", e.frame)),
                }
            }
            if spec.role != Role::Observer {
                self.stretches(i, received);
            }
            self.answer_contents(i);
        }
    }

    /// In each observed room: a socket receives exactly the events after each of its join points until its user's
    /// membership ends (their `left`), and nothing outside those stretches.
    fn stretches(&mut self, i: usize, received: HashMap<String, Vec<&Recv>>) {
        let log = &self.logs[i];
        let spec = &self.plan.sockets[i];
        let (t, me) = (spec.tenant, spec.user.as_str());
        let name = self.name(i);
        let closed = log.server_closed();
        for room in observed_rooms(t) {
            let Some(tl) = observed(&self.timelines, t, &room.name) else { continue };
            let joins: Vec<&super::socket::Sent> = log
                .sent
                .iter()
                .filter(|x| x.req.info.op == "join" && x.req.info.room.as_deref() == Some(&room.name))
                .collect();
            let unanswered = joins.iter().any(|x| x.answer.is_none());
            let ambiguous = unanswered
                || joins
                    .iter()
                    .any(|x| x.req.info.since || x.answer.as_ref().is_some_and(|a| join_err_may_matter(&a.frame)));
            let mut stretches: Vec<(u64, u64, bool)> = Vec::new();
            for join in &joins {
                let Some(a) = join.answer.as_ref().filter(|a| s(&a.frame, "op") == Some("ok")) else { continue };
                let Some(at) = n(&a.frame, "seq") else { continue };
                if at > tl.last {
                    self.v.push(format!(
                        "{name}: join of {} answered seq {at}, past the observer's last {}",
                        room.name, tl.last
                    ));
                    continue;
                }
                if !tl.member(me, at) {
                    self.v.push(format!(
                        "{name}: join of {} answered seq {at}, but {me} was not a member at seq {at}",
                        room.name
                    ));
                    continue;
                }
                let end = (at + 1..=tl.last).find(|q| !tl.member(me, *q));
                stretches.push((at, end.unwrap_or(tl.last), end.is_some()));
            }
            let got: BTreeSet<u64> =
                received.get(&room.name).into_iter().flatten().filter_map(|e| n(&e.frame, "seq")).collect();
            if !unanswered {
                for q in &got {
                    if !stretches.iter().any(|(from, to, _)| q > from && q <= to) {
                        let stretch_list: Vec<String> =
                            stretches.iter().map(|(a, b, _)| format!("({a},{b}]")).collect();
                        self.v.push(format!(
                            "{name}: received {} seq {q} outside its joined stretches {} (after a leave or kick, \
                             before a new join)",
                            room.name,
                            stretch_list.join(" ")
                        ));
                        break;
                    }
                }
            }
            if ambiguous || closed || spec.role == Role::Kamikaze {
                continue;
            }
            let mut missing = Vec::new();
            for (from, to, ended) in &stretches {
                let upto = if *ended { *to - 1 } else { *to };
                missing.extend((from + 1..=upto).filter(|q| !got.contains(q)));
            }
            missing.sort_unstable();
            missing.dedup();
            if !missing.is_empty() {
                let head: Vec<String> = missing.iter().take(8).map(u64::to_string).collect();
                self.v.push(format!(
                    "{name}: missed {} events of {} while joined and a member (seqs {}{})",
                    missing.len(),
                    room.name,
                    head.join(","),
                    if missing.len() > 8 { ",..." } else { "" }
                ));
            }
        }
    }

    /// What `ok` answers hold: nothing of another tenant, and in observed rooms nothing the observer did not see.
    fn answer_contents(&mut self, i: usize) {
        let log = &self.logs[i];
        let spec = &self.plan.sockets[i];
        let (t, me) = (spec.tenant, spec.user.as_str());
        let name = self.name(i);
        for sent in &log.sent {
            let Some(a) = sent.answer.as_ref().filter(|a| s(&a.frame, "op") == Some("ok")) else { continue };
            let room = sent.req.info.room.clone().unwrap_or_default();
            match sent.req.info.op.as_str() {
                "history" => {
                    for m in a.frame.get("messages").and_then(Value::as_array).into_iter().flatten() {
                        if let Some(problem) = self.body_problem(t, m) {
                            self.v.push(format!("{name}: history of {room}: {problem}: {m}"));
                        }
                        let Some(tl) = observed(&self.timelines, t, &room) else { continue };
                        let seq = n(m, "seq").unwrap_or(0);
                        match tl.events.get(&seq) {
                            Some(o)
                                if s(o, "op") == Some("msg")
                                    && s(o, "id") == s(m, "id")
                                    && s(o, "from") == s(m, "from") => {}
                            o => self.v.push(format!(
                                "{name}: history of {room} holds {m}, the observer saw {}",
                                o.map(Value::to_string).unwrap_or_else(|| "nothing at that seq".into())
                            )),
                        }
                    }
                }
                "members" => {
                    let Some(tl) = observed(&self.timelines, t, &room) else { continue };
                    for m in a.frame.get("members").and_then(Value::as_array).into_iter().flatten() {
                        let user = s(m, "user").unwrap_or("");
                        if !tl.ever.contains(user) {
                            self.v.push(format!("{name}: members of {room} lists {user}, never a member: {m}"));
                        }
                    }
                }
                "rooms" => {
                    for r in a.frame.get("rooms").and_then(Value::as_array).into_iter().flatten() {
                        let listed = s(r, "room").unwrap_or("");
                        if let Some((x, y)) = dm_participants(listed) {
                            if x != me && y != me {
                                self.v.push(format!("{name}: rooms lists someone else's conversation: {r}"));
                            }
                        }
                        if let Some(tl) = observed(&self.timelines, t, listed) {
                            if !tl.ever.contains(me) || n(r, "seq").is_some_and(|q| q > tl.last) {
                                self.v.push(format!(
                                    "{name}: rooms lists {r}, the observer saw {me} never a member or a lower seq ({})",
                                    tl.last
                                ));
                            }
                        }
                    }
                }
                "presence" => {
                    let Some(map) = a.frame.get("users").and_then(Value::as_object) else { continue };
                    for (user, state) in map {
                        if !Self::connected(t, user)
                            && (state.get("online").and_then(Value::as_bool) != Some(false)
                                || state.get("last_seen").is_some())
                        {
                            self.v.push(format!(
                                "{name}: CROSS-TENANT presence: {user} never connected in this tenant, yet {state}"
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Each ok that created an event in an observed room names the event the observer saw at that seq.
    fn acks(&mut self) {
        let mut pooled: HashMap<(usize, String, String), (u64, String, String)> = HashMap::new();
        for (i, log) in self.logs.iter().enumerate() {
            let spec = &self.plan.sockets[i];
            let (t, me) = (spec.tenant, spec.user.clone());
            let name = self.name(i);
            for sent in &log.sent {
                let Some(a) = sent.answer.as_ref().filter(|a| s(&a.frame, "op") == Some("ok")) else { continue };
                let info = &sent.req.info;
                let seq = n(&a.frame, "seq");
                if let (Cmid::Pooled(cmid), Some(seq), Some(id)) = (&info.cmid, seq, s(&a.frame, "id")) {
                    let key = (t, me.clone(), cmid.clone());
                    let seen = (seq, id.to_owned(), a.frame.to_string());
                    match pooled.get(&key) {
                        Some((q, first_id, first)) if (*q, first_id.as_str()) != (seq, id) => self.v.push(format!(
                            "{name}: cmid {cmid:?} repeated within 10 minutes answered {} after {first}",
                            a.frame
                        )),
                        Some(_) => {}
                        None => {
                            pooled.insert(key, seen);
                        }
                    }
                }
                let Some(room) = info.room.as_deref() else { continue };
                let Some(tl) = observed(&self.timelines, t, room) else { continue };
                let Some(seq) = seq else { continue };
                let event = tl.events.get(&seq);
                let problem = match info.op.as_str() {
                    "join" | "read" => (seq > tl.last).then(|| format!("past the observer's last seq {}", tl.last)),
                    "send" if matches!(info.cmid, Cmid::None | Cmid::Unique) => match event {
                        Some(e)
                            if s(e, "op") == Some("msg")
                                && s(e, "id") == s(&a.frame, "id")
                                && s(e, "from") == Some(&me)
                                && s(e, "body") == info.body.as_deref() =>
                        {
                            None
                        }
                        other => Some(event_mismatch("msg", other)),
                    },
                    "react" => match event {
                        Some(e)
                            if s(e, "op") == Some("reaction")
                                && n(e, "target") == info.seq
                                && s(e, "user") == Some(&me)
                                && s(e, "emoji") == info.emoji.as_deref()
                                && e.get("removed").and_then(Value::as_bool) == Some(info.remove) =>
                        {
                            None
                        }
                        other => Some(event_mismatch("reaction", other)),
                    },
                    "edit" => match event {
                        Some(e)
                            if s(e, "op") == Some("edit")
                                && n(e, "target") == info.seq
                                && s(e, "from") == Some(&me)
                                && s(e, "body") == info.body.as_deref() =>
                        {
                            None
                        }
                        other => Some(event_mismatch("edit", other)),
                    },
                    "delete" => match event {
                        Some(e)
                            if s(e, "op") == Some("delete")
                                && n(e, "target") == info.seq
                                && s(e, "by") == Some(&me) =>
                        {
                            None
                        }
                        other => Some(event_mismatch("delete", other)),
                    },
                    "pin" | "unpin" => match event {
                        Some(e)
                            if s(e, "op") == Some("pin")
                                && n(e, "target") == info.seq
                                && s(e, "by") == Some(&me)
                                && e.get("pinned").and_then(Value::as_bool) == Some(info.op == "pin") =>
                        {
                            None
                        }
                        other => Some(event_mismatch("pin", other)),
                    },
                    _ => None,
                };
                if let Some(problem) = problem {
                    self.v.push(format!("{name}: {} -> {}: {problem}", sent.req.describe(), a.frame));
                }
            }
        }
    }

    /// Membership events are explained by requests: every acked leave and kick has its `left`, and no `joined` or
    /// `left` appears that no request could have made.
    fn counts(&mut self) {
        for t in 0..TENANTS {
            for room in observed_rooms(t) {
                let Some(tl) = observed(&self.timelines, t, &room.name) else { continue };
                let mut events: BTreeMap<(String, &'static str, String), usize> = BTreeMap::new();
                for e in tl.events.values() {
                    let user = s(e, "user").unwrap_or("").to_owned();
                    match (s(e, "op"), s(e, "by")) {
                        (Some("joined"), _) => *events.entry((user, "joined", String::new())).or_default() += 1,
                        (Some("left"), None) => *events.entry((user, "leave", String::new())).or_default() += 1,
                        (Some("left"), Some(by)) => *events.entry((user, "kick", by.to_owned())).or_default() += 1,
                        _ => {}
                    }
                }
                // (user, kind, by) -> (acked, possibly effective)
                let mut requests: BTreeMap<(String, &'static str, String), (usize, usize)> = BTreeMap::new();
                for (i, log) in self.logs.iter().enumerate() {
                    let spec = &self.plan.sockets[i];
                    if spec.tenant != t {
                        continue;
                    }
                    for sent in log.sent.iter().filter(|x| x.req.info.room.as_deref() == Some(room.name.as_str())) {
                        let info = &sent.req.info;
                        let key = match info.op.as_str() {
                            "leave" => (spec.user.clone(), "leave", String::new()),
                            "kick" => (info.user.clone().unwrap_or_default(), "kick", spec.user.clone()),
                            "join" => (spec.user.clone(), "joined", String::new()),
                            "invite" => (info.user.clone().unwrap_or_default(), "joined", String::new()),
                            _ => continue,
                        };
                        let answer = sent.answer.as_ref().map(|a| &a.frame);
                        let ok = answer.is_some_and(|a| s(a, "op") == Some("ok"));
                        let no_effect = answer.is_some_and(|a| {
                            s(a, "op") == Some("err")
                                && matches!(
                                    s(a, "code"),
                                    Some(
                                        "bad_request"
                                            | "forbidden"
                                            | "not_found"
                                            | "conflict"
                                            | "too_large"
                                            | "rate_limited"
                                    )
                                )
                        });
                        let entry = requests.entry(key).or_default();
                        // An acked join or invite need not create an event (already a member).
                        if ok && info.op != "join" && info.op != "invite" {
                            entry.0 += 1;
                        }
                        if !no_effect {
                            entry.1 += 1;
                        }
                    }
                }
                let keys: BTreeSet<_> = events.keys().chain(requests.keys()).cloned().collect();
                for key in keys {
                    let got = events.get(&key).copied().unwrap_or(0);
                    let (acked, possible) = requests.get(&key).copied().unwrap_or((0, 0));
                    let (user, kind, by) = &key;
                    let what = match *kind {
                        "kick" => format!("kicks of {user} by {by}"),
                        "leave" => format!("leaves of {user}"),
                        _ => format!("joins and invites of {user}"),
                    };
                    if got < acked {
                        self.v.push(format!(
                            "t{t}/{}: {acked} acked {what}, but the observer saw {got} left events for them",
                            room.name
                        ));
                    }
                    if got > possible {
                        self.v.push(format!(
                            "t{t}/{}: the observer saw {got} {kind} events ({what}) that at most {possible} requests \
                             could have made",
                            room.name
                        ));
                    }
                }
            }
        }
    }

    /// An acked message in a direct-message room reaches every socket of both participants.
    fn dms(&mut self) {
        for (i, log) in self.logs.iter().enumerate() {
            let t = self.plan.sockets[i].tenant;
            for sent in &log.sent {
                let info = &sent.req.info;
                if !matches!(info.op.as_str(), "dm" | "send") || !matches!(info.cmid, Cmid::None | Cmid::Unique) {
                    continue;
                }
                let Some(a) = sent.answer.as_ref().filter(|a| s(&a.frame, "op") == Some("ok")) else { continue };
                let (Some(room), Some(seq), Some(id)) = (s(&a.frame, "room"), n(&a.frame, "seq"), s(&a.frame, "id"))
                else {
                    continue;
                };
                let Some((x, y)) = dm_participants(room) else { continue };
                for (k, other) in self.logs.iter().enumerate() {
                    let spec = &self.plan.sockets[k];
                    if spec.tenant != t || (spec.user != x && spec.user != y) || other.server_closed() {
                        continue;
                    }
                    let got = other.events.iter().any(|e| {
                        s(&e.frame, "room") == Some(room)
                            && n(&e.frame, "seq") == Some(seq)
                            && s(&e.frame, "id") == Some(id)
                    });
                    if !got {
                        self.v.push(format!(
                            "{}: never received {room} seq {seq} ({id}), acked to {}",
                            self.name(k),
                            self.name(i)
                        ));
                    }
                }
            }
        }
    }

    /// At the quiet point: `members` of each observed room is the model's, and `rooms` of each user agrees.
    fn finals(&mut self, finals: &Finals) {
        for t in 0..TENANTS {
            for room in observed_rooms(t) {
                let Some(tl) = observed(&self.timelines, t, &room.name) else { continue };
                let model = tl.members[tl.members.len() - 1].clone();
                // An err (judged with every other answer) leaves nothing to compare.
                let Some(answer) = finals.members.get(&(t, room.name.clone())).filter(|a| s(a, "op") == Some("ok"))
                else {
                    continue;
                };
                let listed: BTreeMap<String, &Value> = answer
                    .get("members")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|m| (s(m, "user").unwrap_or("").to_owned(), m))
                    .collect();
                let names: BTreeSet<String> = listed.keys().cloned().collect();
                if names != model {
                    self.v.push(format!(
                        "t{t}/{}: members at the quiet point are {names:?}, the observer's events say {model:?}",
                        room.name
                    ));
                }
                for (user, m) in &listed {
                    let role = s(m, "role").unwrap_or("");
                    let want = if user == OBSERVER { "admin" } else { "member" };
                    if role != want {
                        self.v.push(format!("t{t}/{}: {user} listed as {role}, should be {want}: {m}", room.name));
                    }
                    let online = m.get("online").and_then(Value::as_bool);
                    if !Self::connected(t, user) && online != Some(false) {
                        self.v.push(format!(
                            "t{t}/{}: CROSS-TENANT presence: {user} never connected in this tenant, listed {m}",
                            room.name
                        ));
                    }
                    let has_open = self.logs.iter().enumerate().any(|(k, l)| {
                        self.plan.sockets[k].tenant == t && self.plan.sockets[k].user == *user && !l.server_closed()
                    });
                    if has_open && online != Some(true) {
                        self.v.push(format!("t{t}/{}: {user} has open sockets but is listed {m}", room.name));
                    }
                }
            }
            for user in users(t) {
                let Some(answer) = finals.rooms.get(&(t, user.clone())).filter(|a| s(a, "op") == Some("ok")) else {
                    continue;
                };
                let listed: BTreeMap<String, &Value> = answer
                    .get("rooms")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|r| (s(r, "room").unwrap_or("").to_owned(), r))
                    .collect();
                for room in observed_rooms(t) {
                    let Some(tl) = observed(&self.timelines, t, &room.name) else { continue };
                    let member = tl.member(&user, tl.last);
                    match listed.get(&room.name) {
                        Some(r) if !member => self.v.push(format!(
                            "t{t}/{user}: rooms lists {r}, but {user} is not a member of {} by the observer's events",
                            room.name
                        )),
                        None if member => self.v.push(format!(
                            "t{t}/{user}: rooms does not list {}, of which {user} is a member by the observer's events",
                            room.name
                        )),
                        Some(r) if n(r, "seq") != Some(tl.last) || s(r, "role") != Some("member") => {
                            self.v.push(format!(
                                "t{t}/{user}: rooms lists {r}, the observer's last seq is {} (role member)",
                                tl.last
                            ))
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// Whether a join's answer is an `err` after which the session's delivery point is not pinned down: anything but
/// an op never executed (`rate_limited`, `bad_request`) or a refusal to a non-member (`forbidden`, not a quota).
fn join_err_may_matter(answer: &Value) -> bool {
    let harmless = match s(answer, "code") {
        Some("rate_limited" | "bad_request") => true,
        Some("forbidden") => !s(answer, "message").unwrap_or("").contains("quota"),
        _ => false,
    };
    s(answer, "op") == Some("err") && !harmless
}

/// The timeline of an observed room, unless its observer's view was broken.
fn observed<'t>(timelines: &'t HashMap<(usize, String), Timeline>, t: usize, room: &str) -> Option<&'t Timeline> {
    timelines.get(&(t, room.to_owned())).filter(|tl| !tl.broken)
}

/// The users a `watch` frame named.
fn watch_users(req: &super::gen::Req) -> Vec<String> {
    let super::gen::Payload::Text(text) = &req.payload else { return Vec::new() };
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("users").and_then(Value::as_array).cloned())
        .into_iter()
        .flatten()
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect()
}

fn event_mismatch(want: &str, got: Option<&Value>) -> String {
    let mut out = format!("the observer's event at that seq is not this {want}: ");
    match got {
        Some(e) => {
            let _ = write!(out, "{e}");
        }
        None => out.push_str("it never saw one"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_name_tenant_and_user() {
        assert_eq!(tag("⟦1/alice/7⟧ hello"), Some((1, "alice")));
        assert_eq!(tag("⟦2/t2-carol/1⟧"), Some((2, "t2-carol")));
        assert_eq!(tag("no tag"), None);
    }
}
