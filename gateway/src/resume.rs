//! Resume: the events a client missed in a room, read from the events stream (the authoritative log) in batches
//! (JetStream's batched direct get: one request returns up to [`BATCH_EVENTS`] events of the room's subject), for
//! `join {since}` and to fill a hole in live delivery. Finds the first missed event by binary search over the
//! room's stream subject, then reads forward batch by batch to the join point, holding one batch at a time.
//!
//! An event erased with its user (removed from the stream, leaving a hole in the room's seqs) is replayed as an
//! `erased` stand-in at its seq, so a replay stays gapless and shows nothing of the user.
//!
//! [`replay_into`] queues a join's missed events on the session's outbound queue, waiting for the client to read
//! (bounded by `resume_stall_ms`, then the session is a slow consumer), at most `resume_concurrency` replays at
//! once per gateway. It never reads the history store, which may lag: events older than the stream answer
//! `resume_gap`, and so do events past their room's history retention.

use crate::upstream::UpstreamError;
use crate::ws::hub::{LiveEvent, SessionTx};
use crate::Gateway;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::internal::{EventBody, RoomEvent};
use switchyard_protocol::shard::shard_of_room;
use switchyard_protocol::{codec, subjects, ErrorCode, ProjectId, RoomId, UserId};

/// Most events one batched read returns.
const BATCH_EVENTS: u64 = 256;
/// Most payload bytes one batched read returns (the server stops the batch before it would exceed them).
const BATCH_BYTES: usize = 256 * 1024;
/// How long one replica may take to answer a batch before it is asked again (of any replica).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a join's replay waits for the stream at each step (positioning, each batch) over all its attempts: more
/// than a client takes to notice that its NATS node froze and to move to another (three unanswered pings, 2 s
/// apart), and more than a stream leader's election. The replay runs in a task of its own.
const REPLAY_PATIENCE: Duration = Duration::from_secs(20);
/// How long filling a hole in live delivery may take in all: the session waits for it, so it gives up early and
/// closes (1013), and the client's resume, which runs aside with [`REPLAY_PATIENCE`], takes over.
const GAP_FILL_PATIENCE: Duration = Duration::from_secs(8);
/// The pause between two attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

fn unavailable(error: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::new(ErrorCode::Unavailable, format!("cannot read the room's events: {error}"))
}

fn gap(since: u64) -> UpstreamError {
    UpstreamError::new(
        ErrorCode::ResumeGap,
        format!("events after seq {since} are no longer kept; read history and join without since"),
    )
}

/// Why a read of the stream failed.
enum ReadFailure {
    /// Nobody answered in time, or the request failed: asking again may succeed.
    Unanswered(UpstreamError),
    /// The answer itself is unusable (an event that does not decode): asking again gives the same.
    Final(UpstreamError),
}

impl ReadFailure {
    fn into_error(self) -> UpstreamError {
        match self {
            ReadFailure::Unanswered(error) | ReadFailure::Final(error) => error,
        }
    }
}

/// A room's event at or after a stream sequence, from the stream leader: (stream sequence, event), or `None` past
/// the end.
async fn event_at_or_after(
    stream: &Stream,
    subject: &str,
    sequence: u64,
) -> Result<Option<(u64, RoomEvent)>, ReadFailure> {
    match stream.raw_message_builder().sequence(sequence.max(1)).next_by_subject(subject).send().await {
        Ok(message) => {
            let event = codec::decode::<RoomEvent>(&message.payload).map_err(|e| ReadFailure::Final(unavailable(e)))?;
            Ok(Some((message.sequence, event)))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(ReadFailure::Unanswered(unavailable(e))),
    }
}

/// `read` until it answers, asking again after an unanswered read until `deadline`: a leader read waits through the
/// election that follows the loss of the stream's leader.
async fn patiently<T, F, Fut>(deadline: tokio::time::Instant, mut read: F) -> Result<T, UpstreamError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ReadFailure>>,
{
    loop {
        match tokio::time::timeout_at(deadline, read()).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(ReadFailure::Unanswered(error))) if tokio::time::Instant::now() + RETRY_PAUSE < deadline => {
                tracing::debug!(%error, "reading the room's events again");
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Ok(Err(failure)) => return Err(failure.into_error()),
            Err(_) => return Err(unavailable("the events stream's leader did not answer in time")),
        }
    }
}

/// The stream sequence of a room's last event, from the stream leader.
async fn last_sequence(stream: &Stream, subject: &str) -> Result<u64, ReadFailure> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(message.sequence),
        Err(e) => Err(ReadFailure::Unanswered(unavailable(e))),
    }
}

