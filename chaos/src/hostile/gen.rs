//! The plan of one seed: which sockets exist (an observer, users and a kamikaze per tenant), and every frame each
//! of them sends and when, valid and hostile mixed, each with what the contract says its answer must be.
//!
//! The plan is a pure function of the seed: it never looks at a reply, so a replay sends the same frames at the
//! same offsets (the server's interleaving of concurrent sockets still differs from run to run). It does not judge
//! anything (`check` does) and does no I/O.
//!
//! Classification follows the wire contract and `docs/PROTOCOL.md`, not the implementation: ids are checked here
//! with the contract's own rules, so a parser that starts accepting what it should refuse is caught.

use super::rng::Rng;
use serde_json::{json, Map, Value};

/// Tenants per seed, each created fresh.
pub const TENANTS: usize = 3;
/// The observer's user id in every tenant: the admin of the observed rooms, joined to all of them, never leaving.
pub const OBSERVER: &str = "obs";
/// Sockets per ordinary user.
pub const SOCKETS_PER_USER: usize = 2;
/// How long one seed drives traffic, in ms.
pub const PLAN_MS: u64 = 16_000;
/// Largest body the contract accepts, in bytes.
pub const MAX_BODY: usize = 16 * 1024;
/// Ops a driver lets wait for their answers before it holds back (the gateway queues 64 behind the one running).
pub const MAX_IN_FLIGHT: usize = 24;

/// Every error code of the contract.
pub const CONTRACT_CODES: &[&str] = &[
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "too_large",
    "rate_limited",
    "resume_gap",
    "unavailable",
    "internal",
];

/// Close codes the contract documents; a request on a socket the server closed with one of these may go
/// unanswered.
pub const DOCUMENTED_CLOSES: &[u16] = &[1001, 1009, 1013, 4001, 4003, 4008, 4009, 4010];

/// A stand-in for tenant `j`'s project id in a plan (the real ids exist only once the tenants are created): 23
/// characters, like a real one, and as valid a room or user id as a real one; replaced in every frame as it is
/// sent.
pub fn project_placeholder(j: usize) -> String {
    format!("pj_{}{j}", "z".repeat(19))
}

/// The ordinary users of tenant `t`: two names every tenant has, one of its own.
pub fn users(t: usize) -> Vec<String> {
    vec!["alice".to_owned(), "bob".to_owned(), format!("t{t}-carol")]
}

/// A room the observer creates and watches.
#[derive(Debug, Clone)]
pub struct ObservedRoom {
    pub name: String,
    pub private: bool,
}

/// The observed rooms of tenant `t`: two names every tenant has, two of its own; public and private of each.
pub fn observed_rooms(t: usize) -> Vec<ObservedRoom> {
    vec![
        ObservedRoom { name: "lobby".to_owned(), private: false },
        ObservedRoom { name: "staff".to_owned(), private: true },
        ObservedRoom { name: format!("t{t}-pub"), private: false },
        ObservedRoom { name: format!("t{t}-priv"), private: true },
    ]
}

/// Rooms nobody watches: created by whoever gets there first (join of a missing room, or create).
fn wild_rooms(t: usize) -> Vec<String> {
    vec!["wild".to_owned(), format!("t{t}-wild"), "w-1".to_owned(), format!("t{t}-w-2")]
}

/// The contract's user id: `^[A-Za-z0-9_-]{1,64}$`.
pub fn valid_user(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The contract's room id: a user-id-shaped name, or `dm:<a>:<b>` with valid user ids `a` < `b`.
pub fn valid_room(s: &str) -> bool {
    if let Some(rest) = s.strip_prefix("dm:") {
        return rest.split_once(':').is_some_and(|(a, b)| valid_user(a) && valid_user(b) && a < b);
    }
    valid_user(s)
}

/// The two participants of a direct-message room id.
pub fn dm_participants(room: &str) -> Option<(&str, &str)> {
    room.strip_prefix("dm:")?.split_once(':')
}

/// The direct-message room of two users (`None` for a user and themselves).
pub fn dm_room(a: &str, b: &str) -> String {
    if a < b {
        format!("dm:{a}:{b}")
    } else {
        format!("dm:{b}:{a}")
    }
}

/// The codes a refused `cmid` may get, or `None` for a valid one: over 64 characters is `too_large`, empty or any
/// character outside `!`..`~` is `bad_request` (both may apply).
fn cmid_fault(cmid: &str) -> Option<Vec<&'static str>> {
    let graphic = !cmid.is_empty() && cmid.bytes().all(|b| b.is_ascii_graphic());
    match (cmid.chars().count() > 64, graphic) {
        (false, true) => None,
        (true, true) => Some(vec!["too_large"]),
        (false, false) => Some(vec!["bad_request"]),
        (true, false) => Some(vec!["too_large", "bad_request"]),
    }
}

/// What a socket is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Joined to every observed room of its tenant from seq 1; its view is the reference.
    Observer,
    User,
    /// Sends a frame over `max_frame` at some point and must be closed with 1009.
    Kamikaze,
}

#[derive(Debug, Clone)]
pub struct SockSpec {
    pub tenant: usize,
    pub user: String,
    pub role: Role,
}

impl SockSpec {
    pub fn name(&self, index: usize) -> String {
        format!("t{}/{}#{index}", self.tenant, self.user)
    }
}

/// What the bytes of a frame are.
#[derive(Debug, Clone)]
pub enum Payload {
    Text(String),
    Binary(Vec<u8>),
}

/// How the answer is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Echoes this `rid`.
    Rid(u64),
    /// The frame's `rid` cannot be read (or there is none): the answer has no `rid`.
    NoRid,
}

/// What the answer must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Expect {
    /// `pong`.
    Pong,
    /// No answer at all (`typing`).
    Silent,
    /// An `err` with one of these codes (or `rate_limited`): the frame breaks a rule of the contract.
    Refused(Vec<&'static str>),
    /// `ok`, or an `err` with a code the op may answer: the frame is well formed and the server's state decides.
    Answer,
}

/// A send's `cmid`, as far as the checks care.
#[derive(Debug, Clone, PartialEq)]
pub enum Cmid {
    None,
    /// Used once in the whole plan.
    Unique,
    /// One of a few cmids a user repeats: every ok for it must name the same message.
    Pooled(String),
    /// Refused by the rules.
    Bad,
}

