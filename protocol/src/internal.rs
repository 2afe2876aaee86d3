//! Messages between Switchyard's own processes: commands from gateways to router shards, the sequenced room events
//! router shards append to JetStream and publish live, and history requests to persistors.
//!
//! Every message carries a version field `v` and travels as MessagePack with field names (see `codec`). JSON never
//! appears here; the client-facing shapes live in `client`.

use crate::client::{Message, MessagePreview, OkResult, ServerEvent};
use crate::error::ErrorCode;
use crate::ids::{ClientMessageId, MessageId, ProjectId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The version every internal message is written with.
pub const INTERNAL_VERSION: u8 = 1;

/// A command a gateway sends to the router shard that owns the room's shard, on behalf of one user, or of the
/// tenant's backend (`user: None`, through the tenant HTTP API; trusted within its tenant).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRequest {
    pub v: u8,
    pub tenant: ProjectId,
    pub user: Option<UserId>,
    pub command: RoomCommand,
    /// The tenant's quotas on rooms and memberships, resolved by the gateway for the commands they bound (see
    /// [`RoomCommand::is_bounded_by_quotas`]); absent from other commands and from gateways of earlier releases.
    #[serde(default, skip_serializing_if = "RoomQuotas::is_unset")]
    pub quotas: RoomQuotas,
    /// The tenant's backend sent this command on behalf of `user` (a message posted through the HTTP API): the
    /// room's moderation (freeze, slow mode, mutes) does not hold it back. Absent (false) from clients' commands.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub by_backend: bool,
}

/// The quotas a room actor enforces, as the gateway resolved them for the tenant (its own limits, else the
/// fleet's defaults). `None` is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomQuotas {
    /// Members one room may have.
    #[serde(default)]
    pub members_per_room: Option<u32>,
    /// Rooms one user may be a member of (invites and the backend's additions count too).
    #[serde(default)]
    pub rooms_per_user: Option<u32>,
    /// Only the tenant's backend creates rooms: a client's `create`, or its `join` of a missing room, is
    /// `forbidden`.
    #[serde(default)]
    pub backend_creates_rooms: bool,
    /// Rooms the tenant may have (a deleted room frees its place).
    #[serde(default)]
    pub rooms_per_tenant: Option<u64>,
    /// How long the tenant keeps history, in seconds, unless a room says otherwise (`RoomRecord::retention_secs`);
    /// `None` keeps it for good.
    #[serde(default)]
    pub retention_secs: Option<u64>,
}

impl RoomQuotas {
    /// No quota at all (the protocol's ceilings still hold).
    pub fn is_unset(&self) -> bool {
        self == &RoomQuotas::default()
    }
}

/// What a router shard is asked to do in one room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoomCommand {
    /// Create a room; the caller becomes its admin.
    Create { room: RoomId, private: bool, title: Option<String> },
    /// Become a member (when allowed) and learn the room's last seq. `grants` are the token's `rooms` claims.
    Join { room: RoomId, grants: Vec<String> },
    /// Append a message. In a direct-message room only its two participants may send.
    Send { room: RoomId, body: String, attrs: Option<Value>, reply_to: Option<u64>, cmid: Option<ClientMessageId> },
    /// May the user read the room's history? Answered with the room's last seq (`OkResult::RoomSeq`).
    CanRead { room: RoomId, grants: Vec<String> },
    /// End the caller's membership.
    Leave { room: RoomId },
    /// Make `user` a member (room admins only).
    Invite { room: RoomId, user: UserId },
    /// End `user`'s membership (room admins only).
    Kick { room: RoomId, user: UserId },
    /// The room's members and roles (`online` is filled in by the gateway).
    Members { room: RoomId },
    /// Make `user` a member with `role`, or change their role (the tenant's backend only).
    SetMember { room: RoomId, user: UserId, role: crate::client::Role },
    /// A typing signal; throttled per user and room, never answered.
    Typing { room: RoomId },
    /// Move the caller's read marker forward.
    Read { room: RoomId, seq: u64 },
    /// Add or remove a reaction on message `target`.
    React { room: RoomId, target: u64, emoji: String, remove: bool },
    /// Replace the body of message `target` (its author only).
    Edit { room: RoomId, target: u64, body: String },
    /// Delete message `target` (its author or a room admin).
    Delete { room: RoomId, target: u64 },
    /// Pin (`pinned: true`) or unpin message `target` (room admins; either participant of a direct-message room).
    Pin { room: RoomId, target: u64, pinned: bool },
    /// A moderation action (room admins, or the tenant's backend; named rooms only). A ban or mute with `secs`
    /// lasts that long from when the room's router shard takes it (its clock sets the action's `until_ms`).
    Moderate {
        room: RoomId,
        action: Moderation,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secs: Option<u64>,
    },
    /// Set the room's own history retention in seconds (`Some(0)`: for good), or follow the tenant's again (`None`);
    /// the tenant's backend only, named rooms only. It applies to the events sequenced after it.
    SetRetention { room: RoomId, secs: Option<u64> },
    /// Delete a named room (the tenant's backend only): its members are told by a `room_deleted` event, their
    /// memberships, the roster and the record go, and its history before that event is erased; the name is free.
    DeleteRoom { room: RoomId },
    /// Erase `user` from the room (the tenant's backend only, as part of erasing the user from the tenant): their
    /// membership, roster entry and moderation records go, an `erased` event is appended, and every earlier event
    /// naming them is removed from the events stream; the stores make their messages tombstones when they apply
    /// the event. In a direct-message room with them the whole room is deleted instead, since its id names them.
    EraseUser { room: RoomId, user: UserId },
}

