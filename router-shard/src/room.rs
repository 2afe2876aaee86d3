//! The room actor: one task per active room, the only writer of that room's sequence, roster and read markers while
//! its router shard owns the room's shard. It performs what `room_core` decides: loads the facts the rules ask for,
//! assigns `seq`, appends each event to the events stream with a fence on the room's last stream sequence, and
//! publishes it live only after JetStream has acknowledged it (on the room's live subject, or for a direct-message
//! room on both participants' inboxes).
//!
//! It holds no rule of its own (permissions, quotas and validation are `room_core`'s), does not decide shard
//! ownership (see `leases`), does not talk to clients (gateways do) and does not store history (persistors do; it
//! asks them about earlier messages).

use crate::context::RouterContext;
use crate::direct::{self, Ask};
use crate::memberships;
use crate::room_core::{
    self, Command, CommandFacts, Effect, Fact, MessageFacts, Refusal, Reply, RoomState, Stop, Tail,
};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::DeleteMessageErrorKind;
use async_nats::jetstream::ErrorCode as JetStreamCode;
use async_nats::Subject;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use switchyard_protocol::client::OkResult;
use switchyard_protocol::codec;
use switchyard_protocol::internal::{
    CommandReply, EventBody, HistoryReply, HistoryRequest, LiveMessage, RoomCommand, RoomEvent, RoomHeadReply,
    RoomHeadRequest, RoomQuotas, RoomRecord, RoomTally, Roster, UserRoom, INTERNAL_VERSION,
};
use switchyard_protocol::{subjects, ErrorCode, MessageId, ProjectId, RoomId, ShardId, UserId};
use switchyard_service::nats::{compare_and_set, latest_entry, latest_value, CasError};
use tokio::sync::mpsc;
use tracing::Instrument as _;

/// One command for a room, with where to send the answer (`None` for commands that are never answered).
pub(crate) struct RoomJob {
    /// The acting user; `None` for the tenant's backend.
    pub user: Option<UserId>,
    pub command: RoomCommand,
    /// The tenant's quotas, as the gateway resolved them.
    pub quotas: RoomQuotas,
    /// The tenant's backend sent the command on behalf of `user`.
    pub by_backend: bool,
    pub reply_to: Option<Subject>,
    /// The trace context the command came with (`traceparent`), kept only while traces are on.
    pub trace: Option<async_nats::HeaderMap>,
}

/// Why a command failed; each maps to a protocol error code.
#[derive(Debug, thiserror::Error)]
enum RoomError {
    #[error("{message}")]
    Refused { code: ErrorCode, message: String, retry_after_ms: Option<u64> },
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),
}

impl From<Refusal> for RoomError {
    fn from(refusal: Refusal) -> Self {
        RoomError::Refused { code: refusal.code, message: refusal.message, retry_after_ms: refusal.retry_after_ms }
    }
}