/// The meaning of a frame, for the checks (ids as sent, after placeholders are replaced).
#[derive(Debug, Clone)]
pub struct Info {
    pub op: String,
    /// The room the op names, when it is a valid room id.
    pub room: Option<String>,
    /// The user `invite`/`kick` name, or `dm`'s `to`, when valid.
    pub user: Option<String>,
    pub body: Option<String>,
    pub cmid: Cmid,
    /// `edit`/`react`/`delete`/`read` target or marker.
    pub seq: Option<u64>,
    pub emoji: Option<String>,
    pub remove: bool,
    /// A `join` with `since`.
    pub since: bool,
}

impl Info {
    fn new(op: &str) -> Info {
        Info {
            op: op.to_owned(),
            room: None,
            user: None,
            body: None,
            cmid: Cmid::None,
            seq: None,
            emoji: None,
            remove: false,
            since: false,
        }
    }
}

/// One frame to send.
#[derive(Debug, Clone)]
pub struct Req {
    pub payload: Payload,
    /// `None` when no answer is expected at all.
    pub reply: Option<Reply>,
    pub expect: Expect,
    pub info: Info,
    /// A known, reported product bug this frame exercises (see `KNOWN_BUGS`): the answer the bug gives is counted
    /// under this name instead of failing the seed.
    pub known_bug: Option<&'static str>,
}

/// Product bugs this fuzzer found that are reported and not fixed yet, by name, with what the contract says. A
/// frame tagged with one is still sent and judged; only the buggy answer is counted instead of failed. Remove an
/// entry (and its tag) once the bug is fixed, so a regression fails again.
pub const KNOWN_BUGS: &[(&str, &str)] = &[];

impl Req {
    /// The frame, shortened, for a violation's text.
    pub fn describe(&self) -> String {
        let text = match &self.payload {
            Payload::Text(text) => format!("{text:?}"),
            Payload::Binary(bytes) => format!("<binary {} bytes>", bytes.len()),
        };
        if text.chars().count() > 240 {
            let head: String = text.chars().take(200).collect();
            format!("{head}...({} bytes)", text.len())
        } else {
            text
        }
    }
}

/// First-frame and upgrade attacks: each must be refused without a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attack {
    /// A JWT naming tenant `t` signed with another tenant's key: HTTP 401.
    ForgedTenant { other: usize },
    /// A JWT whose `sub` is not a valid user id: HTTP 401.
    BadSubject,
    /// A JWT that expired an hour ago: HTTP 401.
    Expired,
    /// No token, then a first-frame `auth` with garbage: close 4001.
    GarbageAuthFrame,
    /// No token, then a first frame that is not `auth`: close 4001.
    NotAuthFirst,
}

#[derive(Debug, Clone)]
pub enum What {
    Frame(Req),
    /// A frame over `max_frame` (64 KiB): the socket must be closed with 1009. The socket sends nothing after it.
    Oversize,
    /// An attack on tenant `tenant`'s authentication, from a socket of its own.
    Attack {
        tenant: usize,
        attack: Attack,
    },
}

#[derive(Debug, Clone)]
pub struct Action {
    pub at_ms: u64,
    /// The socket that sends it (attacks: the socket whose tenant is attacked; they open their own).
    pub sock: usize,
    pub what: What,
}

/// One seed's whole plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub seed: u64,
    pub sockets: Vec<SockSpec>,
    /// Sorted by time.
    pub actions: Vec<Action>,
    /// `rid`s of setup requests start above every planned one.
    pub next_rid: Vec<u64>,
}

impl Plan {
    pub fn observer(&self, tenant: usize) -> usize {
        self.sockets.iter().position(|s| s.tenant == tenant && s.role == Role::Observer).unwrap_or(0)
    }
}