/// A moderation action in a room: what `RoomCommand::Moderate` asks for and what its `EventBody::Moderation`
/// records. Expiries are unix milliseconds, set by the room's router shard from the command's `secs`; `None` is for
/// good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Moderation {
    /// End `user`'s membership and refuse their joins, invites and reads of the room until lifted or expired.
    Ban {
        user: UserId,
        until_ms: Option<u64>,
    },
    Unban {
        user: UserId,
    },
    /// `user` may read the room but not send, edit or react in it until lifted or expired.
    Mute {
        user: UserId,
        until_ms: Option<u64>,
    },
    Unmute {
        user: UserId,
    },
    /// Members other than admins send at most one message per `secs` seconds; 0 turns slow mode off.
    SlowMode {
        secs: u32,
    },
    /// A frozen room is read-only for every user (the tenant's backend still writes); `frozen: false` thaws it.
    Freeze {
        frozen: bool,
    },
}

impl Moderation {
    /// The user the action names, if any.
    pub fn user(&self) -> Option<&UserId> {
        match self {
            Moderation::Ban { user, .. }
            | Moderation::Unban { user }
            | Moderation::Mute { user, .. }
            | Moderation::Unmute { user } => Some(user),
            Moderation::SlowMode { .. } | Moderation::Freeze { .. } => None,
        }
    }

    /// The action as clients see it in a `moderation` event.
    pub fn client_action(&self) -> crate::client::ModerationAction {
        use crate::client::ModerationAction;
        match self {
            Moderation::Ban { .. } => ModerationAction::Ban,
            Moderation::Unban { .. } => ModerationAction::Unban,
            Moderation::Mute { .. } => ModerationAction::Mute,
            Moderation::Unmute { .. } => ModerationAction::Unmute,
            Moderation::SlowMode { .. } => ModerationAction::SlowMode,
            Moderation::Freeze { frozen: true } => ModerationAction::Freeze,
            Moderation::Freeze { frozen: false } => ModerationAction::Unfreeze,
        }
    }
}

impl RoomCommand {
    /// The command's kind as its wire tag says it (`send`, `join`, ...), for spans and logs.
    pub fn name(&self) -> &'static str {
        match self {
            RoomCommand::Create { .. } => "create",
            RoomCommand::Join { .. } => "join",
            RoomCommand::Send { .. } => "send",
            RoomCommand::CanRead { .. } => "can_read",
            RoomCommand::Leave { .. } => "leave",
            RoomCommand::Invite { .. } => "invite",
            RoomCommand::Kick { .. } => "kick",
            RoomCommand::Members { .. } => "members",
            RoomCommand::SetMember { .. } => "set_member",
            RoomCommand::Typing { .. } => "typing",
            RoomCommand::Read { .. } => "read",
            RoomCommand::React { .. } => "react",
            RoomCommand::Edit { .. } => "edit",
            RoomCommand::Delete { .. } => "delete",
            RoomCommand::Pin { .. } => "pin",
            RoomCommand::Moderate { .. } => "moderate",
            RoomCommand::SetRetention { .. } => "set_retention",
            RoomCommand::DeleteRoom { .. } => "delete_room",
            RoomCommand::EraseUser { .. } => "erase_user",
        }
    }

    pub fn room(&self) -> &RoomId {
        match self {
            RoomCommand::Create { room, .. }
            | RoomCommand::Join { room, .. }
            | RoomCommand::Send { room, .. }
            | RoomCommand::CanRead { room, .. }
            | RoomCommand::Leave { room }
            | RoomCommand::Invite { room, .. }
            | RoomCommand::Kick { room, .. }
            | RoomCommand::Members { room }
            | RoomCommand::SetMember { room, .. }
            | RoomCommand::Typing { room }
            | RoomCommand::Read { room, .. }
            | RoomCommand::React { room, .. }
            | RoomCommand::Edit { room, .. }
            | RoomCommand::Delete { room, .. }
            | RoomCommand::Pin { room, .. }
            | RoomCommand::Moderate { room, .. }
            | RoomCommand::SetRetention { room, .. }
            | RoomCommand::DeleteRoom { room }
            | RoomCommand::EraseUser { room, .. } => room,
        }
    }

    /// Whether the command may create a room or add a member, the only commands the room quotas bound.
    pub fn is_bounded_by_quotas(&self) -> bool {
        match self {
            RoomCommand::Create { .. }
            | RoomCommand::Join { .. }
            | RoomCommand::Invite { .. }
            | RoomCommand::SetMember { .. } => true,
            RoomCommand::Send { .. }
            | RoomCommand::CanRead { .. }
            | RoomCommand::Leave { .. }
            | RoomCommand::Kick { .. }
            | RoomCommand::Members { .. }
            | RoomCommand::Typing { .. }
            | RoomCommand::Read { .. }
            | RoomCommand::React { .. }
            | RoomCommand::Edit { .. }
            | RoomCommand::Delete { .. }
            | RoomCommand::Pin { .. }
            | RoomCommand::Moderate { .. }
            | RoomCommand::SetRetention { .. }
            | RoomCommand::DeleteRoom { .. }
            | RoomCommand::EraseUser { .. } => false,
        }
    }
}

