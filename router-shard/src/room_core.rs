//! The rules of a room, without I/O: from what the room's actor knows of its room (`RoomState`, the facts loaded
//! for the command at hand in `CommandFacts`) and one command, [`decide`] answers the fact to load next, the
//! refusal, or the decision: the changes to make (room record, roster, memberships and read markers, events to
//! append, live signals) in order, and the reply. Every permission, quota, sequencing and validation rule of a room
//! command lives here.
//!
//! It does not read, write or wait: the actor (`room.rs`) loads the facts it is asked for, performs the effects in
//! order, and assigns each appended event its seq at the append (the fence decides the seq, not this module).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};
use switchyard_protocol::client::{Member, OkResult, Role};
use switchyard_protocol::internal::{
    EventBody, LiveMessage, Moderation, RoomCommand, RoomEvent, RoomModeration, RoomQuotas, RoomRecord, RoomTally,
    Roster, UserRoom, INTERNAL_VERSION,
};
use switchyard_protocol::{limits, subjects, ClientMessageId, ErrorCode, MessageId, ProjectId, RoomId, UserId};

/// At most one typing signal per user per room in this interval.
pub(crate) const TYPING_INTERVAL: Duration = Duration::from_secs(2);
/// Most message facts kept per room; older ones are asked of the persistors again.
const MESSAGE_FACTS_KEPT: usize = 4096;
/// Senders whose last message is remembered for slow mode before the ones past the interval are dropped.
const SLOW_MODE_SENDERS_KEPT: usize = 256;
/// Seqs of the latest messages kept per room, to tell the message count at a recent read marker without reading
/// the stream.
const RECENT_MESSAGES_KEPT: usize = 512;
/// Searches of the stream for the message count at an older read marker one room makes per second at most; past
/// them a marker keeps a bound instead (see [`Rules::msgs_at`]), so members moving their markers one seq at a time
/// cannot keep the room waiting on the stream.
const COUNT_SEARCHES_PER_SEC: u32 = 8;
/// The moderation of a room that has none (and of every direct-message room).
static UNMODERATED: RoomModeration =
    RoomModeration { bans: BTreeMap::new(), mutes: BTreeMap::new(), slow_mode_secs: 0, frozen: false };

/// The room's last event in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tail {
    /// The room's last seq (0 when the room has no events).
    pub seq: u64,
    /// The stream sequence of that event (0 when none): the fence for the next append.
    pub stream_seq: u64,
    /// That event's timestamp; the next one is strictly later.
    pub ts_us: u64,
    /// The room as of that event (message count, latest message); the next event's follows from it.
    pub tally: RoomTally,
}

/// What is known about one message of the room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MessageFacts {
    /// `None` once the author was erased (the message is then a tombstone, and deleted).
    pub author: Option<UserId>,
    pub deleted: bool,
}

/// What the actor keeps of its room between commands: a cache of what the stream and the rooms bucket hold,
/// rebuilt on demand (`None` means "not loaded").
#[derive(Debug, Default)]
pub(crate) struct RoomState {
    /// The room's record; `Some(None)` means the room does not exist. Direct-message rooms have none.
    pub record: Option<Option<RoomRecord>>,
    /// The roster with the revision of its entry (`None`: no entry yet), the base of the next compare-and-set.
    pub roster: Option<(Roster, Option<u64>)>,
    /// The room's last event.
    pub tail: Option<Tail>,
    /// Authors and deletion state of recent messages, by seq (at most [`MESSAGE_FACTS_KEPT`]).
    pub messages: HashMap<u64, MessageFacts>,
    /// When each user last had a typing signal relayed (entries older than [`TYPING_INTERVAL`] are dropped).
    pub typing: HashMap<UserId, Instant>,
    /// Each member's last message while slow mode was on (at most [`SLOW_MODE_SENDERS_KEPT`]). Kept in memory
    /// only: the actor stays up while one of them binds (see [`RoomState::slow_mode_binds`]), but after the room
    /// moves to another router shard a member may send once more before the interval is over.
    pub last_sent: HashMap<UserId, SentMark>,
    /// Seqs of the room's latest messages, oldest first (at most [`RECENT_MESSAGES_KEPT`]).
    pub recent_msgs: VecDeque<u64>,
    /// Every message with a greater seq than this is in `recent_msgs` (`None` until the tail is loaded).
    pub recent_msgs_since: Option<u64>,
    /// Searches of the stream for a count (`Fact::MsgsAt`) in the current second: when it began, and how many.
    pub count_searches: Option<(Instant, u32)>,
}

/// A member's last message under slow mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SentMark {
    pub at: Instant,
    /// The slow-mode interval then.
    pub interval: Duration,
    /// Its `cmid`: a retry of that same send is let through, to find the first in the stream.
    pub cmid: Option<ClientMessageId>,
}

impl RoomState {
    /// Drop every cached fact of the room (another writer changed it); the next command loads them again.
    pub fn forget(&mut self) {
        self.tail = None;
        self.record = None;
        self.roster = None;
        self.messages.clear();
        self.recent_msgs.clear();
        self.recent_msgs_since = None;
    }

    /// The tail was read from the stream (or the history store's head): messages from here on are counted.
    pub fn loaded_tail(&mut self, tail: Tail) -> &Tail {
        self.recent_msgs.clear();
        self.recent_msgs_since = Some(tail.seq);
        self.tail.insert(tail)
    }

    /// A search of the stream for a count was made `at`.
    pub fn searched(&mut self, at: Instant) {
        self.count_searches = match self.count_searches {
            Some((since, made)) if at.saturating_duration_since(since) < Duration::from_secs(1) => {
                Some((since, made + 1))
            }
            _ => Some((at, 1)),
        };
    }

    /// May the room search the stream for a count at `now`?
    pub fn may_search(&self, now: Instant) -> bool {
        match self.count_searches {
            Some((since, made)) => {
                now.saturating_duration_since(since) >= Duration::from_secs(1) || made < COUNT_SEARCHES_PER_SEC
            }
            None => true,
        }
    }

    /// The room's message count as of `seq` (at most the tail), when the recent messages tell it.
    pub fn msgs_at(&self, seq: u64) -> Option<u64> {
        let tail = self.tail.as_ref()?;
        if seq >= tail.seq {
            return Some(tail.tally.msgs);
        }
        if seq < self.recent_msgs_since? {
            return None;
        }
        let after = self.recent_msgs.iter().rev().take_while(|&&msg| msg > seq).count() as u64;
        Some(tail.tally.msgs.saturating_sub(after))
    }