impl RoomError {
    fn reply(&self) -> CommandReply {
        match self {
            RoomError::Refused { code, message, retry_after_ms } => CommandReply::Err {
                code: *code,
                message: message.clone(),
                not_taken: false,
                retry_after_ms: *retry_after_ms,
            },
            RoomError::Unavailable(message) => CommandReply::err(ErrorCode::Unavailable, message.clone()),
        }
    }
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> RoomError {
    RoomError::Unavailable(format!("{what}: {error}"))
}

fn refused(code: ErrorCode, message: impl Into<String>) -> RoomError {
    RoomError::Refused { code, message: message.into(), retry_after_ms: None }
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

/// How a room actor waits for a persistor to answer its room-head question (see `ask_head`).
const HEAD_PATIENCE: Duration = Duration::from_secs(6);
/// How often one command is decided again because another writer changed its room meanwhile (created it, or
/// appended first).
const REDECISIONS: usize = 3;
/// Most events one read of an erasure's scan of the room's stream subject returns.
const ERASE_BATCH: usize = 256;
/// Reads of an erasure's scan that may find a replica behind the erasure before it gives up (100 ms apart).
const ERASE_LAGGING_READS: u32 = 30;
/// The answer when another writer keeps changing the room.
const WRITTEN_ELSEWHERE: &str = "the room is being written by another router shard; retry";

/// A room's actor: its I/O handles and what it knows of its room (a cache of what the stream and the rooms bucket
/// hold, rebuilt on demand; the rules that read it are in `room_core`).
pub(crate) struct RoomActor {
    ctx: Arc<RouterContext>,
    tenant: ProjectId,
    room: RoomId,
    /// The room's subject in the events stream.
    log_subject: String,
    /// The room's record, roster (with the revision of its entry: normally this actor is its only writer, but a
    /// stale owner paused past its lease may not be, so every write is a compare-and-set on that revision), last
    /// event, recent messages' facts and the typing throttle.
    state: RoomState,
    /// This actor created the room's record: an empty stream subject needs no question to the history store. The
    /// room never had an event, or it is a room created again once the `room_deleted` of the one before left the
    /// stream; its seqs then start again at 1 (the stores erase a deleted room by time, so nothing of the new one
    /// is dropped).
    created_here: bool,
}

impl RoomActor {
    pub fn new(ctx: Arc<RouterContext>, shard: ShardId, tenant: ProjectId, room: RoomId) -> Self {
        RoomActor {
            log_subject: subjects::event_log(shard, &tenant, &room),
            ctx,
            tenant,
            room,
            state: RoomState::default(),
            created_here: false,
        }
    }

    /// Serve jobs until the queue closes or the room stays idle for `idle`. Jobs already queued when the actor
    /// decides to stop are still served.
    pub async fn run(mut self, mut jobs: mpsc::Receiver<RoomJob>, idle: Duration) {
        loop {
            match tokio::time::timeout(idle, jobs.recv()).await {
                Ok(Some(job)) => self.serve(job).await,
                Ok(None) => return,
                // A member's slow-mode interval still runs: stay, so the room does not forget it.
                Err(_elapsed) if self.state.slow_mode_binds(Instant::now()) => {}
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
        let span = match &job.trace {
            Some(headers) => switchyard_service::trace::follow(
                tracing::info_span!(target: "switchyard::trace", "router command", op = job.command.name()),
                Some(headers),
            ),
            None => tracing::Span::none(),
        };
        let handled = self.handle(job.user.as_ref(), &job.command, &job.quotas, job.by_backend).instrument(span).await;
        let reply = match handled {
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

    /// Decide the command (loading the facts the rules ask for), perform the decision's effects in order, and
    /// build the reply.
    async fn handle(
        &mut self,
        user: Option<&UserId>,
        command: &RoomCommand,
        quotas: &RoomQuotas,
        by_backend: bool,
    ) -> Result<OkResult, RoomError> {
        let (tenant, room) = (self.tenant.clone(), self.room.clone());
        let message_id = MessageId::generate(now_us() / 1000);
        let mut facts = CommandFacts::default();
        let mut redecisions = 0;
        'decide: loop {
            let now_us = now_us();
            let input = Command {
                tenant: &tenant,
                room: &room,
                user,
                command,
                quotas,
                now: Instant::now(),
                now_us,
                message_id: &message_id,
                by_backend,
            };
            let decision = match room_core::decide(&self.state, &facts, &input) {
                Ok(decision) => decision,
                Err(Stop::Load(fact)) => {
                    self.load(fact, &mut facts).await?;
                    continue;
                }
                Err(Stop::Refuse(refusal)) => return Err(refusal.into()),
            };
            // What the room's events are stamped with: its own retention, loaded once, over the tenant's.
            let appends = decision.effects.iter().any(|effect| matches!(effect, Effect::Append { .. }));
            if appends && self.state.record.is_none() && !room.is_dm() {
                self.load_record().await?;
            }
            let retention = room_core::retention(self.state.record.as_ref().and_then(Option::as_ref), quotas);
            let mut appended = None;
            for effect in decision.effects {
                match effect {
                    Effect::CreateRecord { record, redecide } => {
                        if !self.create_record(record).await? {
                            if redecide && redecisions < REDECISIONS {
                                // Created concurrently through another path: decide again with the room as it is.
                                redecisions += 1;
                                self.state.record = None;
                                facts = CommandFacts::default();
                                continue 'decide;
                            }
                            return Err(refused(ErrorCode::Conflict, format!("room {room} already exists")));
                        }
                    }
                    Effect::SaveRoster(roster) => self.save_roster(roster).await?,
                    Effect::DropFromRoster(user) => {
                        let mut roster = self.roster().await?;
                        if roster.members.remove(&user).is_some() {
                            self.save_roster(roster).await?;
                        }
                    }
                    Effect::PutMembership(user, entry) => self.put_membership(&user, entry).await?,
                    Effect::RemoveMembership(user) => memberships::remove(&self.ctx, &self.tenant, &user, &self.room)
                        .await
                        .map_err(|e| RoomError::Unavailable(e.to_string()))?,
                    Effect::Append { body, dedupe_id } => match self.append(body, dedupe_id, retention).await? {
                        Some(event) => appended = Some(event),
                        // Fenced: another writer changed the room; decide again on the room as it is now (the
                        // effects before an authored append are idempotent).
                        None if redecisions < REDECISIONS => {
                            redecisions += 1;
                            facts = CommandFacts::default();
                            continue 'decide;
                        }
                        None => return Err(RoomError::Unavailable(WRITTEN_ELSEWHERE.into())),
                    },
                    Effect::MarkTyping { user, at } => self.state.mark_typing(user, at),
                    Effect::MarkSent { user, mark } => self.state.mark_sent(user, mark),
                    Effect::Publish(message) => self.publish_live(&message).await,
                    Effect::DeleteRoom => self.delete_room().await?,
                    Effect::EraseFromStream(user) => self.erase_from_stream(&user).await?,
                    Effect::PutRecord(record) => self.put_record(record).await?,
                }
            }
            return match decision.reply {
                Reply::Room => Ok(OkResult::Room { room }),
                Reply::TailSeq => Ok(OkResult::RoomSeq { room, seq: self.tail().await?.seq }),
                Reply::Seq(seq) => Ok(OkResult::RoomSeq { room, seq }),
                Reply::Sent => match &appended {
                    Some(appended) => room_core::sent(appended.event()).map_err(RoomError::from),
                    None => Err(RoomError::Unavailable("a send appended nothing".into())),
                },
                Reply::Members(members) => Ok(OkResult::Members { members }),
                Reply::Empty => Ok(OkResult::Empty {}),
            };
        }
    }

    /// Load a fact the rules asked for into the room's state or the command's facts.
    async fn load(&mut self, fact: Fact, facts: &mut CommandFacts) -> Result<(), RoomError> {
        match fact {
            Fact::Record => {
                self.load_record().await?;
            }
            Fact::Roster => {
                self.roster().await?;
                facts.roster_fresh = true;
            }
            Fact::FreshRoster => {
                self.state.roster = None;
                self.roster().await?;
                facts.roster_fresh = true;
            }
            Fact::Tail => {
                self.tail().await?;
            }
            Fact::Message(target) => match self.ask_history(target).await? {
                Some(message) => self.state.remember(target, message),
                None => {
                    facts.missing_messages.insert(target);
                }
            },
            Fact::Membership(user) => {
                let entry = self.membership(&user).await?;
                facts.memberships.insert(user, entry);
            }
            Fact::UserRooms(user) => {
                let rooms = memberships::count(&self.ctx, &self.tenant, &user)
                    .await
                    .map_err(|e| RoomError::Unavailable(e.to_string()))?;
                facts.user_rooms.insert(user, rooms);
            }
            Fact::MsgsAt(seq) => {
                self.state.searched(Instant::now());
                let msgs = self.msgs_at(seq).await?;
                facts.msgs_at.insert(seq, msgs);
            }
            Fact::TenantRooms => {
                let rooms = memberships::tenant_rooms(&self.ctx, &self.tenant)
                    .await
                    .map_err(|e| RoomError::Unavailable(e.to_string()))?;
                facts.tenant_rooms = Some(rooms);
            }
        }
        Ok(())
    }

    /// Create the room's record; `false` when it exists already.
    async fn create_record(&mut self, record: RoomRecord) -> Result<bool, RoomError> {
        let payload = codec::encode(&record).map_err(|e| unavailable("encode room", e))?;
        match compare_and_set(&self.ctx.rooms, &subjects::room_key(&self.tenant, &self.room), payload, None).await {
            Ok(_) => {}
            Err(CasError::Conflict) => return Ok(false),
            Err(e) => return Err(unavailable("create room", e)),
        }
        self.state.record = Some(Some(record));
        self.created_here = true;
        Ok(true)
    }

    async fn load_record(&mut self) -> Result<Option<RoomRecord>, RoomError> {
        if let Some(record) = &self.state.record {
            return Ok(record.clone());
        }
        let record = match latest_value(&self.ctx.rooms, &subjects::room_key(&self.tenant, &self.room)).await {
            Ok(Some(bytes)) => Some(codec::decode::<RoomRecord>(&bytes).map_err(|e| unavailable("room record", e))?),
            Ok(None) => None,
            Err(e) => return Err(unavailable("read room", e)),
        };
        self.state.record = Some(record.clone());
        Ok(record)
    }

    async fn roster(&mut self) -> Result<Roster, RoomError> {
        if let Some((roster, _)) = &self.state.roster {
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
        self.state.roster = Some((roster.clone(), revision));
        Ok(roster)
    }

    /// Store `roster` by compare-and-set on the revision it was read at. A conflict means another router shard
    /// wrote the room meanwhile (this one was paused past its lease, or is the new owner of a paused one): nothing
    /// was written, every cached fact of the room is dropped, and the command answers `unavailable` so its client
    /// repeats it against the room's true state.
    async fn save_roster(&mut self, roster: Roster) -> Result<(), RoomError> {
        let payload = codec::encode(&roster).map_err(|e| unavailable("encode roster", e))?;
        let key = subjects::roster_key(&self.tenant, &self.room);
        let revision = self.state.roster.as_ref().and_then(|(_, revision)| *revision);
        match compare_and_set(&self.ctx.rooms, &key, payload, revision).await {
            Ok(revision) => {
                self.state.roster = Some((roster, Some(revision)));
                Ok(())
            }
            Err(CasError::Conflict) => {
                self.state.forget();
                metrics::counter!("switchyard_router_roster_conflicts_total").increment(1);
                tracing::info!(tenant = %self.tenant, room = %self.room, "roster changed by another writer");
                Err(RoomError::Unavailable("the room's members changed meanwhile; retry".into()))
            }
            Err(error) => {
                self.state.forget();
                Err(unavailable("store roster", error))
            }
        }
    }

    /// The user's membership entry in this room (role and read marker), as listed by `rooms`.
    async fn membership(&self, user: &UserId) -> Result<Option<UserRoom>, RoomError> {
        memberships::get(&self.ctx, &self.tenant, user, &self.room)
            .await
            .map_err(|e| RoomError::Unavailable(e.to_string()))
    }

    async fn put_membership(&self, user: &UserId, entry: UserRoom) -> Result<(), RoomError> {
        memberships::put(&self.ctx, &self.tenant, user, &self.room, entry)
            .await
            .map_err(|e| RoomError::Unavailable(e.to_string()))
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
            thread: None,
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
                .map(|m| MessageFacts { deleted: m.deleted || m.from.is_none(), author: m.from })),
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

    /// The room's last event, loading it from the stream when not known.
    async fn tail(&mut self) -> Result<&Tail, RoomError> {
        if self.state.tail.is_some() {
            return self.state.tail.as_ref().ok_or_else(|| RoomError::Unavailable("the room's tail was lost".into()));
        }
        let tail = match self.ctx.events.get_last_raw_message_by_subject(&self.log_subject).await {
            Ok(message) => {
                let event: RoomEvent = codec::decode(&message.payload).map_err(|e| unavailable("last event", e))?;
                Tail { seq: event.seq, stream_seq: message.sequence, ts_us: event.ts_us, tally: event.tally_through() }
            }
            // The stream holds none of the room's events: the room is new, or its events aged out of the stream
            // (or were purged). The history store keeps the room's head for good; the fence is "no event on the
            // room's subject", so two writers that both find it empty still cannot both append.
            Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                let (seq, ts_us) = if self.created_here { (0, 0) } else { self.ask_head().await? };
                Tail { seq, stream_seq: 0, ts_us, tally: RoomTally::restarted(seq) }
            }
            Err(e) => return Err(unavailable("read the room's last event", e)),
        };
        Ok(self.state.loaded_tail(tail))
    }

    /// The room's message count as of `seq`, from the first event at or after it that the stream holds (found by
    /// a binary search over the room's stream subject, each step a read of the stream leader). Messages that left
    /// the stream before it are not counted.
    async fn msgs_at(&mut self, seq: u64) -> Result<u64, RoomError> {
        let tail = self.tail().await?;
        let (tail_msgs, tail_stream_seq) = (tail.tally.msgs, tail.stream_seq);
        let at_or_after = |sequence: u64| {
            let builder =
                self.ctx.events.raw_message_builder().sequence(sequence.max(1)).next_by_subject(&self.log_subject);
            async move {
                match builder.send().await {
                    Ok(message) => {
                        let event: RoomEvent =
                            codec::decode(&message.payload).map_err(|e| unavailable("decode an event", e))?;
                        Ok(Some((message.sequence, event)))
                    }
                    Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                        Ok(None)
                    }
                    Err(e) => Err(unavailable("read the room's events", e)),
                }
            }
        };
        let Some((first, mut found)) = at_or_after(1).await? else { return Ok(tail_msgs) };
        // The smallest stream sequence holding an event of the room with a seq of at least `seq`.
        let (mut low, mut high) = (first, tail_stream_seq.max(first));
        if found.seq < seq {
            while low < high {
                let middle = low + (high - low) / 2;
                match at_or_after(middle).await? {
                    Some((_, event)) if event.seq >= seq => high = middle,
                    Some((sequence, _)) => low = sequence + 1,
                    None => break,
                }
            }
            match at_or_after(low).await? {
                Some((_, event)) => found = event,
                None => return Ok(tail_msgs),
            }
        }
        let own = u64::from(found.seq > seq && matches!(found.body, EventBody::Msg { .. }));
        Ok(found.tally_through().msgs.saturating_sub(own))
    }

    /// Store the room's changed record.
    async fn put_record(&mut self, record: RoomRecord) -> Result<(), RoomError> {
        let payload = codec::encode(&record).map_err(|e| unavailable("encode room", e))?;
        self.ctx
            .rooms
            .put(subjects::room_key(&self.tenant, &self.room), payload)
            .await
            .map_err(|e| unavailable("write the room's record", e))?;
        self.state.record = Some(Some(record));
        Ok(())
    }

    /// Remove what is left of a deleted room: its roster and record (purged from the rooms bucket, so the name is
    /// free), and every event of its stream subject but the last, its `room_deleted`, so that no join replays
    /// anything from before the deletion. The stores erase their part when they apply the `room_deleted`.
    async fn delete_room(&mut self) -> Result<(), RoomError> {
        // The events first and the record last: a deletion that fails half-way still finds the room's record when
        // it is asked again, and finishes.
        self.ctx
            .events
            .purge()
            .filter(self.log_subject.clone())
            .keep(1)
            .await
            .map_err(|e| unavailable("remove the room's events", e))?;
        // Purged from the bucket's stream, with no delete marker left to count as a room of the tenant.
        for key in [subjects::roster_key(&self.tenant, &self.room), subjects::room_key(&self.tenant, &self.room)] {
            let subject = subjects::rooms_bucket_subject(&key);
            self.ctx
                .rooms
                .stream
                .purge()
                .filter(subject)
                .await
                .map_err(|e| unavailable("remove the room's records", e))?;
        }
        self.state.forget();
        self.state.record = Some(None);
        self.state.typing.clear();
        self.state.last_sent.clear();
        self.created_here = false;
        Ok(())
    }

    /// Remove every event naming `user` from the room's stream subject before its tail (the `user_erased` just
    /// appended, which stays for the stores), reading the subject a batch at a time: securely erased, so that no
    /// replay and no reader of the stream finds them. Events appended meanwhile cannot name the user, who is no
    /// member any more.
    async fn erase_from_stream(&mut self, user: &UserId) -> Result<(), RoomError> {
        let until = self.tail().await?.stream_seq;
        let (mut from, mut behind) = (1, 0);
        // Up to and including the `user_erased`: a replica that answers without it lags behind, and the events
        // before it that it lacks are asked again (of any replica).
        while from <= until {
            let ask = Ask::Matching { filter: &self.log_subject, from, batch: ERASE_BATCH };
            let got = direct::batch(&self.ctx.nats, subjects::EVENTS_DIRECT_GET, ask)
                .await
                .map_err(|e| unavailable("read the room's events", e))?;
            let Some(last) = got.last() else {
                behind += 1;
                if behind > ERASE_LAGGING_READS {
                    return Err(RoomError::Unavailable("the stream's replicas lag behind the erasure; retry".into()));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            from = last.sequence + 1;
            for message in got.iter().filter(|message| message.sequence < until) {
                let names = codec::decode::<RoomEvent>(&message.payload).is_ok_and(|event| event.body.names(user));
                if !names {
                    continue;
                }
                match self.ctx.events.delete_message(message.sequence).await {
                    Ok(_) => {}
                    // Gone meanwhile (aged out, or erased by a retry running alongside).
                    Err(e)
                        if matches!(e.kind(), DeleteMessageErrorKind::JetStream(error)
                        if [JetStreamCode::SEQUENCE_NOT_FOUND, JetStreamCode::NO_MESSAGE_FOUND].contains(&error.error_code())) =>
                        {}
                    Err(e) => return Err(unavailable("erase an event from the stream", e)),
                }
            }
        }
        Ok(())
    }

    /// Publish to whoever listens live: the room's subject, or both inboxes of a direct-message room; a user's own
    /// read to that user's inbox.
    async fn publish_live(&self, message: &LiveMessage) {
        let payload = match codec::encode(message) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%error, "cannot encode a live message");
                return;
            }
        };
        let targets = match (message, self.room.dm_participants()) {
            (LiveMessage::OwnRead { user, .. }, _) => vec![subjects::user_inbox(&self.tenant, user)],
            (_, Some((a, b))) => vec![subjects::user_inbox(&self.tenant, &a), subjects::user_inbox(&self.tenant, &b)],
            (_, None) => vec![subjects::room_live(&self.tenant, &self.room)],
        };
        for subject in targets {
            if let Err(error) = self.ctx.nats.publish(subject, payload.clone()).await {
                // Sequenced events are durable; gateways that miss one live recover it from the stream.
                tracing::warn!(%error, "cannot publish a live message");
            }
        }
    }

    /// Sequence `body` as the room's next event: append it to the stream, fenced on the room's last stream
    /// sequence, and publish it live once acknowledged. A fence failure means another writer appended first: every
    /// cached fact is dropped; an event written for a user answers `None`, so that its command is decided again
    /// on the room as it is now, and a `joined` or `left` is retried with the next seq.
    ///
    /// `retention` (seconds) sets when the event leaves history.
    async fn append(
        &mut self,
        body: EventBody,
        dedupe_id: Option<String>,
        retention: Option<u64>,
    ) -> Result<Option<Appended>, RoomError> {
        const ATTEMPTS: usize = 3;
        for _ in 0..ATTEMPTS {
            let tail = self.tail().await?;
            let (seq, ts_us) = (tail.seq + 1, now_us().max(tail.ts_us + 1));
            let expires_ms = retention.map(|secs| (ts_us / 1000).saturating_add(secs.saturating_mul(1000)));
            let tally = tail.tally.followed_by(seq, ts_us / 1000, expires_ms, &body).stored_for(&body);
            let fence = tail.stream_seq;
            let event = RoomEvent {
                v: INTERNAL_VERSION,
                tenant: self.tenant.clone(),
                room: self.room.clone(),
                seq,
                ts_us,
                tally,
                expires_ms,
                body: body.clone(),
            };
            let payload = codec::encode(&event).map_err(|e| unavailable("encode event", e))?;
            let mut publish = PublishMessage::build().payload(payload).expected_last_subject_sequence(fence);
            if let Some(id) = &dedupe_id {
                // Ids are validated types, so this cannot fail; if it did, the op is refused, nothing panics.
                let id = async_nats::HeaderValue::from_str(id)
                    .map_err(|e| refused(ErrorCode::BadRequest, format!("the op's id cannot be a header: {e}")))?;
                publish = publish.header(async_nats::header::NATS_MESSAGE_ID, id);
            }
            // Traced only within a traced command: an append never starts a trace of its own.
            let append = match switchyard_service::trace::enabled() && !tracing::Span::current().is_none() {
                false => tracing::Span::none(),
                true => tracing::info_span!(target: "switchyard::trace", "events stream append", seq),
            };
            if switchyard_service::trace::enabled() {
                let mut headers = async_nats::HeaderMap::new();
                append.in_scope(|| switchyard_service::trace::inject_current(&mut headers));
                for (name, values) in headers.iter() {
                    for value in values {
                        publish = publish.header(name.clone(), value.clone());
                    }
                }
            }
            let started = std::time::Instant::now();
            let ack = async {
                match self.ctx.js.send_publish(self.log_subject.clone(), publish).await {
                    Ok(ack) => ack.await,
                    Err(e) => Err(e),
                }
            }
            .instrument(append)
            .await;
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
                    return Ok(Some(Appended::Duplicate(original)));
                }
                Ok(ack) => {
                    self.state.appended(&event, ack.sequence);
                    metrics::counter!("switchyard_router_events_appended_total").increment(1);
                    self.publish_live(&LiveMessage::Event(event.clone())).await;
                    return Ok(Some(Appended::New(event)));
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    tracing::info!(tenant = %self.tenant, room = %self.room, "fenced: another writer appended; reloading");
                    metrics::counter!("switchyard_router_fenced_total").increment(1);
                    // Another writer may also have changed the members: what the rules checked is stale.
                    self.state.forget();
                    if room_core::redecide_when_fenced(&body) {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    // The append may or may not have been stored: reload before the next one.
                    self.state.tail = None;
                    return Err(unavailable("append to the events stream", e));
                }
            }
        }
        Err(RoomError::Unavailable(WRITTEN_ELSEWHERE.into()))
    }
}