/// A request about one user, served by the router shard that owns the user's shard (see `shard_of_user`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRequest {
    pub v: u8,
    pub tenant: ProjectId,
    pub user: UserId,
    pub command: UserCommand,
}

/// What is asked about a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UserCommand {
    /// The user's memberships with last seq and read marker, all in one reply (`OkResult::Rooms`). Kept for
    /// gateways of earlier releases; its reply grows with the user's rooms.
    Rooms,
    /// One page of the user's memberships with last seq and read marker (`CommandReply::RoomsPage`), starting at
    /// the cursor `after` (0 for the first page). Each page fits one NATS message whatever the user's room count.
    RoomsPage { after: u64 },
    /// Presence of `users`, all owned by this shard (`OkResult::Presence`).
    Presence { users: Vec<UserId> },
    /// A gateway's sessions of this user went from none to some (`online`) or from some to none. Answered with an
    /// empty `ok` when asked as a request.
    SessionsChanged { gateway: String, online: bool },
    /// Forget the user's presence, its record and `last_seen` included (an erasure of the user, whose sessions are
    /// closed first). Answered with an empty `ok`.
    ForgetPresence,
}

/// A user's presence as last announced, in the rooms KV bucket: lets a new owner of the user's shard tell a real
/// change from a rebuild.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PresenceRecord {
    pub v: u8,
    pub online: bool,
    /// When the user's last session closed (unix ms).
    pub last_seen: Option<u64>,
}

/// A gateway's periodic list of the users it has sessions for, per presence shard. Not answered. A user missing
/// from a gateway's snapshots for the presence expiry is taken to have no session there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceSnapshot {
    pub v: u8,
    pub gateway: String,
    pub users: Vec<(ProjectId, UserId)>,
}

/// A new shard owner's request that every gateway send it that shard's presence snapshot now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceResync {
    pub v: u8,
    pub shard: crate::ShardId,
}

/// What travels on a room's live subject and on a user's inbox: sequenced events and ephemeral signals.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "live", rename_all = "snake_case")]
pub enum LiveMessage {
    Event(RoomEvent),
    Typing {
        room: RoomId,
        user: UserId,
    },
    Read {
        room: RoomId,
        user: UserId,
        seq: u64,
    },
    /// A user's read marker moved: for that user's own sessions (on their inbox), with what is left unread.
    OwnRead {
        room: RoomId,
        user: UserId,
        seq: u64,
        unread: u64,
    },
    Presence {
        user: UserId,
        online: bool,
        ts: u64,
    },
}

/// A router shard's answer to a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommandReply {
    Ok {
        result: OkResult,
    },
    Err {
        code: ErrorCode,
        message: String,
        /// The command was refused before anything of it ran (its room's queue was full): sending it again is safe
        /// whatever the command. Absent (false) from older router shards.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        not_taken: bool,
        /// For `rate_limited` (a room's slow mode): when the command may succeed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// A page of a user's rooms (`UserCommand::RoomsPage`); `next` is the cursor of the next page, `None` after the
    /// last.
    RoomsPage {
        rooms: Vec<crate::client::RoomSummary>,
        next: Option<u64>,
    },
}

impl CommandReply {
    pub fn err(code: ErrorCode, message: impl Into<String>) -> Self {
        CommandReply::Err { code, message: message.into(), not_taken: false, retry_after_ms: None }
    }

    /// `unavailable` for a command refused before anything of it ran; the gateway sends it again.
    pub fn not_taken(message: impl Into<String>) -> Self {
        CommandReply::Err {
            code: ErrorCode::Unavailable,
            message: message.into(),
            not_taken: true,
            retry_after_ms: None,
        }
    }

    /// Whether this answer says the command was refused before anything of it ran.
    pub fn was_not_taken(&self) -> bool {
        matches!(self, CommandReply::Err { not_taken: true, .. })
    }
}

