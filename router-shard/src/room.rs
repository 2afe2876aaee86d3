//! The room actor: one task per active room, the only writer of that room's sequence, roster and read markers while
//! its router shard owns the room's shard. It checks permissions, assigns `seq`, appends each event to the events
//! stream with a fence on the room's last stream sequence, and publishes it live only after JetStream has
//! acknowledged it (on the room's live subject, or for a direct-message room on both participants' inboxes).
//!
//! It does not decide shard ownership (see `leases`), does not talk to clients (gateways do) and does not store
//! history (persistors do; it asks them about earlier messages).

use crate::context::RouterContext;
use crate::memberships;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::Subject;
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use switchyard_protocol::client::{Member, OkResult, Role};
use switchyard_protocol::codec;
use switchyard_protocol::internal::{
    CommandReply, EventBody, HistoryReply, HistoryRequest, LiveMessage, RoomCommand, RoomEvent, RoomHeadReply,
    RoomHeadRequest, RoomQuotas, RoomRecord, Roster, UserRoom, INTERNAL_VERSION,
};
use switchyard_protocol::{
    limits, subjects, ClientMessageId, ErrorCode, MessageId, ProjectId, RoomId, ShardId, UserId,
};
use switchyard_service::nats::{latest_entry, latest_value};
use tokio::sync::mpsc;

/// One command for a room, with where to send the answer (`None` for commands that are never answered).
pub(crate) struct RoomJob {
    /// The acting user; `None` for the tenant's backend.
    pub user: Option<UserId>,
    pub command: RoomCommand,
    /// The tenant's quotas, as the gateway resolved them.
    pub quotas: RoomQuotas,
    pub reply_to: Option<Subject>,
}

/// Why a command failed; each maps to a protocol error code.
#[derive(Debug, thiserror::Error)]
enum RoomError {
    #[error("{1}")]
    Refused(ErrorCode, String),
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
}

impl RoomError {
    fn reply(&self) -> CommandReply {
        match self {
            RoomError::Refused(code, message) => CommandReply::err(*code, message.clone()),
            RoomError::Unavailable(message) => CommandReply::err(ErrorCode::Unavailable, message.clone()),
        }
    }
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> RoomError {
    RoomError::Unavailable(format!("{what}: {error}"))
}

fn refused(code: ErrorCode, message: impl Into<String>) -> RoomError {
    RoomError::Refused(code, message.into())
}

/// The room's last event in the stream.
#[derive(Debug, Clone, Copy)]
struct Tail {
    /// The room's last seq (0 when the room has no events).
    seq: u64,
    /// The stream sequence of that event (0 when none): the fence for the next append.
    stream_seq: u64,
    /// That event's timestamp; the next one is strictly later.
    ts_us: u64,
}

/// What the actor knows about one message of the room.
#[derive(Debug, Clone)]
struct MessageFacts {
    author: UserId,
    deleted: bool,
}

/// The result of an append.
enum Appended {
    /// A new event, sequenced, stored and published live.
    New(RoomEvent),
    /// The stream already held an event with the same `cmid` within its duplicate window; this is that event.
    Duplicate(RoomEvent),
}

impl Appended {
    fn event(&self) -> &RoomEvent {
        match self {
            Appended::New(event) | Appended::Duplicate(event) => event,
        }
    }
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Most message facts kept per room; older ones are asked of the persistors again.
const MESSAGE_FACTS_KEPT: usize = 4096;
/// How long a room actor waits for a persistor to answer its room-head question (see `ask_head`).
const HEAD_PATIENCE: Duration = Duration::from_secs(6);
/// At most one typing signal per user per room in this interval.
const TYPING_INTERVAL: Duration = Duration::from_secs(2);

/// A room's actor state. Everything here is a cache of what the stream and the rooms bucket hold, rebuilt on demand.
pub(crate) struct RoomActor {
    ctx: Arc<RouterContext>,
    tenant: ProjectId,
    room: RoomId,
    /// The room's subject in the events stream.
    log_subject: String,
    /// The room's last event, once loaded; `None` forces a reload from the stream before the next append.
    tail: Option<Tail>,
    /// The room's record once loaded; `Some(None)` means the room does not exist. Direct-message rooms have none.
    record: Option<Option<RoomRecord>>,
    /// This actor created the room's record (rooms are never deleted, so the room never had an event): an empty
    /// stream subject needs no question to the history store.
    created_here: bool,
    /// The room's roster once loaded, with the revision of its entry (`None`: no entry yet). Normally this actor is
    /// its only writer; a stale owner (paused past its lease) may not be, so every write is a compare-and-set on
    /// that revision, and a refusal re-reads the roster before it is final.
    roster: Option<(Roster, Option<u64>)>,
    /// When each user last had a typing signal relayed.
    typing: HashMap<UserId, Instant>,
    /// Authors and deletion state of recent messages, by seq.
    messages: HashMap<u64, MessageFacts>,
}

impl RoomActor {
    pub fn new(ctx: Arc<RouterContext>, shard: ShardId, tenant: ProjectId, room: RoomId) -> Self {
        RoomActor {
            log_subject: subjects::event_log(shard, &tenant, &room),
            ctx,
            tenant,
            room,
            tail: None,
            record: None,
            created_here: false,
            roster: None,
            typing: HashMap::new(),
            messages: HashMap::new(),
        }
    }

