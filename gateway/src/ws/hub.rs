//! The fan-out hub: one NATS subscription per live subject (a room, a user's inbox, a user's presence) that has at
//! least one local session, and one task per such subject that decodes each live event once, encodes it at most once per wire format, and hands the same bytes to
//! every subscribed session without waiting.
//!
//! A session whose outbound queue is full (in frames or bytes) is dropped from the room and told through its
//! `overflow` token; it then closes with 4009. The hub never blocks on a session, and it does not order or dedupe
//! events per session (the session does that).

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use switchyard_protocol::client::{encode_frame, Format, ServerEvent};
use switchyard_protocol::internal::{EventBody, LiveMessage, RoomEvent};
use switchyard_protocol::{codec, RoomId, UserId};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Control messages waiting for one room task.
const ROOM_CONTROL_QUEUE: usize = 1024;

/// One live message (a sequenced room event or a signal), decoded once and encoded lazily, once per format.
pub struct LiveEvent {
    /// The room of a room event or room signal; `None` for presence.
    pub room: Option<RoomId>,
    /// The seq of a sequenced event; `None` for signals (typing, read, presence).
    pub seq: Option<u64>,
    /// Who a typing signal is from; that user's own sessions do not get it.
    pub typing_user: Option<UserId>,
    /// Who a `left` event takes out of the room; their sessions stop receiving the room after it.
    pub left_user: Option<UserId>,
    /// A `room_deleted`: every session stops receiving the room after it.
    pub ends_room: bool,
    /// Who a `joined` event makes a member: the join point of their own join, which their sessions skip.
    pub joined_user: Option<UserId>,
    /// The reader's own `read` (from their inbox): for the user's sessions that do not receive the room, which
    /// get the room's `read` instead.
    pub own_read: bool,
    /// The event's op name, for the frame counters.
    pub op: &'static str,
    /// Read from the events stream for one session's `join {since}`, not received live.
    pub replayed: bool,
    event: ServerEvent,
    json: OnceLock<Utf8Bytes>,
    msgpack: OnceLock<Bytes>,
}

