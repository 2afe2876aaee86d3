//! The room's rules driven without a fleet: a table of the permission matrix, and random op sequences from several
//! users checked against a small reference model of membership, authorship and seq.
//!
//! `World` plays the actor: it answers the facts `decide` asks for from in-memory records and performs the effects
//! on them, checking on every append what must hold whatever the op (seqs gap-free, events written only for
//! members, edits only by authors, kicks and pins in a named room only by admins, nothing for a user after their
//! `left`).
//!
//! The property test can fail: letting any member delete another's message (`role != Role::Admin` dropped from the
//! `Delete` rule), letting members kick (`require_admin` skipped in `Kick`), or appending for a user who left
//! (`require_member` skipped in `Send`) each makes `random_ops_follow_the_model` fail within its first cases; so do
//! letting a muted member send (`require_voice` skipped in `Send`) and letting a banned user rejoin
//! (`require_not_banned` skipped in `set_member`).

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use switchyard_protocol::ClientMessageId;

fn user(name: &str) -> UserId {
    UserId::parse(name).expect("a valid user id")
}

fn room_id(name: &str) -> RoomId {
    RoomId::parse(name).expect("a valid room id")
}

/// The records a room's actor reads and writes, in memory, and the actor's cache of them.
struct World {
    tenant: ProjectId,
    room: RoomId,
    record: Option<RoomRecord>,
    roster: Roster,
    roster_revision: Option<u64>,
    memberships: BTreeMap<UserId, UserRoom>,
    /// Rooms each user is a member of besides this one.
    other_rooms: HashMap<UserId, u64>,
    /// Rooms the tenant has besides this one.
    other_tenant_rooms: u64,
    events: Vec<RoomEvent>,
    /// Dedupe ids seen, with the seq of the event that carried them.
    dedupe: HashMap<String, u64>,
    published: Vec<LiveMessage>,
    state: RoomState,
    /// What went wrong on an append: must stay empty.
    violations: Vec<String>,
    /// Users whose last membership event is `left` (they may see nothing until they join again).
    gone: BTreeSet<UserId>,
    now: Instant,
    /// Unix time of the next command, in microseconds; moves with `now`.
    now_us: u64,
    /// Commands are sent by the tenant's backend on behalf of their user.
    by_backend: bool,
    /// The next roster write fails (as a compare-and-set that lost, or an outage): the command stops there.
    fail_roster_save: bool,
    /// The facts the rules asked for, in order.
    loaded: Vec<Fact>,
}

impl World {
    fn new(room: &str) -> World {
        World {
            tenant: ProjectId::parse("pj_0123456789abcdefghij").expect("a valid project id"),
            room: room_id(room),
            record: None,
            roster: Roster { v: INTERNAL_VERSION, ..Roster::default() },
            roster_revision: None,
            memberships: BTreeMap::new(),
            other_rooms: HashMap::new(),
            other_tenant_rooms: 0,
            events: Vec::new(),
            dedupe: HashMap::new(),
            published: Vec::new(),
            state: RoomState::default(),
            violations: Vec::new(),
            gone: BTreeSet::new(),
            now: Instant::now(),
            now_us: 1_700_000_000_000_000,
            by_backend: false,
            fail_roster_save: false,
            loaded: Vec::new(),
        }
    }

    /// A room that exists, with `members` (`name`, admin?).
    fn with_room(room: &str, private: bool, members: &[(&str, bool)]) -> World {
        let mut world = World::new(room);
        let created_by = None;
        let record = RoomRecord {
            v: INTERNAL_VERSION,
            private,
            title: None,
            created_by,
            created_at_ms: 1,
            retention_secs: None,
        };
        world.record = Some(record);
        for (name, admin) in members {
            let role = if *admin { Role::Admin } else { Role::Member };
            world.roster.members.insert(user(name), role);
            world.memberships.insert(user(name), UserRoom::joined(role, 0));
            world.events.push(world.event(EventBody::Joined { user: user(name) }));
        }
        world.roster_revision = Some(1);
        world
    }

    fn event(&self, body: EventBody) -> RoomEvent {
        let seq = self.events.len() as u64 + 1;
        let tally = self.tail().tally.followed_by(seq, 0, None, &body).stored_for(&body);
        RoomEvent {
            v: INTERNAL_VERSION,
            tenant: self.tenant.clone(),
            room: self.room.clone(),
            seq,
            ts_us: seq,
            tally,
            expires_ms: None,
            body,
        }
    }

    /// The room's last event as the stream holds it.
    fn tail(&self) -> Tail {
        let seq = self.events.len() as u64;
        let tally = self.events.last().map(RoomEvent::tally_through).unwrap_or_default();
        Tail { seq, stream_seq: seq, ts_us: seq, tally }
    }

    /// Messages up to `seq`, counted from the events.
    fn msgs_through(&self, seq: u64) -> u64 {
        self.events.iter().filter(|event| event.seq <= seq && matches!(event.body, EventBody::Msg { .. })).count()
            as u64
    }

    /// A message by `author` as the room's next event (written directly, as a setup step).
    fn with_message(mut self, author: &str) -> World {
        let id = MessageId::generate(1);
        let body = EventBody::Msg { id, from: user(author), body: "hi".into(), attrs: None, reply_to: None };
        self.events.push(self.event(body));
        self
    }

    fn role(&self, who: &UserId) -> Option<Role> {
        match self.room.dm_participants() {
            Some((a, b)) => (who == &a || who == &b).then_some(Role::Member),
            None => self.roster.members.get(who).copied(),
        }
    }