/// One sequenced room event: what the JetStream stream holds, what persistors store and what gateways deliver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomEvent {
    pub v: u8,
    pub tenant: ProjectId,
    pub room: RoomId,
    /// Per-room sequence, gap-free from 1.
    pub seq: u64,
    /// Server time in microseconds, strictly increasing within a room; stores use it as the write timestamp, so a
    /// late write of an older event never overrides a newer one.
    pub ts_us: u64,
    pub body: EventBody,
    /// The room as of this event (message count, latest message), so that a room's last event alone answers
    /// `rooms`. Empty on events of earlier releases.
    #[serde(default, skip_serializing_if = "RoomTally::is_empty")]
    pub tally: RoomTally,
    /// When the event leaves history (unix milliseconds), from the room's retention when it was sequenced; `None`
    /// keeps it for good. The stores drop it then, and no join replays it after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
}

/// What a room holds as of one of its events: how many messages it has had and its latest one. Each event's
/// tally follows from the one before it ([`RoomTally::followed_by`]), so no reader ever counts history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomTally {
    /// `msg` events up to this one, this one included (counted from the first event written with a tally).
    #[serde(default)]
    pub msgs: u64,
    /// The room's latest message as its edits and deletion left it. Not stored on a `msg` event, which is its own
    /// latest message (see [`RoomEvent::tally_through`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message: Option<MessagePreview>,
    /// When that message leaves history (its event's `expires_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message_expires_ms: Option<u64>,
}

impl RoomTally {
    /// The tally of a room whose events all left the stream, at its head `seq`: its count starts again from `seq`,
    /// which no count up to the head exceeds, so every marker taken before stays at or below it.
    pub fn restarted(seq: u64) -> RoomTally {
        RoomTally { msgs: seq, last_message: None, last_message_expires_ms: None }
    }

    pub fn is_empty(&self) -> bool {
        self == &RoomTally::default()
    }

    /// The tally as of the event after the one this tally is through: `body` at `seq`, at `ts_ms`, leaving history
    /// at `expires_ms`.
    pub fn followed_by(&self, seq: u64, ts_ms: u64, expires_ms: Option<u64>, body: &EventBody) -> RoomTally {
        let mut next = self.clone();
        match body {
            EventBody::Msg { id, from, body, .. } => {
                next.msgs += 1;
                next.last_message = Some(MessagePreview::new(seq, id.clone(), from.clone(), body, ts_ms));
                next.last_message_expires_ms = expires_ms;
            }
            EventBody::Edit { target, body, .. } => {
                if let Some(last) = next.last_message.as_mut().filter(|last| last.seq == *target && !last.deleted) {
                    *last = MessagePreview {
                        edited: true,
                        ..MessagePreview::new(last.seq, last.id.clone(), last.from.clone(), body, last.ts)
                    };
                }
            }
            EventBody::Delete { target, .. } => {
                if let Some(last) = next.last_message.as_mut().filter(|last| last.seq == *target) {
                    last.body.clear();
                    last.deleted = true;
                }
            }
            // Every membership ends with the room, so no read marker counts on the deleted room's messages: a room
            // created again under the name counts from nothing.
            EventBody::RoomDeleted {} => next = RoomTally::default(),
            // The latest message of an erased user is shown as no message at all; it still counts.
            EventBody::UserErased { user } => {
                if next.last_message.as_ref().is_some_and(|last| &last.from == user) {
                    next.last_message = None;
                    next.last_message_expires_ms = None;
                }
            }
            EventBody::Reaction { .. }
            | EventBody::Pin { .. }
            | EventBody::Joined { .. }
            | EventBody::Left { .. }
            | EventBody::Moderation { .. } => {}
        }
        next
    }

    /// What an event with `body` stores of this tally (the tally through it): a `msg` does not repeat itself.
    pub fn stored_for(mut self, body: &EventBody) -> RoomTally {
        if matches!(body, EventBody::Msg { .. }) {
            self.last_message = None;
            self.last_message_expires_ms = None;
        }
        self
    }
}

/// The kind-specific part of a room event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    Msg {
        id: MessageId,
        from: UserId,
        body: String,
        attrs: Option<Value>,
        reply_to: Option<u64>,
    },
    Edit {
        target: u64,
        from: UserId,
        body: String,
    },
    Delete {
        target: u64,
        by: UserId,
    },
    Reaction {
        target: u64,
        user: UserId,
        emoji: String,
        removed: bool,
    },
    /// Message `target` was pinned (`pinned: true`) or unpinned by `by`.
    Pin {
        target: u64,
        by: UserId,
        pinned: bool,
    },
    Joined {
        user: UserId,
    },
    Left {
        user: UserId,
        by: Option<UserId>,
    },
    /// A moderation action taken by `by` (`None`: the tenant's backend).
    Moderation {
        action: Moderation,
        by: Option<UserId>,
    },
    /// The room was deleted: every event before this one is gone from history, nobody is a member any more, and a
    /// room created later under the same name continues after this seq.
    RoomDeleted {},
    /// `user` was erased from the room: the stores make every earlier message of theirs a tombstone with no author
    /// and drop their reactions; sessions see an `erased` event that names nobody.
    UserErased {
        user: UserId,
    },
}