/// Build the plan of `seed`.
pub fn plan(seed: u64) -> Plan {
    let mut master = Rng::new(seed);
    let mut sockets = Vec::new();
    for t in 0..TENANTS {
        sockets.push(SockSpec { tenant: t, user: OBSERVER.to_owned(), role: Role::Observer });
        for user in users(t) {
            for _ in 0..SOCKETS_PER_USER {
                sockets.push(SockSpec { tenant: t, user: user.clone(), role: Role::User });
            }
        }
        sockets.push(SockSpec { tenant: t, user: "alice".to_owned(), role: Role::Kamikaze });
    }
    let mut gens: Vec<Gen> = sockets
        .iter()
        .enumerate()
        .map(|(i, s)| Gen { rng: master.fork(), sock: i, tenant: s.tenant, user: s.user.clone(), rid: 0, tags: 0 })
        .collect();
    let mut actions = Vec::new();
    for (i, spec) in sockets.iter().enumerate() {
        let g = &mut gens[i];
        let mut at = 0;
        match spec.role {
            Role::Observer => {
                // Let the users in who are meant to be in the private rooms.
                let t = spec.tenant;
                actions.push(Action { at_ms: 0, sock: i, what: What::Frame(g.invite("staff", "alice")) });
                let priv_room = format!("t{t}-priv");
                actions.push(Action {
                    at_ms: 5,
                    sock: i,
                    what: What::Frame(g.invite(&priv_room, &format!("t{t}-carol"))),
                });
                at = 300;
                while at < PLAN_MS {
                    let req = g.observer_op();
                    actions.push(Action { at_ms: at, sock: i, what: What::Frame(req) });
                    at += g.rng.gap_ms(320);
                }
            }
            Role::User => {
                let t = spec.tenant;
                for room in ["lobby".to_owned(), format!("t{t}-pub")] {
                    actions.push(Action { at_ms: at, sock: i, what: What::Frame(g.join(&room)) });
                    at += 40;
                }
                let mine = if spec.user == "alice" {
                    Some("staff".to_owned())
                } else if spec.user.ends_with("-carol") {
                    Some(format!("t{t}-priv"))
                } else {
                    None
                };
                if let Some(room) = mine {
                    actions.push(Action { at_ms: 150, sock: i, what: What::Frame(g.join(&room)) });
                }
                at = 300;
                while at < PLAN_MS {
                    let req = g.user_op();
                    actions.push(Action { at_ms: at, sock: i, what: What::Frame(req) });
                    at += g.rng.gap_ms(170);
                }
            }
            Role::Kamikaze => {
                actions.push(Action { at_ms: 0, sock: i, what: What::Frame(g.join("lobby")) });
                let boom = g.rng.range(3_000, PLAN_MS - 3_000);
                at = 500;
                while at < boom {
                    let req = g.user_op();
                    actions.push(Action { at_ms: at, sock: i, what: What::Frame(req) });
                    at += g.rng.gap_ms(600);
                }
                actions.push(Action { at_ms: boom, sock: i, what: What::Oversize });
            }
        }
    }
    // Races: an admin kicks (or invites) a user while the user's own sockets send, leave and join the same room.
    let mut races = master.fork();
    for t in 0..TENANTS {
        let obs = sockets.iter().position(|s| s.tenant == t && s.role == Role::Observer).unwrap_or(0);
        let mut at = 800 + races.below(400);
        let mut burst_done = false;
        while at < PLAN_MS - 800 {
            let user = races.pick(&users(t)).clone();
            let socks: Vec<usize> = sockets
                .iter()
                .enumerate()
                .filter(|(_, s)| s.tenant == t && s.user == user && s.role == Role::User)
                .map(|(i, _)| i)
                .collect();
            let (s0, s1) = (socks[0], socks[1]);
            let room = races.pick(&observed_rooms(t)).name.clone();
            match races.weighted(&[5, 2, 2, 1]) {
                0 => {
                    actions.push(Action { at_ms: at, sock: obs, what: What::Frame(gens[obs].kick(&room, &user)) });
                    // Sends just before, at, and just after the kick.
                    for d in [0, 15, 30, 55] {
                        let req = gens[s0].send_plain(&room);
                        actions.push(Action { at_ms: at + d - 15, sock: s0, what: What::Frame(req) });
                    }
                    let second = match races.below(4) {
                        0 => gens[s1].leave(&room),
                        1 => gens[s1].join(&room),
                        2 => gens[s1].react_random(&room),
                        _ => gens[s1].send_plain(&room),
                    };
                    actions.push(Action { at_ms: at + 5, sock: s1, what: What::Frame(second) });
                    // On a room one was just kicked from: send, then try to come back.
                    actions.push(Action { at_ms: at + 220, sock: s0, what: What::Frame(gens[s0].send_plain(&room)) });
                    actions.push(Action { at_ms: at + 260, sock: s1, what: What::Frame(gens[s1].join(&room)) });
                    actions.push(Action { at_ms: at + 300, sock: s1, what: What::Frame(gens[s1].send_plain(&room)) });
                }
                1 => {
                    actions.push(Action { at_ms: at, sock: obs, what: What::Frame(gens[obs].invite(&room, &user)) });
                    actions.push(Action { at_ms: at + 3, sock: s0, what: What::Frame(gens[s0].join(&room)) });
                    actions.push(Action { at_ms: at + 8, sock: s1, what: What::Frame(gens[s1].send_plain(&room)) });
                    actions.push(Action { at_ms: at + 12, sock: s1, what: What::Frame(gens[s1].join(&room)) });
                }
                2 => {
                    actions.push(Action { at_ms: at, sock: s0, what: What::Frame(gens[s0].leave(&room)) });
                    actions.push(Action { at_ms: at + 2, sock: s1, what: What::Frame(gens[s1].send_plain(&room)) });
                    actions.push(Action { at_ms: at + 5, sock: obs, what: What::Frame(gens[obs].kick(&room, &user)) });
                    actions.push(Action { at_ms: at + 20, sock: s1, what: What::Frame(gens[s1].join(&room)) });
                    actions.push(Action { at_ms: at + 40, sock: s0, what: What::Frame(gens[s0].join(&room)) });
                }
                _ if !burst_done => {
                    // 45 pings at once: over the burst of 40, so a few must be answered rate_limited.
                    burst_done = true;
                    for _ in 0..45 {
                        actions.push(Action { at_ms: at, sock: s0, what: What::Frame(gens[s0].ping()) });
                    }
                }
                _ => {}
            }
            at += 600 + races.gap_ms(900);
        }
    }
    // Attacks on authentication, a few per tenant.
    let mut attacks = master.fork();
    for t in 0..TENANTS {
        for _ in 0..2 {
            let attack = match attacks.below(5) {
                0 => Attack::ForgedTenant { other: (t + 1 + attacks.below(TENANTS as u64 - 1) as usize) % TENANTS },
                1 => Attack::BadSubject,
                2 => Attack::Expired,
                3 => Attack::GarbageAuthFrame,
                _ => Attack::NotAuthFirst,
            };
            let sock = sockets.iter().position(|s| s.tenant == t).unwrap_or(0);
            let at_ms = attacks.range(500, PLAN_MS - 2_000);
            actions.push(Action { at_ms, sock, what: What::Attack { tenant: t, attack } });
        }
    }
    actions.sort_by_key(|a| a.at_ms);
    let next_rid = gens.iter().map(|g| g.rid + 1).collect();
    Plan { seed, sockets, actions, next_rid }
}

/// The generator of one socket's frames.
struct Gen {
    rng: Rng,
    /// The socket's index: part of every "unique" cmid, since a user's sockets share the cmid space.
    sock: usize,
    tenant: usize,
    user: String,
    rid: u64,
    tags: u64,
}

/// A frame under construction: fields, the faults found so far, and what it means.
struct Frame {
    fields: Map<String, Value>,
    /// Codes the faults of the frame may be refused with; empty means valid.
    faults: Vec<&'static str>,
    info: Info,
}

impl Frame {
    fn new(op: &str) -> Frame {
        let mut fields = Map::new();
        fields.insert("op".into(), json!(op));
        Frame { fields, faults: Vec::new(), info: Info::new(op) }
    }

    fn set(&mut self, key: &str, value: Value) {
        self.fields.insert(key.into(), value);
    }

    fn fault(&mut self, codes: &[&'static str]) {
        for c in codes {
            if !self.faults.contains(c) {
                self.faults.push(c);
            }
        }
    }
}

impl Gen {
    fn next_rid(&mut self) -> u64 {
        self.rid += 1;
        self.rid
    }

    /// The other tenants.
    fn other_tenant(&mut self) -> usize {
        (self.tenant + 1 + self.rng.below(TENANTS as u64 - 1) as usize) % TENANTS
    }

    /// A string that is not a valid id, made from a plausible one.
    fn hostile_id(&mut self) -> String {
        let base = self.rng.pick(&["lobby", "staff", "alice", "bob", "obs"]).to_string();
        match self.rng.below(18) {
            0 => format!("{base}\r\n"),
            1 => format!("{base}\n"),
            2 => format!("{}\0{}", &base[..2], &base[2..]),
            3 => format!("\t{base}"),
            4 => format!("{base} "),
            5 => base.replacen('o', "ó", 1).replacen('a', "á", 1),
            6 => "大厅".to_owned(),
            7 => "🙂".to_owned(),
            8 => format!("{base}.x"),
            9 => format!("{base}*"),
            10 => ">".to_owned(),
            11 => String::new(),
            12 => format!("{base}\u{200b}"),
            13 => format!("{base}\u{7f}"),
            14 => "../etc".to_owned(),
            15 => format!("{base}\\n"),
            16 => format!("{base}\r\nNats-Msg-Id: x"),
            _ => format!("{base}%0d%0a"),
        }
    }