    /// Serve jobs until the queue closes or the room stays idle for `idle`. Jobs already queued when the actor
    /// decides to stop are still served.
    pub async fn run(mut self, mut jobs: mpsc::Receiver<RoomJob>, idle: Duration) {
        loop {
            match tokio::time::timeout(idle, jobs.recv()).await {
                Ok(Some(job)) => self.serve(job).await,
                Ok(None) => return,
                Err(_elapsed) => {
                    jobs.close();
                    while let Ok(job) = jobs.try_recv() {
                        self.serve(job).await;
                    }
                    return;
                }
            }
        }
    }

    async fn serve(&mut self, job: RoomJob) {
        let reply = match self.handle(job.user.as_ref(), job.command, &job.quotas).await {
            Ok(result) => CommandReply::Ok { result },
            Err(error) => {
                if matches!(error, RoomError::Unavailable(_)) {
                    tracing::warn!(tenant = %self.tenant, room = %self.room, %error, "command failed");
                }
                error.reply()
            }
        };
        let Some(reply_to) = job.reply_to else { return };
        match codec::encode(&reply) {
            Ok(payload) => {
                if let Err(error) = self.ctx.nats.publish(reply_to, payload).await {
                    tracing::warn!(%error, "cannot send a command reply");
                }
            }
            Err(error) => tracing::error!(%error, "cannot encode a command reply"),
        }
    }

    async fn handle(
        &mut self,
        user: Option<&UserId>,
        command: RoomCommand,
        quotas: &RoomQuotas,
    ) -> Result<OkResult, RoomError> {
        let room = self.room.clone();
        match (command, user) {
            (RoomCommand::Create { private, title, .. }, user) => self.create(user, private, title, quotas).await,
            (RoomCommand::Members { .. }, None) => self.members().await,
            (RoomCommand::CanRead { .. }, None) => {
                if !self.room.is_dm() {
                    self.require_record().await?;
                }
                Ok(OkResult::RoomSeq { room, seq: self.tail().await?.seq })
            }
            (RoomCommand::SetMember { user: member, role, .. }, None) => {
                self.require_named_room()?;
                self.require_record().await?;
                self.set_member(&member, role, quotas).await?;
                Ok(OkResult::Room { room })
            }
            (RoomCommand::Kick { user: member, .. }, None) => {
                self.require_named_room()?;
                self.require_record().await?;
                self.remove_member(&member, None).await?;
                Ok(OkResult::Room { room })
            }
            (_, None) => Err(refused(ErrorCode::Forbidden, "this operation needs a user")),
            (RoomCommand::Join { grants, .. }, Some(user)) => self.join(user, &grants, quotas).await,
            (RoomCommand::CanRead { grants, .. }, Some(user)) => {
                self.require_reader(user, &grants).await?;
                Ok(OkResult::RoomSeq { room, seq: self.tail().await?.seq })
            }
            (RoomCommand::Members { .. }, Some(user)) => {
                self.require_reader(user, &[]).await?;
                self.members().await
            }
            (RoomCommand::Send { body, attrs, reply_to, cmid, .. }, Some(user)) => {
                self.send(user, body, attrs, reply_to, cmid).await
            }
            (RoomCommand::Leave { .. }, Some(user)) => {
                self.require_named_room()?;
                if self.role_of(user).await?.is_none() {
                    return Err(refused(ErrorCode::NotFound, format!("{user} is not a member of room {room}")));
                }
                self.remove_member(user, None).await?;
                Ok(OkResult::Room { room })
            }
            (RoomCommand::Invite { user: member, .. }, Some(user)) => {
                self.require_named_room()?;
                self.require_admin(user).await?;
                if self.role_of(&member).await?.is_none() {
                    self.set_member(&member, Role::Member, quotas).await?;
                }
                Ok(OkResult::Room { room })
            }
            (RoomCommand::Kick { user: member, .. }, Some(user)) => {
                self.require_named_room()?;
                self.require_admin(user).await?;
                if self.role_of(&member).await?.is_none() {
                    return Err(refused(ErrorCode::NotFound, format!("{member} is not a member of room {room}")));
                }
                self.remove_member(&member, Some(user.clone())).await?;
                Ok(OkResult::Room { room })
            }
            (RoomCommand::SetMember { .. }, Some(_)) => {
                Err(refused(ErrorCode::Forbidden, "roles are set by the tenant's backend"))
            }
            (RoomCommand::Typing { .. }, Some(user)) => {
                self.typing(user).await?;
                Ok(OkResult::Empty {})
            }
            (RoomCommand::Read { seq, .. }, Some(user)) => self.read(user, seq).await,
            (RoomCommand::React { target, emoji, remove, .. }, Some(user)) => {
                self.require_member(user).await?;
                self.require_message(target).await?;
                let body = EventBody::Reaction { target, user: user.clone(), emoji, removed: remove };
                let seq = self.append(body, None).await?.event().seq;
                Ok(OkResult::RoomSeq { room, seq })
            }
            (RoomCommand::Edit { target, body, .. }, Some(user)) => {
                self.require_member(user).await?;
                let facts = self.require_message(target).await?;
                if &facts.author != user {
                    return Err(refused(ErrorCode::Forbidden, "only a message's author may edit it"));
                }
                let seq = self.append(EventBody::Edit { target, from: user.clone(), body }, None).await?.event().seq;
                Ok(OkResult::RoomSeq { room, seq })
            }
            (RoomCommand::Delete { target, .. }, Some(user)) => {
                let role = self.require_member(user).await?;
                let facts = self.require_message(target).await?;
                if &facts.author != user && role != Role::Admin {
                    return Err(refused(ErrorCode::Forbidden, "only a message's author or a room admin may delete it"));
                }
                let seq = self.append(EventBody::Delete { target, by: user.clone() }, None).await?.event().seq;
                Ok(OkResult::RoomSeq { room, seq })
            }
        }
    }