impl RoomEvent {
    /// Server time in unix milliseconds, as clients see it.
    pub fn ts_ms(&self) -> u64 {
        self.ts_us / 1000
    }

    /// The room's tally as of this event, its own message included.
    pub fn tally_through(&self) -> RoomTally {
        match &self.body {
            EventBody::Msg { id, from, body, .. } => RoomTally {
                msgs: self.tally.msgs,
                last_message: Some(MessagePreview::new(self.seq, id.clone(), from.clone(), body, self.ts_ms())),
                last_message_expires_ms: self.expires_ms,
            },
            EventBody::Edit { .. }
            | EventBody::Delete { .. }
            | EventBody::Reaction { .. }
            | EventBody::Pin { .. }
            | EventBody::Joined { .. }
            | EventBody::Left { .. }
            | EventBody::Moderation { .. }
            | EventBody::RoomDeleted {} => self.tally.clone(),
            // Tallied by the router (`RoomTally::followed_by`): no preview of the erased user is carried on.
            EventBody::UserErased { .. } => self.tally.clone(),
        }
    }

    /// The event as subscribed sessions receive it.
    pub fn to_server_event(&self) -> ServerEvent {
        let room = self.room.clone();
        let seq = self.seq;
        let ts = self.ts_ms();
        match &self.body {
            EventBody::Msg { id, from, body, attrs, reply_to } => ServerEvent::Msg {
                room,
                seq,
                id: id.clone(),
                from: from.clone(),
                body: body.clone(),
                attrs: attrs.clone(),
                reply_to: *reply_to,
                ts,
            },
            EventBody::Edit { target, from, body } => {
                ServerEvent::Edit { room, seq, target: *target, from: from.clone(), body: body.clone(), ts }
            }
            EventBody::Delete { target, by } => ServerEvent::Delete { room, seq, target: *target, by: by.clone(), ts },
            EventBody::Reaction { target, user, emoji, removed } => ServerEvent::Reaction {
                room,
                seq,
                target: *target,
                user: user.clone(),
                emoji: emoji.clone(),
                removed: *removed,
                ts,
            },
            EventBody::Pin { target, by, pinned } => {
                ServerEvent::Pin { room, seq, target: *target, by: by.clone(), pinned: *pinned, ts }
            }
            EventBody::Joined { user } => ServerEvent::Joined { room, seq, user: user.clone(), ts },
            EventBody::Left { user, by } => ServerEvent::Left { room, seq, user: user.clone(), by: by.clone(), ts },
            EventBody::Moderation { action, by } => {
                let (until, secs) = match action {
                    Moderation::Ban { until_ms, .. } | Moderation::Mute { until_ms, .. } => (*until_ms, None),
                    Moderation::SlowMode { secs } => (None, Some(*secs)),
                    Moderation::Unban { .. } | Moderation::Unmute { .. } | Moderation::Freeze { .. } => (None, None),
                };
                ServerEvent::Moderation {
                    room,
                    seq,
                    action: action.client_action(),
                    user: action.user().cloned(),
                    until,
                    secs,
                    by: by.clone(),
                    ts,
                }
            }
            EventBody::RoomDeleted {} => ServerEvent::RoomDeleted { room, seq, ts },
            EventBody::UserErased { .. } => ServerEvent::Erased { room, seq },
        }
    }
}

impl EventBody {
    /// Whether the event names `user` (as author, actor or subject): what an erasure of that user removes from
    /// the events stream. Another user's `left` stays even when `user` kicked them: replays stop a room for its
    /// reader at their own `left`, so it must not become a hole.
    pub fn names(&self, user: &UserId) -> bool {
        match self {
            EventBody::Msg { from, .. } | EventBody::Edit { from, .. } => from == user,
            EventBody::Delete { by, .. } | EventBody::Pin { by, .. } => by == user,
            EventBody::Reaction { user: reactor, .. } | EventBody::Joined { user: reactor } => reactor == user,
            EventBody::Left { user: left, .. } => left == user,
            EventBody::Moderation { action, by } => action.user() == Some(user) || by.as_ref() == Some(user),
            // The erasure itself stays: the stores still have to apply it.
            EventBody::RoomDeleted {} | EventBody::UserErased { .. } => false,
        }
    }
}

/// A page of a room's history, asked of the persistors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRequest {
    pub v: u8,
    pub tenant: ProjectId,
    pub room: RoomId,
    pub before: Option<u64>,
    pub after: Option<u64>,
    pub limit: u32,
    /// The room's last seq when the request was authorised: the persistor waits (briefly) until its store has
    /// caught up to it, so a client reads its own writes.
    pub min_seq: u64,
    /// Page the replies to message `thread` instead of the whole room. Absent from gateways of earlier releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread: Option<u64>,
}

/// A persistor's answer to a history request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HistoryReply {
    Ok { messages: Vec<Message>, more: bool },
    Err { code: ErrorCode, message: String },
}

/// What a persistor is asked about one user's authorship across the tenant, for erasing and exporting the user:
/// one page, in (room, seq) order, after the cursor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthoredRequest {
    pub v: u8,
    pub tenant: ProjectId,
    pub user: UserId,
    pub page: AuthoredPage,
    pub limit: u32,
}