    /// A room id to name in an op: mostly the tenant's observed rooms, also wild rooms, direct-message rooms,
    /// other tenants' names and project ids, invalid strings and boundary lengths.
    fn room(&mut self) -> String {
        let t = self.tenant;
        match self.rng.weighted(&[46, 12, 8, 6, 3, 13, 4, 3, 2, 3]) {
            0 => self.rng.pick(&observed_rooms(t)).name.clone(),
            1 => self.rng.pick(&wild_rooms(t)).clone(),
            2 => {
                let mut others: Vec<String> = users(t).into_iter().filter(|u| *u != self.user).collect();
                others.push(OBSERVER.to_owned());
                others.push("ghost".to_owned());
                others.retain(|u| *u != self.user);
                let other = self.rng.pick(&others).clone();
                dm_room(&self.user, &other)
            }
            3 => {
                let j = self.other_tenant();
                self.rng.pick(&[format!("t{j}-priv"), format!("t{j}-pub"), format!("t{j}-wild")]).clone()
            }
            4 => project_placeholder(self.other_tenant()),
            5 => self.hostile_id(),
            6 => {
                if self.rng.percent(50) {
                    "r".repeat(64)
                } else {
                    "r".repeat(65)
                }
            }
            7 => match self.rng.below(3) {
                0 => format!("dm:{}:{}", "zed", self.user),
                1 => format!("dm:{}:{}", self.user, self.user),
                _ => format!("dm:{}", self.user),
            },
            8 => "LOBBY".to_owned(),
            _ => dm_room(&"a".repeat(64), &"b".repeat(64)),
        }
    }

    /// A user id to name in an op.
    fn user_id(&mut self) -> String {
        let t = self.tenant;
        match self.rng.weighted(&[46, 8, 12, 4, 14, 4, 3, 3]) {
            0 => {
                let mut all = users(t);
                all.push(OBSERVER.to_owned());
                self.rng.pick(&all).clone()
            }
            1 => "ghost".to_owned(),
            2 => format!("t{}-carol", self.other_tenant()),
            3 => project_placeholder(self.other_tenant()),
            4 => self.hostile_id(),
            5 => {
                if self.rng.percent(50) {
                    "u".repeat(64)
                } else {
                    "u".repeat(65)
                }
            }
            6 => self.rng.pick(&["Alice", "OBS", "Bob"]).to_string(),
            _ => self.rng.pick(&["a:b", "dm:alice:bob", "a.b"]).to_string(),
        }
    }

    /// A tagged body: `⟦tenant/user/n⟧` then something, valid or hostile; its faults.
    fn body(&mut self) -> (String, Option<&'static str>) {
        self.tags += 1;
        let tag = format!("⟦{}/{}/{}⟧", self.tenant, self.user, self.tags);
        let suffix = match self.rng.weighted(&[40, 18, 18, 8, 6, 2, 2, 1, 1]) {
            0 => format!(" hello {}", self.rng.below(1000)),
            1 => self
                .rng
                .pick(&[" a\r\nb", " nul\0here", " tab\tbed", " \u{1b}[31mred\u{1b}[0m", "\r\n\r\n"])
                .to_string(),
            2 => self
                .rng
                .pick(&[
                    " héllo 日本 🙂",
                    " 👨‍👩‍👧‍👦 family",
                    " \u{202e}txet\u{202c}",
                    " zero\u{200b}width",
                    " \u{fffd}\u{feff}",
                ])
                .to_string(),
            3 => self
                .rng
                .pick(&[" {\"op\":\"ping\"}", " </script><script>", " \\u0000", " ${jndi:x}", " '; DROP TABLE x; --"])
                .to_string(),
            4 => String::new(),
            5 => "x".repeat(MAX_BODY - tag.len()),
            6 => "x".repeat(MAX_BODY + 1 - tag.len()),
            7 => {
                // Two-byte characters up to exactly the limit.
                let room = MAX_BODY - tag.len();
                format!("{}{}", "x".repeat(room % 2), "ü".repeat(room / 2))
            }
            _ => "x".repeat(MAX_BODY * 2),
        };
        let body = format!("{tag}{suffix}");
        let fault = (body.len() > MAX_BODY).then_some("too_large");
        (body, fault)
    }

    /// A target or marker seq, mostly plausible, sometimes hostile; `None` value means a wrong JSON type was used.
    fn seq_value(&mut self, f: &mut Frame, key: &str) {
        match self.rng.weighted(&[80, 4, 4, 3, 9]) {
            0 => {
                let s = self.rng.range(1, 60);
                f.set(key, json!(s));
                f.info.seq = Some(s);
            }
            1 => {
                f.set(key, json!(0));
                f.info.seq = Some(0);
            }
            2 => {
                f.set(key, json!(u64::MAX));
                f.info.seq = Some(u64::MAX);
            }
            3 => {
                f.set(key, json!(1u64 << 53));
                f.info.seq = Some(1 << 53);
            }
            _ => {
                let wrong = self.wrong_number();
                f.set(key, wrong);
                f.fault(&["bad_request"]);
            }
        }
    }

    /// A value where an unsigned integer is expected that is not one.
    fn wrong_number(&mut self) -> Value {
        match self.rng.below(7) {
            0 => json!("5"),
            1 => json!(-1),
            2 => json!(1.5),
            3 => Value::Null,
            4 => json!([3]),
            5 => json!({"seq": 3}),
            _ => json!(true),
        }
    }

    fn room_field(&mut self, f: &mut Frame, room: &str) {
        f.set("room", json!(room));
        if valid_room(room) {
            f.info.room = Some(room.to_owned());
        } else {
            f.fault(&["bad_request"]);
        }
    }

    fn user_field(&mut self, f: &mut Frame, key: &str, user: &str) {
        f.set(key, json!(user));
        if valid_user(user) {
            f.info.user = Some(user.to_owned());
        } else {
            f.fault(&["bad_request"]);
        }
    }