    /// Run one command as the actor would, to its reply or refusal.
    fn run(&mut self, who: Option<&str>, command: RoomCommand, quotas: &RoomQuotas) -> Result<OkResult, Refusal> {
        let who = who.map(user);
        let message_id = MessageId::generate(1);
        let mut facts = CommandFacts::default();
        let (tenant, room) = (self.tenant.clone(), self.room.clone());
        self.now += Duration::from_millis(700);
        self.now_us += 700_000;
        'decide: for _ in 0..100 {
            let input = Command {
                tenant: &tenant,
                room: &room,
                user: who.as_ref(),
                command: &command,
                quotas,
                now: self.now,
                now_us: self.now_us,
                message_id: &message_id,
                by_backend: self.by_backend,
            };
            let decision = match decide(&self.state, &facts, &input) {
                Ok(decision) => decision,
                Err(Stop::Load(fact)) => {
                    self.load(fact, &mut facts);
                    continue;
                }
                Err(Stop::Refuse(refusal)) => return Err(refusal),
            };
            let mut appended = None;
            for effect in decision.effects {
                match effect {
                    Effect::CreateRecord { record, redecide } => {
                        if self.record.is_some() {
                            if redecide {
                                self.state.record = None;
                                facts = CommandFacts::default();
                                continue 'decide;
                            }
                            return Err(Refusal {
                                code: ErrorCode::Conflict,
                                message: "exists".into(),
                                retry_after_ms: None,
                            });
                        }
                        self.record = Some(record.clone());
                        self.state.record = Some(Some(record));
                    }
                    Effect::SaveRoster(_) if std::mem::take(&mut self.fail_roster_save) => {
                        self.state.forget();
                        let message = "the roster write failed".into();
                        return Err(Refusal { code: ErrorCode::Unavailable, message, retry_after_ms: None });
                    }
                    Effect::SaveRoster(roster) => self.save_roster(roster),
                    Effect::DropFromRoster(gone) => {
                        let mut roster = self.roster.clone();
                        if roster.members.remove(&gone).is_some() {
                            self.save_roster(roster);
                        }
                    }
                    Effect::PutMembership(member, entry) => {
                        self.memberships.insert(member, entry);
                    }
                    Effect::RemoveMembership(member) => {
                        self.memberships.remove(&member);
                    }
                    Effect::Append { body, dedupe_id } => appended = Some(self.append(body, dedupe_id)),
                    Effect::MarkTyping { user, at } => self.state.mark_typing(user, at),
                    Effect::MarkSent { user, mark } => self.state.mark_sent(user, mark),
                    Effect::Publish(message) => self.published.push(message),
                    Effect::PutRecord(record) => {
                        self.record = Some(record.clone());
                        self.state.record = Some(Some(record));
                    }
                    // The world keeps no stream apart from its events, which stay as the rules saw them.
                    Effect::EraseFromStream(_) => {}
                    Effect::DeleteRoom => {
                        self.record = None;
                        self.roster = Roster { v: INTERNAL_VERSION, ..Roster::default() };
                        self.roster_revision = None;
                        self.state.forget();
                        self.state.record = Some(None);
                    }
                }
            }
            return match decision.reply {
                Reply::Room => Ok(OkResult::Room { room }),
                Reply::TailSeq => Ok(OkResult::RoomSeq { room, seq: self.events.len() as u64 }),
                Reply::Seq(seq) => Ok(OkResult::RoomSeq { room, seq }),
                Reply::Sent => sent(appended.as_ref().expect("a send appends")),
                Reply::Members(members) => Ok(OkResult::Members { members }),
                Reply::Empty => Ok(OkResult::Empty {}),
            };
        }
        panic!("the command was never decided");
    }

    fn load(&mut self, fact: Fact, facts: &mut CommandFacts) {
        self.loaded.push(fact.clone());
        match fact {
            Fact::Record => self.state.record = Some(self.record.clone()),
            Fact::Roster | Fact::FreshRoster => {
                self.state.roster = Some((self.roster.clone(), self.roster_revision));
                facts.roster_fresh = true;
            }
            Fact::Tail => {
                self.state.loaded_tail(self.tail());
            }
            Fact::MsgsAt(seq) => {
                self.state.searched(self.now);
                facts.msgs_at.insert(seq, self.msgs_through(seq));
            }
            Fact::Message(target) => {
                let author = self.events.iter().find_map(|event| match &event.body {
                    EventBody::Msg { from, .. } if event.seq == target => Some(from.clone()),
                    _ => None,
                });
                let deleted = self.events.iter().any(
                    |event| matches!(&event.body, EventBody::Delete { target: deleted, .. } if *deleted == target),
                );
                match author {
                    Some(author) => self.state.remember(target, MessageFacts { author: Some(author), deleted }),
                    None => {
                        facts.missing_messages.insert(target);
                    }
                }
            }
            Fact::Membership(member) => {
                let entry = self.memberships.get(&member).copied();
                facts.memberships.insert(member, entry);
            }
            Fact::UserRooms(member) => {
                let here = u64::from(self.memberships.contains_key(&member));
                let rooms = self.other_rooms.get(&member).copied().unwrap_or(0) + here;
                facts.user_rooms.insert(member, rooms);
            }
            Fact::TenantRooms => {
                facts.tenant_rooms = Some(self.other_tenant_rooms + u64::from(self.record.is_some()));
            }
        }
    }

    fn save_roster(&mut self, roster: Roster) {
        let revision = self.roster_revision.unwrap_or(0) + 1;
        self.roster = roster.clone();
        self.roster_revision = Some(revision);
        self.state.roster = Some((roster, Some(revision)));
    }

    /// Append as the stream would, checking what every event must satisfy.
    fn append(&mut self, body: EventBody, dedupe_id: Option<String>) -> RoomEvent {
        if let Some(seq) = dedupe_id.as_ref().and_then(|id| self.dedupe.get(id)) {
            return self.events[*seq as usize - 1].clone();
        }
        if self.state.tail.is_none() {
            // The actor reads the tail before an append it was not asked for.
            self.state.loaded_tail(self.tail());
        }
        let check = |ok: bool, what: String, violations: &mut Vec<String>| {
            if !ok {
                violations.push(what);
            }
        };
        let now_ms = self.now_us / 1000;
        let moderation = self.roster.moderation.clone();
        let backend = self.by_backend;
        match &body {
            EventBody::Msg { from, .. } | EventBody::Reaction { user: from, .. } | EventBody::Edit { from, .. } => {
                let voice = backend || (!moderation.frozen && !moderation.is_muted(from, now_ms));
                check(voice, format!("{from} spoke while muted or frozen"), &mut self.violations);
            }
            EventBody::Delete { .. } | EventBody::Pin { .. } => {
                check(backend || !moderation.frozen, "a write to a frozen room".into(), &mut self.violations);
            }
            EventBody::Joined { user: joined } => {
                let banned = moderation.is_banned(joined, now_ms);
                check(!banned, format!("{joined} joined while banned"), &mut self.violations);
            }
            EventBody::Left { .. }
            | EventBody::Moderation { .. }
            | EventBody::RoomDeleted {}
            | EventBody::UserErased { .. } => {}
        }
        match &body {
            EventBody::Msg { from, .. } | EventBody::Reaction { user: from, .. } => {
                check(self.role(from).is_some(), format!("an event for {from}, not a member"), &mut self.violations);
            }
            EventBody::Edit { target, from, .. } => {
                let author = self.author_of(*target);
                check(
                    author.as_ref() == Some(from),
                    format!("{from} edited {target} of {author:?}"),
                    &mut self.violations,
                );
            }
            EventBody::Delete { target, by } => {
                let author = self.author_of(*target);
                let allowed = author.as_ref() == Some(by) || self.role(by) == Some(Role::Admin);
                check(allowed, format!("{by} deleted {target} of {author:?}"), &mut self.violations);
            }
            EventBody::Pin { target, by, .. } => {
                let allowed = match self.room.is_dm() {
                    true => self.role(by).is_some(),
                    false => self.role(by) == Some(Role::Admin),
                };
                check(allowed, format!("{by} pinned {target} without being allowed to"), &mut self.violations);
                let live = self.author_of(*target).is_some() && !self.deleted(*target);
                check(live, format!("{by} pinned {target}, which is no live message"), &mut self.violations);
            }
            EventBody::Left { user: left, by } => {
                check(self.role(left).is_some(), format!("{left} left but was no member"), &mut self.violations);
                if let Some(by) = by {
                    let admin = self.role(by) == Some(Role::Admin);
                    check(admin, format!("{by} kicked {left} without being an admin"), &mut self.violations);
                }
                self.gone.insert(left.clone());
            }
            EventBody::Joined { user: joined } => {
                self.gone.remove(joined);
            }
            EventBody::Moderation { by, .. } => {
                if let Some(by) = by {
                    let admin = self.role(by) == Some(Role::Admin);
                    check(admin, format!("{by} moderated without being an admin"), &mut self.violations);
                }
            }
            EventBody::RoomDeleted {} => {
                check(self.record.is_some(), "a deletion of no room".into(), &mut self.violations);
            }
            EventBody::UserErased { user } => {
                check(backend || self.role(user).is_none(), format!("{user} erased by a user"), &mut self.violations);
            }
        }
        if let Some(author) = written_for(&body) {
            check(!self.gone.contains(author), format!("an event for {author} after their left"), &mut self.violations);
        }
        let event = self.event(body);
        if event.seq != self.state.tail.as_ref().map_or(0, |tail| tail.seq) + 1 {
            self.violations.push(format!("seq {} does not follow the tail the rules saw", event.seq));
        }
        if let Some(id) = dedupe_id {
            self.dedupe.insert(id, event.seq);
        }
        self.state.appended(&event, event.seq);
        self.events.push(event.clone());
        event
    }

    /// Messages whose last pin event pinned them and that are not deleted, as history folds them.
    fn pinned(&self) -> BTreeSet<u64> {
        let mut pinned = BTreeSet::new();
        for event in &self.events {
            match &event.body {
                EventBody::Pin { target, pinned: true, .. } => {
                    pinned.insert(*target);
                }
                EventBody::Pin { target, pinned: false, .. } | EventBody::Delete { target, .. } => {
                    pinned.remove(target);
                }
                EventBody::Msg { .. }
                | EventBody::Edit { .. }
                | EventBody::Reaction { .. }
                | EventBody::Joined { .. }
                | EventBody::Left { .. }
                | EventBody::Moderation { .. }
                | EventBody::UserErased { .. } => {}
                EventBody::RoomDeleted {} => pinned.clear(),
            }
        }
        pinned
    }

    fn deleted(&self, target: u64) -> bool {
        self.events
            .iter()
            .any(|event| matches!(&event.body, EventBody::Delete { target: deleted, .. } if *deleted == target))
    }

    fn author_of(&self, target: u64) -> Option<UserId> {
        self.events.iter().find_map(|event| match &event.body {
            EventBody::Msg { from, .. } if event.seq == target => Some(from.clone()),
            _ => None,
        })
    }
}

/// The user an event is written by (a message, an edit, a reaction, a delete, a pin).
fn written_for(body: &EventBody) -> Option<&UserId> {
    author(body)
}

fn code(result: &Result<OkResult, Refusal>) -> Option<ErrorCode> {
    result.as_ref().err().map(|refusal| refusal.code)
}

// ---- The permission matrix ----

/// Who acts in the matrix: the tenant's backend, or one of the users of `matrix_world`.
const ACTORS: [Option<&str>; 4] = [None, Some("ada"), Some("bob"), Some("eve")];

/// A public room with `ada` (admin) and `bob` (member), a message of each (seqs 3 and 4); `eve` is of the tenant
/// but no member.
fn matrix_world(private: bool) -> World {
    World::with_room("lobby", private, &[("ada", true), ("bob", false)]).with_message("ada").with_message("bob")
}

fn matrix_commands(room: &RoomId) -> Vec<(&'static str, RoomCommand)> {
    let room = room.clone();
    vec![
        ("join", RoomCommand::Join { room: room.clone(), grants: vec![] }),
        ("can_read", RoomCommand::CanRead { room: room.clone(), grants: vec![] }),
        ("members", RoomCommand::Members { room: room.clone() }),
        ("send", RoomCommand::Send { room: room.clone(), body: "x".into(), attrs: None, reply_to: None, cmid: None }),
        ("invite", RoomCommand::Invite { room: room.clone(), user: user("zed") }),
        ("kick bob", RoomCommand::Kick { room: room.clone(), user: user("bob") }),
        ("set_member", RoomCommand::SetMember { room: room.clone(), user: user("zed"), role: Role::Admin }),
        ("read", RoomCommand::Read { room: room.clone(), seq: 3 }),
        ("react", RoomCommand::React { room: room.clone(), target: 3, emoji: "+1".into(), remove: false }),
        ("edit ada's", RoomCommand::Edit { room: room.clone(), target: 3, body: "y".into() }),
        ("edit bob's", RoomCommand::Edit { room: room.clone(), target: 4, body: "y".into() }),
        ("delete ada's", RoomCommand::Delete { room: room.clone(), target: 3 }),
        ("delete bob's", RoomCommand::Delete { room: room.clone(), target: 4 }),
        ("pin ada's", RoomCommand::Pin { room: room.clone(), target: 3, pinned: true }),
        ("unpin bob's", RoomCommand::Pin { room: room.clone(), target: 4, pinned: false }),
        ("pin a join", RoomCommand::Pin { room: room.clone(), target: 1, pinned: true }),
        ("leave", RoomCommand::Leave { room: room.clone() }),
        ("create", RoomCommand::Create { room, private: false, title: None }),
    ]
}