/// Which page of a user's authorship is asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuthoredPage {
    /// The rooms holding a message or reaction of the user, after room `after`.
    Rooms { after: Option<RoomId> },
    /// The user's messages (neither deleted nor tombstones), after (`room`, `seq`).
    Messages { after: Option<(RoomId, u64)> },
}

/// A persistor's answer to an [`AuthoredRequest`]: `rooms` for a rooms page, `messages` for a messages page, and
/// the cursor of the next page (`None`: this was the last).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuthoredReply {
    Rooms { rooms: Vec<RoomId>, next: Option<RoomId> },
    Messages { messages: Vec<(RoomId, Message)>, next: Option<(RoomId, u64)> },
    Err { code: ErrorCode, message: String },
}

/// A router shard's question to the persistors: what is the last event of this room the history store holds? Asked
/// when the events stream holds none of the room's events (they aged out), so the room's seq continues.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomHeadRequest {
    pub v: u8,
    pub tenant: ProjectId,
    pub room: RoomId,
}

/// A persistor's answer to a room-head request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RoomHeadReply {
    /// The room's last stored event: its seq and `ts_us` (both 0 when the store has none).
    Ok {
        last_seq: u64,
        last_ts_us: u64,
    },
    Err {
        code: ErrorCode,
        message: String,
    },
}

/// A room's record in the rooms KV bucket. Direct-message rooms have none: they exist implicitly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomRecord {
    pub v: u8,
    pub private: bool,
    pub title: Option<String>,
    /// The creating user; `None` when the tenant's backend created the room.
    pub created_by: Option<UserId>,
    pub created_at_ms: u64,
    /// The room's own history retention, in seconds, over the tenant's; `Some(0)` keeps its history for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_secs: Option<u64>,
}

/// A room's members and their roles, and its moderation, in the rooms KV bucket; written only by the room's actor.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Roster {
    pub v: u8,
    pub members: std::collections::BTreeMap<UserId, crate::client::Role>,
    /// Absent from rosters of earlier releases and of rooms never moderated.
    #[serde(default, skip_serializing_if = "RoomModeration::is_unset")]
    pub moderation: RoomModeration,
}

/// A room's standing moderation: bans and mutes with their expiries (unix ms; `None`: for good), slow mode and
/// freeze. Expired entries stay until the next moderation action rewrites the roster; they bind nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomModeration {
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub bans: std::collections::BTreeMap<UserId, Option<u64>>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub mutes: std::collections::BTreeMap<UserId, Option<u64>>,
    /// Seconds between two messages of one member (admins exempt); 0: off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub slow_mode_secs: u32,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub frozen: bool,
}

fn is_zero(secs: &u32) -> bool {
    *secs == 0
}

impl RoomModeration {
    pub fn is_unset(&self) -> bool {
        self == &RoomModeration::default()
    }

    /// Is `user` banned at `now_ms`?
    pub fn is_banned(&self, user: &UserId, now_ms: u64) -> bool {
        in_force(self.bans.get(user), now_ms)
    }

    /// Is `user` muted at `now_ms`?
    pub fn is_muted(&self, user: &UserId, now_ms: u64) -> bool {
        in_force(self.mutes.get(user), now_ms)
    }

    /// Drop bans and mutes that expired by `now_ms`.
    pub fn prune(&mut self, now_ms: u64) {
        self.bans.retain(|_, until| in_force(Some(until), now_ms));
        self.mutes.retain(|_, until| in_force(Some(until), now_ms));
    }
}

/// Does an entry with this expiry still hold at `now_ms`?
fn in_force(entry: Option<&Option<u64>>, now_ms: u64) -> bool {
    match entry {
        None => false,
        Some(None) => true,
        Some(Some(until_ms)) => *until_ms > now_ms,
    }
}

/// One of a user's rooms, as kept in the user's `UserRooms` record.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UserRoom {
    pub role: crate::client::Role,
    /// The user's read marker in the room.
    pub read: u64,
    /// The room's message count ([`RoomTally::msgs`]) at the read marker, or at the join when that is later;
    /// `None` for an entry of an earlier release that no read has moved since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_msgs: Option<u64>,
}

impl UserRoom {
    /// A new entry: no read marker, unread counted from a room that had `msgs` messages.
    pub fn joined(role: crate::client::Role, msgs: u64) -> UserRoom {
        UserRoom { role, read: 0, read_msgs: Some(msgs) }
    }

    /// Messages after the marker in a room whose last event is `seq` and whose tally counts `msgs`: the messages
    /// counted since `read_msgs`, never more than the events after the marker. That bound is what an entry
    /// without `read_msgs` gets, and what holds after a room's tally restarted (see `RoomTally::restarted`).
    pub fn unread(&self, seq: u64, msgs: u64) -> u64 {
        msgs.saturating_sub(self.read_msgs.unwrap_or(0)).min(seq.saturating_sub(self.read))
    }
}