    /// Finish a frame: its `rid` (sometimes hostile), its bytes and its expectation.
    fn finish(&mut self, mut f: Frame) -> Req {
        let op = f.info.op.clone();
        let mut reply = Some(Reply::Rid(self.next_rid()));
        match self.rng.weighted(&[95, 2, 2, 1]) {
            0 => {
                if let Some(Reply::Rid(rid)) = reply {
                    f.set("rid", json!(rid));
                }
            }
            1 => {
                // A rid that cannot be read: the answer (an err) has none.
                let wrong = self.rng.pick(&[json!("7"), json!(-3), json!(1.5), json!([1]), json!({"rid": 1})]).clone();
                f.set("rid", wrong);
                f.fault(&["bad_request"]);
                reply = Some(Reply::NoRid);
            }
            2 => {
                // The largest rid there is, made unique by the counter.
                let rid = u64::MAX - self.rid;
                f.set("rid", json!(rid));
                reply = Some(Reply::Rid(rid));
            }
            _ => {
                // No rid at all.
                reply = Some(Reply::NoRid);
            }
        }
        let text = Value::Object(f.fields).to_string();
        let payload = Payload::Text(text);
        let expect = if !f.faults.is_empty() {
            Expect::Refused(f.faults)
        } else if op == "ping" {
            Expect::Pong
        } else if op == "typing" {
            Expect::Silent
        } else {
            Expect::Answer
        };
        if expect == Expect::Silent {
            reply = None;
        }
        Req { payload, reply, expect, info: f.info, known_bug: None }
    }

    fn ping(&mut self) -> Req {
        let f = Frame::new("ping");
        let rid = self.next_rid();
        let mut fields = f.fields;
        fields.insert("rid".into(), json!(rid));
        Req {
            payload: Payload::Text(Value::Object(fields).to_string()),
            reply: Some(Reply::Rid(rid)),
            expect: Expect::Pong,
            info: f.info,
            known_bug: None,
        }
    }

    fn join(&mut self, room: &str) -> Req {
        let mut f = Frame::new("join");
        self.room_field(&mut f, room);
        self.plain(f)
    }

    fn leave(&mut self, room: &str) -> Req {
        let mut f = Frame::new("leave");
        self.room_field(&mut f, room);
        self.plain(f)
    }

    fn invite(&mut self, room: &str, user: &str) -> Req {
        let mut f = Frame::new("invite");
        self.room_field(&mut f, room);
        self.user_field(&mut f, "user", user);
        self.plain(f)
    }

    fn kick(&mut self, room: &str, user: &str) -> Req {
        let mut f = Frame::new("kick");
        self.room_field(&mut f, room);
        self.user_field(&mut f, "user", user);
        self.plain(f)
    }

    /// A well-formed send with a plain tagged body.
    fn send_plain(&mut self, room: &str) -> Req {
        let mut f = Frame::new("send");
        self.room_field(&mut f, room);
        self.tags += 1;
        let body = format!("⟦{}/{}/{}⟧ race", self.tenant, self.user, self.tags);
        f.set("body", json!(body));
        f.info.body = Some(body);
        self.plain(f)
    }

    fn react_random(&mut self, room: &str) -> Req {
        let mut f = Frame::new("react");
        self.room_field(&mut f, room);
        let seq = self.rng.range(2, 30);
        f.set("seq", json!(seq));
        f.info.seq = Some(seq);
        f.set("emoji", json!("👍"));
        f.info.emoji = Some("👍".to_owned());
        self.plain(f)
    }

    /// A pin or unpin of a random seq (the observer is its rooms' admin, so its pins of messages succeed).
    fn pin_random(&mut self, room: &str) -> Req {
        let op = if self.rng.percent(70) { "pin" } else { "unpin" };
        let mut f = Frame::new(op);
        self.room_field(&mut f, room);
        let seq = self.rng.range(2, 30);
        f.set("seq", json!(seq));
        f.info.seq = Some(seq);
        self.plain(f)
    }

    /// A frame with an ordinary rid (setup and race frames keep theirs readable).
    fn plain(&mut self, mut f: Frame) -> Req {
        let rid = self.next_rid();
        f.set("rid", json!(rid));
        let expect = if f.faults.is_empty() { Expect::Answer } else { Expect::Refused(f.faults) };
        Req {
            payload: Payload::Text(Value::Object(f.fields).to_string()),
            reply: Some(Reply::Rid(rid)),
            expect,
            info: f.info,
            known_bug: None,
        }
    }

    /// One op of the observer: admin work on its rooms, and a little traffic.
    fn observer_op(&mut self) -> Req {
        let t = self.tenant;
        let room = self.rng.pick(&observed_rooms(t)).name.clone();
        match self.rng.weighted(&[34, 26, 14, 10, 8, 8, 6]) {
            0 => {
                let user = if self.rng.percent(80) { self.rng.pick(&users(t)).clone() } else { self.user_id() };
                if user == OBSERVER {
                    return self.ping();
                }
                self.invite(&room, &user)
            }
            1 => {
                let user = if self.rng.percent(85) { self.rng.pick(&users(t)).clone() } else { self.user_id() };
                if user == OBSERVER {
                    return self.ping();
                }
                self.kick(&room, &user)
            }
            2 => self.send_plain(&room),
            3 => {
                let mut f = Frame::new("members");
                self.room_field(&mut f, &room);
                self.plain(f)
            }
            4 => {
                let mut f = Frame::new("typing");
                self.room_field(&mut f, &room);
                self.finish(f)
            }
            6 => self.pin_random(&room),
            _ => {
                let mut f = Frame::new("history");
                self.room_field(&mut f, &room);
                f.set("limit", json!(self.rng.range(1, 100)));
                self.plain(f)
            }
        }
    }