use ErrorCode::{BadRequest, Conflict, Forbidden, NotFound, RateLimited};

/// The refusal each actor of [`ACTORS`] gets, in order (`None`: success).
type Outcomes = [Option<ErrorCode>; 4];

/// The expected outcome of each matrix command for backend, ada (admin), bob (member), eve (outsider) in a public
/// room, then in a private one (where only the outsider's answers change). `None` is success.
#[rustfmt::skip]
const MATRIX: [(&str, Outcomes, Outcomes); 18] = [
    //                 backend          ada              bob              eve                private: backend, ada, bob, eve
    ("join",         [Some(Forbidden), None,            None,            None],            [Some(Forbidden), None, None, Some(Forbidden)]),
    ("can_read",     [None,            None,            None,            None],            [None, None, None, Some(Forbidden)]),
    ("members",      [None,            None,            None,            None],            [None, None, None, Some(Forbidden)]),
    ("send",         [Some(Forbidden), None,            None,            Some(Forbidden)], [Some(Forbidden), None, None, Some(Forbidden)]),
    ("invite",       [Some(Forbidden), None,            Some(Forbidden), Some(Forbidden)], [Some(Forbidden), None, Some(Forbidden), Some(Forbidden)]),
    ("kick bob",     [None,            None,            Some(Forbidden), Some(Forbidden)], [None, None, Some(Forbidden), Some(Forbidden)]),
    ("set_member",   [None,            Some(Forbidden), Some(Forbidden), Some(Forbidden)], [None, Some(Forbidden), Some(Forbidden), Some(Forbidden)]),
    ("read",         [Some(Forbidden), None,            None,            Some(Forbidden)], [Some(Forbidden), None, None, Some(Forbidden)]),
    ("react",        [Some(Forbidden), None,            None,            Some(Forbidden)], [Some(Forbidden), None, None, Some(Forbidden)]),
    ("edit ada's",   [Some(Forbidden), None,            Some(Forbidden), Some(Forbidden)], [Some(Forbidden), None, Some(Forbidden), Some(Forbidden)]),
    ("edit bob's",   [Some(Forbidden), Some(Forbidden), None,            Some(Forbidden)], [Some(Forbidden), Some(Forbidden), None, Some(Forbidden)]),
    ("delete ada's", [Some(Forbidden), None,            Some(Forbidden), Some(Forbidden)], [Some(Forbidden), None, Some(Forbidden), Some(Forbidden)]),
    ("delete bob's", [Some(Forbidden), None,            None,            Some(Forbidden)], [Some(Forbidden), None, None, Some(Forbidden)]),
    ("pin ada's",    [Some(Forbidden), None,            Some(Forbidden), Some(Forbidden)], [Some(Forbidden), None, Some(Forbidden), Some(Forbidden)]),
    ("unpin bob's",  [Some(Forbidden), None,            Some(Forbidden), Some(Forbidden)], [Some(Forbidden), None, Some(Forbidden), Some(Forbidden)]),
    ("pin a join",   [Some(Forbidden), Some(NotFound),  Some(Forbidden), Some(Forbidden)], [Some(Forbidden), Some(NotFound), Some(Forbidden), Some(Forbidden)]),
    ("leave",        [Some(Forbidden), None,            None,            Some(NotFound)],  [Some(Forbidden), None, None, Some(NotFound)]),
    ("create",       [Some(Conflict),  Some(Conflict),  Some(Conflict),  Some(Conflict)],  [Some(Conflict), Some(Conflict), Some(Conflict), Some(Conflict)]),
];