    pub fn remember(&mut self, seq: u64, facts: MessageFacts) {
        if self.messages.len() >= MESSAGE_FACTS_KEPT {
            self.messages.clear();
        }
        self.messages.insert(seq, facts);
    }

    /// `event` was appended at stream sequence `stream_seq`: it is the new tail, and what it says of a message is
    /// remembered.
    pub fn appended(&mut self, event: &RoomEvent, stream_seq: u64) {
        self.tail = Some(Tail { seq: event.seq, stream_seq, ts_us: event.ts_us, tally: event.tally_through() });
        match &event.body {
            EventBody::Msg { from, .. } => {
                self.remember(event.seq, MessageFacts { author: Some(from.clone()), deleted: false });
                if self.recent_msgs_since.is_some() {
                    self.recent_msgs.push_back(event.seq);
                    if self.recent_msgs.len() > RECENT_MESSAGES_KEPT {
                        self.recent_msgs_since = self.recent_msgs.pop_front().max(self.recent_msgs_since);
                    }
                }
            }
            EventBody::Delete { target, .. } => {
                if let Some(facts) = self.messages.get_mut(target) {
                    facts.deleted = true;
                }
            }
            EventBody::Edit { .. }
            | EventBody::Reaction { .. }
            | EventBody::Pin { .. }
            | EventBody::Joined { .. }
            | EventBody::Left { .. }
            | EventBody::Moderation { .. }
            | EventBody::RoomDeleted {} => {}
            EventBody::UserErased { user } => {
                for facts in self.messages.values_mut().filter(|facts| facts.author.as_ref() == Some(user)) {
                    *facts = MessageFacts { author: None, deleted: true };
                }
            }
        }
    }

    /// `user` sent a message while slow mode was on. Past the bound, marks whose interval is over go first, then
    /// the oldest.
    pub fn mark_sent(&mut self, user: UserId, mark: SentMark) {
        if self.last_sent.len() >= SLOW_MODE_SENDERS_KEPT && !self.last_sent.contains_key(&user) {
            let now = mark.at;
            self.last_sent.retain(|_, last| now.saturating_duration_since(last.at) < last.interval);
            if self.last_sent.len() >= SLOW_MODE_SENDERS_KEPT {
                let oldest = self.last_sent.iter().min_by_key(|(_, last)| last.at).map(|(user, _)| user.clone());
                if let Some(oldest) = oldest {
                    self.last_sent.remove(&oldest);
                }
            }
        }
        self.last_sent.insert(user, mark);
    }

    /// Does a member's slow-mode interval still run at `now`? The actor stays up meanwhile, so that a quiet room
    /// does not forget it.
    pub fn slow_mode_binds(&self, now: Instant) -> bool {
        self.last_sent.values().any(|last| now.saturating_duration_since(last.at) < last.interval)
    }

    /// A typing signal of `user` was relayed `at`.
    pub fn mark_typing(&mut self, user: UserId, at: Instant) {
        self.typing.retain(|_, last| at.duration_since(*last) < TYPING_INTERVAL);
        self.typing.insert(user, at);
    }
}

/// Facts loaded for the command being decided, dropped after it.
#[derive(Debug, Default)]
pub(crate) struct CommandFacts {
    /// The roster was read during this command: a user missing from it is not a member (one missing from an older
    /// read may have been added since by another writer).
    pub roster_fresh: bool,
    /// Users' membership entries in this room (role and read marker); `None`: no entry.
    pub memberships: HashMap<UserId, Option<UserRoom>>,
    /// How many rooms each user is a member of.
    pub user_rooms: HashMap<UserId, u64>,
    /// How many rooms the tenant has.
    pub tenant_rooms: Option<u64>,
    /// Messages the history store does not hold.
    pub missing_messages: HashSet<u64>,
    /// The room's message count as of a seq, read from the stream.
    pub msgs_at: HashMap<u64, u64>,
}

/// A fact [`decide`] needs before it can decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fact {
    /// The room's record (into `RoomState::record`).
    Record,
    /// The roster, when none is cached (into `RoomState::roster`; sets `CommandFacts::roster_fresh`).
    Roster,
    /// The roster read again: the cached one lacks a user and was read before this command.
    FreshRoster,
    /// The room's last event (into `RoomState::tail`).
    Tail,
    /// Who wrote message `seq` and whether it was deleted (into `RoomState::messages`, or
    /// `CommandFacts::missing_messages`).
    Message(u64),
    /// The user's membership entry in this room (into `CommandFacts::memberships`).
    Membership(UserId),
    /// How many rooms the user is a member of (into `CommandFacts::user_rooms`).
    UserRooms(UserId),
    /// How many rooms the tenant has (into `CommandFacts::tenant_rooms`).
    TenantRooms,
    /// The room's message count as of a seq older than the recent messages kept (into `CommandFacts::msgs_at`).
    MsgsAt(u64),
}

/// One command as the core decides it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Command<'a> {
    pub tenant: &'a ProjectId,
    pub room: &'a RoomId,
    /// The acting user; `None` for the tenant's backend.
    pub user: Option<&'a UserId>,
    pub command: &'a RoomCommand,
    /// The tenant's quotas, as the gateway resolved them.
    pub quotas: &'a RoomQuotas,
    pub now: Instant,
    /// Unix time in microseconds, for records' creation times.
    pub now_us: u64,
    /// The id a message sent by this command gets.
    pub message_id: &'a MessageId,
    /// The tenant's backend sent the command on behalf of `user`: the room's moderation does not hold it back.
    pub by_backend: bool,
}