    /// One op of an ordinary user: any op of the contract with valid and hostile values, or a malformed frame.
    fn user_op(&mut self) -> Req {
        let ops: &[(&str, u64)] = &[
            ("send", 24),
            ("join", 8),
            ("leave", 4),
            ("create", 3),
            ("invite", 3),
            ("kick", 3),
            ("dm", 5),
            ("edit", 4),
            ("delete", 3),
            ("react", 6),
            ("pin", 2),
            ("unpin", 1),
            ("ban", 1),
            ("unban", 1),
            ("mute", 1),
            ("unmute", 1),
            ("slow_mode", 1),
            ("freeze", 1),
            ("unfreeze", 1),
            ("read", 5),
            ("typing", 3),
            ("history", 5),
            ("members", 3),
            ("rooms", 2),
            ("presence", 3),
            ("watch", 2),
            ("unwatch", 1),
            ("ping", 2),
            ("auth", 1),
            ("malformed", 10),
        ];
        let weights: Vec<u64> = ops.iter().map(|(_, w)| *w).collect();
        let op = ops[self.rng.weighted(&weights)].0;
        if op == "malformed" {
            return self.malformed();
        }
        let mut f = Frame::new(op);
        match op {
            "send" => {
                let room = self.room();
                self.room_field(&mut f, &room);
                self.message_fields(&mut f);
                if self.rng.percent(8) {
                    match self.rng.below(4) {
                        0 => f.set("reply_to", json!(self.rng.range(1, 60))),
                        1 => f.set("reply_to", json!(u64::MAX)),
                        2 => f.set("reply_to", json!(0)),
                        _ => {
                            let wrong = self.wrong_number();
                            if !wrong.is_null() {
                                f.fault(&["bad_request"]);
                            }
                            f.set("reply_to", wrong);
                        }
                    }
                }
            }
            "dm" => {
                let to = if self.rng.percent(10) { self.user.clone() } else { self.user_id() };
                self.user_field(&mut f, "to", &to);
                if to == self.user {
                    f.fault(&["bad_request"]);
                }
                self.message_fields(&mut f);
                f.info.room = valid_user(&to).then(|| dm_room(&self.user, &to));
            }
            "join" => {
                let room = self.room();
                self.room_field(&mut f, &room);
                if self.rng.percent(12) {
                    f.info.since = true;
                    match self.rng.below(5) {
                        0 => f.set("since", json!(u64::MAX)),
                        1 => f.set("since", json!(1u64 << 63)),
                        2 => f.set("since", json!(1_000_000u64)),
                        3 => f.set("since", Value::Null),
                        _ => {
                            f.set("since", json!("100"));
                            f.fault(&["bad_request"]);
                        }
                    }
                }
            }
            "leave" | "members" | "typing" => {
                let room = self.room();
                self.room_field(&mut f, &room);
            }
            "create" => {
                let room = if self.rng.percent(70) {
                    self.room()
                } else {
                    format!("t{}-new-{}", self.tenant, self.rng.below(4))
                };
                self.room_field(&mut f, &room);
                if self.rng.percent(50) {
                    let private = self.rng.percent(50);
                    f.set("private", json!(private));
                }
                if self.rng.percent(5) {
                    f.set("private", json!("true"));
                    f.fault(&["bad_request"]);
                }
                if self.rng.percent(15) {
                    let title =
                        self.rng.pick(&["Title ✨", "a\r\nb\0c", &"t".repeat(200), &"t".repeat(201)]).to_string();
                    f.set("title", json!(title));
                }
            }
            "invite" | "kick" => {
                let room = self.room();
                self.room_field(&mut f, &room);
                let user = self.user_id();
                self.user_field(&mut f, "user", &user);
            }
            "edit" => {
                let room = self.room();
                self.room_field(&mut f, &room);
                self.seq_value(&mut f, "seq");
                let (body, fault) = self.body();
                f.set("body", json!(body));
                f.info.body = Some(body);
                if let Some(code) = fault {
                    f.fault(&[code]);
                }
            }
            "delete" | "pin" | "unpin" => {
                let room = self.room();
                self.room_field(&mut f, &room);
                self.seq_value(&mut f, "seq");
            }
            "ban" | "unban" | "mute" | "unmute" => {
                let room = self.room();
                self.room_field(&mut f, &room);
                let user = self.user_id();
                self.user_field(&mut f, "user", &user);
                if matches!(op, "ban" | "mute") && self.rng.percent(50) {
                    match self.rng.below(5) {
                        0 => f.set("secs", json!(self.rng.range(1, 3_600))),
                        1 => {
                            f.set("secs", json!(0));
                            f.fault(&["bad_request"]);
                        }
                        2 => {
                            f.set("secs", json!(u64::MAX));
                            f.fault(&["bad_request"]);
                        }
                        _ => {
                            let wrong = self.wrong_number();
                            if !wrong.is_null() {
                                f.fault(&["bad_request"]);
                            }
                            f.set("secs", wrong);
                        }
                    }
                }
            }
            "slow_mode" => {
                let room = self.room();
                self.room_field(&mut f, &room);
                match self.rng.below(4) {
                    // Longer than the ceiling: refused by the room's rules (or sooner, as for any op there).
                    0 => f.set("secs", json!(100_000)),
                    1 => {
                        let wrong = self.wrong_number();
                        f.set("secs", wrong);
                        f.fault(&["bad_request"]);
                    }
                    _ => f.set("secs", json!(self.rng.below(3))),
                }
            }
            "freeze" | "unfreeze" => {
                let room = self.room();
                self.room_field(&mut f, &room);
                if self.rng.percent(5) {
                    f.set("user", json!("bob"));
                    f.fault(&["bad_request"]);
                }
            }
            "react" => {
                let room = self.room();
                self.room_field(&mut f, &room);
                self.seq_value(&mut f, "seq");
                let (emoji, ok) = self.emoji();
                f.set("emoji", json!(emoji));
                f.info.emoji = Some(emoji);
                if !ok {
                    f.fault(&["bad_request"]);
                }
                if self.rng.percent(30) {
                    f.set("remove", json!(true));
                    f.info.remove = true;
                } else if self.rng.percent(3) {
                    f.set("remove", json!("yes"));
                    f.fault(&["bad_request"]);
                }
            }
            "read" => {
                let room = self.room();
                self.room_field(&mut f, &room);
                self.seq_value(&mut f, "seq");
            }
            "history" => {
                let room = self.room();
                self.room_field(&mut f, &room);
                match self.rng.weighted(&[30, 6, 10, 10, 10, 6, 6, 4, 4, 4]) {
                    0 => {}
                    1 => {
                        f.set("limit", json!(0));
                        f.fault(&["bad_request"]);
                    }
                    2 => f.set("limit", json!(1)),
                    3 => f.set("limit", json!(100)),
                    4 => f.set("limit", json!(self.rng.range(2, 99))),
                    5 => {
                        f.set("limit", json!(101));
                        f.fault(&["bad_request"]);
                    }
                    6 => {
                        f.set("limit", json!(u64::MAX));
                        f.fault(&["bad_request"]);
                    }
                    7 => {
                        f.set("limit", json!(1u64 << 32));
                        f.fault(&["bad_request"]);
                    }
                    8 => {
                        f.set("limit", json!("10"));
                        f.fault(&["bad_request"]);
                    }
                    _ => {
                        f.set("limit", json!(-1));
                        f.fault(&["bad_request"]);
                    }
                }
                if self.rng.percent(30) {
                    let before = *self.rng.pick(&[0, 1, 5, 20, 1 << 53, u64::MAX]);
                    f.set("before", json!(before));
                }
                if self.rng.percent(30) {
                    let after = *self.rng.pick(&[0, 1, 5, 20, 1 << 53, u64::MAX]);
                    f.set("after", json!(after));
                }
                if self.rng.percent(10) {
                    match self.rng.below(4) {
                        0 => {
                            f.set("thread", json!("3"));
                            f.fault(&["bad_request"]);
                        }
                        _ => f.set("thread", json!(*self.rng.pick(&[0, 1, 3, 20, u64::MAX]))),
                    }
                }
            }
            "presence" | "watch" | "unwatch" => self.user_list(&mut f),
            "rooms" | "ping" => {}
            "auth" => {
                f.set("token", json!("sytok_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
                f.fault(&["bad_request"]);
            }
            _ => {}
        }
        self.finish(f)
    }

    /// `body`, `attrs` and `cmid` of a send or dm.
    fn message_fields(&mut self, f: &mut Frame) {
        let (body, fault) = self.body();
        f.set("body", json!(body));
        f.info.body = Some(body);
        if let Some(code) = fault {
            f.fault(&[code]);
        }
        if self.rng.percent(10) {
            match self.rng.below(8) {
                0 | 1 => f.set("attrs", json!({"k": "v", "n": 1, "nested": {"a": [1, 2, 3]}})),
                2 => f.set("attrs", nested(60)),
                3 => f.set("attrs", Value::Null),
                4 => {
                    f.set("attrs", json!({"blob": "y".repeat(4200)}));
                    f.fault(&["too_large"]);
                }
                5 => {
                    f.set("attrs", json!([1, 2]));
                    f.fault(&["bad_request"]);
                }
                6 => {
                    f.set("attrs", json!("attrs"));
                    f.fault(&["bad_request"]);
                }
                _ => {
                    f.set("attrs", json!(42));
                    f.fault(&["bad_request"]);
                }
            }
        }
        match self.rng.weighted(&[50, 22, 10, 18]) {
            0 => {}
            1 => {
                self.tags += 1;
                let cmid = match self.rng.below(3) {
                    0 => format!("c-{}-{}-{}", self.sock, self.user, self.tags),
                    1 => format!("!~#{{}}|{}:{}:{}", self.user, self.sock, self.tags),
                    _ => {
                        let stem = format!("{}-{}-{}-", self.user, self.sock, self.tags);
                        format!("{stem}{}", "k".repeat(64 - stem.len()))
                    }
                };
                f.set("cmid", json!(cmid));
                f.info.cmid = Cmid::Unique;
            }
            2 => {
                let cmid = self.rng.pick(&["dup-1", "dup-2"]).to_string();
                f.set("cmid", json!(cmid));
                f.info.cmid = Cmid::Pooled(cmid);
            }
            _ => {
                let cmid = self
                    .rng
                    .pick(&[
                        "a\nb".to_owned(),
                        "a\rb".to_owned(),
                        "a\0b".to_owned(),
                        "a\tb".to_owned(),
                        "a b".to_owned(),
                        String::new(),
                        "ü".to_owned(),
                        "x".repeat(65),
                        "ü".repeat(65),
                        "ü".repeat(64),
                        "\u{7f}".to_owned(),
                        "c\r\nNats-Msg-Id: x".to_owned(),
                        format!("{}\n", "x".repeat(70)),
                        "🙂".to_owned(),
                    ])
                    .clone();
                if let Some(codes) = cmid_fault(&cmid) {
                    f.fault(&codes);
                    f.info.cmid = Cmid::Bad;
                } else {
                    f.info.cmid = Cmid::Unique;
                }
                f.set("cmid", json!(cmid));
            }
        }
    }

    /// An emoji, and whether it is 1–32 bytes.
    fn emoji(&mut self) -> (String, bool) {
        let emoji = self
            .rng
            .pick(&[
                "👍".to_owned(),
                "🎉".to_owned(),
                "👍🏽".to_owned(),
                "👨‍👩‍👧‍👦".to_owned(),
                "a\0b".to_owned(),
                "\r\n".to_owned(),
                "x".repeat(32),
                "x".repeat(33),
                "ü".repeat(16),
                "ü".repeat(17),
                String::new(),
                "🙂".repeat(9),
            ])
            .clone();
        let ok = (1..=32).contains(&emoji.len());
        (emoji, ok)
    }

    /// `users` of presence/watch/unwatch: a few, exactly 100, 101, or with an invalid id among them.
    fn user_list(&mut self, f: &mut Frame) {
        let list: Vec<String> = match self.rng.weighted(&[60, 10, 10, 8, 6, 6]) {
            0 => (0..self.rng.range(1, 5)).map(|_| self.user_id()).collect(),
            1 => (0..100).map(|i| format!("u{i}")).collect(),
            2 => (0..101).map(|i| format!("u{i}")).collect(),
            3 => {
                let mut l: Vec<String> = (0..99).map(|i| format!("u{i}")).collect();
                l.push(self.hostile_id());
                l
            }
            4 => Vec::new(),
            _ => {
                f.set("users", json!("alice"));
                f.fault(&["bad_request"]);
                return;
            }
        };
        if list.len() > 100 || list.iter().any(|u| !valid_user(u)) {
            f.fault(&["bad_request"]);
        }
        f.set("users", json!(list));
    }

    /// A frame that is malformed as a whole: wrong types, missing fields, unknown ops and fields, not JSON, too
    /// deep, binary on a JSON session.
    fn malformed(&mut self) -> Req {
        let rid = self.next_rid();
        let with_rid = |mut v: Value| {
            if let Value::Object(m) = &mut v {
                m.insert("rid".into(), json!(rid));
            }
            v.to_string()
        };
        let refused = |text: String, reply: Reply| Req {
            payload: Payload::Text(text),
            reply: Some(reply),
            expect: Expect::Refused(vec!["bad_request"]),
            info: Info::new("malformed"),
            known_bug: None,
        };
        let r = Reply::Rid(rid);
        match self.rng.below(30) {
            0 => refused(with_rid(json!({"op": "send", "room": 5, "body": "x"})), r),
            1 => refused(with_rid(json!({"op": "send", "room": "lobby", "body": ["x"]})), r),
            2 => refused(with_rid(json!({"op": "send", "room": "lobby"})), r),
            3 => refused(with_rid(json!({"op": "join"})), r),
            4 => refused(with_rid(json!({"op": "frobnicate"})), r),
            5 => refused(with_rid(json!({"op": "PING"})), r),
            6 => refused(with_rid(json!({"op": 5})), r),
            7 => refused(with_rid(json!({"op": null})), r),
            8 => refused(with_rid(json!({})), r),
            9 => refused(with_rid(json!({"op": "send", "room": "lobby", "body": "x", "extra": 1})), r),
            10 => refused(
                with_rid(
                    self.rng.pick(&[json!({"op": "rooms", "room": "lobby"}), json!({"op": "ping", "x": 1})]).clone(),
                ),
                r,
            ),
            11 => refused(with_rid(json!({"op": "presence", "users": [1, 2]})), r),
            12 => refused(with_rid(json!({"op": "presence", "users": null})), r),
            13 => refused(with_rid(json!({"op": "kick", "room": "lobby"})), r),
            14 => refused(with_rid(json!({"op": "read", "room": "lobby", "seq": "1"})), r),
            15 => refused(with_rid(json!({"op": "typing", "room": "lob by"})), r),
            16 => refused(with_rid(json!({"op": ["send"]})), r),
            17 => refused(self.rng.pick(&["[]", "\"ping\"", "42", "null", "true"]).to_string(), Reply::NoRid),
            18 => refused(
                self.rng
                    .pick(&[
                        "not json",
                        "{\"op\":\"ping\"",
                        "{\"op\":\"ping\",\"rid\":1}{\"op\":\"ping\"}",
                        "",
                        "{op:ping}",
                    ])
                    .to_string(),
                Reply::NoRid,
            ),
            19 => refused(
                format!("{{\"op\":\"send\",\"rid\":{rid},\"room\":\"lobby\",\"body\":\"\\ud800 lone\"}}"),
                Reply::NoRid,
            ),
            20 => {
                let depth = *self.rng.pick(&[200usize, 1000, 5000]);
                let text = format!(
                    "{{\"op\":\"send\",\"rid\":{rid},\"room\":\"lobby\",\"body\":\"x\",\"attrs\":{}}}",
                    nested_text(depth)
                );
                refused(text, Reply::NoRid)
            }
            21 => refused(format!("{}{}", "[".repeat(3000), "]".repeat(3000)), Reply::NoRid),
            22 => Req {
                payload: Payload::Binary(with_rid(json!({"op": "ping"})).into_bytes()),
                reply: Some(Reply::NoRid),
                expect: Expect::Refused(vec!["bad_request"]),
                info: Info::new("binary"),
                known_bug: None,
            },
            23 => refused(json!({"op": "ping", "rid": "1"}).to_string(), Reply::NoRid),
            24 => refused(with_rid(json!({"op": "react", "room": "lobby", "seq": 2})), r),
            25 => refused(with_rid(json!({"op": "dm", "body": "x"})), r),
            26 => refused(with_rid(json!({"op": "history", "room": "lobby", "limit": 1.5})), r),
            27 => refused(with_rid(json!({"op": "watch", "users": [["alice"]]})), r),
            28 => refused(with_rid(json!({"op": "create", "room": {"name": "lobby"}})), r),
            _ => refused(with_rid(json!({"op": "send", "room": "lobby", "body": null})), r),
        }
    }
}

/// `{"a":{"a":...}}`, `depth` objects deep.
fn nested(depth: usize) -> Value {
    let mut v = json!(1);
    for _ in 0..depth {
        v = json!({ "a": v });
    }
    v
}

fn nested_text(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

/// The codes an op may answer when it is well formed (besides `rate_limited`, and `forbidden` for quotas).
pub fn allowed_codes(op: &str) -> &'static [&'static str] {
    match op {
        "create" => &["bad_request", "conflict", "forbidden"],
        "join" => &["bad_request", "forbidden", "not_found", "resume_gap"],
        "leave" => &["bad_request", "forbidden", "not_found"],
        "invite" | "kick" => &["bad_request", "forbidden", "not_found"],
        "send" => &["bad_request", "forbidden", "not_found", "conflict"],
        "dm" => &["bad_request", "forbidden", "conflict"],
        "read" | "react" | "edit" | "delete" | "pin" | "unpin" => &["bad_request", "forbidden", "not_found"],
        "ban" | "unban" | "mute" | "unmute" | "slow_mode" | "freeze" | "unfreeze" => {
            &["bad_request", "forbidden", "not_found"]
        }
        "history" | "members" => &["bad_request", "forbidden", "not_found"],
        "presence" | "watch" | "unwatch" => &["bad_request"],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_is_one_plan() {
        let (a, b) = (plan(99), plan(99));
        assert_eq!(a.actions.len(), b.actions.len());
        for (x, y) in a.actions.iter().zip(&b.actions) {
            assert_eq!(x.at_ms, y.at_ms);
            assert_eq!(format!("{:?}", x.what), format!("{:?}", y.what));
        }
        assert_ne!(format!("{:?}", plan(100).actions), format!("{:?}", a.actions));
    }

    #[test]
    fn ids_follow_the_contract() {
        for good in ["lobby", "a", &"r".repeat(64), "dm:alice:bob", &project_placeholder(1)] {
            assert!(valid_room(good), "{good:?}");
        }
        for bad in ["", "lob by", "lobby\r\n", "dm:bob:alice", "dm:a:a", "dm:a", "ü", &"r".repeat(65)] {
            assert!(!valid_room(bad), "{bad:?}");
        }
        assert_eq!(project_placeholder(2).len(), 23);
        assert!(!valid_user("a:b"));
    }

    #[test]
    fn cmids_are_classified_like_the_contract() {
        assert_eq!(cmid_fault("c-1"), None);
        assert_eq!(cmid_fault(&"x".repeat(64)), None);
        assert_eq!(cmid_fault(&"x".repeat(65)), Some(vec!["too_large"]));
        assert_eq!(cmid_fault("a\nb"), Some(vec!["bad_request"]));
        assert_eq!(cmid_fault(""), Some(vec!["bad_request"]));
        assert_eq!(cmid_fault(&"ü".repeat(64)), Some(vec!["bad_request"]));
    }

    #[test]
    fn no_planned_frame_is_over_the_frame_limit_and_sockets_keep_under_the_op_rate() {
        for seed in 0..20 {
            let p = plan(seed);
            let mut per_sock_second: std::collections::HashMap<(usize, u64), usize> = Default::default();
            for a in &p.actions {
                if let What::Frame(req) = &a.what {
                    let len = match &req.payload {
                        Payload::Text(t) => t.len(),
                        Payload::Binary(b) => b.len(),
                    };
                    assert!(len < 64 * 1024, "seed {seed}: a frame of {len} bytes");
                    *per_sock_second.entry((a.sock, a.at_ms / 1000)).or_default() += 1;
                }
            }
            let worst = per_sock_second.values().max().copied().unwrap_or(0);
            assert!(worst <= 70, "seed {seed}: {worst} frames in a second on one socket");
        }
    }
}