#[test]
fn the_permission_matrix_holds_in_public_and_private_rooms() {
    let quotas = RoomQuotas::default();
    let mut failures = Vec::new();
    for private in [false, true] {
        let commands = matrix_commands(&matrix_world(private).room);
        assert_eq!(commands.len(), MATRIX.len());
        for ((name, command), (row, public_codes, private_codes)) in commands.into_iter().zip(MATRIX) {
            assert_eq!(name, row, "the matrix lists the commands in order");
            let expected = if private { private_codes } else { public_codes };
            for (actor, want) in ACTORS.into_iter().zip(expected) {
                let mut world = matrix_world(private);
                let got = world.run(actor, command.clone(), &quotas);
                if code(&got) != want {
                    failures.push(format!("private={private} {name} by {actor:?}: want {want:?}, got {got:?}"));
                }
                assert!(world.violations.is_empty(), "{name} by {actor:?}: {:?}", world.violations);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn direct_message_rooms_have_two_fixed_members() {
    let quotas = RoomQuotas::default();
    let dm = RoomId::dm(&user("ada"), &user("bob")).expect("two users make a direct-message room");
    let mut world = World::new(dm.as_str());
    let send = RoomCommand::Send { room: dm.clone(), body: "hi".into(), attrs: None, reply_to: None, cmid: None };
    let sent = world.run(Some("ada"), send.clone(), &quotas).expect("a participant sends");
    assert!(matches!(sent, OkResult::Sent { seq: 1, .. }));
    assert_eq!(world.memberships.len(), 2, "the first message lists the room for both participants");
    assert_eq!(code(&world.run(Some("eve"), send, &quotas)), Some(Forbidden));
    let join = RoomCommand::Join { room: dm.clone(), grants: vec!["*".into()] };
    assert_eq!(code(&world.run(Some("eve"), join, &quotas)), Some(Forbidden));
    let invite = RoomCommand::Invite { room: dm.clone(), user: user("eve") };
    assert_eq!(code(&world.run(Some("ada"), invite, &quotas)), Some(BadRequest));
    let leave = RoomCommand::Leave { room: dm.clone() };
    assert_eq!(code(&world.run(Some("bob"), leave, &quotas)), Some(BadRequest));
    let members = world.run(Some("bob"), RoomCommand::Members { room: dm.clone() }, &quotas).expect("members");
    assert!(matches!(members, OkResult::Members { members } if members.len() == 2));
    // Either participant pins and unpins; nobody else does, and only messages are pinned.
    let pin = |target, pinned| RoomCommand::Pin { room: dm.clone(), target, pinned };
    assert_eq!(world.run(Some("bob"), pin(1, true), &quotas), Ok(OkResult::RoomSeq { room: dm.clone(), seq: 2 }));
    assert_eq!(world.run(Some("ada"), pin(1, false), &quotas), Ok(OkResult::RoomSeq { room: dm.clone(), seq: 3 }));
    assert_eq!(code(&world.run(Some("eve"), pin(1, true), &quotas)), Some(Forbidden));
    assert_eq!(code(&world.run(Some("ada"), pin(2, true), &quotas)), Some(NotFound), "seq 2 is a pin, not a message");
    assert_eq!(code(&world.run(None, pin(1, true), &quotas)), Some(Forbidden), "the backend is no participant");
    assert!(matches!(&world.events[1].body, EventBody::Pin { target: 1, pinned: true, by } if by == &user("bob")));
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn a_deleted_message_cannot_be_pinned_and_a_pin_names_its_admin() {
    let quotas = RoomQuotas::default();
    let mut world = matrix_world(false);
    let room = world.room.clone();
    let pin = |target, pinned| RoomCommand::Pin { room: room.clone(), target, pinned };
    assert_eq!(world.run(Some("ada"), pin(4, true), &quotas), Ok(OkResult::RoomSeq { room: room.clone(), seq: 5 }));
    assert_eq!(world.run(Some("ada"), pin(4, true), &quotas), Ok(OkResult::RoomSeq { room: room.clone(), seq: 6 }));
    world.run(Some("bob"), RoomCommand::Delete { room: room.clone(), target: 4 }, &quotas).expect("deleted");
    assert_eq!(code(&world.run(Some("ada"), pin(4, false), &quotas)), Some(NotFound), "deleted");
    assert_eq!(code(&world.run(Some("ada"), pin(99, true), &quotas)), Some(NotFound), "past the tail");
    assert!(matches!(&world.events[4].body, EventBody::Pin { target: 4, pinned: true, by } if by == &user("ada")));
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn a_missing_room_is_created_by_its_first_joiner_unless_the_backend_creates_rooms() {
    let mut world = World::new("fresh");
    let join = RoomCommand::Join { room: world.room.clone(), grants: vec![] };
    let backend_only = RoomQuotas { backend_creates_rooms: true, ..RoomQuotas::default() };
    assert_eq!(code(&world.run(Some("ada"), join.clone(), &backend_only)), Some(Forbidden));
    assert!(world.record.is_none() && world.events.is_empty());
    let joined = world.run(Some("ada"), join, &RoomQuotas::default()).expect("created");
    assert_eq!(joined, OkResult::RoomSeq { room: world.room.clone(), seq: 1 });
    assert_eq!(world.roster.members.get(&user("ada")), Some(&Role::Admin));
    let capped = RoomQuotas { rooms_per_tenant: Some(1), ..RoomQuotas::default() };
    let mut other = World::new("other");
    let create = RoomCommand::Create { room: other.room.clone(), private: true, title: None };
    assert_eq!(code(&other.run(Some("ada"), create.clone(), &capped)), None);
    other.other_tenant_rooms = 1;
    other.record = None;
    other.state.record = None;
    assert_eq!(code(&other.run(Some("bob"), create, &capped)), Some(Forbidden), "the tenant's room quota");
}

#[test]
fn quotas_refuse_the_member_past_them() {
    let quotas = RoomQuotas { members_per_room: Some(2), rooms_per_user: Some(3), ..RoomQuotas::default() };
    let mut world = World::with_room("small", false, &[("ada", true), ("bob", false)]);
    let join = RoomCommand::Join { room: world.room.clone(), grants: vec![] };
    assert_eq!(code(&world.run(Some("eve"), join.clone(), &quotas)), Some(Forbidden), "the room is full");
    let mut world = World::with_room("small", false, &[("ada", true)]);
    world.other_rooms.insert(user("eve"), 3);
    assert_eq!(code(&world.run(Some("eve"), join.clone(), &quotas)), Some(Forbidden), "eve is in 3 rooms");
    world.other_rooms.insert(user("eve"), 2);
    assert_eq!(code(&world.run(Some("eve"), join, &quotas)), None);
}

#[test]
fn reads_move_forward_only_and_typing_is_throttled() {
    let quotas = RoomQuotas::default();
    let mut world = matrix_world(false);
    let room = world.room.clone();
    let read = |seq| RoomCommand::Read { room: room.clone(), seq };
    assert_eq!(world.run(Some("bob"), read(3), &quotas), Ok(OkResult::RoomSeq { room: room.clone(), seq: 3 }));
    assert_eq!(world.run(Some("bob"), read(1), &quotas), Ok(OkResult::RoomSeq { room: room.clone(), seq: 3 }));
    assert_eq!(code(&world.run(Some("bob"), read(5), &quotas)), Some(BadRequest), "past the tail");
    assert_eq!(world.published.len(), 2, "one read marker moved: the room's read and the reader's own");
    let typing = RoomCommand::Typing { room: room.clone() };
    world.run(Some("bob"), typing.clone(), &quotas).expect("typing");
    world.run(Some("bob"), typing.clone(), &quotas).expect("typing again, 700 ms later");
    world.run(Some("eve"), typing.clone(), &quotas).expect("typing by an outsider is ignored");
    assert_eq!(world.published.len(), 3, "the second signal within 2 s and the outsider's are not relayed");
    world.now += TYPING_INTERVAL;
    world.run(Some("bob"), typing, &quotas).expect("typing later");
    assert_eq!(world.published.len(), 4);
}

/// The unread count the reader's own sessions were last told.
fn last_own_unread(world: &World) -> Option<(u64, u64)> {
    world.published.iter().rev().find_map(|message| match message {
        LiveMessage::OwnRead { seq, unread, .. } => Some((*seq, *unread)),
        _ => None,
    })
}

#[test]
fn unread_counts_messages_after_the_marker_or_the_join_without_reading_history() {
    let quotas = RoomQuotas::default();
    let mut world = World::with_room("plaza", false, &[("alice", true), ("bob", false)]);
    let room = world.room.clone();
    let mut sent = Vec::new();
    for _ in 0..3 {
        sent.push(world.run(Some("alice"), send(&world), &quotas).map(|ok| ok_seq(&ok)).expect("send"));
    }
    let react = RoomCommand::React { room: room.clone(), target: sent[0], emoji: "+1".into(), remove: false };
    world.run(Some("bob"), react, &quotas).expect("react");
    world.run(Some("carol"), RoomCommand::Join { room: room.clone(), grants: vec![] }, &quotas).expect("join");
    for _ in 0..2 {
        sent.push(world.run(Some("alice"), send(&world), &quotas).map(|ok| ok_seq(&ok)).expect("send"));
    }
    let tail = world.tail();
    assert_eq!(tail.tally.msgs, 5, "a reaction and a join are no messages");
    assert_eq!(tail.tally.last_message.as_ref().map(|last| last.seq), Some(sent[4]));
    let unread = |world: &World, who: &str| world.memberships[&user(who)].unread(tail.seq, tail.tally.msgs);
    assert_eq!(unread(&world, "carol"), 2, "only what came after the join");
    assert_eq!(unread(&world, "bob"), 5);

    world.run(Some("bob"), RoomCommand::Read { room: room.clone(), seq: sent[1] }, &quotas).expect("read");
    assert_eq!(last_own_unread(&world), Some((sent[1], 3)), "bob's own sessions are told what is left");
    assert_eq!(unread(&world, "bob"), 3);
    // An actor that has just loaded its room asks the stream for the count at an older marker.
    world.state.forget();
    let read = RoomCommand::Read { room: room.clone(), seq: sent[2] + 1 };
    world.loaded.clear();
    world.run(Some("bob"), read, &quotas).expect("read after a reload");
    assert!(world.loaded.contains(&Fact::MsgsAt(sent[2] + 1)), "{:?}", world.loaded);
    assert_eq!(last_own_unread(&world), Some((sent[2] + 1, 2)));

    // A deleted latest message shows as deleted, with no body; an edit of it shows the new body.
    let edit = RoomCommand::Edit { room: room.clone(), target: sent[4], body: "better".into() };
    world.run(Some("alice"), edit, &quotas).expect("edit");
    let last = world.tail().tally.last_message.expect("a latest message");
    assert_eq!((last.body.as_str(), last.edited, last.deleted), ("better", true, false));
    world.run(Some("alice"), RoomCommand::Delete { room: room.clone(), target: sent[4] }, &quotas).expect("delete");
    let last = world.tail().tally.last_message.expect("a latest message");
    assert_eq!((last.seq, last.body.as_str(), last.deleted), (sent[4], "", true));
}

#[test]
fn only_the_backend_deletes_a_named_room_and_its_name_is_free_again() {
    let quotas = RoomQuotas::default();
    let mut world = World::with_room("attic", true, &[("ada", true), ("bob", false)]).with_message("bob");
    let room = world.room.clone();
    let delete = RoomCommand::DeleteRoom { room: room.clone() };
    assert_eq!(code(&world.run(Some("ada"), delete.clone(), &quotas)), Some(Forbidden), "not even its admin");
    let ok = world.run(None, delete.clone(), &quotas).expect("the backend deletes it");
    let last = world.events.last().expect("an event");
    assert_eq!((ok_seq(&ok), &last.body), (last.seq, &EventBody::RoomDeleted {}));
    assert_eq!(last.tally, RoomTally::default(), "a room created again under the name counts from nothing");
    assert!(world.memberships.is_empty(), "every membership ended: {:?}", world.memberships);
    assert!(world.record.is_none() && world.roster.members.is_empty());
    assert_eq!(code(&world.run(None, delete, &quotas)), Some(NotFound), "gone already");
    let read = RoomCommand::CanRead { room: room.clone(), grants: vec![] };
    assert_eq!(code(&world.run(Some("bob"), read, &quotas)), Some(NotFound));
    world
        .run(Some("cy"), RoomCommand::Create { room, private: false, title: None }, &quotas)
        .expect("the name is free");
    let dm = RoomCommand::DeleteRoom { room: room_id("dm:ada:bob") };
    let mut direct = World::new("dm:ada:bob");
    assert_eq!(code(&direct.run(None, dm, &quotas)), Some(BadRequest));
}

#[test]
fn only_the_backend_erases_a_user_who_then_has_no_place_in_the_room() {
    let quotas = RoomQuotas::default();
    let mut world = World::with_room("plaza", false, &[("ada", true), ("bob", false)]).with_message("bob");
    let room = world.room.clone();
    let ban = RoomCommand::Moderate {
        room: room.clone(),
        action: Moderation::Mute { user: user("bob"), until_ms: None },
        secs: None,
    };
    world.run(Some("ada"), ban, &quotas).expect("mute");
    let erase = RoomCommand::EraseUser { room: room.clone(), user: user("bob") };
    assert_eq!(code(&world.run(Some("ada"), erase.clone(), &quotas)), Some(Forbidden), "not even an admin");
    let ok = world.run(None, erase.clone(), &quotas).expect("the backend erases");
    let last = world.events.last().expect("an event");
    assert_eq!((ok_seq(&ok), &last.body), (last.seq, &EventBody::UserErased { user: user("bob") }));
    assert_eq!(
        last.to_server_event(),
        switchyard_protocol::client::ServerEvent::Erased { room: room.clone(), seq: last.seq },
        "it names nobody"
    );
    assert!(last.tally.last_message.is_none(), "no preview of the erased user's message is carried on");
    assert_eq!(last.tally.msgs, 1, "their message still counts");
    assert!(!world.roster.members.contains_key(&user("bob")) && world.roster.moderation.mutes.is_empty());
    assert!(!world.memberships.contains_key(&user("bob")), "{:?}", world.memberships);
    // The message is a tombstone to the rules too: nobody edits or reacts to it.
    let react = RoomCommand::React { room: room.clone(), target: 1, emoji: "x".into(), remove: false };
    assert_eq!(code(&world.run(Some("ada"), react, &quotas)), Some(NotFound));
    world.run(None, erase, &quotas).expect("erasing again is harmless");
    // A direct-message room names its participants: erasing one deletes it whole, once.
    let mut direct = World::new("dm:ada:bob");
    let send =
        RoomCommand::Send { room: room_id("dm:ada:bob"), body: "hi".into(), attrs: None, reply_to: None, cmid: None };
    direct.run(Some("ada"), send, &quotas).expect("send");
    let erase_dm = |who: &str| RoomCommand::EraseUser { room: room_id("dm:ada:bob"), user: user(who) };
    assert_eq!(code(&direct.run(None, erase_dm("cy"), &quotas)), Some(BadRequest), "no participant");
    direct.run(None, erase_dm("bob"), &quotas).expect("erase from the conversation");
    assert_eq!(direct.events.last().map(|event| &event.body), Some(&EventBody::RoomDeleted {}));
    let before = direct.events.len();
    direct.run(None, erase_dm("bob"), &quotas).expect("nothing more to do");
    assert_eq!(direct.events.len(), before, "a deleted conversation is not deleted again");
}

#[test]
fn a_rooms_own_retention_wins_over_the_tenants_and_only_the_backend_sets_it() {
    let tenant = RoomQuotas { retention_secs: Some(60), ..RoomQuotas::default() };
    let mut world = World::with_room("plaza", false, &[("ada", true)]);
    assert_eq!(retention(world.record.as_ref(), &tenant), Some(60), "the tenant's");
    assert_eq!(retention(None, &tenant), Some(60), "a direct-message room has only the tenant's");
    assert_eq!(retention(world.record.as_ref(), &RoomQuotas::default()), None, "for good");
    let set = |secs| RoomCommand::SetRetention { room: room_id("plaza"), secs };
    assert_eq!(code(&world.run(Some("ada"), set(Some(5)), &tenant)), Some(Forbidden), "not even its admin");
    world.run(None, set(Some(5)), &tenant).expect("the backend sets it");
    assert_eq!(retention(world.record.as_ref(), &tenant), Some(5));
    world.run(None, set(Some(0)), &tenant).expect("for good");
    assert_eq!(retention(world.record.as_ref(), &tenant), None, "0 keeps the room's history whatever the tenant's");
    world.run(None, set(None), &tenant).expect("back to the tenant's");
    assert_eq!(retention(world.record.as_ref(), &tenant), Some(60));
    let too_long = set(Some(limits::MAX_RETENTION_SECS + 1));
    assert_eq!(code(&world.run(None, too_long, &tenant)), Some(BadRequest));
    let mut direct = World::new("dm:ada:bob");
    let dm = RoomCommand::SetRetention { room: room_id("dm:ada:bob"), secs: Some(5) };
    assert_eq!(code(&direct.run(None, dm, &tenant)), Some(BadRequest));
}

#[test]
fn past_its_searches_per_second_a_room_keeps_a_bound_instead_of_searching() {
    let quotas = RoomQuotas::default();
    let mut world = World::with_room("plaza", false, &[("ada", true), ("bob", false)]);
    let mut sent = Vec::new();
    for _ in 0..4 {
        sent.push(world.run(Some("ada"), send(&world), &quotas).map(|ok| ok_seq(&ok)).expect("send"));
    }
    let react = RoomCommand::React { room: world.room.clone(), target: sent[3], emoji: "+1".into(), remove: false };
    world.run(Some("ada"), react, &quotas).expect("react");
    // The next command runs 700 ms later, within the second of these searches.
    for _ in 0..COUNT_SEARCHES_PER_SEC {
        world.state.searched(world.now + Duration::from_millis(700));
    }
    world.state.forget();
    world.loaded.clear();
    world.run(Some("bob"), RoomCommand::Read { room: world.room.clone(), seq: sent[1] }, &quotas).expect("read");
    assert!(!world.loaded.contains(&Fact::MsgsAt(sent[1])), "no search: {:?}", world.loaded);
    assert_eq!(last_own_unread(&world), Some((sent[1], 3)), "a bound: the reaction after it counts too");
    world.now += Duration::from_secs(2);
    world.state.forget();
    world.run(Some("bob"), RoomCommand::Read { room: world.room.clone(), seq: sent[2] }, &quotas).expect("read");
    assert!(world.loaded.contains(&Fact::MsgsAt(sent[2])), "a second later it searches: {:?}", world.loaded);
    assert_eq!(last_own_unread(&world), Some((sent[2], 1)), "exact again");
}

#[test]
fn the_recent_messages_kept_are_bounded_and_older_counts_are_asked_for() {
    let mut state = RoomState::default();
    state.loaded_tail(Tail {
        seq: 10,
        stream_seq: 10,
        ts_us: 10,
        tally: RoomTally { msgs: 4, ..RoomTally::default() },
    });
    let tenant = ProjectId::parse("pj_0123456789abcdefghij").expect("a valid project id");
    let room = room_id("plaza");
    let mut tally = state.tail.as_ref().map(|tail| tail.tally.clone()).unwrap_or_default();
    for seq in 11..=(11 + RECENT_MESSAGES_KEPT as u64 + 9) {
        let body = EventBody::Msg {
            id: MessageId::generate(1),
            from: user("a"),
            body: "x".into(),
            attrs: None,
            reply_to: None,
        };
        tally = tally.followed_by(seq, 0, None, &body);
        let event = RoomEvent {
            v: INTERNAL_VERSION,
            tenant: tenant.clone(),
            room: room.clone(),
            seq,
            ts_us: seq,
            tally: tally.clone().stored_for(&body),
            expires_ms: None,
            body,
        };
        state.appended(&event, seq);
    }
    assert_eq!(state.recent_msgs.len(), RECENT_MESSAGES_KEPT);
    let last = 11 + RECENT_MESSAGES_KEPT as u64 + 9;
    assert_eq!(state.msgs_at(last), Some(tally.msgs));
    assert_eq!(state.msgs_at(last - 1), Some(tally.msgs - 1));
    assert_eq!(state.msgs_at(10), None, "messages after seq 10 left the kept ones");
    assert_eq!(state.msgs_at(20), Some(4 + 10), "seq 20 is the last message no longer kept");
}

#[test]
fn a_repeated_cmid_answers_the_first_send_and_a_kick_is_sequenced_once() {
    let quotas = RoomQuotas::default();
    let mut world = matrix_world(false);
    let cmid = ClientMessageId::parse("c-1").expect("a valid cmid");
    let send = RoomCommand::Send {
        room: world.room.clone(),
        body: "once".into(),
        attrs: None,
        reply_to: Some(3),
        cmid: Some(cmid),
    };
    let first = world.run(Some("bob"), send.clone(), &quotas).expect("sent");
    let second = world.run(Some("bob"), send, &quotas).expect("sent again");
    assert_eq!(first, second);
    assert_eq!(world.events.len(), 5);
    let bad_reply =
        RoomCommand::Send { room: world.room.clone(), body: "x".into(), attrs: None, reply_to: Some(9), cmid: None };
    assert_eq!(code(&world.run(Some("bob"), bad_reply, &quotas)), Some(BadRequest));
    let kick = RoomCommand::Kick { room: world.room.clone(), user: user("bob") };
    world.run(Some("ada"), kick.clone(), &quotas).expect("kicked");
    assert_eq!(code(&world.run(Some("ada"), kick, &quotas)), Some(NotFound));
    assert!(matches!(&world.events[5].body, EventBody::Left { by: Some(by), .. } if by == &user("ada")));
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn grants_match_exact_ids_and_prefixes() {
    let room = room_id("team-red");
    assert!(granted(&["team-*".into()], &room));
    assert!(granted(&["team-red".into()], &room));
    assert!(!granted(&["team-re".into(), "blue*".into()], &room));
    assert!(!granted(&[], &room));
}

#[test]
fn quotas_refuse_the_member_past_them_and_ceilings_hold_without_quotas() {
    let quotas = RoomQuotas { members_per_room: Some(3), rooms_per_user: Some(2), ..RoomQuotas::default() };
    assert_eq!(quota_refusal(2, 1, &quotas), None);
    assert!(quota_refusal(3, 0, &quotas).is_some_and(|m| m.contains("3 members")));
    assert!(quota_refusal(0, 2, &quotas).is_some_and(|m| m.contains("2 rooms")));
    let none = RoomQuotas::default();
    assert_eq!(quota_refusal(0, 0, &none), None);
    assert!(quota_refusal(limits::MAX_MEMBERS_PER_ROOM as usize, 0, &none).is_some());
    assert!(quota_refusal(0, u64::from(limits::MAX_ROOMS_PER_USER), &none).is_some());
    let above = RoomQuotas { members_per_room: Some(u32::MAX), rooms_per_user: Some(u32::MAX), ..quotas };
    assert!(quota_refusal(limits::MAX_MEMBERS_PER_ROOM as usize, 0, &above).is_some());
}

// ---- Moderation ----

fn moderate(world: &World, action: Moderation) -> RoomCommand {
    RoomCommand::Moderate { room: world.room.clone(), action, secs: None }
}

fn ok_seq(ok: &OkResult) -> u64 {
    match ok {
        OkResult::Sent { seq, .. } | OkResult::RoomSeq { seq, .. } => *seq,
        other => panic!("no seq in {other:?}"),
    }
}

fn send(world: &World) -> RoomCommand {
    RoomCommand::Send { room: world.room.clone(), body: "m".into(), attrs: None, reply_to: None, cmid: None }
}

#[test]
fn a_ban_ends_the_membership_and_keeps_the_user_out_until_it_ends() {
    let quotas = RoomQuotas::default();
    let mut world = matrix_world(false);
    let ban = |until_ms| Moderation::Ban { user: user("bob"), until_ms };
    assert_eq!(
        code(&world.run(Some("bob"), moderate(&world, Moderation::Unban { user: user("eve") }), &quotas)),
        Some(Forbidden),
        "a member"
    );
    assert_eq!(code(&world.run(Some("eve"), moderate(&world, ban(None)), &quotas)), Some(Forbidden), "an outsider");
    assert_eq!(
        code(&world.run(Some("ada"), moderate(&world, Moderation::Ban { user: user("ada"), until_ms: None }), &quotas)),
        Some(BadRequest),
        "themselves"
    );
    let until_ms = world.now_us / 1000 + 10_000;
    let tail = world.events.len() as u64;
    world.run(Some("ada"), moderate(&world, ban(Some(until_ms))), &quotas).expect("ada bans bob for 10 s");
    // The action first, then the end of bob's membership, as a kick by ada.
    assert!(matches!(&world.events[tail as usize].body,
        EventBody::Moderation { action: Moderation::Ban { until_ms: Some(u), .. }, by: Some(by) } if *u == until_ms && by == &user("ada")));
    assert!(matches!(&world.events[tail as usize + 1].body,
        EventBody::Left { user: left, by: Some(by) } if left == &user("bob") && by == &user("ada")));
    assert!(!world.roster.members.contains_key(&user("bob")) && !world.memberships.contains_key(&user("bob")));
    let join = RoomCommand::Join { room: world.room.clone(), grants: vec![] };
    let can_read = RoomCommand::CanRead { room: world.room.clone(), grants: vec![] };
    assert_eq!(code(&world.run(Some("bob"), join.clone(), &quotas)), Some(Forbidden), "banned from joining");
    assert_eq!(
        code(&world.run(Some("bob"), can_read.clone(), &quotas)),
        Some(Forbidden),
        "banned from reading a public room"
    );
    let invite = RoomCommand::Invite { room: world.room.clone(), user: user("bob") };
    assert_eq!(code(&world.run(Some("ada"), invite, &quotas)), Some(Forbidden), "banned from invites");
    let set = RoomCommand::SetMember { room: world.room.clone(), user: user("bob"), role: Role::Member };
    assert_eq!(code(&world.run(None, set, &quotas)), Some(Forbidden), "the backend lifts the ban first");
    // The same ban again changes nothing and appends nothing.
    let before = world.events.len();
    world.run(Some("ada"), moderate(&world, ban(Some(until_ms))), &quotas).expect("the same ban");
    assert_eq!(world.events.len(), before);
    // It ends by itself.
    world.now_us += 10_000_000;
    world.run(Some("bob"), can_read, &quotas).expect("the ban expired");
    world.run(Some("bob"), join.clone(), &quotas).expect("bob joins again");
    // Lifted by the backend.
    world.run(None, moderate(&world, ban(None)), &quotas).expect("the backend bans bob for good");
    assert!(matches!(world.events.last().map(|e| &e.body), Some(EventBody::Left { by: None, .. })));
    world.now_us += 1_000_000_000_000;
    assert_eq!(code(&world.run(Some("bob"), join.clone(), &quotas)), Some(Forbidden), "still banned");
    world.run(None, moderate(&world, Moderation::Unban { user: user("bob") }), &quotas).expect("unban");
    assert_eq!(
        code(&world.run(None, moderate(&world, Moderation::Unban { user: user("bob") }), &quotas)),
        Some(NotFound)
    );
    world.run(Some("bob"), join, &quotas).expect("bob joins after the unban");
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn only_the_backend_restricts_an_admin_and_the_lists_are_bounded() {
    let quotas = RoomQuotas::default();
    let mut world = World::with_room("hall", false, &[("ada", true), ("max", true), ("bob", false)]);
    for action in
        [Moderation::Mute { user: user("max"), until_ms: None }, Moderation::Ban { user: user("max"), until_ms: None }]
    {
        assert_eq!(code(&world.run(Some("ada"), moderate(&world, action.clone()), &quotas)), Some(Forbidden));
        world.run(None, moderate(&world, action), &quotas).expect("the backend may");
    }
    let past = world.now_us / 1000;
    let expired = Moderation::Mute { user: user("bob"), until_ms: Some(past) };
    assert_eq!(code(&world.run(None, moderate(&world, expired), &quotas)), Some(BadRequest), "an expiry in the past");
    let too_slow = Moderation::SlowMode { secs: limits::MAX_SLOW_MODE_SECS + 1 };
    assert_eq!(code(&world.run(None, moderate(&world, too_slow), &quotas)), Some(BadRequest));
    let mut world = World::with_room("big", false, &[("ada", true)]);
    world.roster.moderation.bans = (0..limits::MAX_BANS_PER_ROOM).map(|i| (user(&format!("u{i}")), None)).collect();
    world.roster.moderation.bans.insert(user("u0"), Some(1));
    let ban = |name: &str| Moderation::Ban { user: user(name), until_ms: None };
    world.run(Some("ada"), moderate(&world, ban("eve")), &quotas).expect("an expired ban leaves room for another");
    assert_eq!(
        code(&world.run(Some("ada"), moderate(&world, ban("fay")), &quotas)),
        Some(Forbidden),
        "the room's bans are full"
    );
    world.run(Some("ada"), moderate(&world, ban("u1")), &quotas).expect("a ban changed in place needs no room");
    assert_eq!(world.roster.moderation.bans.len(), limits::MAX_BANS_PER_ROOM);
    let dm =
        RoomCommand::Moderate { room: room_id("dm:ada:bob"), action: Moderation::Freeze { frozen: true }, secs: None };
    assert_eq!(code(&World::new("dm:ada:bob").run(Some("ada"), dm, &quotas)), Some(BadRequest), "no moderation in DMs");
}

#[test]
fn a_ban_whose_roster_write_failed_is_finished_by_its_retry_without_new_events() {
    let quotas = RoomQuotas::default();
    let mut world = matrix_world(false);
    let ban = RoomCommand::Moderate {
        room: world.room.clone(),
        action: Moderation::Ban { user: user("bob"), until_ms: None },
        secs: Some(60),
    };
    world.fail_roster_save = true;
    let before = world.events.len();
    assert_eq!(code(&world.run(Some("ada"), ban.clone(), &quotas)), Some(ErrorCode::Unavailable));
    assert_eq!(world.events.len(), before + 2, "the ban and bob's left were sequenced");
    assert!(world.roster.members.contains_key(&user("bob")) && world.roster.moderation.bans.is_empty());
    world.run(Some("ada"), ban, &quotas).expect("the retry");
    assert_eq!(world.events.len(), before + 2, "the retry found both events by their ids");
    assert!(!world.roster.members.contains_key(&user("bob")));
    let until = world.roster.moderation.bans.get(&user("bob")).copied().flatten().expect("a ban with an end");
    let now_ms = world.now_us / 1000;
    assert!(until > now_ms && until <= now_ms + 60_000, "the router's clock sets the end: {until} vs {now_ms}");
    let forever = RoomCommand::Moderate {
        room: world.room.clone(),
        action: Moderation::Mute { user: user("eve"), until_ms: None },
        secs: Some(limits::MAX_MODERATION_SECS + 1),
    };
    assert_eq!(code(&world.run(None, forever, &quotas)), Some(BadRequest));
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn slow_mode_lets_a_retry_of_the_same_send_through_and_forgets_no_binding_sender() {
    let quotas = RoomQuotas::default();
    let mut world = matrix_world(false);
    world.run(Some("ada"), moderate(&world, Moderation::SlowMode { secs: 60 }), &quotas).expect("slow mode");
    let cmid = ClientMessageId::parse("retry-me").expect("a valid cmid");
    let send = |cmid: Option<ClientMessageId>| RoomCommand::Send {
        room: room_id("lobby"),
        body: "m".into(),
        attrs: None,
        reply_to: None,
        cmid,
    };
    let first = world.run(Some("bob"), send(Some(cmid.clone())), &quotas).expect("the first send");
    let again = world.run(Some("bob"), send(Some(cmid)), &quotas).expect("its retry is let through");
    assert_eq!(first, again, "and answers the first send");
    assert_eq!(code(&world.run(Some("bob"), send(None), &quotas)), Some(RateLimited));
    assert!(world.state.slow_mode_binds(world.now));
    assert!(!world.state.slow_mode_binds(world.now + Duration::from_secs(61)));
    // The bound: past it the oldest mark goes, never a user's own.
    let at = world.now;
    for i in 0..SLOW_MODE_SENDERS_KEPT + 10 {
        let mark = SentMark { at: at + Duration::from_millis(i as u64), interval: Duration::from_secs(60), cmid: None };
        world.state.mark_sent(user(&format!("u{i}")), mark);
    }
    assert_eq!(world.state.last_sent.len(), SLOW_MODE_SENDERS_KEPT);
    assert!(world.state.last_sent.contains_key(&user(&format!("u{}", SLOW_MODE_SENDERS_KEPT + 9))));
}

#[test]
fn a_muted_member_reads_but_does_not_speak() {
    let quotas = RoomQuotas::default();
    let mut world = matrix_world(false);
    let mute = Moderation::Mute { user: user("bob"), until_ms: Some(world.now_us / 1000 + 5_000) };
    world.run(Some("ada"), moderate(&world, mute), &quotas).expect("mute");
    let room = world.room.clone();
    assert_eq!(code(&world.run(Some("bob"), send(&world), &quotas)), Some(Forbidden));
    let react = RoomCommand::React { room: room.clone(), target: 3, emoji: "+1".into(), remove: false };
    assert_eq!(code(&world.run(Some("bob"), react, &quotas)), Some(Forbidden));
    let edit = RoomCommand::Edit { room: room.clone(), target: 4, body: "x".into() };
    assert_eq!(code(&world.run(Some("bob"), edit, &quotas)), Some(Forbidden));
    let published = world.published.len();
    world.run(Some("bob"), RoomCommand::Typing { room: room.clone() }, &quotas).expect("typing is dropped");
    assert_eq!(world.published.len(), published);
    world.run(Some("bob"), RoomCommand::CanRead { room: room.clone(), grants: vec![] }, &quotas).expect("reads");
    world.run(Some("bob"), RoomCommand::Delete { room: room.clone(), target: 4 }, &quotas).expect("deletes their own");
    world.by_backend = true;
    world.run(Some("bob"), send(&world), &quotas).expect("the backend posts for a muted user");
    world.by_backend = false;
    world.now_us += 5_000_000;
    world.run(Some("bob"), send(&world), &quotas).expect("the mute expired");
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

#[test]
fn slow_mode_spaces_members_messages_but_not_admins_or_the_backend() {
    let quotas = RoomQuotas::default();
    let mut world = matrix_world(false);
    world.run(Some("ada"), moderate(&world, Moderation::SlowMode { secs: 2 }), &quotas).expect("slow mode");
    world.run(Some("bob"), send(&world), &quotas).expect("a first message");
    // The next command comes 700 ms later.
    let refused = world.run(Some("bob"), send(&world), &quotas).expect_err("too soon");
    assert_eq!(refused.code, RateLimited);
    assert_eq!(refused.retry_after_ms, Some(1301));
    world.run(Some("ada"), send(&world), &quotas).expect("admins are exempt");
    world.run(Some("ada"), send(&world), &quotas).expect("admins are exempt");
    world.by_backend = true;
    world.run(Some("bob"), send(&world), &quotas).expect("the backend is exempt");
    world.by_backend = false;
    world.run(Some("bob"), send(&world), &quotas).expect("2.8 s after the first");
    world.run(None, moderate(&world, Moderation::SlowMode { secs: 0 }), &quotas).expect("off");
    world.run(Some("bob"), send(&world), &quotas).expect("no slow mode");
    world.run(Some("bob"), send(&world), &quotas).expect("no slow mode");
}

#[test]
fn a_frozen_room_is_read_only_but_for_the_backend() {
    let quotas = RoomQuotas::default();
    let mut world = matrix_world(false);
    world.run(Some("ada"), moderate(&world, Moderation::Freeze { frozen: true }), &quotas).expect("freeze");
    let room = world.room.clone();
    for who in ["ada", "bob"] {
        assert_eq!(code(&world.run(Some(who), send(&world), &quotas)), Some(Forbidden), "{who} sends");
        let delete = RoomCommand::Delete { room: room.clone(), target: 4 };
        assert_eq!(code(&world.run(Some(who), delete, &quotas)), Some(Forbidden), "{who} deletes");
    }
    let pin = RoomCommand::Pin { room: room.clone(), target: 3, pinned: true };
    assert_eq!(code(&world.run(Some("ada"), pin, &quotas)), Some(Forbidden));
    world
        .run(Some("eve"), RoomCommand::Join { room: room.clone(), grants: vec![] }, &quotas)
        .expect("joins still work");
    world.by_backend = true;
    world.run(Some("bob"), send(&world), &quotas).expect("the backend writes");
    world.by_backend = false;
    world.run(Some("ada"), moderate(&world, Moderation::Freeze { frozen: false }), &quotas).expect("thaw");
    world.run(Some("bob"), send(&world), &quotas).expect("sends again");
    let freezes = world.events.iter().filter(|e| matches!(e.body, EventBody::Moderation { .. })).count();
    assert_eq!(freezes, 2);
    assert!(world.violations.is_empty(), "{:?}", world.violations);
}

// ---- Random op sequences against a reference model ----

const USERS: [&str; 4] = ["ada", "bob", "cy", "dee"];

/// One op of a random sequence: who acts (`None`: the backend) and what.
#[derive(Debug, Clone)]
enum Op {
    Create {
        by: Option<usize>,
        private: bool,
    },
    Join {
        by: usize,
        granted: bool,
    },
    Leave {
        by: usize,
    },
    Invite {
        by: usize,
        member: usize,
    },
    Kick {
        by: Option<usize>,
        member: usize,
    },
    SetMember {
        member: usize,
        admin: bool,
    },
    Send {
        by: usize,
    },
    Edit {
        by: usize,
        target: u64,
    },
    Delete {
        by: usize,
        target: u64,
    },
    React {
        by: usize,
        target: u64,
    },
    Pin {
        by: usize,
        target: u64,
        pinned: bool,
    },
    Read {
        by: usize,
        seq: u64,
        /// The room's actor forgets what it cached first, as one that has just started.
        cold: bool,
    },
    CanRead {
        by: usize,
    },
    /// Ban (`on`) or unban, mute or unmute, for good.
    Ban {
        by: Option<usize>,
        member: usize,
        on: bool,
    },
    Mute {
        by: Option<usize>,
        member: usize,
        on: bool,
    },
    Freeze {
        by: Option<usize>,
        frozen: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let who = 0..USERS.len();
    let target = 0u64..24;
    prop_oneof![
        1 => (proptest::option::of(who.clone()), any::<bool>()).prop_map(|(by, private)| Op::Create { by, private }),
        3 => (who.clone(), any::<bool>()).prop_map(|(by, granted)| Op::Join { by, granted }),
        1 => who.clone().prop_map(|by| Op::Leave { by }),
        1 => (who.clone(), who.clone()).prop_map(|(by, member)| Op::Invite { by, member }),
        1 => (proptest::option::of(who.clone()), who.clone()).prop_map(|(by, member)| Op::Kick { by, member }),
        1 => (who.clone(), any::<bool>()).prop_map(|(member, admin)| Op::SetMember { member, admin }),
        4 => who.clone().prop_map(|by| Op::Send { by }),
        2 => (who.clone(), target.clone()).prop_map(|(by, target)| Op::Edit { by, target }),
        2 => (who.clone(), target.clone()).prop_map(|(by, target)| Op::Delete { by, target }),
        1 => (who.clone(), target.clone()).prop_map(|(by, target)| Op::React { by, target }),
        2 => (who.clone(), target.clone(), any::<bool>()).prop_map(|(by, target, pinned)| Op::Pin { by, target, pinned }),
        1 => (who.clone(), target, any::<bool>()).prop_map(|(by, seq, cold)| Op::Read { by, seq, cold }),
        1 => who.clone().prop_map(|by| Op::CanRead { by }),
        1 => (proptest::option::of(who.clone()), who.clone(), any::<bool>())
            .prop_map(|(by, member, on)| Op::Ban { by, member, on }),
        1 => (proptest::option::of(who.clone()), who.clone(), any::<bool>())
            .prop_map(|(by, member, on)| Op::Mute { by, member, on }),
        1 => (proptest::option::of(who), any::<bool>()).prop_map(|(by, frozen)| Op::Freeze { by, frozen }),
    ]
}

/// What the rules should do, written as plainly as possible and independently of them.
#[derive(Debug, Default)]
struct Model {
    exists: bool,
    private: bool,
    members: BTreeMap<usize, bool>,
    seq: u64,
    /// Messages by seq: (author, deleted).
    messages: BTreeMap<u64, (usize, bool)>,
    /// Messages whose last pin event pinned them.
    pinned: BTreeSet<u64>,
    banned: BTreeSet<usize>,
    muted: BTreeSet<usize>,
    frozen: bool,
}

impl Model {
    fn admin(&self, who: usize) -> bool {
        self.members.get(&who) == Some(&true)
    }

    fn member(&self, who: usize) -> bool {
        self.members.contains_key(&who)
    }

    fn message(&self, target: u64) -> Result<usize, ErrorCode> {
        match self.messages.get(&target) {
            Some((author, false)) => Ok(*author),
            Some((_, true)) | None => Err(NotFound),
        }
    }

    /// May `who` send, edit or react?
    fn voice(&self, who: usize) -> bool {
        !self.frozen && !self.muted.contains(&who)
    }

    /// Who may take a moderation action: the backend in an existing room, a room admin, never on themselves.
    fn moderator(&self, by: Option<usize>, member: Option<usize>) -> Result<(), ErrorCode> {
        match by {
            None if !self.exists => Err(NotFound),
            Some(by) if !self.admin(by) => Err(Forbidden),
            Some(by) if Some(by) == member => Err(BadRequest),
            None | Some(_) => Ok(()),
        }
    }

    fn add(&mut self, who: usize, admin: bool) {
        if self.members.insert(who, admin).is_none() {
            self.seq += 1;
        }
    }

    /// The expected outcome of `op`, applied to the model when it succeeds.
    fn apply(&mut self, op: &Op) -> Result<(), ErrorCode> {
        match *op {
            Op::Create { by, private } => {
                if self.exists {
                    return Err(Conflict);
                }
                (self.exists, self.private) = (true, private);
                if let Some(by) = by {
                    self.add(by, true);
                }
            }
            Op::Join { by, granted } => {
                if self.member(by) {
                    return Ok(());
                }
                if !self.exists {
                    (self.exists, self.private) = (true, false);
                    self.add(by, true);
                    return Ok(());
                }
                if self.private && !granted || self.banned.contains(&by) {
                    return Err(Forbidden);
                }
                self.add(by, false);
            }
            Op::Leave { by } => {
                if !self.member(by) {
                    return Err(NotFound);
                }
                self.members.remove(&by);
                self.seq += 1;
            }
            Op::Invite { by, member } => {
                if !self.admin(by) {
                    return Err(Forbidden);
                }
                if !self.member(member) {
                    if self.banned.contains(&member) {
                        return Err(Forbidden);
                    }
                    self.add(member, false);
                }
            }
            Op::Kick { by, member } => {
                match by {
                    None if !self.exists => return Err(NotFound),
                    Some(by) if !self.admin(by) => return Err(Forbidden),
                    None | Some(_) => {}
                }
                if !self.member(member) {
                    return Err(NotFound);
                }
                self.members.remove(&member);
                self.seq += 1;
            }
            Op::SetMember { member, admin } => {
                if !self.exists {
                    return Err(NotFound);
                }
                let new = !self.member(member);
                if new && self.banned.contains(&member) {
                    return Err(Forbidden);
                }
                self.members.insert(member, admin);
                if new {
                    self.seq += 1;
                }
            }
            Op::Send { by } => {
                if !self.member(by) || !self.voice(by) {
                    return Err(Forbidden);
                }
                self.seq += 1;
                self.messages.insert(self.seq, (by, false));
            }
            Op::Edit { by, target } | Op::React { by, target } => {
                if !self.member(by) || !self.voice(by) {
                    return Err(Forbidden);
                }
                let author = self.message(target)?;
                if matches!(op, Op::Edit { .. }) && author != by {
                    return Err(Forbidden);
                }
                self.seq += 1;
            }
            Op::Delete { by, target } => {
                if !self.member(by) || self.frozen {
                    return Err(Forbidden);
                }
                let author = self.message(target)?;
                if author != by && !self.admin(by) {
                    return Err(Forbidden);
                }
                self.seq += 1;
                self.messages.insert(target, (author, true));
                self.pinned.remove(&target);
            }
            Op::Pin { by, target, pinned } => {
                // The model's room is a named one: members may not pin, admins may.
                if !self.member(by) || !self.admin(by) || self.frozen {
                    return Err(Forbidden);
                }
                self.message(target)?;
                self.seq += 1;
                if pinned {
                    self.pinned.insert(target);
                } else {
                    self.pinned.remove(&target);
                }
            }
            Op::Read { by, seq, .. } => {
                if !self.member(by) {
                    return Err(Forbidden);
                }
                if seq > self.seq {
                    return Err(BadRequest);
                }
            }
            Op::CanRead { by } => {
                if self.banned.contains(&by) {
                    return Err(Forbidden);
                }
                if self.member(by) {
                    return Ok(());
                }
                if !self.exists {
                    return Err(NotFound);
                }
                if self.private {
                    return Err(Forbidden);
                }
            }
            Op::Ban { by, member, on } | Op::Mute { by, member, on } => {
                self.moderator(by, Some(member))?;
                let ban = matches!(op, Op::Ban { .. });
                if on && by.is_some() && self.admin(member) {
                    return Err(Forbidden);
                }
                let list = if ban { &mut self.banned } else { &mut self.muted };
                match on {
                    true if list.insert(member) => self.seq += 1,
                    true => {}
                    false if list.remove(&member) => self.seq += 1,
                    false => return Err(NotFound),
                }
                if ban && on && self.members.remove(&member).is_some() {
                    self.seq += 1;
                }
            }
            Op::Freeze { by, frozen } => {
                self.moderator(by, None)?;
                if self.frozen != frozen {
                    self.frozen = frozen;
                    self.seq += 1;
                }
            }
        }
        Ok(())
    }
}

fn command(room: &RoomId, op: &Op) -> (Option<&'static str>, RoomCommand) {
    let room = room.clone();
    let name = |i: usize| USERS[i];
    match *op {
        Op::Create { by, private } => (by.map(name), RoomCommand::Create { room, private, title: None }),
        Op::Join { by, granted } => {
            let grants = if granted { vec!["pl*".to_string()] } else { vec![] };
            (Some(name(by)), RoomCommand::Join { room, grants })
        }
        Op::Leave { by } => (Some(name(by)), RoomCommand::Leave { room }),
        Op::Invite { by, member } => (Some(name(by)), RoomCommand::Invite { room, user: user(name(member)) }),
        Op::Kick { by, member } => (by.map(name), RoomCommand::Kick { room, user: user(name(member)) }),
        Op::SetMember { member, admin } => {
            let role = if admin { Role::Admin } else { Role::Member };
            (None, RoomCommand::SetMember { room, user: user(name(member)), role })
        }
        Op::Send { by } => {
            (Some(name(by)), RoomCommand::Send { room, body: "m".into(), attrs: None, reply_to: None, cmid: None })
        }
        Op::Edit { by, target } => (Some(name(by)), RoomCommand::Edit { room, target, body: "e".into() }),
        Op::Delete { by, target } => (Some(name(by)), RoomCommand::Delete { room, target }),
        Op::React { by, target } => {
            (Some(name(by)), RoomCommand::React { room, target, emoji: "+1".into(), remove: false })
        }
        Op::Pin { by, target, pinned } => (Some(name(by)), RoomCommand::Pin { room, target, pinned }),
        Op::Read { by, seq, .. } => (Some(name(by)), RoomCommand::Read { room, seq }),
        Op::CanRead { by } => (Some(name(by)), RoomCommand::CanRead { room, grants: vec![] }),
        Op::Ban { by, member, on } => {
            let member = user(name(member));
            let action =
                if on { Moderation::Ban { user: member, until_ms: None } } else { Moderation::Unban { user: member } };
            (by.map(name), RoomCommand::Moderate { room, action, secs: None })
        }
        Op::Mute { by, member, on } => {
            let member = user(name(member));
            let action = if on {
                Moderation::Mute { user: member, until_ms: None }
            } else {
                Moderation::Unmute { user: member }
            };
            (by.map(name), RoomCommand::Moderate { room, action, secs: None })
        }
        Op::Freeze { by, frozen } => {
            (by.map(name), RoomCommand::Moderate { room, action: Moderation::Freeze { frozen }, secs: None })
        }
    }
}

proptest! {
    // Failures are printed with their minimal input; nothing is written into the source tree.
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_ops_follow_the_model(ops in proptest::collection::vec(op(), 1..60)) {
        let quotas = RoomQuotas::default();
        let mut world = World::new("plaza");
        let mut model = Model::default();
        for (step, op) in ops.iter().enumerate() {
            let (who, command) = command(&world.room, op);
            let before = who.and_then(|name| world.memberships.get(&user(name)).copied());
            if let Op::Read { cold: true, .. } = op {
                // The actor has just loaded the room: the count at the marker comes from the stream.
                world.state.forget();
            }
            let got = world.run(who, command, &quotas);
            let want = model.apply(op);
            if let (Op::Read { seq, .. }, Some(name), Ok(_)) = (op, who, &got) {
                let after = world.memberships.get(&user(name)).copied();
                let moved = before.map_or(0, |entry| entry.read) < *seq;
                let want_msgs = before.and_then(|entry| entry.read_msgs).unwrap_or(0).max(world.msgs_through(*seq));
                if moved {
                    prop_assert_eq!(after.and_then(|entry| entry.read_msgs), Some(want_msgs), "step {}: the count at the marker", step);
                }
            }
            prop_assert_eq!(code(&got), want.err(), "step {} {:?}: {:?}", step, op, got);
            prop_assert!(world.violations.is_empty(), "step {} {:?}: {:?}", step, op, world.violations);
            let seqs: Vec<u64> = world.events.iter().map(|event| event.seq).collect();
            prop_assert_eq!(seqs, (1..=model.seq).collect::<Vec<_>>(), "seqs are gap-free and match the model");
            let members: BTreeMap<UserId, Role> = model
                .members
                .iter()
                .map(|(who, admin)| (user(USERS[*who]), if *admin { Role::Admin } else { Role::Member }))
                .collect();
            prop_assert_eq!(&world.roster.members, &members, "the roster is the model's members");
            prop_assert_eq!(world.pinned(), model.pinned.clone(), "the pinned messages are the model's");
            // A user who is not a member may not read a private room, and is sent nothing by it.
            for (i, name) in USERS.iter().enumerate() {
                if model.exists && model.private && !model.member(i) {
                    let can_read = RoomCommand::CanRead { room: world.room.clone(), grants: vec![] };
                    let can_read = world.run(Some(name), can_read, &quotas);
                    prop_assert_eq!(code(&can_read), Some(Forbidden), "{} reads a private room it is not in", name);
                }
            }
        }
    }
}
