//! The room actor: one task per active room, the only writer of that room's sequence while its router shard owns the
//! room's shard. It checks membership, assigns `seq`, appends the event to the events stream with a fence on the
//! room's last stream sequence, and publishes the event live only after JetStream has acknowledged it.
//!
//! It does not decide shard ownership (see `leases`) and does not talk to clients (gateways do).

use crate::context::RouterContext;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::Subject;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchyard_protocol::client::{OkResult, Role};
use switchyard_protocol::codec;
use switchyard_protocol::internal::{
    CommandReply, EventBody, MemberRecord, RoomCommand, RoomEvent, RoomRecord, INTERNAL_VERSION,
};
use switchyard_protocol::{subjects, ErrorCode, MessageId, ProjectId, RoomId, ShardId, UserId};
use tokio::sync::mpsc;

/// One command for a room, with where to send the answer.
pub(crate) struct RoomJob {
    pub user: UserId,
    pub command: RoomCommand,
    pub reply_to: Subject,
}

/// Why a command failed; each maps to a protocol error code.
#[derive(Debug, thiserror::Error)]
enum RoomError {
    #[error("{0}")]
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

/// A room's actor state. Everything here is a cache of what the stream and the rooms bucket hold, rebuilt on demand.
pub(crate) struct RoomActor {
    ctx: Arc<RouterContext>,
    tenant: ProjectId,
    room: RoomId,
    /// The room's subject in the events stream.
    log_subject: String,
    /// The room's live subject.
    live_subject: String,
    /// The room's last event, once loaded; `None` forces a reload from the stream before the next append.
    tail: Option<Tail>,
    /// The room's record once loaded; `Some(None)` means the room does not exist.
    record: Option<Option<RoomRecord>>,
    /// Memberships looked up so far: `Some(role)` for a member, `None` for a known non-member. This actor is the
    /// only writer of its room's memberships, so the cache stays true while it lives.
    members: HashMap<UserId, Option<Role>>,
}

impl RoomActor {
    pub fn new(ctx: Arc<RouterContext>, shard: ShardId, tenant: ProjectId, room: RoomId) -> Self {
        RoomActor {
            log_subject: subjects::event_log(shard, &tenant, &room),
            live_subject: subjects::room_live(&tenant, &room),
            ctx,
            tenant,
            room,
            tail: None,
            record: None,
            members: HashMap::new(),
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
        let reply = match self.handle(&job.user, job.command).await {
            Ok(result) => CommandReply::Ok { result },
            Err(error) => {
                if matches!(error, RoomError::Unavailable(_)) {
                    tracing::warn!(tenant = %self.tenant, room = %self.room, %error, "command failed");
                }
                error.reply()
            }
        };
        match codec::encode(&reply) {
            Ok(payload) => {
                if let Err(error) = self.ctx.nats.publish(job.reply_to, payload).await {
                    tracing::warn!(%error, "cannot send a command reply");
                }
            }
            Err(error) => tracing::error!(%error, "cannot encode a command reply"),
        }
    }

    async fn handle(&mut self, user: &UserId, command: RoomCommand) -> Result<OkResult, RoomError> {
        match command {
            RoomCommand::Create { room: _, private, title } => self.create(user, private, title).await,
            RoomCommand::Join { room: _, grants } => self.join(user, &grants).await,
            RoomCommand::CanRead { room: _, grants } => self.can_read(user, &grants).await,
            RoomCommand::Send { room: _, body, attrs, reply_to, cmid } => {
                self.require_member(user).await?;
                let ts_hint = now_us() / 1000;
                let msg =
                    EventBody::Msg { id: MessageId::generate(ts_hint), from: user.clone(), body, attrs, reply_to };
                let dedupe = cmid.map(|cmid| format!("{}:{}:{}", self.tenant, user, cmid));
                let appended = self.append(msg, dedupe).await?;
                let event = appended.event();
                match &event.body {
                    EventBody::Msg { id, .. } => Ok(OkResult::Sent {
                        room: self.room.clone(),
                        id: id.clone(),
                        seq: event.seq,
                        ts: event.ts_ms(),
                    }),
                    _ => Err(RoomError::Refused(
                        ErrorCode::Conflict,
                        "cmid was already used for another kind of op".into(),
                    )),
                }
            }
        }
    }

    async fn create(&mut self, user: &UserId, private: bool, title: Option<String>) -> Result<OkResult, RoomError> {
        if self.room.is_dm() {
            return Err(RoomError::Refused(
                ErrorCode::BadRequest,
                "direct-message rooms are created by the server through dm".into(),
            ));
        }
        let record = RoomRecord {
            v: INTERNAL_VERSION,
            private,
            title,
            created_by: user.clone(),
            created_at_ms: now_us() / 1000,
        };
        let payload = codec::encode(&record).map_err(|e| unavailable("encode room", e))?;
        match self.ctx.rooms.create(subjects::room_key(&self.tenant, &self.room), payload).await {
            Ok(_) => {}
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                return Err(RoomError::Refused(ErrorCode::Conflict, format!("room {} already exists", self.room)));
            }
            Err(e) => return Err(unavailable("create room", e)),
        }
        self.record = Some(Some(record));
        self.add_member(user, Role::Admin).await?;
        Ok(OkResult::Room { room: self.room.clone() })
    }