/// A change to make, in the order the decision lists them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Create the room's record. When it exists already: with `redecide` the command is decided again (the room
    /// was created meanwhile), otherwise it is refused as a conflict.
    CreateRecord { record: RoomRecord, redecide: bool },
    /// Store the roster, by compare-and-set on the revision it was read at.
    SaveRoster(Roster),
    /// Take the user off the roster as it is now (read again if an append was fenced meanwhile).
    DropFromRoster(UserId),
    /// Write the user's membership entry (role and read marker).
    PutMembership(UserId, UserRoom),
    /// Remove the user's membership entry.
    RemoveMembership(UserId),
    /// Sequence an event: the room's next seq, fenced. `dedupe_id` makes a repeat of the same op find the first.
    Append { body: EventBody, dedupe_id: Option<String> },
    /// Note a relayed typing signal, for the throttle.
    MarkTyping { user: UserId, at: Instant },
    /// Note a member's message, for slow mode.
    MarkSent { user: UserId, mark: SentMark },
    /// Publish to whoever listens live.
    Publish(LiveMessage),
    /// Store the room's record as changed (only the room's actor writes it once it exists).
    PutRecord(RoomRecord),
    /// Remove the room's roster and record (its name is free again) and the room's events before its last one
    /// (the `room_deleted`) from the stream; forget every cached fact.
    DeleteRoom,
    /// Remove every event naming the user from the room's stream subject, up to the event just appended (its
    /// `user_erased`), which stays for the stores to apply.
    EraseFromStream(UserId),
}

/// What the command answers once its effects are done.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// `OkResult::Room`.
    Room,
    /// `OkResult::RoomSeq` with the room's last seq after the effects.
    TailSeq,
    /// `OkResult::RoomSeq` with this seq.
    Seq(u64),
    /// `OkResult::Sent` for the appended message (see [`sent`]).
    Sent,
    Members(Vec<Member>),
    Empty,
}

/// What to do for a command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Decision {
    pub effects: Vec<Effect>,
    pub reply: Reply,
}

/// A refused command: nothing of it is done.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    /// For `rate_limited`: when the command may succeed.
    pub retry_after_ms: Option<u64>,
}

/// Why [`decide`] did not decide.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Stop {
    /// Load this fact, then decide again.
    Load(Fact),
    /// The command is refused.
    Refuse(Refusal),
}