    fn require_named_room(&self) -> Result<(), RoomError> {
        if self.room.is_dm() {
            return Err(refused(ErrorCode::BadRequest, "direct-message rooms have a fixed membership"));
        }
        Ok(())
    }

    async fn require_record(&mut self) -> Result<RoomRecord, RoomError> {
        self.load_record()
            .await?
            .ok_or_else(|| refused(ErrorCode::NotFound, format!("room {} does not exist", self.room)))
    }

    async fn create(
        &mut self,
        user: Option<&UserId>,
        private: bool,
        title: Option<String>,
        quotas: &RoomQuotas,
    ) -> Result<OkResult, RoomError> {
        self.require_named_room()?;
        if let Some(user) = user {
            if quotas.backend_creates_rooms {
                return Err(refused(ErrorCode::Forbidden, "rooms of this tenant are created by its backend"));
            }
            // The creator becomes a member: refuse before the room exists rather than leave it without an admin.
            self.admit(user, quotas).await?;
        }
        if let Some(cap) = quotas.rooms_per_tenant {
            let rooms = memberships::tenant_rooms(&self.ctx, &self.tenant).await.map_err(RoomError::Unavailable)?;
            if rooms >= cap {
                let message = format!("room {} cannot be created: the tenant has its quota of {cap} rooms", self.room);
                return Err(refused(ErrorCode::Forbidden, message));
            }
        }
        let record = RoomRecord {
            v: INTERNAL_VERSION,
            private,
            title,
            created_by: user.cloned(),
            created_at_ms: now_us() / 1000,
        };
        let payload = codec::encode(&record).map_err(|e| unavailable("encode room", e))?;
        match self.ctx.rooms.create(subjects::room_key(&self.tenant, &self.room), payload).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                return Err(refused(ErrorCode::Conflict, format!("room {} already exists", self.room)));
            }
            Err(e) => return Err(unavailable("create room", e)),
        }
        self.record = Some(Some(record));
        self.created_here = true;
        if let Some(user) = user {
            self.set_member(user, Role::Admin, quotas).await?;
        }
        Ok(OkResult::Room { room: self.room.clone() })
    }