/// A user's rooms, in the rooms KV bucket; updated by compare-and-set, since each room's actor writes its own entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UserRooms {
    pub v: u8,
    pub rooms: std::collections::BTreeMap<RoomId, UserRoom>,
}

/// A revocation, broadcast by the gateway that took it to every gateway (see `subjects::revocations`), which closes
/// the matching live sessions of that tenant with 4003.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    pub v: u8,
    pub tenant: ProjectId,
    pub target: RevocationTarget,
    /// Unix milliseconds when it was taken.
    pub at_ms: u64,
}

/// What a revocation applies to, always within its tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RevocationTarget {
    /// One credential: `id` is a token id (see the gateway's `auth::token_id`), never the token itself.
    /// `until_ms` is when the credential would have expired anyway: revocation markers live until then.
    Token { id: String, until_ms: u64 },
    /// Every session of one user.
    User { user: UserId },
    /// Every session of the tenant (it was disabled).
    Tenant,
    /// `user` is banned from the tenant until `until_ms` (unix ms; `None`: until lifted): their sessions close as for
    /// `User`, and each gateway remembers the ban, to refuse the user while Redis cannot be asked.
    Ban { user: UserId, until_ms: Option<u64> },
    /// `user`'s ban was lifted: gateways forget it. Closes nothing.
    Unban { user: UserId },
}

/// Per-tenant limits set by the admin API; `None` means the gateway's configured default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TenantLimits {
    /// Fleet-wide sustained message rate (messages per second) and burst.
    #[serde(default)]
    pub msgs_per_sec: Option<u32>,
    #[serde(default)]
    pub msgs_burst: Option<u32>,
    /// Live sockets of the tenant, and of one of its users, across the fleet.
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub max_connections_per_user: Option<u32>,
    /// Members per room and rooms per user (see [`RoomQuotas`]).
    #[serde(default)]
    pub max_members_per_room: Option<u32>,
    #[serde(default)]
    pub max_rooms_per_user: Option<u32>,
    /// Only the tenant's backend creates rooms.
    #[serde(default)]
    pub backend_creates_rooms: Option<bool>,
    /// Rooms the tenant may have.
    #[serde(default)]
    pub max_rooms: Option<u64>,
    /// Users one session may watch.
    #[serde(default)]
    pub max_watched_per_session: Option<u32>,
    /// How long the tenant's history is kept, in seconds (a room may say otherwise); absent: for good.
    #[serde(default)]
    pub history_retention_secs: Option<u64>,
}

/// How a tenant's JWTs are verified.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "alg")]
pub enum JwtKey {
    HS256 { secret: String },
    RS256 { public_key_pem: String },
    ES256 { public_key_pem: String },
}

impl std::fmt::Debug for JwtKey {
    /// The algorithm only: an HMAC secret must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let alg = match self {
            JwtKey::HS256 { .. } => "HS256",
            JwtKey::RS256 { .. } => "RS256",
            JwtKey::ES256 { .. } => "ES256",
        };
        f.debug_struct("JwtKey").field("alg", &alg).finish_non_exhaustive()
    }
}