impl From<Refusal> for Stop {
    fn from(refusal: Refusal) -> Self {
        Stop::Refuse(refusal)
    }
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Stop {
    Stop::Refuse(Refusal { code, message: message.into(), retry_after_ms: None })
}

type Rule<T> = Result<T, Stop>;

/// Decide `command` given what is known; see the module's documentation.
pub(crate) fn decide(state: &RoomState, facts: &CommandFacts, command: &Command<'_>) -> Result<Decision, Stop> {
    let rules = Rules { state, facts, command };
    let room = command.room;
    let mut effects = Vec::new();
    let reply = match (command.command, command.user) {
        (RoomCommand::Create { private, title, .. }, user) => {
            rules.require_named_room()?;
            if rules.record()?.is_some() {
                return Err(refuse(ErrorCode::Conflict, format!("room {room} already exists")));
            }
            rules.create(user, *private, title.clone(), false, &mut effects)?;
            Reply::Room
        }
        (RoomCommand::Members { .. }, None) => rules.members()?,
        (RoomCommand::CanRead { .. }, None) => {
            if !room.is_dm() {
                rules.require_record()?;
            }
            Reply::Seq(rules.tail_seq()?)
        }
        (RoomCommand::SetMember { user: member, role, .. }, None) => {
            rules.require_named_room()?;
            rules.require_record()?;
            rules.set_member(member, *role, &mut effects)?;
            Reply::Room
        }
        (RoomCommand::Kick { user: member, .. }, None) => {
            rules.require_named_room()?;
            rules.require_record()?;
            rules.remove_member(member, None, &mut effects)?;
            Reply::Room
        }
        (RoomCommand::Moderate { action, secs, .. }, None) => {
            rules.require_named_room()?;
            rules.require_record()?;
            rules.moderate(None, action, *secs, &mut effects)?
        }
        (RoomCommand::Moderate { action, secs, .. }, Some(user)) => {
            rules.require_named_room()?;
            rules.require_admin(user)?;
            rules.moderate(Some(user), action, *secs, &mut effects)?
        }
        (
            RoomCommand::Join { .. }
            | RoomCommand::Send { .. }
            | RoomCommand::Leave { .. }
            | RoomCommand::Invite { .. }
            | RoomCommand::Typing { .. }
            | RoomCommand::Read { .. }
            | RoomCommand::React { .. }
            | RoomCommand::Edit { .. }
            | RoomCommand::Delete { .. }
            | RoomCommand::Pin { .. },
            None,
        ) => return Err(refuse(ErrorCode::Forbidden, "this operation needs a user")),
        (RoomCommand::Join { grants, .. }, Some(user)) => rules.join(user, grants, &mut effects)?,
        (RoomCommand::CanRead { grants, .. }, Some(user)) => {
            rules.require_reader(user, grants)?;
            Reply::Seq(rules.tail_seq()?)
        }
        (RoomCommand::Members { .. }, Some(user)) => {
            rules.require_reader(user, &[])?;
            rules.members()?
        }
        (RoomCommand::Send { body, attrs, reply_to, cmid, .. }, Some(user)) => {
            let role = rules.require_member(user)?;
            rules.require_voice(user, "send")?;
            let slow_mode = rules.slow_mode(user, role, cmid.as_ref())?;
            let tail = rules.tail_seq()?;
            if reply_to.is_some_and(|seq| seq == 0 || seq > tail) {
                return Err(refuse(ErrorCode::BadRequest, "reply_to must be the seq of an earlier event of the room"));
            }
            if let (Some((a, b)), 0) = (room.dm_participants(), rules.tail()?.tally.msgs) {
                // The conversation's first message (also after it was deleted with an erased participant): list
                // it among both participants' rooms.
                for participant in [a, b] {
                    if rules.membership(&participant)?.is_none() {
                        effects.push(Effect::PutMembership(participant, UserRoom::joined(Role::Member, 0)));
                    }
                }
            }
            let body = EventBody::Msg {
                id: command.message_id.clone(),
                from: user.clone(),
                body: body.clone(),
                attrs: attrs.clone(),
                reply_to: *reply_to,
            };
            let dedupe_id = cmid.as_ref().map(|cmid| subjects::cmid_dedupe_id(command.tenant, user, cmid));
            effects.push(Effect::Append { body, dedupe_id });
            if let Some(interval) = slow_mode {
                let mark = SentMark { at: command.now, interval, cmid: cmid.clone() };
                effects.push(Effect::MarkSent { user: user.clone(), mark });
            }
            Reply::Sent
        }
        (RoomCommand::Leave { .. }, Some(user)) => {
            rules.require_named_room()?;
            if rules.role_of(user)?.is_none() {
                return Err(refuse(ErrorCode::NotFound, format!("{user} is not a member of room {room}")));
            }
            rules.remove_member(user, None, &mut effects)?;
            Reply::Room
        }
        (RoomCommand::Invite { user: member, .. }, Some(user)) => {
            rules.require_named_room()?;
            rules.require_admin(user)?;
            if rules.role_of(member)?.is_none() {
                rules.set_member(member, Role::Member, &mut effects)?;
            }
            Reply::Room
        }
        (RoomCommand::Kick { user: member, .. }, Some(user)) => {
            rules.require_named_room()?;
            rules.require_admin(user)?;
            if rules.role_of(member)?.is_none() {
                return Err(refuse(ErrorCode::NotFound, format!("{member} is not a member of room {room}")));
            }
            rules.remove_member(member, Some(user.clone()), &mut effects)?;
            Reply::Room
        }
        (RoomCommand::SetMember { .. }, Some(_)) => {
            return Err(refuse(ErrorCode::Forbidden, "roles are set by the tenant's backend"));
        }
        (RoomCommand::DeleteRoom { .. }, None) => {
            rules.require_named_room()?;
            let created_at_ms = rules.require_record()?.created_at_ms;
            // The event first: once it is in the stream every session stops receiving the room and the stores
            // erase what came before it, whatever fails afterwards; a retry finds it by its id and finishes.
            let dedupe_id = subjects::room_deleted_dedupe_id(command.tenant, room, created_at_ms);
            effects.push(Effect::Append { body: EventBody::RoomDeleted {}, dedupe_id: Some(dedupe_id) });
            for member in rules.roster()?.members.keys() {
                effects.push(Effect::RemoveMembership(member.clone()));
            }
            effects.push(Effect::DeleteRoom);
            Reply::TailSeq
        }
        (RoomCommand::SetRetention { secs, .. }, None) => {
            rules.require_named_room()?;
            if secs.is_some_and(|secs| secs > limits::MAX_RETENTION_SECS) {
                let message = format!("a retention is at most {} seconds", limits::MAX_RETENTION_SECS);
                return Err(refuse(ErrorCode::BadRequest, message));
            }
            let mut record = rules.require_record()?.clone();
            if record.retention_secs != *secs {
                record.retention_secs = *secs;
                effects.push(Effect::PutRecord(record));
            }
            Reply::Room
        }
        (RoomCommand::SetRetention { .. }, Some(_)) => {
            return Err(refuse(ErrorCode::Forbidden, "retention is set by the tenant's backend"));
        }
        (RoomCommand::DeleteRoom { .. }, Some(_)) => {
            return Err(refuse(ErrorCode::Forbidden, "rooms are deleted by the tenant's backend"));
        }
        (RoomCommand::EraseUser { user: erased, .. }, None) => match room.dm_participants() {
            Some((a, b)) => {
                if &a != erased && &b != erased {
                    return Err(refuse(ErrorCode::BadRequest, format!("{erased} is not a participant of {room}")));
                }
                // Its id names the erased user, so the conversation goes whole, as a deleted room. A deletion
                // counts the room's messages from nothing again, so a conversation with none is deleted already:
                // no second event, but the rest again, which finishes a deletion that failed after its event.
                if rules.tail()?.tally.msgs > 0 {
                    effects.push(Effect::Append { body: EventBody::RoomDeleted {}, dedupe_id: None });
                }
                effects.push(Effect::RemoveMembership(a));
                effects.push(Effect::RemoveMembership(b));
                effects.push(Effect::DeleteRoom);
                Reply::TailSeq
            }
            None => {
                rules.require_record()?;
                let roster = rules.roster()?;
                let mut kept = roster.clone();
                kept.members.remove(erased);
                kept.moderation.bans.remove(erased);
                kept.moderation.mutes.remove(erased);
                if &kept != roster {
                    effects.push(Effect::SaveRoster(kept));
                }
                effects.push(Effect::RemoveMembership(erased.clone()));
                // Appended before the stream is cleared, so a failure in between leaves the stores' part done and
                // a retry clears the rest.
                effects.push(Effect::Append { body: EventBody::UserErased { user: erased.clone() }, dedupe_id: None });
                effects.push(Effect::EraseFromStream(erased.clone()));
                Reply::TailSeq
            }
        },
        (RoomCommand::EraseUser { .. }, Some(_)) => {
            return Err(refuse(ErrorCode::Forbidden, "users are erased by the tenant's backend"));
        }
        (RoomCommand::Typing { .. }, Some(user)) => {
            let throttled = |last: &Instant| command.now.saturating_duration_since(*last) < TYPING_INTERVAL;
            if rules.role_of(user)?.is_some()
                && rules.has_voice(user)?
                && !state.typing.get(user).is_some_and(throttled)
            {
                effects.push(Effect::MarkTyping { user: user.clone(), at: command.now });
                effects.push(Effect::Publish(LiveMessage::Typing { room: room.clone(), user: user.clone() }));
            }
            Reply::Empty
        }
        (RoomCommand::Read { seq, .. }, Some(user)) => {
            let role = rules.require_member(user)?;
            let tail = rules.tail()?;
            if *seq > tail.seq {
                let last = tail.seq;
                return Err(refuse(ErrorCode::BadRequest, format!("seq {seq} is past the room's last seq {last}")));
            }
            let mut entry = rules.membership(user)?.unwrap_or(UserRoom { role, read: 0, read_msgs: None });
            if *seq > entry.read {
                // Never below the count at the join: messages before it were never unread.
                let at = rules.msgs_at(*seq)?.max(entry.read_msgs.unwrap_or(0));
                entry.read = *seq;
                entry.read_msgs = Some(at);
                let unread = entry.unread(tail.seq, tail.tally.msgs);
                effects.push(Effect::PutMembership(user.clone(), entry));
                effects.push(Effect::Publish(LiveMessage::Read { room: room.clone(), user: user.clone(), seq: *seq }));
                let own = LiveMessage::OwnRead { room: room.clone(), user: user.clone(), seq: *seq, unread };
                effects.push(Effect::Publish(own));
            }
            Reply::Seq(entry.read)
        }
        (RoomCommand::React { target, emoji, remove, .. }, Some(user)) => {
            rules.require_member(user)?;
            rules.require_voice(user, "react")?;
            rules.require_message(*target)?;
            let body =
                EventBody::Reaction { target: *target, user: user.clone(), emoji: emoji.clone(), removed: *remove };
            effects.push(Effect::Append { body, dedupe_id: None });
            Reply::TailSeq
        }
        (RoomCommand::Edit { target, body, .. }, Some(user)) => {
            rules.require_member(user)?;
            rules.require_voice(user, "edit")?;
            if rules.require_message(*target)?.author.as_ref() != Some(user) {
                return Err(refuse(ErrorCode::Forbidden, "only a message's author may edit it"));
            }
            let body = EventBody::Edit { target: *target, from: user.clone(), body: body.clone() };
            effects.push(Effect::Append { body, dedupe_id: None });
            Reply::TailSeq
        }
        (RoomCommand::Delete { target, .. }, Some(user)) => {
            let role = rules.require_member(user)?;
            rules.require_unfrozen()?;
            if rules.require_message(*target)?.author.as_ref() != Some(user) && role != Role::Admin {
                return Err(refuse(ErrorCode::Forbidden, "only a message's author or a room admin may delete it"));
            }
            effects.push(Effect::Append {
                body: EventBody::Delete { target: *target, by: user.clone() },
                dedupe_id: None,
            });
            Reply::TailSeq
        }
        (RoomCommand::Pin { target, pinned, .. }, Some(user)) => {
            // In a named room only its admins pin; in a direct-message room either participant does.
            let role = rules.require_member(user)?;
            rules.require_unfrozen()?;
            if !room.is_dm() && role != Role::Admin {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    format!("only admins of room {room} may pin or unpin messages"),
                ));
            }
            rules.require_message(*target)?;
            effects.push(Effect::Append {
                body: EventBody::Pin { target: *target, by: user.clone(), pinned: *pinned },
                dedupe_id: None,
            });
            Reply::TailSeq
        }
    };
    Ok(Decision { effects, reply })
}