    async fn join(&mut self, user: &UserId, grants: &[String], quotas: &RoomQuotas) -> Result<OkResult, RoomError> {
        let room = self.room.clone();
        if self.role_of(user).await?.is_some() {
            return Ok(OkResult::RoomSeq { room, seq: self.tail().await?.seq });
        }
        if self.room.is_dm() {
            return Err(refused(ErrorCode::Forbidden, format!("{user} is not a participant of {room}")));
        }
        let seq = match self.load_record().await? {
            None => {
                // A missing room is created public by its first joiner, who becomes its admin.
                match self.create(Some(user), false, None, quotas).await {
                    Ok(_) => self.tail().await?.seq,
                    // Created concurrently through another path: join it as it is.
                    Err(RoomError::Refused(ErrorCode::Conflict, _)) => {
                        self.record = None;
                        return Box::pin(self.join(user, grants, quotas)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            Some(record) => {
                if record.private && !granted(grants, &room) {
                    return Err(refused(
                        ErrorCode::Forbidden,
                        format!("room {room} is private and {user} is not a member"),
                    ));
                }
                self.set_member(user, Role::Member, quotas).await?
            }
        };
        Ok(OkResult::RoomSeq { room, seq })
    }

    /// Members may read a room, and so may anyone of the tenant when the room is public (or granted).
    async fn require_reader(&mut self, user: &UserId, grants: &[String]) -> Result<(), RoomError> {
        if self.role_of(user).await?.is_some() {
            return Ok(());
        }
        let allowed = match self.room.is_dm() {
            true => false,
            false => {
                let record = self.require_record().await?;
                !record.private || granted(grants, &self.room)
            }
        };
        if !allowed {
            return Err(refused(ErrorCode::Forbidden, format!("{user} may not read room {}", self.room)));
        }
        Ok(())
    }

    async fn members(&mut self) -> Result<OkResult, RoomError> {
        let members = match self.room.dm_participants() {
            Some((a, b)) => vec![
                Member { user: a, role: Role::Member, online: false },
                Member { user: b, role: Role::Member, online: false },
            ],
            None => {
                self.require_record().await?;
                let roster = self.roster().await?;
                roster
                    .members
                    .iter()
                    .map(|(user, role)| Member { user: user.clone(), role: *role, online: false })
                    .collect()
            }
        };
        Ok(OkResult::Members { members })
    }

    async fn send(
        &mut self,
        user: &UserId,
        body: String,
        attrs: Option<serde_json::Value>,
        reply_to: Option<u64>,
        cmid: Option<ClientMessageId>,
    ) -> Result<OkResult, RoomError> {
        self.require_member(user).await?;
        let tail = self.tail().await?;
        if reply_to.is_some_and(|seq| seq == 0 || seq > tail.seq) {
            return Err(refused(ErrorCode::BadRequest, "reply_to must be the seq of an earlier event of the room"));
        }
        if self.room.is_dm() && tail.seq == 0 {
            // The conversation's first message: list it among both participants' rooms.
            if let Some((a, b)) = self.room.dm_participants() {
                for participant in [a, b] {
                    if self.membership(&participant).await?.is_none() {
                        self.put_membership(&participant, UserRoom { role: Role::Member, read: 0 }).await?;
                    }
                }
            }
        }
        let msg =
            EventBody::Msg { id: MessageId::generate(now_us() / 1000), from: user.clone(), body, attrs, reply_to };
        let dedupe = cmid.map(|cmid| subjects::cmid_dedupe_id(&self.tenant, user, &cmid));
        let appended = self.append(msg, dedupe).await?;
        let event = appended.event();
        match &event.body {
            // A repeated cmid answers the first ok, which names the room the first send went to.
            EventBody::Msg { id, .. } => {
                Ok(OkResult::Sent { room: event.room.clone(), id: id.clone(), seq: event.seq, ts: event.ts_ms() })
            }
            EventBody::Edit { .. }
            | EventBody::Delete { .. }
            | EventBody::Reaction { .. }
            | EventBody::Joined { .. }
            | EventBody::Left { .. } => {
                Err(refused(ErrorCode::Conflict, "cmid was already used for another kind of op"))
            }
        }
    }

    async fn typing(&mut self, user: &UserId) -> Result<(), RoomError> {
        if self.role_of(user).await?.is_none() {
            return Ok(());
        }
        let now = Instant::now();
        if self.typing.get(user).is_some_and(|last| now.duration_since(*last) < TYPING_INTERVAL) {
            return Ok(());
        }
        self.typing.retain(|_, last| now.duration_since(*last) < TYPING_INTERVAL);
        self.typing.insert(user.clone(), now);
        self.publish_live(&LiveMessage::Typing { room: self.room.clone(), user: user.clone() }).await;
        Ok(())
    }

    async fn read(&mut self, user: &UserId, seq: u64) -> Result<OkResult, RoomError> {
        self.require_member(user).await?;
        let tail = self.tail().await?;
        if seq > tail.seq {
            return Err(refused(ErrorCode::BadRequest, format!("seq {seq} is past the room's last seq {}", tail.seq)));
        }
        let room = self.room.clone();
        let role = self.role_of(user).await?.unwrap_or(Role::Member);
        let mut entry = self.membership(user).await?.unwrap_or(UserRoom { role, read: 0 });
        let moved = seq > entry.read;
        if moved {
            entry.read = seq;
            self.put_membership(user, entry).await?;
        }
        let marker = entry.read;
        if moved {
            self.publish_live(&LiveMessage::Read { room: room.clone(), user: user.clone(), seq }).await;
        }
        Ok(OkResult::RoomSeq { room, seq: marker })
    }

    /// Make `user` a member with `role` (or change the role); a new membership is sequenced as `joined`. Returns
    /// the room's last seq afterwards.
    async fn set_member(&mut self, user: &UserId, role: Role, quotas: &RoomQuotas) -> Result<u64, RoomError> {
        let mut roster = self.roster().await?;
        if !roster.members.contains_key(user) {
            self.admit(user, quotas).await?;
        }
        let new_member = roster.members.insert(user.clone(), role).is_none();
        self.save_roster(roster).await?;
        let read = self.membership(user).await?.map_or(0, |entry| entry.read);
        self.put_membership(user, UserRoom { role, read }).await?;
        if new_member {
            return Ok(self.append(EventBody::Joined { user: user.clone() }, None).await?.event().seq);
        }
        Ok(self.tail().await?.seq)
    }

    /// May `user` become a member, within the room's and the user's quotas? Counts the user's rooms (one request).
    async fn admit(&mut self, user: &UserId, quotas: &RoomQuotas) -> Result<(), RoomError> {
        let members = self.roster().await?.members.len();
        let rooms = memberships::count(&self.ctx, &self.tenant, user).await.map_err(RoomError::Unavailable)?;
        match quota_refusal(members, rooms, quotas) {
            Some(message) => {
                Err(refused(ErrorCode::Forbidden, format!("{user} cannot join room {}: {message}", self.room)))
            }
            None => Ok(()),
        }
    }

    /// End `user`'s membership; sequenced as `left` (with `by` for a kick).
    ///
    /// The event comes first: once `left` is in the stream every session of the user stops receiving the room at
    /// it, whatever fails afterwards. Then the user's rooms record, then the roster. A step that fails answers
    /// `unavailable` with the user still on the roster, so the client's retry runs the whole change again; the
    /// `left` is appended with an id derived from the roster's revision, so the retry finds the first `left` in the
    /// stream's duplicate window instead of appending a second one.
    async fn remove_member(&mut self, user: &UserId, by: Option<UserId>) -> Result<(), RoomError> {
        if !self.roster().await?.members.contains_key(user) {
            return Err(refused(ErrorCode::NotFound, format!("{user} is not a member of room {}", self.room)));
        }
        let revision = self.roster.as_ref().and_then(|(_, revision)| *revision).unwrap_or(0);
        let dedupe = subjects::left_dedupe_id(&self.tenant, &self.room, user, revision);
        self.append(EventBody::Left { user: user.clone(), by }, Some(dedupe)).await?;
        memberships::remove(&self.ctx, &self.tenant, user, &self.room)
            .await
            .map_err(|e| RoomError::Unavailable(e.to_string()))?;
        // A fenced append drops the cached roster: remove the user from the roster as it is now.
        let mut roster = self.roster().await?;
        if roster.members.remove(user).is_some() {
            self.save_roster(roster).await?;
        }
        Ok(())
    }

    async fn load_record(&mut self) -> Result<Option<RoomRecord>, RoomError> {
        if let Some(record) = &self.record {
            return Ok(record.clone());
        }
        let record = match latest_value(&self.ctx.rooms, &subjects::room_key(&self.tenant, &self.room)).await {
            Ok(Some(bytes)) => Some(codec::decode::<RoomRecord>(&bytes).map_err(|e| unavailable("room record", e))?),
            Ok(None) => None,
            Err(e) => return Err(unavailable("read room", e)),
        };
        self.record = Some(record.clone());
        Ok(record)
    }

    async fn roster(&mut self) -> Result<Roster, RoomError> {
        if let Some((roster, _)) = &self.roster {
            return Ok(roster.clone());
        }
        let key = subjects::roster_key(&self.tenant, &self.room);
        let (roster, revision) = match latest_entry(&self.ctx.rooms, &key).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                (codec::decode::<Roster>(&entry.value).map_err(|e| unavailable("roster", e))?, Some(entry.revision))
            }
            Ok(Some(entry)) => (Roster { v: INTERNAL_VERSION, ..Roster::default() }, Some(entry.revision)),
            Ok(None) => (Roster { v: INTERNAL_VERSION, ..Roster::default() }, None),
            Err(e) => return Err(unavailable("read roster", e)),
        };
        self.roster = Some((roster.clone(), revision));
        Ok(roster)
    }

    /// Store `roster` by compare-and-set on the revision it was read at. A conflict means another router shard
    /// wrote the room meanwhile (this one was paused past its lease, or is the new owner of a paused one): nothing
    /// was written, every cached fact of the room is dropped, and the command answers `unavailable` so its client
    /// repeats it against the room's true state.
    async fn save_roster(&mut self, roster: Roster) -> Result<(), RoomError> {
        let payload = codec::encode(&roster).map_err(|e| unavailable("encode roster", e))?;
        let key = subjects::roster_key(&self.tenant, &self.room);
        let revision = self.roster.as_ref().and_then(|(_, revision)| *revision);
        let written = match revision {
            Some(revision) => self.ctx.rooms.update(key, payload, revision).await.map_err(|e| {
                let conflict = e.kind() == kv::UpdateErrorKind::WrongLastRevision;
                (conflict, e.to_string())
            }),
            None => self.ctx.rooms.create(key, payload).await.map_err(|e| {
                let conflict = e.kind() == kv::CreateErrorKind::AlreadyExists;
                (conflict, e.to_string())
            }),
        };
        match written {
            Ok(revision) => {
                self.roster = Some((roster, Some(revision)));
                Ok(())
            }
            Err((conflict, error)) => {
                self.forget();
                if conflict {
                    metrics::counter!("switchyard_router_roster_conflicts_total").increment(1);
                    tracing::info!(tenant = %self.tenant, room = %self.room, "roster changed by another writer");
                    return Err(RoomError::Unavailable("the room's members changed meanwhile; retry".into()));
                }
                Err(unavailable("store roster", error))
            }
        }
    }

    /// Drop every cached fact of the room; the next command reads them again.
    fn forget(&mut self) {
        self.tail = None;
        self.record = None;
        self.roster = None;
        self.messages.clear();
    }

    /// The user's membership entry in this room (role and read marker), as listed by `rooms`.
    async fn membership(&self, user: &UserId) -> Result<Option<UserRoom>, RoomError> {
        memberships::get(&self.ctx, &self.tenant, user, &self.room).await.map_err(RoomError::Unavailable)
    }

    async fn put_membership(&self, user: &UserId, entry: UserRoom) -> Result<(), RoomError> {
        memberships::put(&self.ctx, &self.tenant, user, &self.room, entry).await.map_err(RoomError::Unavailable)
    }

    async fn role_of(&mut self, user: &UserId) -> Result<Option<Role>, RoomError> {
        if let Some((a, b)) = self.room.dm_participants() {
            return Ok((user == &a || user == &b).then_some(Role::Member));
        }
        if let Some(role) = self.roster().await?.members.get(user).copied() {
            return Ok(Some(role));
        }
        // Not a member by the cached roster; it may be stale if another router shard wrote the room (a paused
        // owner that resumed), so read it again before answering.
        self.roster = None;
        Ok(self.roster().await?.members.get(user).copied())
    }

    async fn require_member(&mut self, user: &UserId) -> Result<Role, RoomError> {
        self.role_of(user)
            .await?
            .ok_or_else(|| refused(ErrorCode::Forbidden, format!("{user} is not a member of room {}", self.room)))
    }

    async fn require_admin(&mut self, user: &UserId) -> Result<(), RoomError> {
        match self.role_of(user).await? {
            Some(Role::Admin) => Ok(()),
            _ => Err(refused(ErrorCode::Forbidden, format!("only admins of room {} may do that", self.room))),
        }
    }

    /// The message `target` of this room, which must exist and not be deleted.
    async fn require_message(&mut self, target: u64) -> Result<MessageFacts, RoomError> {
        let tail = self.tail().await?;
        let missing = || refused(ErrorCode::NotFound, format!("no message with seq {target} in room {}", self.room));
        if target == 0 || target > tail.seq {
            return Err(missing());
        }
        let facts = match self.messages.get(&target) {
            Some(facts) => facts.clone(),
            None => {
                let facts = self.ask_history(target).await?.ok_or_else(missing)?;
                self.remember(target, facts.clone());
                facts
            }
        };
        if facts.deleted {
            return Err(refused(ErrorCode::NotFound, format!("message {target} was deleted")));
        }
        Ok(facts)
    }

    /// Ask the persistors about message `target` (they wait until their store holds it).
    async fn ask_history(&self, target: u64) -> Result<Option<MessageFacts>, RoomError> {
        let request = HistoryRequest {
            v: INTERNAL_VERSION,
            tenant: self.tenant.clone(),
            room: self.room.clone(),
            before: None,
            after: Some(target - 1),
            limit: 1,
            min_seq: target,
        };
        let payload = codec::encode(&request).map_err(|e| unavailable("encode history request", e))?;
        let reply =
            tokio::time::timeout(Duration::from_secs(5), self.ctx.nats.request(subjects::HISTORY_SUBJECT, payload))
                .await
                .map_err(|_| unavailable("history", "no persistor answered in time"))?
                .map_err(|e| unavailable("history", e))?;
        match codec::decode::<HistoryReply>(&reply.payload).map_err(|e| unavailable("history reply", e))? {
            HistoryReply::Ok { messages, .. } => Ok(messages
                .into_iter()
                .find(|m| m.seq == target)
                .map(|m| MessageFacts { author: m.from, deleted: m.deleted })),
            HistoryReply::Err { message, .. } => Err(unavailable("history", message)),
        }
    }

    /// Ask the persistors for the room's last stored event: (seq, ts_us), (0, 0) for a room that never had one.
    /// While no persistor listens (they are starting or restarting) the question is repeated, with backoff, for up
    /// to [`HEAD_PATIENCE`]; then the command answers `unavailable`: a room never restarts at seq 1 by guessing.
    async fn ask_head(&self) -> Result<(u64, u64), RoomError> {
        let request = RoomHeadRequest { v: INTERNAL_VERSION, tenant: self.tenant.clone(), room: self.room.clone() };
        let payload = codec::encode(&request).map_err(|e| unavailable("encode room head request", e))?;
        let deadline = tokio::time::Instant::now() + HEAD_PATIENCE;
        let mut backoff = Duration::from_millis(50);
        let reply = loop {
            let asked =
                tokio::time::timeout_at(deadline, self.ctx.nats.request(subjects::ROOM_HEAD_SUBJECT, payload.clone()))
                    .await
                    .map_err(|_| unavailable("room head", "no persistor answered in time"))?;
            match asked {
                Ok(reply) => break reply,
                Err(e)
                    if e.kind() == async_nats::client::RequestErrorKind::NoResponders
                        && tokio::time::Instant::now() + backoff < deadline =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(unavailable("room head", e)),
            }
        };
        match codec::decode::<RoomHeadReply>(&reply.payload).map_err(|e| unavailable("room head reply", e))? {
            RoomHeadReply::Ok { last_seq, last_ts_us } => {
                if last_seq > 0 {
                    metrics::counter!("switchyard_router_heads_from_store_total").increment(1);
                    tracing::info!(tenant = %self.tenant, room = %self.room, last_seq, "room continued from the history store");
                }
                Ok((last_seq, last_ts_us))
            }
            RoomHeadReply::Err { message, .. } => Err(unavailable("room head", message)),
        }
    }

    fn remember(&mut self, seq: u64, facts: MessageFacts) {
        if self.messages.len() >= MESSAGE_FACTS_KEPT {
            self.messages.clear();
        }
        self.messages.insert(seq, facts);
    }

    /// The room's last event, loading it from the stream when not known.
    async fn tail(&mut self) -> Result<Tail, RoomError> {
        if let Some(tail) = self.tail {
            return Ok(tail);
        }
        let tail = match self.ctx.events.get_last_raw_message_by_subject(&self.log_subject).await {
            Ok(message) => {
                let event: RoomEvent = codec::decode(&message.payload).map_err(|e| unavailable("last event", e))?;
                Tail { seq: event.seq, stream_seq: message.sequence, ts_us: event.ts_us }
            }
            // The stream holds none of the room's events: the room is new, or its events aged out of the stream
            // (or were purged). The history store keeps the room's head for good; the fence is "no event on the
            // room's subject", so two writers that both find it empty still cannot both append.
            Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                let (seq, ts_us) = if self.created_here { (0, 0) } else { self.ask_head().await? };
                Tail { seq, stream_seq: 0, ts_us }
            }
            Err(e) => return Err(unavailable("read the room's last event", e)),
        };
        self.tail = Some(tail);
        Ok(tail)
    }

    /// Publish to whoever listens live: the room's subject, or both inboxes of a direct-message room.
    async fn publish_live(&self, message: &LiveMessage) {
        let payload = match codec::encode(message) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%error, "cannot encode a live message");
                return;
            }
        };
        let targets = match self.room.dm_participants() {
            Some((a, b)) => vec![subjects::user_inbox(&self.tenant, &a), subjects::user_inbox(&self.tenant, &b)],
            None => vec![subjects::room_live(&self.tenant, &self.room)],
        };
        for subject in targets {
            if let Err(error) = self.ctx.nats.publish(subject, payload.clone()).await {
                // Sequenced events are durable; gateways that miss one live recover it from the stream.
                tracing::warn!(%error, "cannot publish a live message");
            }
        }
    }

    /// Sequence `body` as the room's next event: append it to the stream, fenced on the room's last stream
    /// sequence, and publish it live once acknowledged. A fence failure means another writer appended first; the
    /// tail is reloaded and the append retried with the next seq.
    async fn append(&mut self, body: EventBody, dedupe_id: Option<String>) -> Result<Appended, RoomError> {
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let tail = self.tail().await?;
            let event = RoomEvent {
                v: INTERNAL_VERSION,
                tenant: self.tenant.clone(),
                room: self.room.clone(),
                seq: tail.seq + 1,
                ts_us: now_us().max(tail.ts_us + 1),
                body: body.clone(),
            };
            let payload = codec::encode(&event).map_err(|e| unavailable("encode event", e))?;
            let mut publish = PublishMessage::build().payload(payload).expected_last_subject_sequence(tail.stream_seq);
            if let Some(id) = &dedupe_id {
                // Ids are validated types, so this cannot fail; if it did, the op is refused, nothing panics.
                let id = async_nats::HeaderValue::from_str(id)
                    .map_err(|e| refused(ErrorCode::BadRequest, format!("the op's id cannot be a header: {e}")))?;
                publish = publish.header(async_nats::header::NATS_MESSAGE_ID, id);
            }
            let started = std::time::Instant::now();
            let ack = match self.ctx.js.send_publish(self.log_subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            let outcome = match &ack {
                Ok(ack) if ack.duplicate => "duplicate",
                Ok(_) => "ok",
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => "fenced",
                Err(_) => "error",
            };
            metrics::histogram!("switchyard_router_publish_ack_duration_seconds", "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
            match ack {
                Ok(ack) if ack.duplicate => {
                    let original = self
                        .ctx
                        .events
                        .get_raw_message(ack.sequence)
                        .await
                        .map_err(|e| unavailable("read the original of a repeated cmid", e))?;
                    let original: RoomEvent =
                        codec::decode(&original.payload).map_err(|e| unavailable("decode original", e))?;
                    return Ok(Appended::Duplicate(original));
                }
                Ok(ack) => {
                    self.tail = Some(Tail { seq: event.seq, stream_seq: ack.sequence, ts_us: event.ts_us });
                    match &event.body {
                        EventBody::Msg { from, .. } => {
                            self.remember(event.seq, MessageFacts { author: from.clone(), deleted: false })
                        }
                        EventBody::Delete { target, .. } => {
                            if let Some(facts) = self.messages.get_mut(target) {
                                facts.deleted = true;
                            }
                        }
                        EventBody::Edit { .. }
                        | EventBody::Reaction { .. }
                        | EventBody::Joined { .. }
                        | EventBody::Left { .. } => {}
                    }
                    metrics::counter!("switchyard_router_events_appended_total").increment(1);
                    self.publish_live(&LiveMessage::Event(event.clone())).await;
                    return Ok(Appended::New(event));
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    tracing::info!(tenant = %self.tenant, room = %self.room, "fenced: another writer appended; reloading");
                    metrics::counter!("switchyard_router_fenced_total").increment(1);
                    // Another writer may also have changed the members: what this actor checked is stale. Read
                    // everything again, and append for a user only if the user is still a member.
                    self.forget();
                    if let Some(author) = author(&body) {
                        self.require_member(&author).await?;
                    }
                }
                Err(e) => {
                    // The append may or may not have been stored: reload before the next one.
                    self.tail = None;
                    return Err(unavailable("append to the events stream", e));
                }
            }
        }
        Err(RoomError::Unavailable("the room is being written by another router shard; retry".into()))
    }
}

/// The user an event is written for, when it needs that user to be a member.
fn author(body: &EventBody) -> Option<UserId> {
    match body {
        EventBody::Msg { from, .. } | EventBody::Edit { from, .. } => Some(from.clone()),
        EventBody::Reaction { user, .. } => Some(user.clone()),
        EventBody::Delete { by, .. } => Some(by.clone()),
        EventBody::Joined { .. } | EventBody::Left { .. } => None,
    }
}

/// Does a token's `rooms` claim allow `room`? Entries are room ids or prefixes ending in `*`.
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

fn granted(grants: &[String], room: &RoomId) -> bool {
    grants.iter().any(|grant| match grant.strip_suffix('*') {
        Some(prefix) => room.as_str().starts_with(prefix),
        None => grant == room.as_str(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_match_exact_ids_and_prefixes() {
        let room = RoomId::parse("team-red").unwrap();
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
}