impl LiveEvent {
    pub fn new(message: &LiveMessage) -> Self {
        let mut joined_user = None;
        let mut own_read = false;
        let mut ends_room = false;
        let (room, seq, typing_user, left_user, event) = match message {
            LiveMessage::Event(event) => {
                let left_user = match &event.body {
                    EventBody::Left { user, .. } => Some(user.clone()),
                    EventBody::Msg { .. }
                    | EventBody::Edit { .. }
                    | EventBody::Delete { .. }
                    | EventBody::Reaction { .. }
                    | EventBody::Pin { .. }
                    | EventBody::Joined { .. }
                    | EventBody::Moderation { .. }
                    | EventBody::RoomDeleted {}
                    | EventBody::UserErased { .. } => None,
                };
                ends_room = matches!(event.body, EventBody::RoomDeleted {});
                if let EventBody::Joined { user } = &event.body {
                    joined_user = Some(user.clone());
                }
                (Some(event.room.clone()), Some(event.seq), None, left_user, event.to_server_event())
            }
            LiveMessage::Typing { room, user } => (
                Some(room.clone()),
                None,
                Some(user.clone()),
                None,
                ServerEvent::Typing { room: room.clone(), user: user.clone() },
            ),
            LiveMessage::Read { room, user, seq } => (
                Some(room.clone()),
                None,
                None,
                None,
                ServerEvent::Read { room: room.clone(), user: user.clone(), seq: *seq, unread: None },
            ),
            LiveMessage::OwnRead { room, user, seq, unread } => {
                own_read = true;
                let event =
                    ServerEvent::Read { room: room.clone(), user: user.clone(), seq: *seq, unread: Some(*unread) };
                (Some(room.clone()), None, None, None, event)
            }
            LiveMessage::Presence { user, online, ts } => {
                (None, None, None, None, ServerEvent::Presence { user: user.clone(), online: *online, ts: *ts })
            }
        };
        let op = event.name();
        LiveEvent {
            room,
            seq,
            typing_user,
            left_user,
            ends_room,
            joined_user,
            own_read,
            op,
            replayed: false,
            event,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    /// The stand-in of an event erased from the stream with its user, in a replay.
    pub fn erased(room: RoomId, seq: u64) -> Self {
        let event = ServerEvent::Erased { room: room.clone(), seq };
        LiveEvent {
            room: Some(room),
            seq: Some(seq),
            typing_user: None,
            left_user: None,
            ends_room: false,
            joined_user: None,
            own_read: false,
            op: event.name(),
            replayed: true,
            event,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    /// A replayed room event (from the stream, not from a live subject).
    pub fn replayed(event: RoomEvent) -> Self {
        LiveEvent { replayed: true, ..LiveEvent::new(&LiveMessage::Event(event)) }
    }

    /// The event as a WebSocket message in `format`; the bytes are shared, not copied.
    pub fn message(&self, format: Format) -> Message {
        match format {
            Format::Json => Message::Text(self.json().clone()),
            Format::MsgPack => Message::Binary(self.msgpack().clone()),
        }
    }

    /// The size of the event's frame in `format`.
    pub fn encoded_len(&self, format: Format) -> usize {
        match format {
            Format::Json => self.json().len(),
            Format::MsgPack => self.msgpack().len(),
        }
    }

    fn json(&self) -> &Utf8Bytes {
        self.json.get_or_init(|| {
            let bytes = encode_frame(&self.event, Format::Json);
            // JSON produced by serde_json is UTF-8.
            Utf8Bytes::try_from(bytes).unwrap_or_else(|_| Utf8Bytes::from_static("{}"))
        })
    }

    fn msgpack(&self) -> &Bytes {
        self.msgpack.get_or_init(|| Bytes::from(encode_frame(&self.event, Format::MsgPack)))
    }
}

/// How the hub reaches one session.
#[derive(Clone)]
pub struct SessionTx {
    /// Unique within this gateway.
    pub id: u64,
    pub format: Format,
    /// The session's outbound event queue (bounded in frames).
    pub events: mpsc::Sender<Arc<LiveEvent>>,
    /// Bytes queued and not yet written; bounded by `max_queued_bytes`.
    pub queued_bytes: Arc<AtomicUsize>,
    pub max_queued_bytes: usize,
    /// Fired when the session fell too far behind.
    pub overflow: CancellationToken,
}

impl SessionTx {
    /// Queue a replayed event, waiting while the queue is half full (in frames or bytes) so live events always
    /// find room behind it. Returns false, after firing `overflow`, when the queue made no room for `stall`, or
    /// when the session is already overflowing or gone.
    pub async fn offer_replayed(&self, event: Arc<LiveEvent>, stall: std::time::Duration) -> bool {
        let len = event.encoded_len(self.format);
        let deadline = tokio::time::Instant::now() + stall;
        loop {
            if self.overflow.is_cancelled() || self.events.is_closed() {
                return false;
            }
            let queued = self.queued_bytes.load(Ordering::Relaxed);
            let frames_free = self.events.capacity() * 2 > self.events.max_capacity();
            if frames_free && (queued == 0 || queued.saturating_add(len) <= self.max_queued_bytes / 2) {
                return self.offer(&event);
            }
            if tokio::time::Instant::now() >= deadline {
                self.overflow.cancel();
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    }

    /// Queue `event` without waiting. Returns false when the session must be dropped from the room.
    fn offer(&self, event: &Arc<LiveEvent>) -> bool {
        let len = event.encoded_len(self.format);
        // Count the bytes before the event can be taken: the session subtracts them as soon as it takes it, and
        // counting after the send let that subtraction come first and wrap the counter.
        let queued = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if queued.saturating_add(len) > self.max_queued_bytes {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.overflow.cancel();
            return false;
        }
        match self.events.try_send(event.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                self.overflow.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
                false
            }
        }
    }
}

/// Why a subscription could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// NATS refused the subscription (shared by every session that waited for it).
    #[error("cannot subscribe to the room's live events: {0}")]
    Subscribe(#[source] Arc<async_nats::SubscribeError>),
    /// The room's fan-out task stopped on every attempt to join it.
    #[error("cannot subscribe to the room's live events: the room's fan-out task kept stopping")]
    TaskKeptStopping,
}

enum RoomControl {
    /// Boxed so the control queue's slots stay small: every subject with a local session (each user's inbox
    /// among them) allocates a block of them up front.
    Subscribe {
        session: Box<SessionTx>,
        done: oneshot::Sender<Result<(), Arc<async_nats::SubscribeError>>>,
    },
    Unsubscribe {
        session_id: u64,
    },
    /// Hand every message NATS has already given the subscription to the sessions, then answer.
    Barrier {
        done: oneshot::Sender<()>,
    },
}

/// A room task's entry in the registry.
struct RoomEntry {
    /// Tells entries apart when a room task is replaced.
    generation: u64,
    control: mpsc::Sender<RoomControl>,
}

/// The registry of room tasks.
pub struct Hub {
    nats: async_nats::Client,
    /// Live subject -> its room task. Held only for lookups and inserts, never across an await.
    rooms: Mutex<HashMap<String, RoomEntry>>,
    next_generation: AtomicU64,
}

impl Hub {
    pub fn new(nats: async_nats::Client) -> Arc<Self> {
        Arc::new(Hub { nats, rooms: Mutex::new(HashMap::new()), next_generation: AtomicU64::new(1) })
    }

    /// Subscribe a session to a room's live events. When this returns, the NATS subscription is in place ahead of
    /// any request the caller sends next on the same connection.
    pub async fn subscribe(self: &Arc<Self>, subject: &str, session: SessionTx) -> Result<(), HubError> {
        let subject = subject.to_owned();
        for _ in 0..5 {
            let (generation, control) = self.room_task(&subject);
            let (done, result) = oneshot::channel();
            if control.send(RoomControl::Subscribe { session: Box::new(session.clone()), done }).await.is_err() {
                self.forget(&subject, generation);
                continue;
            }
            match result.await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(error)) => return Err(HubError::Subscribe(error)),
                // The room task was stopping; start over with a fresh one.
                Err(_) => self.forget(&subject, generation),
            }
        }
        Err(HubError::TaskKeptStopping)
    }

    /// Wait until every message that this gateway's NATS connection had received for `subject` before the call is
    /// queued to the subject's sessions. NATS keeps one publisher's order on one connection, so a reply that
    /// arrived after a live message on the subject finds that message queued once this returns. Returns at once
    /// when the subject has no task.
    pub async fn barrier(&self, subject: &str) {
        let control = match self.rooms.lock() {
            Ok(rooms) => rooms.get(subject).map(|entry| entry.control.clone()),
            Err(_) => None,
        };
        let Some(control) = control else { return };
        let (done, passed) = oneshot::channel();
        if control.send(RoomControl::Barrier { done }).await.is_ok() {
            let _ = passed.await;
        }
    }

    /// Remove a session from a subject. Never waits.
    pub fn unsubscribe(&self, subject: &str, session_id: u64) {
        let control = match self.rooms.lock() {
            Ok(rooms) => rooms.get(subject).map(|entry| entry.control.clone()),
            Err(_) => None,
        };
        if let Some(control) = control {
            if let Err(mpsc::error::TrySendError::Full(message)) =
                control.try_send(RoomControl::Unsubscribe { session_id })
            {
                tokio::spawn(async move {
                    let _ = control.send(message).await;
                });
            }
        }
    }

    /// The number of rooms with a live subscription.
    pub fn room_count(&self) -> usize {
        self.rooms.lock().map(|rooms| rooms.len()).unwrap_or(0)
    }

    fn room_task(self: &Arc<Self>, subject: &str) -> (u64, mpsc::Sender<RoomControl>) {
        let mut rooms = match self.rooms.lock() {
            Ok(rooms) => rooms,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(entry) = rooms.get(subject) {
            return (entry.generation, entry.control.clone());
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let (control, receiver) = mpsc::channel(ROOM_CONTROL_QUEUE);
        rooms.insert(subject.to_owned(), RoomEntry { generation, control: control.clone() });
        tokio::spawn(run_room(self.clone(), subject.to_owned(), generation, receiver));
        (generation, control)
    }

    fn forget(&self, subject: &str, generation: u64) {
        if let Ok(mut rooms) = self.rooms.lock() {
            if rooms.get(subject).is_some_and(|entry| entry.generation == generation) {
                rooms.remove(subject);
            }
        }
    }
}

/// Decode one live message and queue it to every session of the subject, dropping those that cannot take it.
fn fan_out(subject: &str, sessions: &mut Vec<SessionTx>, message: &async_nats::Message) {
    let live: LiveMessage = match codec::decode(&message.payload) {
        Ok(live) => live,
        Err(error) => {
            tracing::warn!(%subject, %error, "undecodable live message dropped");
            return;
        }
    };
    let event = Arc::new(LiveEvent::new(&live));
    let before = sessions.len();
    sessions.retain(|session| session.offer(&event));
    metrics::counter!("switchyard_gateway_deliveries_total").increment(before as u64);
}

/// One room's fan-out: owns the NATS subscription and the room's local sessions.
async fn run_room(hub: Arc<Hub>, subject: String, generation: u64, mut control: mpsc::Receiver<RoomControl>) {
    let mut live = match hub.nats.subscribe(subject.clone()).await {
        Ok(subscription) => subscription,
        Err(error) => {
            let error = Arc::new(error);
            hub.forget(&subject, generation);
            control.close();
            while let Ok(message) = control.try_recv() {
                if let RoomControl::Subscribe { done, .. } = message {
                    let _ = done.send(Err(error.clone()));
                }
            }
            return;
        }
    };
    metrics::gauge!("switchyard_gateway_rooms_subscribed").increment(1.0);
    // The room's local sessions.
    let mut sessions: Vec<SessionTx> = Vec::new();
    loop {
        tokio::select! {
            message = control.recv() => match message {
                Some(RoomControl::Subscribe { session, done }) => {
                    sessions.retain(|s| s.id != session.id);
                    sessions.push(*session);
                    let _ = done.send(Ok(()));
                }
                Some(RoomControl::Unsubscribe { session_id }) => {
                    sessions.retain(|s| s.id != session_id);
                    if sessions.is_empty() {
                        break;
                    }
                }
                Some(RoomControl::Barrier { done }) => {
                    // What the subscription already holds is handed on before the answer.
                    let (before, mut ended) = (sessions.len(), false);
                    loop {
                        match live.next().now_or_never() {
                            Some(Some(message)) => fan_out(&subject, &mut sessions, &message),
                            Some(None) => {
                                ended = true;
                                break;
                            }
                            None => break,
                        }
                    }
                    let _ = done.send(());
                    if ended || sessions.is_empty() && before > 0 {
                        break;
                    }
                }
                None => break,
            },
            message = live.next() => {
                let Some(message) = message else { break };
                let before = sessions.len();
                fan_out(&subject, &mut sessions, &message);
                if sessions.is_empty() && before > 0 {
                    break;
                }
            }
        }
    }
    // Stop taking new sessions; any that raced in are told to start over.
    hub.forget(&subject, generation);
    control.close();
    while let Ok(message) = control.try_recv() {
        drop(message);
    }
    let _ = live.unsubscribe().await;
    metrics::gauge!("switchyard_gateway_rooms_subscribed").decrement(1.0);
}