/// Must the command that appends `body` be decided again after another writer changed the room (a fenced
/// append)? An event written for a user (a message, an edit, a reaction, a delete, a pin) rests on rules about the
/// room as it was: membership, role, the target message. A `joined` or `left` does not: its roster and membership
/// writes are done already, and it is appended with the next seq as it is.
pub(crate) fn redecide_when_fenced(body: &EventBody) -> bool {
    match body {
        // A moderation action rests on the actor's role and on the moderation it changes; a deletion on the
        // room's record and members.
        EventBody::Moderation { .. } | EventBody::RoomDeleted {} => true,
        // Its roster and membership writes are done, and it holds whatever seq it gets.
        EventBody::UserErased { .. } => false,
        EventBody::Msg { .. }
        | EventBody::Edit { .. }
        | EventBody::Delete { .. }
        | EventBody::Reaction { .. }
        | EventBody::Pin { .. }
        | EventBody::Joined { .. }
        | EventBody::Left { .. } => author(body).is_some(),
    }
}

/// The answer to a `send`, from the event its append stored or found: a repeated cmid answers the first `ok`,
/// which names the room the first send went to.
pub(crate) fn sent(event: &RoomEvent) -> Result<OkResult, Refusal> {
    match &event.body {
        EventBody::Msg { id, .. } => {
            Ok(OkResult::Sent { room: event.room.clone(), id: id.clone(), seq: event.seq, ts: event.ts_ms() })
        }
        EventBody::Edit { .. }
        | EventBody::Delete { .. }
        | EventBody::Reaction { .. }
        | EventBody::Pin { .. }
        | EventBody::Joined { .. }
        | EventBody::Left { .. }
        | EventBody::Moderation { .. }
        | EventBody::RoomDeleted {}
        | EventBody::UserErased { .. } => {
            let message = "cmid was already used for another kind of op".into();
            Err(Refusal { code: ErrorCode::Conflict, message, retry_after_ms: None })
        }
    }
}

/// The user an event is written for, when it needs that user to be a member.
pub(crate) fn author(body: &EventBody) -> Option<&UserId> {
    match body {
        EventBody::Msg { from, .. } | EventBody::Edit { from, .. } => Some(from),
        EventBody::Reaction { user, .. } => Some(user),
        EventBody::Delete { by, .. } | EventBody::Pin { by, .. } => Some(by),
        EventBody::Joined { .. }
        | EventBody::Left { .. }
        | EventBody::Moderation { .. }
        | EventBody::RoomDeleted {}
        | EventBody::UserErased { .. } => None,
    }
}

/// The rules of one command, over what is known.
struct Rules<'a> {
    state: &'a RoomState,
    facts: &'a CommandFacts,
    command: &'a Command<'a>,
}