/// A tenant's record in the tenants KV bucket. Holds the API key's hash, never the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantRecord {
    pub v: u8,
    pub project_id: ProjectId,
    pub name: String,
    pub created_at_ms: u64,
    /// Hex SHA-256 of the current API key.
    pub api_key_sha256: String,
    pub jwt: Option<JwtKey>,
    /// A disabled tenant is refused everywhere.
    pub disabled: bool,
    /// Limits that override the gateways' defaults for this tenant.
    #[serde(default)]
    pub limits: TenantLimits,
    /// The tenant's hooks (pre-send) and the secret that signs what is sent to them.
    #[serde(default)]
    pub hooks: Option<crate::hooks::TenantHooks>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_not_taken_refusal_travels_and_older_refusals_read_as_taken() {
        let refused = CommandReply::not_taken("room r has too many commands waiting; retry");
        let decoded: CommandReply = crate::codec::decode(&crate::codec::encode(&refused).unwrap()).unwrap();
        assert!(decoded.was_not_taken());
        let plain = CommandReply::err(ErrorCode::Forbidden, "not a member");
        let bytes = crate::codec::encode(&plain).unwrap();
        let decoded: CommandReply = crate::codec::decode(&bytes).unwrap();
        assert!(!decoded.was_not_taken());
        assert_eq!(decoded, plain);
    }

    #[test]
    fn an_event_names_its_author_actor_and_subject_and_an_erasure_names_nobody_on_the_wire() {
        let (zed, bob) = (UserId::parse("zed").unwrap(), UserId::parse("bob").unwrap());
        let naming = [
            EventBody::Msg {
                id: MessageId::generate(1),
                from: zed.clone(),
                body: "x".into(),
                attrs: None,
                reply_to: None,
            },
            EventBody::Edit { target: 1, from: zed.clone(), body: "y".into() },
            EventBody::Delete { target: 1, by: zed.clone() },
            EventBody::Reaction { target: 1, user: zed.clone(), emoji: "👍".into(), removed: false },
            EventBody::Pin { target: 1, by: zed.clone(), pinned: true },
            EventBody::Joined { user: zed.clone() },
            EventBody::Left { user: zed.clone(), by: None },
            EventBody::Moderation { action: Moderation::Mute { user: zed.clone(), until_ms: None }, by: None },
            EventBody::Moderation { action: Moderation::Freeze { frozen: true }, by: Some(zed.clone()) },
        ];
        for body in &naming {
            assert!(body.names(&zed) && !body.names(&bob), "{body:?}");
        }
        let kick = EventBody::Left { user: bob.clone(), by: Some(zed.clone()) };
        assert!(!kick.names(&zed) && kick.names(&bob), "another user's left stays, whoever kicked them");
        let erasure = EventBody::UserErased { user: zed.clone() };
        assert!(!erasure.names(&zed), "the erasure stays for the stores");
        let event = RoomEvent {
            v: INTERNAL_VERSION,
            tenant: ProjectId::generate(),
            room: RoomId::parse("plaza").unwrap(),
            seq: 9,
            ts_us: 1_000,
            tally: RoomTally::default(),
            expires_ms: None,
            body: erasure,
        };
        let wire = serde_json::to_string(&event.to_server_event()).unwrap();
        assert_eq!(wire, r#"{"op":"erased","room":"plaza","seq":9}"#);
        let tally = RoomTally::default().followed_by(1, 1, None, &naming[0]);
        let after = tally.followed_by(2, 2, None, &EventBody::UserErased { user: zed });
        assert_eq!((after.msgs, after.last_message), (1, None), "counted, not shown");
    }

    #[test]
    fn a_tally_follows_messages_edits_and_deletions_and_previews_are_cut_at_a_character() {
        let from = UserId::parse("ann").unwrap();
        let long = "é".repeat(crate::limits::PREVIEW_BYTES);
        let msg = |body: &str| EventBody::Msg {
            id: MessageId::generate(1),
            from: from.clone(),
            body: body.into(),
            attrs: None,
            reply_to: None,
        };
        let first = RoomTally::default().followed_by(1, 10, None, &msg(&long));
        let preview = first.last_message.clone().unwrap();
        assert_eq!((first.msgs, preview.body.len()), (1, crate::limits::PREVIEW_BYTES));
        assert!(long.starts_with(&preview.body));
        let odd = RoomTally::default().followed_by(1, 10, None, &msg(&format!("a{long}")));
        assert_eq!(odd.last_message.unwrap().body.len(), crate::limits::PREVIEW_BYTES - 1, "no half character");
        let joined = first.followed_by(2, 11, None, &EventBody::Joined { user: from.clone() });
        assert_eq!(joined, first, "a join changes nothing");
        let edit_other = EventBody::Edit { target: 9, from: from.clone(), body: "x".into() };
        assert_eq!(joined.followed_by(3, 12, None, &edit_other), first, "an edit of an older message changes nothing");
        let edited =
            joined.followed_by(3, 12, None, &EventBody::Edit { target: 1, from: from.clone(), body: "new".into() });
        let preview = edited.last_message.clone().unwrap();
        assert_eq!((preview.body.as_str(), preview.edited, preview.seq, preview.ts), ("new", true, 1, 10));
        let deleted = edited.followed_by(4, 13, None, &EventBody::Delete { target: 1, by: from.clone() });
        let preview = deleted.last_message.clone().unwrap();
        assert_eq!((preview.body.as_str(), preview.deleted, deleted.msgs), ("", true, 1));
        let edit_after = EventBody::Edit { target: 1, from: from.clone(), body: "back".into() };
        assert_eq!(deleted.followed_by(5, 14, None, &edit_after), deleted, "a deleted message stays deleted");
        // A message does not repeat itself in its stored tally, and reads back whole.
        let second = deleted.followed_by(6, 15, None, &msg("hi"));
        let event = RoomEvent {
            v: INTERNAL_VERSION,
            tenant: ProjectId::generate(),
            room: RoomId::parse("r").unwrap(),
            seq: 6,
            ts_us: 15_000,
            tally: second.clone().stored_for(&msg("hi")),
            expires_ms: None,
            body: msg("hi"),
        };
        assert_eq!(event.tally.last_message, None);
        let mut through = event.tally_through();
        through.last_message.as_mut().unwrap().id = second.last_message.as_ref().unwrap().id.clone();
        assert_eq!(through, second);
        let entry = UserRoom { role: crate::client::Role::Member, read: 2, read_msgs: Some(1) };
        assert_eq!(entry.unread(6, second.msgs), 1);
        assert_eq!(UserRoom { read_msgs: None, ..entry }.unread(6, second.msgs), 2, "at most what the tally counts");
        assert_eq!(UserRoom { read: 5, ..entry }.unread(6, second.msgs), 1, "at most the events after the marker");
    }
}