/// A batched direct-get request (JetStream's `$JS.API.DIRECT.GET.<stream>` with `batch`).
#[derive(serde::Serialize)]
struct BatchRequest<'a> {
    seq: u64,
    next_by_subj: &'a str,
    batch: u64,
    max_bytes: usize,
}

/// How one batched read ended.
enum BatchEnd {
    /// The replica said the batch is over (or answered one message, on a server without batched reads).
    Answered,
    /// The replica stopped answering, or answered with an error status: the batch may be cut short.
    Unanswered(String),
}

/// One seq of a replay: the event the stream holds, or the stand-in of one erased from it.
pub enum Replayed {
    Event(RoomEvent),
    Erased { seq: u64 },
}

impl Replayed {
    pub fn seq(&self) -> u64 {
        match self {
            Replayed::Event(event) => event.seq,
            Replayed::Erased { seq } => *seq,
        }
    }

    /// As a session receives it.
    pub fn into_live(self, room: &RoomId) -> LiveEvent {
        match self {
            Replayed::Event(event) => LiveEvent::replayed(event),
            Replayed::Erased { seq } => LiveEvent::erased(room.clone(), seq),
        }
    }
}

/// A forward reader of one room's events with `since < seq <= upto`, a batch at a time, each checked to follow the
/// one before it with no gap.
///
/// Batches are direct gets, which every replica of the stream answers (a queue group): one may be paused or cut
/// off and never answer, one may lag behind the leader and end a batch early. So an unanswered batch is asked
/// again on a fresh inbox (late answers of the silent replica land on the old one and are never read), and a batch
/// that ends early with nothing new is settled by the stream leader: the next event from the leader, or
/// `resume_gap` only when the leader has no next event either.
pub struct RoomLog {
    nats: async_nats::Client,
    /// The events stream, for the leader's reads.
    stream: Stream,
    subject: String,
    /// Where this reader's batches are answered; replaced after an unanswered batch.
    inbox: async_nats::Subscriber,
    inbox_subject: async_nats::Subject,
    /// The stream sequence to read from next.
    next_sequence: u64,
    /// The seq of the last event handed out (`since` at first).
    last_seq: u64,
    /// The last seq to hand out.
    upto: u64,
    /// How long positioning, and then each batch, may take over all its attempts.
    patience: Duration,
}

impl RoomLog {
    /// Position a reader on the first event after `since`. `resume_gap` when the stream no longer holds it, or
    /// when more than `resume_max_events` are asked for.
    pub async fn open(
        gw: &Gateway,
        tenant: &ProjectId,
        room: &RoomId,
        since: u64,
        upto: u64,
        patience: Duration,
    ) -> Result<RoomLog, UpstreamError> {
        if upto.saturating_sub(since) > gw.config.resume_max_events {
            return Err(UpstreamError::new(
                ErrorCode::ResumeGap,
                format!(
                    "{} events since seq {since} is more than one join replays ({}); read history and join without \
                     since",
                    upto - since,
                    gw.config.resume_max_events
                ),
            ));
        }
        let stream = gw.events_stream().await.map_err(unavailable)?;
        let subject = subjects::event_log(shard_of_room(tenant, room, gw.config.shard_count), tenant, room);
        let inbox_subject = async_nats::Subject::from(gw.nats.new_inbox());
        let inbox = gw.nats.subscribe(inbox_subject.clone()).await.map_err(unavailable)?;
        let mut log = RoomLog {
            nats: gw.nats.clone(),
            stream,
            subject,
            inbox,
            inbox_subject,
            next_sequence: 1,
            last_seq: since,
            upto,
            patience,
        };
        if since >= upto {
            return Ok(log);
        }
        let (stream, subject) = (&log.stream, log.subject.as_str());
        // One deadline for every leader read of the positioning.
        let deadline = tokio::time::Instant::now() + patience;
        let Some((first_sequence, first)) = patiently(deadline, || event_at_or_after(stream, subject, 1)).await? else {
            return Err(gap(since));
        };
        if first.seq > since + 1 {
            return Err(gap(since));
        }
        let last_sequence = patiently(deadline, || last_sequence(stream, subject)).await?;
        // The smallest stream sequence holding an event of seq > since.
        let (mut low, mut high) = (first_sequence, last_sequence);
        while low < high {
            let middle = low + (high - low) / 2;
            match patiently(deadline, || event_at_or_after(stream, subject, middle)).await? {
                Some((_, event)) if event.seq > since => high = middle,
                Some((found, _)) => low = found + 1,
                None => return Err(unavailable("the room's log ended during the search")),
            }
        }
        log.next_sequence = low;
        Ok(log)
    }