impl Rules<'_> {
    fn room(&self) -> &RoomId {
        self.command.room
    }

    fn record(&self) -> Rule<Option<&RoomRecord>> {
        match &self.state.record {
            Some(record) => Ok(record.as_ref()),
            None => Err(Stop::Load(Fact::Record)),
        }
    }

    fn require_record(&self) -> Rule<&RoomRecord> {
        self.record()?.ok_or_else(|| refuse(ErrorCode::NotFound, format!("room {} does not exist", self.room())))
    }

    fn roster(&self) -> Rule<&Roster> {
        self.state.roster.as_ref().map(|(roster, _)| roster).ok_or(Stop::Load(Fact::Roster))
    }

    fn tail(&self) -> Rule<&Tail> {
        self.state.tail.as_ref().ok_or(Stop::Load(Fact::Tail))
    }

    fn tail_seq(&self) -> Rule<u64> {
        Ok(self.tail()?.seq)
    }

    /// The room's message count as of `seq` (at most the tail's).
    /// The room's message count as of `seq` (at most the tail's): from the recent messages, else from a search of
    /// the stream; past the room's searches per second, the lowest it can be (every event after `seq` a message),
    /// which counts at most too many unread, never too few.
    fn msgs_at(&self, seq: u64) -> Rule<u64> {
        let tail = self.tail()?;
        if let Some(msgs) = self.state.msgs_at(seq).or_else(|| self.facts.msgs_at.get(&seq).copied()) {
            return Ok(msgs);
        }
        if self.state.may_search(self.command.now) {
            return Err(Stop::Load(Fact::MsgsAt(seq)));
        }
        Ok(tail.tally.msgs.saturating_sub(tail.seq.saturating_sub(seq)))
    }

    fn membership(&self, user: &UserId) -> Rule<Option<UserRoom>> {
        self.facts.memberships.get(user).copied().ok_or_else(|| Stop::Load(Fact::Membership(user.clone())))
    }

    fn require_named_room(&self) -> Rule<()> {
        if self.room().is_dm() {
            return Err(refuse(ErrorCode::BadRequest, "direct-message rooms have a fixed membership"));
        }
        Ok(())
    }

    /// The user's role: a direct-message room's participants are its members; in a named room, the roster's
    /// (read again when it lacks the user and was read before this command).
    fn role_of(&self, user: &UserId) -> Rule<Option<Role>> {
        if let Some((a, b)) = self.room().dm_participants() {
            return Ok((user == &a || user == &b).then_some(Role::Member));
        }
        match self.roster()?.members.get(user) {
            Some(role) => Ok(Some(*role)),
            None if !self.facts.roster_fresh => Err(Stop::Load(Fact::FreshRoster)),
            None => Ok(None),
        }
    }

    /// The user's role, refused unless they are a member (and not banned: a ban ends the membership, so a banned
    /// member is a half-done ban, and no more a member than one it finished).
    fn require_member(&self, user: &UserId) -> Rule<Role> {
        let role = self
            .role_of(user)?
            .ok_or_else(|| refuse(ErrorCode::Forbidden, format!("{user} is not a member of room {}", self.room())))?;
        self.require_not_banned(user)?;
        Ok(role)
    }

    fn require_admin(&self, user: &UserId) -> Rule<()> {
        match self.role_of(user)? {
            Some(Role::Admin) => Ok(()),
            Some(Role::Member) | None => {
                Err(refuse(ErrorCode::Forbidden, format!("only admins of room {} may do that", self.room())))
            }
        }
    }

    /// Members may read a room, and so may anyone of the tenant when the room is public (or granted).
    fn require_reader(&self, user: &UserId, grants: &[String]) -> Rule<()> {
        self.require_not_banned(user)?;
        if self.role_of(user)?.is_some() {
            return Ok(());
        }
        let allowed = match self.room().is_dm() {
            true => false,
            false => {
                let record = self.require_record()?;
                !record.private || granted(grants, self.room())
            }
        };
        if !allowed {
            return Err(refuse(ErrorCode::Forbidden, format!("{user} may not read room {}", self.room())));
        }
        Ok(())
    }

    /// The message `target` of this room, which must exist and not be deleted.
    fn require_message(&self, target: u64) -> Rule<&MessageFacts> {
        let tail = self.tail_seq()?;
        let missing = || refuse(ErrorCode::NotFound, format!("no message with seq {target} in room {}", self.room()));
        if target == 0 || target > tail || self.facts.missing_messages.contains(&target) {
            return Err(missing());
        }
        let facts = self.state.messages.get(&target).ok_or(Stop::Load(Fact::Message(target)))?;
        if facts.deleted {
            return Err(refuse(ErrorCode::NotFound, format!("message {target} was deleted")));
        }
        Ok(facts)
    }

    fn now_ms(&self) -> u64 {
        self.command.now_us / 1000
    }

    /// The room's standing moderation (a direct-message room has none).
    fn moderation(&self) -> Rule<&RoomModeration> {
        if self.room().is_dm() {
            return Ok(&UNMODERATED);
        }
        Ok(&self.roster()?.moderation)
    }

    fn require_not_banned(&self, user: &UserId) -> Rule<()> {
        if self.moderation()?.is_banned(user, self.now_ms()) {
            return Err(refuse(ErrorCode::Forbidden, format!("{user} is banned from room {}", self.room())));
        }
        Ok(())
    }

    /// Writes to the room's history (a delete, a pin) need it not frozen, unless the tenant's backend sends them.
    fn require_unfrozen(&self) -> Rule<()> {
        if !self.command.by_backend && self.moderation()?.frozen {
            return Err(refuse(ErrorCode::Forbidden, format!("room {} is frozen", self.room())));
        }
        Ok(())
    }

    /// May `user` speak in the room: it is not frozen and they are not muted (the backend always may)?
    fn has_voice(&self, user: &UserId) -> Rule<bool> {
        let moderation = self.moderation()?;
        Ok(self.command.by_backend || (!moderation.frozen && !moderation.is_muted(user, self.now_ms())))
    }

    /// Refuse `what` (send, react, edit) when `user` may not speak in the room.
    fn require_voice(&self, user: &UserId, what: &str) -> Rule<()> {
        if self.has_voice(user)? {
            return Ok(());
        }
        self.require_unfrozen()?;
        Err(refuse(ErrorCode::Forbidden, format!("{user} is muted in room {} and may not {what}", self.room())))
    }

    /// The slow-mode interval that binds `user`'s message (`None`: none does), refused as `rate_limited` when
    /// their last message is more recent than it, unless this is a retry of that very message (the same `cmid`),
    /// which the append then finds.
    fn slow_mode(&self, user: &UserId, role: Role, cmid: Option<&ClientMessageId>) -> Rule<Option<Duration>> {
        let secs = self.moderation()?.slow_mode_secs;
        if secs == 0 || role == Role::Admin || self.command.by_backend {
            return Ok(None);
        }
        let interval = Duration::from_secs(u64::from(secs));
        if let Some(last) = self.state.last_sent.get(user) {
            let since = self.command.now.saturating_duration_since(last.at);
            let retry = cmid.is_some() && last.cmid.as_ref() == cmid;
            if since < interval && !retry {
                let wait = interval - since;
                return Err(Stop::Refuse(Refusal {
                    code: ErrorCode::RateLimited,
                    message: format!("room {} is in slow mode: one message per {secs} s", self.room()),
                    retry_after_ms: Some(wait.as_millis() as u64 + 1),
                }));
            }
        }
        Ok(Some(interval))
    }

    /// A moderation action by `by` (`None`: the tenant's backend), who may take it; a ban or mute with `secs` ends
    /// that long from now. The action is sequenced first, then (for a ban of a member) the member's `left` and the
    /// end of their membership entry, and last the roster, in one write that holds both the moderation and the
    /// member's removal: until it is written nothing of the action binds, and a retry of a half-done attempt finds
    /// the events it appended by their ids (both derived from the roster's revision, which did not move). An action
    /// that changes nothing appends nothing.
    fn moderate(
        &self,
        by: Option<&UserId>,
        asked: &Moderation,
        secs: Option<u64>,
        effects: &mut Vec<Effect>,
    ) -> Rule<Reply> {
        let room = self.room();
        let roster = self.roster()?;
        let now_ms = self.now_ms();
        let action = match (asked, secs) {
            (_, Some(secs)) if !(1..=limits::MAX_MODERATION_SECS).contains(&secs) => {
                let message = format!("secs must be 1 to {}", limits::MAX_MODERATION_SECS);
                return Err(refuse(ErrorCode::BadRequest, message));
            }
            (Moderation::Ban { user, .. }, Some(secs)) => {
                Moderation::Ban { user: user.clone(), until_ms: Some(now_ms + secs * 1000) }
            }
            (Moderation::Mute { user, .. }, Some(secs)) => {
                Moderation::Mute { user: user.clone(), until_ms: Some(now_ms + secs * 1000) }
            }
            (_, _) => asked.clone(),
        };
        let action = &action;
        if let (Some(by), Some(target)) = (by, action.user()) {
            if by == target {
                return Err(refuse(ErrorCode::BadRequest, "a room admin cannot moderate themselves"));
            }
            let restricts = matches!(action, Moderation::Ban { .. } | Moderation::Mute { .. });
            if restricts && roster.members.get(target) == Some(&Role::Admin) {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    format!("{target} is an admin of room {room}: only the tenant's backend may ban or mute them"),
                ));
            }
        }
        let mut moderation = roster.moderation.clone();
        moderation.prune(now_ms);
        let lifted =
            |user: &UserId, what: &str| refuse(ErrorCode::NotFound, format!("{user} is not {what} in room {room}"));
        let changed = match action {
            Moderation::Ban { user, until_ms } => {
                restrict(&mut moderation.bans, user, *until_ms, now_ms, limits::MAX_BANS_PER_ROOM, "bans", room)?
            }
            Moderation::Mute { user, until_ms } => {
                restrict(&mut moderation.mutes, user, *until_ms, now_ms, limits::MAX_MUTES_PER_ROOM, "mutes", room)?
            }
            Moderation::Unban { user } => {
                moderation.bans.remove(user).map(|_| true).ok_or_else(|| lifted(user, "banned"))?
            }
            Moderation::Unmute { user } => {
                moderation.mutes.remove(user).map(|_| true).ok_or_else(|| lifted(user, "muted"))?
            }
            Moderation::SlowMode { secs } => {
                if *secs > limits::MAX_SLOW_MODE_SECS {
                    let message = format!("slow mode is at most {} seconds", limits::MAX_SLOW_MODE_SECS);
                    return Err(refuse(ErrorCode::BadRequest, message));
                }
                std::mem::replace(&mut moderation.slow_mode_secs, *secs) != *secs
            }
            Moderation::Freeze { frozen } => std::mem::replace(&mut moderation.frozen, *frozen) != *frozen,
        };
        let revision = self.state.roster.as_ref().and_then(|(_, revision)| *revision).unwrap_or(0);
        let mut saved = roster.clone();
        if changed {
            let dedupe_id = subjects::moderation_dedupe_id(self.command.tenant, room, revision, asked, secs);
            let body = EventBody::Moderation { action: action.clone(), by: by.cloned() };
            effects.push(Effect::Append { body, dedupe_id: Some(dedupe_id) });
            saved.moderation = moderation;
        }
        if let Moderation::Ban { user, .. } = action {
            if saved.members.remove(user).is_some() {
                let dedupe_id = subjects::left_dedupe_id(self.command.tenant, room, user, revision);
                let body = EventBody::Left { user: user.clone(), by: by.cloned() };
                effects.push(Effect::Append { body, dedupe_id: Some(dedupe_id) });
                effects.push(Effect::RemoveMembership(user.clone()));
            }
        }
        if &saved != roster {
            effects.push(Effect::SaveRoster(saved));
        }
        Ok(Reply::TailSeq)
    }

    fn members(&self) -> Rule<Reply> {
        let members = match self.room().dm_participants() {
            Some((a, b)) => vec![
                Member { user: a, role: Role::Member, online: false },
                Member { user: b, role: Role::Member, online: false },
            ],
            None => {
                self.require_record()?;
                let roster = self.roster()?;
                roster
                    .members
                    .iter()
                    .map(|(user, role)| Member { user: user.clone(), role: *role, online: false })
                    .collect()
            }
        };
        Ok(Reply::Members(members))
    }

    fn join(&self, user: &UserId, grants: &[String], effects: &mut Vec<Effect>) -> Rule<Reply> {
        let room = self.room();
        if self.role_of(user)?.is_some() {
            return Ok(Reply::Seq(self.tail_seq()?));
        }
        if room.is_dm() {
            return Err(refuse(ErrorCode::Forbidden, format!("{user} is not a participant of {room}")));
        }
        match self.record()? {
            // A missing room is created public by its first joiner, who becomes its admin.
            None => self.create(Some(user), false, None, true, effects)?,
            Some(record) => {
                if record.private && !granted(grants, room) {
                    return Err(refuse(
                        ErrorCode::Forbidden,
                        format!("room {room} is private and {user} is not a member"),
                    ));
                }
                self.set_member(user, Role::Member, effects)?;
            }
        }
        Ok(Reply::TailSeq)
    }

    /// Create the room; a creating user becomes its admin. `redecide`: a room created meanwhile is joined instead
    /// of refused.
    fn create(
        &self,
        user: Option<&UserId>,
        private: bool,
        title: Option<String>,
        redecide: bool,
        effects: &mut Vec<Effect>,
    ) -> Rule<()> {
        self.require_named_room()?;
        if let Some(user) = user {
            if self.command.quotas.backend_creates_rooms {
                return Err(refuse(ErrorCode::Forbidden, "rooms of this tenant are created by its backend"));
            }
            // The creator becomes a member: refuse before the room exists rather than leave it without an admin.
            self.admit(user)?;
        }
        if let Some(cap) = self.command.quotas.rooms_per_tenant {
            let rooms = self.facts.tenant_rooms.ok_or(Stop::Load(Fact::TenantRooms))?;
            if rooms >= cap {
                let message =
                    format!("room {} cannot be created: the tenant has its quota of {cap} rooms", self.room());
                return Err(refuse(ErrorCode::Forbidden, message));
            }
        }
        let record = RoomRecord {
            v: INTERNAL_VERSION,
            private,
            title,
            created_by: user.cloned(),
            created_at_ms: self.command.now_us / 1000,
            retention_secs: None,
        };
        effects.push(Effect::CreateRecord { record, redecide });
        if let Some(user) = user {
            self.set_member(user, Role::Admin, effects)?;
        }
        Ok(())
    }

    /// May `user` become a member, within the room's and the user's quotas?
    fn admit(&self, user: &UserId) -> Rule<()> {
        let members = self.roster()?.members.len();
        let rooms = *self.facts.user_rooms.get(user).ok_or_else(|| Stop::Load(Fact::UserRooms(user.clone())))?;
        match quota_refusal(members, rooms, self.command.quotas) {
            Some(message) => {
                Err(refuse(ErrorCode::Forbidden, format!("{user} cannot join room {}: {message}", self.room())))
            }
            None => Ok(()),
        }
    }

    /// Make `user` a member with `role` (or change the role); a new membership is sequenced as `joined`.
    fn set_member(&self, user: &UserId, role: Role, effects: &mut Vec<Effect>) -> Rule<()> {
        let roster = self.roster()?;
        let new_member = !roster.members.contains_key(user);
        if new_member {
            self.require_not_banned(user)?;
            self.admit(user)?;
        }
        let entry = match self.membership(user)? {
            Some(entry) => UserRoom { role, ..entry },
            // Unread counts from the join; a room being created has no message yet.
            None if self.record()?.is_none() => UserRoom::joined(role, 0),
            None => UserRoom::joined(role, self.tail()?.tally.msgs),
        };
        let mut roster = roster.clone();
        roster.members.insert(user.clone(), role);
        effects.push(Effect::SaveRoster(roster));
        effects.push(Effect::PutMembership(user.clone(), entry));
        if new_member {
            effects.push(Effect::Append { body: EventBody::Joined { user: user.clone() }, dedupe_id: None });
        }
        Ok(())
    }

    /// End `user`'s membership; sequenced as `left` (with `by` for a kick).
    ///
    /// The event comes first: once `left` is in the stream every session of the user stops receiving the room at
    /// it, whatever fails afterwards. Then the user's membership entry, then the roster. A step that fails answers
    /// `unavailable` with the user still on the roster, so the client's retry runs the whole change again; the
    /// `left` carries an id derived from the roster's revision, so the retry finds the first `left` in the
    /// stream's duplicate window instead of appending a second one.
    fn remove_member(&self, user: &UserId, by: Option<UserId>, effects: &mut Vec<Effect>) -> Rule<()> {
        if !self.roster()?.members.contains_key(user) {
            return Err(refuse(ErrorCode::NotFound, format!("{user} is not a member of room {}", self.room())));
        }
        let revision = self.state.roster.as_ref().and_then(|(_, revision)| *revision).unwrap_or(0);
        let dedupe_id = subjects::left_dedupe_id(self.command.tenant, self.room(), user, revision);
        effects.push(Effect::Append { body: EventBody::Left { user: user.clone(), by }, dedupe_id: Some(dedupe_id) });
        effects.push(Effect::RemoveMembership(user.clone()));
        effects.push(Effect::DropFromRoster(user.clone()));
        Ok(())
    }
}