    async fn join(&mut self, user: &UserId, grants: &[String]) -> Result<OkResult, RoomError> {
        if self.room.is_dm() {
            self.require_member(user).await?;
            let tail = self.tail().await?;
            return Ok(OkResult::RoomSeq { room: self.room.clone(), seq: tail.seq });
        }
        if self.role_of(user).await?.is_some() {
            let tail = self.tail().await?;
            return Ok(OkResult::RoomSeq { room: self.room.clone(), seq: tail.seq });
        }
        let seq = match self.load_record().await? {
            None => {
                // A missing room is created public by its first joiner, who becomes its admin.
                match self.create(user, false, None).await {
                    Ok(_) => {}
                    // Created concurrently through another path: join it as it is.
                    Err(RoomError::Refused(ErrorCode::Conflict, _)) => {
                        self.record = None;
                        return Box::pin(self.join(user, grants)).await;
                    }
                    Err(e) => return Err(e),
                }
                self.tail().await?.seq
            }
            Some(record) => {
                if record.private && !granted(grants, &self.room) {
                    return Err(RoomError::Refused(
                        ErrorCode::Forbidden,
                        format!("room {} is private and {user} is not a member", self.room),
                    ));
                }
                self.add_member(user, Role::Member).await?
            }
        };
        Ok(OkResult::RoomSeq { room: self.room.clone(), seq })
    }

    /// Members may read a room, and so may anyone of the tenant when the room is public (or granted).
    async fn can_read(&mut self, user: &UserId, grants: &[String]) -> Result<OkResult, RoomError> {
        let allowed = if self.room.is_dm() {
            self.role_of(user).await?.is_some()
        } else {
            match self.load_record().await? {
                None => {
                    return Err(RoomError::Refused(ErrorCode::NotFound, format!("room {} does not exist", self.room)))
                }
                Some(record) => !record.private || granted(grants, &self.room) || self.role_of(user).await?.is_some(),
            }
        };
        if !allowed {
            return Err(RoomError::Refused(ErrorCode::Forbidden, format!("{user} may not read room {}", self.room)));
        }
        let tail = self.tail().await?;
        Ok(OkResult::RoomSeq { room: self.room.clone(), seq: tail.seq })
    }

    /// Record a membership and sequence its `joined` event; returns that event's seq.
    async fn add_member(&mut self, user: &UserId, role: Role) -> Result<u64, RoomError> {
        let record = MemberRecord { v: INTERNAL_VERSION, role };
        let payload = codec::encode(&record).map_err(|e| unavailable("encode member", e))?;
        self.ctx
            .rooms
            .put(subjects::member_key(&self.tenant, &self.room, user), payload)
            .await
            .map_err(|e| unavailable("store membership", e))?;
        self.members.insert(user.clone(), Some(role));
        let appended = self.append(EventBody::Joined { user: user.clone() }, None).await?;
        Ok(appended.event().seq)
    }

    async fn load_record(&mut self) -> Result<Option<RoomRecord>, RoomError> {
        if let Some(record) = &self.record {
            return Ok(record.clone());
        }
        let record = match self.ctx.rooms.get(subjects::room_key(&self.tenant, &self.room)).await {
            Ok(Some(bytes)) => Some(codec::decode::<RoomRecord>(&bytes).map_err(|e| unavailable("room record", e))?),
            Ok(None) => None,
            Err(e) => return Err(unavailable("read room", e)),
        };
        self.record = Some(record.clone());
        Ok(record)
    }

    async fn role_of(&mut self, user: &UserId) -> Result<Option<Role>, RoomError> {
        if let Some((a, b)) = self.room.dm_participants() {
            return Ok((user == &a || user == &b).then_some(Role::Member));
        }
        if let Some(role) = self.members.get(user) {
            return Ok(*role);
        }
        let role = match self.ctx.rooms.get(subjects::member_key(&self.tenant, &self.room, user)).await {
            Ok(Some(bytes)) => {
                Some(codec::decode::<MemberRecord>(&bytes).map_err(|e| unavailable("membership", e))?.role)
            }
            Ok(None) => None,
            Err(e) => return Err(unavailable("read membership", e)),
        };
        self.members.insert(user.clone(), role);
        Ok(role)
    }

    async fn require_member(&mut self, user: &UserId) -> Result<Role, RoomError> {
        self.role_of(user).await?.ok_or_else(|| {
            RoomError::Refused(ErrorCode::Forbidden, format!("{user} is not a member of room {}", self.room))
        })
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
            Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Tail { seq: 0, stream_seq: 0, ts_us: 0 }
            }
            Err(e) => return Err(unavailable("read the room's last event", e)),
        };
        self.tail = Some(tail);
        Ok(tail)
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
            let mut publish =
                PublishMessage::build().payload(payload.clone()).expected_last_subject_sequence(tail.stream_seq);
            if let Some(id) = &dedupe_id {
                publish = publish.message_id(id);
            }
            let ack = match self.ctx.js.send_publish(self.log_subject.clone(), publish).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
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
                    metrics::counter!("switchyard_router_events_appended_total").increment(1);
                    if let Err(error) = self.ctx.nats.publish(self.live_subject.clone(), payload).await {
                        // The event is durable; gateways that miss it live recover it from the stream.
                        tracing::warn!(%error, "cannot publish a live event");
                    }
                    return Ok(Appended::New(event));
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    tracing::info!(tenant = %self.tenant, room = %self.room, "fenced: another writer appended; reloading");
                    metrics::counter!("switchyard_router_fenced_total").increment(1);
                    self.tail = None;
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

/// Does a token's `rooms` claim allow `room`? Entries are room ids or prefixes ending in `*`.
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
}