    /// The next events in seq order; empty once `upto` was handed out. `resume_gap` when an event is missing;
    /// `unavailable` when no replica and no leader answered within the reader's patience.
    pub async fn next_batch(&mut self) -> Result<Vec<Replayed>, UpstreamError> {
        let events = self.next_events().await?;
        // An event past its room's retention left history: it is never replayed, so neither is what follows it.
        let now_ms = crate::http::now_ms();
        let expired = |replayed: &&Replayed| match replayed {
            Replayed::Event(event) => event.expires_ms.is_some_and(|at| at <= now_ms),
            Replayed::Erased { .. } => false,
        };
        if let Some(expired) = events.iter().find(expired) {
            return Err(gap(expired.seq().saturating_sub(1)));
        }
        Ok(events)
    }

    /// Hand out `event`, after a stand-in for each seq between the last one handed out and it: events erased from
    /// the stream.
    fn hand_out(&mut self, event: RoomEvent, events: &mut Vec<Replayed>) {
        events.extend((self.last_seq + 1..event.seq).map(|seq| Replayed::Erased { seq }));
        self.last_seq = event.seq;
        events.push(Replayed::Event(event));
    }

    async fn next_events(&mut self) -> Result<Vec<Replayed>, UpstreamError> {
        if self.last_seq >= self.upto {
            return Ok(Vec::new());
        }
        let budget = tokio::time::Instant::now() + self.patience;
        let mut events = Vec::new();
        loop {
            let attempt = (tokio::time::Instant::now() + ATTEMPT_TIMEOUT).min(budget);
            let problem = match self.read_batch(&mut events, attempt).await? {
                BatchEnd::Answered if !events.is_empty() || self.last_seq >= self.upto => return Ok(events),
                BatchEnd::Unanswered(_) if !events.is_empty() => {
                    self.renew_inbox(budget).await?;
                    return Ok(events);
                }
                BatchEnd::Unanswered(problem) => {
                    self.renew_inbox(budget).await?;
                    problem
                }
                // Ended early with nothing new: a lagging replica, or events that are gone. The leader decides.
                BatchEnd::Answered => {
                    let asked = event_at_or_after(&self.stream, &self.subject, self.next_sequence);
                    match tokio::time::timeout_at(attempt, asked).await {
                        Ok(Ok(Some((sequence, event)))) => {
                            self.next_sequence = sequence + 1;
                            if event.seq > self.last_seq && event.seq <= self.upto {
                                let mut events = Vec::new();
                                self.hand_out(event, &mut events);
                                return Ok(events);
                            }
                            // An event handed out already: read on from the one after it.
                            "the room's log repeats an event".to_owned()
                        }
                        // The room's log ends before `upto`: the events after `last_seq` are gone.
                        Ok(Ok(None)) => return Err(gap(self.last_seq)),
                        Ok(Err(ReadFailure::Unanswered(error))) => error.message,
                        Ok(Err(ReadFailure::Final(error))) => return Err(error),
                        Err(_) => "the events stream's leader did not answer in time".to_owned(),
                    }
                }
            };
            if tokio::time::Instant::now() + RETRY_PAUSE >= budget {
                return Err(unavailable(problem));
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// One batched direct get from `next_sequence`, its in-order events appended to `events`, until the replica
    /// ends the batch or `deadline`.
    async fn read_batch(
        &mut self,
        events: &mut Vec<Replayed>,
        deadline: tokio::time::Instant,
    ) -> Result<BatchEnd, UpstreamError> {
        let request = BatchRequest {
            seq: self.next_sequence,
            next_by_subj: &self.subject,
            batch: (self.upto - self.last_seq).min(BATCH_EVENTS),
            max_bytes: BATCH_BYTES,
        };
        let payload = serde_json::to_vec(&request).map_err(unavailable)?;
        let asked =
            self.nats.publish_with_reply(subjects::EVENTS_DIRECT_GET, self.inbox_subject.clone(), payload.into());
        match tokio::time::timeout_at(deadline, asked).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Ok(BatchEnd::Unanswered(format!("cannot ask the events stream: {e}"))),
            Err(_) => return Ok(BatchEnd::Unanswered("cannot ask the events stream in time".into())),
        }
        loop {
            let message = match tokio::time::timeout_at(deadline, self.inbox.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => return Ok(BatchEnd::Unanswered("the reply subscription ended".into())),
                Err(_) => return Ok(BatchEnd::Unanswered("no answer from the events stream in time".into())),
            };
            if let Some(status) = message.status {
                return Ok(match status.as_u16() {
                    // End of the batch, or nothing (more) on the subject.
                    204 | 404 => BatchEnd::Answered,
                    code => BatchEnd::Unanswered(format!("direct get answered {code}: {:?}", message.description)),
                });
            }
            let headers = message.headers.as_ref();
            let sequence = headers
                .and_then(|h| h.get("Nats-Sequence"))
                .and_then(|v| v.as_str().parse::<u64>().ok())
                .ok_or_else(|| unavailable("a direct-get answer without its stream sequence"))?;
            // A server without batched reads answers one message and no end-of-batch marker.
            let batched = headers.is_some_and(|h| h.get("Nats-Num-Pending").is_some());
            self.next_sequence = sequence + 1;
            let event = codec::decode::<RoomEvent>(&message.payload).map_err(unavailable)?;
            if event.seq > self.last_seq && event.seq <= self.upto {
                self.hand_out(event, events);
            }
            if !batched {
                return Ok(BatchEnd::Answered);
            }
        }
    }

    /// Read the next batches on a new inbox, so the rest of an unanswered batch never mixes into them.
    async fn renew_inbox(&mut self, deadline: tokio::time::Instant) -> Result<(), UpstreamError> {
        let inbox_subject = async_nats::Subject::from(self.nats.new_inbox());
        let subscribed = tokio::time::timeout_at(deadline, self.nats.subscribe(inbox_subject.clone()))
            .await
            .map_err(|_| unavailable("cannot subscribe to a reply inbox in time"))?;
        self.inbox = subscribed.map_err(unavailable)?;
        self.inbox_subject = inbox_subject;
        Ok(())
    }
}

/// The room's events with `since < seq <= upto`, in order, read in batches, within [`GAP_FILL_PATIENCE`] in all.
/// For filling a hole in live delivery, which is short (a lost live publish); joins stream theirs with
/// [`replay_into`].
pub async fn missed_events(
    gw: &Gateway,
    tenant: &ProjectId,
    room: &RoomId,
    since: u64,
    upto: u64,
) -> Result<Vec<Replayed>, UpstreamError> {
    let read = async {
        let mut log = RoomLog::open(gw, tenant, room, since, upto, GAP_FILL_PATIENCE).await?;
        let mut events = Vec::new();
        loop {
            let batch = log.next_batch().await?;
            if batch.is_empty() {
                return Ok(events);
            }
            events.extend(batch);
        }
    };
    tokio::time::timeout(GAP_FILL_PATIENCE, read).await.map_err(|_| unavailable("the gap took too long to fill"))?
}

/// Queue the events of `room` with `since < seq <= upto` on a session's outbound queue, as `user` may see them:
/// after the user's own `left` nothing until their next `joined`. Returns the seq of the last event queued
/// (`None` when none was). Waits for a replay turn, and for the client to read when its queue is half full; a
/// client that reads nothing for `resume_stall_ms` is closed as a slow consumer.
pub async fn replay_into(
    gw: &Gateway,
    tx: &SessionTx,
    tenant: &ProjectId,
    user: &UserId,
    room: &RoomId,
    since: u64,
    upto: u64,
) -> Result<Option<u64>, UpstreamError> {
    let _turn = gw.replays.clone().acquire_owned().await.map_err(unavailable)?;
    let stall = Duration::from_millis(gw.config.resume_stall_ms);
    let mut log = RoomLog::open(gw, tenant, room, since, upto, REPLAY_PATIENCE).await?;
    let (mut member, mut last_queued) = (true, None);
    loop {
        let batch = log.next_batch().await?;
        if batch.is_empty() {
            return Ok(last_queued);
        }
        for replayed in batch {
            let event = match replayed {
                Replayed::Event(event) => event,
                Replayed::Erased { seq } => {
                    if member {
                        if !tx.offer_replayed(Arc::new(LiveEvent::erased(room.clone(), seq)), stall).await {
                            return Err(UpstreamError::new(
                                ErrorCode::Unavailable,
                                "the client does not read its replay",
                            ));
                        }
                        last_queued = Some(seq);
                    }
                    continue;
                }
            };
            let visible = match &event.body {
                EventBody::Left { user: left, .. } if left == user => std::mem::replace(&mut member, false),
                EventBody::Joined { user: joined } if joined == user => {
                    member = true;
                    true
                }
                EventBody::Left { .. }
                | EventBody::Joined { .. }
                | EventBody::Msg { .. }
                | EventBody::Edit { .. }
                | EventBody::Delete { .. }
                | EventBody::Reaction { .. }
                | EventBody::Pin { .. }
                | EventBody::Moderation { .. }
                | EventBody::RoomDeleted {}
                | EventBody::UserErased { .. } => member,
            };
            if !visible {
                continue;
            }
            let seq = event.seq;
            if !tx.offer_replayed(Arc::new(LiveEvent::replayed(event)), stall).await {
                return Err(UpstreamError::new(ErrorCode::Unavailable, "the client does not read its replay"));
            }
            last_queued = Some(seq);
        }
    }
}