/// How long the room's events stay in history, in seconds (`None`: for good): the room's own retention over the
/// tenant's. A room's `Some(0)` keeps its history for good whatever the tenant's.
pub(crate) fn retention(record: Option<&RoomRecord>, quotas: &RoomQuotas) -> Option<u64> {
    match record.and_then(|record| record.retention_secs) {
        Some(0) => None,
        Some(secs) => Some(secs),
        None => quotas.retention_secs.filter(|secs| *secs > 0),
    }
}

/// Why a new member would exceed a quota, given the room's members and the user's rooms before the join; `None`
/// when the join fits. The protocol's ceilings hold whatever the quotas say (a gateway of an earlier release sends
/// none).
fn quota_refusal(members: usize, user_rooms: u64, quotas: &RoomQuotas) -> Option<String> {
    let members_cap = quotas.members_per_room.unwrap_or(limits::MAX_MEMBERS_PER_ROOM).min(limits::MAX_MEMBERS_PER_ROOM);
    let rooms_cap = quotas.rooms_per_user.unwrap_or(limits::MAX_ROOMS_PER_USER).min(limits::MAX_ROOMS_PER_USER);
    if members >= members_cap as usize {
        return Some(format!("the room has its quota of {members_cap} members"));
    }
    if user_rooms >= u64::from(rooms_cap) {
        return Some(format!("the user is in their quota of {rooms_cap} rooms"));
    }
    None
}

/// Put `user` in a room's bans or mutes until `until_ms` (`None`: for good); whether that changes them. A new entry
/// needs room under `cap` (expired entries were pruned already).
fn restrict(
    entries: &mut BTreeMap<UserId, Option<u64>>,
    user: &UserId,
    until_ms: Option<u64>,
    now_ms: u64,
    cap: usize,
    what: &str,
    room: &RoomId,
) -> Rule<bool> {
    if until_ms.is_some_and(|until| until <= now_ms) {
        return Err(refuse(ErrorCode::BadRequest, "the expiry is in the past"));
    }
    if !entries.contains_key(user) && entries.len() >= cap {
        return Err(refuse(ErrorCode::Forbidden, format!("room {room} has its quota of {cap} {what}")));
    }
    Ok(entries.insert(user.clone(), until_ms) != Some(until_ms))
}

/// Does a token's `rooms` claim allow `room`? Entries are room ids or prefixes ending in `*`.
fn granted(grants: &[String], room: &RoomId) -> bool {
    grants.iter().any(|grant| match grant.strip_suffix('*') {
        Some(prefix) => room.as_str().starts_with(prefix),
        None => grant == room.as_str(),
    })
}

#[cfg(test)]
mod tests;
