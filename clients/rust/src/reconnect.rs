//! A session that outlives its sockets: [`ReconnectingClient`] wraps one [`Client`] at a time and, when the socket
//! closes, connects again with full-jitter exponential backoff (or after the server's `bye.reconnect_after_ms`),
//! authenticates again (with a fresh credential when an [`AuthSource`] is given), re-joins every room it tracks with
//! `join {since: last seq seen}`, re-watches watched users, and only then lets waiting requests through. Events are
//! delivered once each, in seq order per room, across reconnects; `send` and `dm` carry a `cmid`, so a request whose
//! socket dropped before its reply is sent again and still posts exactly once.
//!
//! The supervising actor owns the connection and the per-room resume state; handles talk to it through bounded
//! channels and read the current connection from a watch. It does not keep history or buffer events beyond the
//! bounded event queue. A 4003 close (revoked, kicked out, tenant disabled), and a 4001 close without an
//! [`AuthSource`], end the session for good.

use crate::client::{Auth, Client, ConnectOptions, Sent};
use crate::error::{ClientError, CloseInfo, Detail};
use crate::frame::{Hello, Reply};
use futures::future::BoxFuture;
use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::client::{ClientOp, Message, RoomSummary, ServerEvent};
use switchyard_protocol::{ErrorCode, RoomId, UserId};
use tokio::sync::{mpsc, oneshot, watch, Mutex};

/// Capacity of the queue of [`SessionEvent`]s; when it is full the actor waits for the caller to take events.
pub const SESSION_EVENT_QUEUE: usize = 4_096;
/// Capacity of the queue of bookkeeping commands from handles to the actor.
const COMMAND_QUEUE: usize = 256;
/// Length of a generated `cmid`.
const CMID_LEN: usize = 22;

/// Produces the credential for the next connection attempt (for example a fresh token from the tenant backend).
pub type AuthSource = Arc<dyn Fn() -> BoxFuture<'static, Result<Auth, ClientError>> + Send + Sync>;

/// How to reconnect.
#[derive(Clone)]
pub struct ReconnectOptions {
    /// The first retry waits a random time below this; each further one below twice the last ceiling.
    pub backoff_base: Duration,
    /// The ceiling of the backoff.
    pub backoff_cap: Duration,
    /// Give up (and end the session) after this many failed attempts in a row; `None` retries for ever.
    pub max_attempts: Option<u32>,
    /// Called before every reconnect for the credential to use; `None` reuses the one in the connect options.
    pub auth_source: Option<AuthSource>,
    /// How often the session pings the server when it has heard nothing else, and how long it waits for the
    /// `pong` before it treats the socket as dead; `None` uses the `heartbeat_ms` of the server's `hello`.
    pub liveness_interval: Option<Duration>,
}

impl Default for ReconnectOptions {
    fn default() -> Self {
        ReconnectOptions {
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            max_attempts: None,
            auth_source: None,
            liveness_interval: None,
        }
    }
}

impl std::fmt::Debug for ReconnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconnectOptions")
            .field("backoff_base", &self.backoff_base)
            .field("backoff_cap", &self.backoff_cap)
            .field("max_attempts", &self.max_attempts)
            .field("auth_source", &self.auth_source.as_ref().map(|_| "<fn>"))
            .field("liveness_interval", &self.liveness_interval)
            .finish()
    }
}

/// What a [`ReconnectingClient`] reports: the server's events (each once, in order) and the session's own.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// A server event. Sequenced events (`msg`, `edit`, `delete`, `reaction`, `joined`, `left`) arrive once each,
    /// in seq order per room, across reconnects.
    Event(ServerEvent),
    /// The socket closed; the next attempt starts after `delay`.
    Reconnecting {
        /// 1 for the first attempt after a close.
        attempt: u32,
        delay: Duration,
        /// How the socket closed, when known.
        close: Option<CloseInfo>,
    },
    /// Connected again and every tracked room resumed; waiting requests now go out.
    Reconnected(Hello),
    /// A room was re-joined with `since = from`; the missed events were delivered before this.
    Resumed { room: RoomId, from: Option<u64>, to: u64 },
    /// Too much was missed to replay (`resume_gap`): the room was re-joined at `to` without the events between;
    /// read them with `history`.
    Gap { room: RoomId, from: Option<u64>, to: u64 },
    /// A tracked room could not be re-joined (for example the user was removed while away); it is no longer
    /// tracked.
    Dropped { room: RoomId, error: String },
    /// The session ended for good (closed by the caller, a final close code, or too many failed attempts).
    Ended(Option<CloseInfo>),
}

/// The connection as handles see it.
#[derive(Clone)]
enum Conn {
    Reconnecting,
    Open(Arc<Client>),
    Ended(Option<CloseInfo>),
}

/// Bookkeeping from handles to the actor.
enum Command {
    /// Resume `room` from now on, starting after `since` (when known).
    Track {
        room: RoomId,
        since: Option<u64>,
    },
    /// A join answered with this seq: nothing at or below it is delivered again.
    Advance {
        room: RoomId,
        seq: u64,
    },
    Untrack(RoomId),
    Watch(Vec<UserId>),
    Unwatch(Vec<UserId>),
    Close(oneshot::Sender<()>),
}

/// A session that reconnects and resumes on its own. Methods take `&self`; share it in an `Arc` between a task
/// that sends and one that reads events. Requests issued while reconnecting wait for the resumed session (wrap
/// them in a timeout to bound that). Dropping the last handle closes the session.
pub struct ReconnectingClient {
    conn: watch::Receiver<Conn>,
    commands: mpsc::Sender<Command>,
    events: Mutex<mpsc::Receiver<SessionEvent>>,
}

impl std::fmt::Debug for ReconnectingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconnectingClient").field("connected", &self.is_connected()).finish_non_exhaustive()
    }
}

/// Full-jitter exponential backoff: a uniformly random delay in `[0, min(cap, base * 2^attempt))`, where `random`
/// is in `[0, 1)`.
pub fn backoff_delay(attempt: u32, base: Duration, cap: Duration, random: f64) -> Duration {
    let ceiling = base.saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX)).min(cap);
    ceiling.mul_f64(random.clamp(0.0, 1.0 - f64::EPSILON))
}

/// The wait before reconnect attempt `attempt` (1-based): the server's `bye.reconnect_after_ms` for the first
/// attempt after a close that carried one (a draining gateway spreads its clients out), else full jitter.
fn next_delay(attempt: u32, close: Option<&CloseInfo>, options: &ReconnectOptions, random: f64) -> Duration {
    match close.and_then(|c| c.bye.as_ref()).and_then(|bye| bye.reconnect_after_ms) {
        Some(ms) if attempt == 1 => Duration::from_millis(ms),
        _ => backoff_delay(attempt.saturating_sub(1), options.backoff_base, options.backoff_cap, random),
    }
}

/// A random number in `[0, 1)` from the standard library's per-process random hash keys.
fn random_unit() -> f64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// A fresh client message id.
pub fn new_cmid() -> String {
    switchyard_protocol::ids::random_base62(CMID_LEN)
}

/// Whether the error means the socket went away (so a repeatable request may be sent again).
fn connection_lost(error: &ClientError) -> bool {
    matches!(error, ClientError::Closed(_) | ClientError::WebSocket(_))
}

/// Whether sending `op` twice has the effect of sending it once (a `send`/`dm` only with a `cmid`).
fn repeatable(op: &ClientOp) -> bool {
    match op {
        ClientOp::Send { cmid, .. } | ClientOp::Dm { cmid, .. } => cmid.is_some(),
        ClientOp::Ping
        | ClientOp::Join { .. }
        | ClientOp::History { .. }
        | ClientOp::Members { .. }
        | ClientOp::Rooms
        | ClientOp::Presence { .. }
        | ClientOp::Read { .. }
        | ClientOp::Watch { .. }
        | ClientOp::Unwatch { .. } => true,
        ClientOp::Auth { .. }
        | ClientOp::Create { .. }
        | ClientOp::Leave { .. }
        | ClientOp::Invite { .. }
        | ClientOp::Kick { .. }
        | ClientOp::Typing { .. }
        | ClientOp::React { .. }
        | ClientOp::Edit { .. }
        | ClientOp::Delete { .. }
        | ClientOp::Pin { .. }
        | ClientOp::Unpin { .. }
        | ClientOp::Ban { .. }
        | ClientOp::Unban { .. }
        | ClientOp::Mute { .. }
        | ClientOp::Unmute { .. }
        | ClientOp::SlowMode { .. }
        | ClientOp::Freeze { .. }
        | ClientOp::Unfreeze { .. } => false,
    }
}

/// Whether a close ends the session: 4003 always, 4001 when there is no way to get another credential.
fn is_final(close: &Option<CloseInfo>, can_refresh: bool) -> bool {
    match close {
        Some(info) => info.code == 4003 || (info.code == 4001 && !can_refresh),
        None => false,
    }
}

impl ReconnectingClient {
    /// Connect (the first attempt is not retried: its error is returned), then keep the session alive.
    pub async fn connect(options: ConnectOptions, reconnect: ReconnectOptions) -> Result<Self, ClientError> {
        let client = Arc::new(Client::connect(options.clone()).await?);
        let (conn_tx, conn_rx) = watch::channel(Conn::Open(client.clone()));
        let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(SESSION_EVENT_QUEUE);
        let actor = Actor {
            options,
            reconnect,
            conn: conn_tx,
            commands: commands_rx,
            events: events_tx,
            rooms: HashMap::new(),
            watched: BTreeSet::new(),
        };
        tokio::spawn(actor.run(client));
        Ok(ReconnectingClient { conn: conn_rx, commands: commands_tx, events: Mutex::new(events_rx) })
    }

    /// Whether a socket is open and resumed right now.
    pub fn is_connected(&self) -> bool {
        matches!(*self.conn.borrow(), Conn::Open(_))
    }

    /// The current connection, for ops the typed helpers do not cover; `None` while reconnecting or ended. Its
    /// events belong to this session: take them from [`ReconnectingClient::next_event`], not from the `Client`.
    pub fn current(&self) -> Option<Arc<Client>> {
        match &*self.conn.borrow() {
            Conn::Open(client) => Some(client.clone()),
            _ => None,
        }
    }

    /// The open connection, waiting while reconnecting; `Closed` once the session ended.
    async fn open(&self) -> Result<Arc<Client>, ClientError> {
        let mut conn = self.conn.clone();
        let state =
            conn.wait_for(|c| !matches!(c, Conn::Reconnecting)).await.map_err(|_| ClientError::Closed(None))?.clone();
        match state {
            Conn::Open(client) => Ok(client),
            Conn::Ended(close) => Err(ClientError::Closed(close)),
            Conn::Reconnecting => unreachable!("waited for another state"),
        }
    }

    /// Wait until `client` is no longer the current connection (the actor noticed it closed).
    async fn replaced(&self, client: &Arc<Client>) {
        let mut conn = self.conn.clone();
        let _ = conn.wait_for(|c| !matches!(c, Conn::Open(current) if Arc::ptr_eq(current, client))).await;
    }

    /// Run `attempt` on the open connection; when the socket drops under it and `retry` holds, run it again on the
    /// next one.
    async fn on_connection<T, F>(&self, retry: bool, attempt: F) -> Result<T, ClientError>
    where
        F: Fn(Arc<Client>) -> BoxFuture<'static, Result<T, ClientError>>,
    {
        loop {
            let client = self.open().await?;
            match attempt(client.clone()).await {
                Err(error) if retry && connection_lost(&error) => self.replaced(&client).await,
                other => return other,
            }
        }
    }

    async fn tell(&self, command: Command) -> Result<(), ClientError> {
        self.commands.send(command).await.map_err(|_| ClientError::Closed(self.close_info()))
    }

    /// How the session ended, once it has.
    pub fn close_info(&self) -> Option<CloseInfo> {
        match &*self.conn.borrow() {
            Conn::Ended(close) => close.clone(),
            _ => None,
        }
    }

    /// Send `op` and wait for its reply. A repeatable op (reads, `join`, `read`, `watch`, and `send`/`dm` with a
    /// `cmid`) whose socket drops before the reply is sent again after the reconnect; any other op then fails
    /// with [`ClientError::Closed`] (its effect is unknown).
    pub async fn request(&self, op: ClientOp) -> Result<Reply, ClientError> {
        let retry = repeatable(&op);
        self.on_connection(retry, move |client| {
            let op = op.clone();
            Box::pin(async move { client.request(op).await })
        })
        .await
    }

    /// `join`: join, subscribe, and resume the room after every reconnect from now on. With `since`, the events
    /// after it are delivered first.
    pub async fn join(&self, room: &str, since: Option<u64>) -> Result<u64, ClientError> {
        let room_id = RoomId::parse(room)?;
        self.tell(Command::Track { room: room_id.clone(), since }).await?;
        let fields = self.request(ClientOp::Join { room: room_id.clone(), since }).await?.into_result();
        let fields = match fields {
            Ok(fields) => fields,
            Err(error) => {
                self.tell(Command::Untrack(room_id)).await?;
                return Err(error);
            }
        };
        let seq = seq_of(&fields)?;
        self.tell(Command::Advance { room: room_id, seq }).await?;
        Ok(seq)
    }

    /// `leave`: end membership; the room is no longer resumed.
    pub async fn leave(&self, room: &str) -> Result<(), ClientError> {
        let room_id = RoomId::parse(room)?;
        self.request(ClientOp::Leave { room: room_id.clone() }).await?.into_result()?;
        self.tell(Command::Untrack(room_id)).await
    }

    /// `send` with a generated `cmid`: however often it is retried, it posts once.
    pub async fn send(&self, room: &str, body: impl Into<String>) -> Result<Sent, ClientError> {
        self.send_with_cmid(room, body, new_cmid()).await
    }

    /// `send` with the caller's `cmid` (to retry a send across calls, or across restarts of the caller).
    pub async fn send_with_cmid(&self, room: &str, body: impl Into<String>, cmid: String) -> Result<Sent, ClientError> {
        let op = ClientOp::Send {
            room: RoomId::parse(room)?,
            body: body.into(),
            attrs: None,
            reply_to: None,
            cmid: Some(cmid),
        };
        let fields = self.request(op).await?.into_result()?;
        serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|e| ClientError::UnexpectedReply(Detail::of(e)))
    }

    /// `dm` with a generated `cmid`; the `dm:<a>:<b>` room is resumed from then on.
    pub async fn dm(&self, to: &str, body: impl Into<String>) -> Result<(RoomId, Sent), ClientError> {
        let op = ClientOp::Dm { to: UserId::parse(to)?, body: body.into(), attrs: None, cmid: Some(new_cmid()) };
        let mut fields = self.request(op).await?.into_result()?;
        let room = fields
            .remove("room")
            .and_then(|v| v.as_str().and_then(|r| RoomId::parse(r).ok()))
            .ok_or_else(|| ClientError::UnexpectedReply(Detail::new("no room in the dm reply")))?;
        let sent: Sent = serde_json::from_value(serde_json::Value::Object(fields))
            .map_err(|e| ClientError::UnexpectedReply(Detail::of(e)))?;
        self.tell(Command::Track { room: room.clone(), since: None }).await?;
        Ok((room, sent))
    }

    /// `history`: a page of messages in ascending seq, and whether there are more.
    pub async fn history(
        &self,
        room: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<(Vec<Message>, bool), ClientError> {
        let room = RoomId::parse(room)?;
        self.on_connection(true, move |client| {
            let room = room.clone();
            Box::pin(async move { client.history(room.as_str(), before, after, limit).await })
        })
        .await
    }

    /// `rooms`: this user's rooms, each with its last seq, read marker, unread count and latest message.
    pub async fn rooms(&self) -> Result<Vec<RoomSummary>, ClientError> {
        self.on_connection(true, move |client| Box::pin(async move { client.rooms().await })).await
    }

    /// `read`: move this user's read marker forward; the marker.
    pub async fn read(&self, room: &str, seq: u64) -> Result<u64, ClientError> {
        let fields = self.request(ClientOp::Read { room: RoomId::parse(room)?, seq }).await?.into_result()?;
        seq_of(&fields)
    }

    /// `react` (or remove a reaction); the seq of the reaction event. Not repeated after a drop (its effect is
    /// unknown then: the error is [`ClientError::Closed`]).
    pub async fn react(&self, room: &str, seq: u64, emoji: &str, remove: bool) -> Result<u64, ClientError> {
        let op = ClientOp::React { room: RoomId::parse(room)?, seq, emoji: emoji.to_owned(), remove };
        seq_of(&self.request(op).await?.into_result()?)
    }

    /// `pin` a message (a room admin, or either participant of a direct-message room); the seq of the pin event.
    /// Not repeated after a drop (its effect is unknown then: the error is [`ClientError::Closed`]).
    pub async fn pin(&self, room: &str, seq: u64) -> Result<u64, ClientError> {
        seq_of(&self.request(ClientOp::Pin { room: RoomId::parse(room)?, seq }).await?.into_result()?)
    }

    /// `unpin` a message (who may pin may unpin); the seq of the pin event that says `pinned: false`. Not repeated
    /// after a drop.
    pub async fn unpin(&self, room: &str, seq: u64) -> Result<u64, ClientError> {
        seq_of(&self.request(ClientOp::Unpin { room: RoomId::parse(room)?, seq }).await?.into_result()?)
    }

    /// `ban` a user from a room (room admins), for `secs` seconds or until `unban`; the seq of the `moderation`
    /// event (a ban that changes nothing answers the room's last seq). Moderation ops are not repeated after a
    /// drop (their effect is unknown then: the error is [`ClientError::Closed`]).
    pub async fn ban(&self, room: &str, user: &str, secs: Option<u64>) -> Result<u64, ClientError> {
        let op = ClientOp::Ban { room: RoomId::parse(room)?, user: UserId::parse(user)?, secs };
        seq_of(&self.request(op).await?.into_result()?)
    }

    /// `unban` a user (room admins).
    pub async fn unban(&self, room: &str, user: &str) -> Result<u64, ClientError> {
        let op = ClientOp::Unban { room: RoomId::parse(room)?, user: UserId::parse(user)? };
        seq_of(&self.request(op).await?.into_result()?)
    }

    /// `mute` a user in a room (room admins), for `secs` seconds or until `unmute`.
    pub async fn mute(&self, room: &str, user: &str, secs: Option<u64>) -> Result<u64, ClientError> {
        let op = ClientOp::Mute { room: RoomId::parse(room)?, user: UserId::parse(user)?, secs };
        seq_of(&self.request(op).await?.into_result()?)
    }

    /// `unmute` a user (room admins).
    pub async fn unmute(&self, room: &str, user: &str) -> Result<u64, ClientError> {
        let op = ClientOp::Unmute { room: RoomId::parse(room)?, user: UserId::parse(user)? };
        seq_of(&self.request(op).await?.into_result()?)
    }

    /// Set a room's slow mode to one message per `secs` seconds per member (0: off; room admins).
    pub async fn slow_mode(&self, room: &str, secs: u32) -> Result<u64, ClientError> {
        seq_of(&self.request(ClientOp::SlowMode { room: RoomId::parse(room)?, secs }).await?.into_result()?)
    }

    /// Freeze (`frozen: true`) or thaw a room (room admins).
    pub async fn freeze(&self, room: &str, frozen: bool) -> Result<u64, ClientError> {
        let room = RoomId::parse(room)?;
        let op = if frozen { ClientOp::Freeze { room } } else { ClientOp::Unfreeze { room } };
        seq_of(&self.request(op).await?.into_result()?)
    }

    /// `edit` one's own message; the seq of the edit event.
    pub async fn edit(&self, room: &str, seq: u64, body: impl Into<String>) -> Result<u64, ClientError> {
        let op = ClientOp::Edit { room: RoomId::parse(room)?, seq, body: body.into() };
        seq_of(&self.request(op).await?.into_result()?)
    }

    /// `delete` a message; the seq of the delete event.
    pub async fn delete(&self, room: &str, seq: u64) -> Result<u64, ClientError> {
        seq_of(&self.request(ClientOp::Delete { room: RoomId::parse(room)?, seq }).await?.into_result()?)
    }

    /// `typing`, on the current connection only (a typing signal is not worth keeping while reconnecting).
    pub async fn typing(&self, room: &str) -> Result<(), ClientError> {
        match self.current() {
            Some(client) => client.typing(room).await,
            None => Ok(()),
        }
    }

    /// `watch`: presence events for these users, renewed after every reconnect.
    pub async fn watch(&self, users: &[&str]) -> Result<(), ClientError> {
        let users = users.iter().map(|u| UserId::parse(u)).collect::<Result<Vec<_>, _>>()?;
        self.request(ClientOp::Watch { users: users.clone() }).await?.into_result()?;
        self.tell(Command::Watch(users)).await
    }

    /// `unwatch`.
    pub async fn unwatch(&self, users: &[&str]) -> Result<(), ClientError> {
        let users = users.iter().map(|u| UserId::parse(u)).collect::<Result<Vec<_>, _>>()?;
        self.tell(Command::Unwatch(users.clone())).await?;
        self.request(ClientOp::Unwatch { users }).await?.into_result().map(drop)
    }

    /// The next event, waiting as long as it takes; `None` after [`SessionEvent::Ended`] was taken.
    pub async fn next_event(&self) -> Option<SessionEvent> {
        self.events.lock().await.recv().await
    }

    /// [`ReconnectingClient::next_event`] within `limit`; `None` on timeout.
    pub async fn next_event_timeout(&self, limit: Duration) -> Option<SessionEvent> {
        tokio::time::timeout(limit, self.next_event()).await.ok().flatten()
    }

    /// End the session: the socket closes with 1000 and waiting requests fail with `Closed`.
    pub async fn close(&self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.commands.send(Command::Close(done_tx)).await.is_ok() {
            let _ = done_rx.await;
        }
    }
}

/// What the actor knows about one tracked room.
#[derive(Debug, Clone, Copy, Default)]
struct RoomState {
    /// The last seq delivered (or the join point); nothing at or below it is delivered again.
    last: Option<u64>,
}

/// The supervising task: owns the connection and the resume state.
struct Actor {
    options: ConnectOptions,
    reconnect: ReconnectOptions,
    conn: watch::Sender<Conn>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<SessionEvent>,
    rooms: HashMap<RoomId, RoomState>,
    watched: BTreeSet<UserId>,
}

/// Why the actor stopped serving a connection.
enum Stop {
    /// The socket closed (or was found dead); reconnect unless the close is final.
    Closed(Option<CloseInfo>),
    /// The caller closed the session, or dropped every handle.
    Caller(Option<oneshot::Sender<()>>),
}

impl Actor {
    async fn run(mut self, mut client: Arc<Client>) {
        loop {
            let close = match self.serve(&client).await {
                Stop::Caller(done) => {
                    client.close().await;
                    self.end(client.close_info()).await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                Stop::Closed(close) => close,
            };
            self.conn.send_replace(Conn::Reconnecting);
            if is_final(&close, self.reconnect.auth_source.is_some()) {
                self.end(close).await;
                return;
            }
            match self.reconnect(close).await {
                Ok(next) => {
                    client = next;
                    self.conn.send_replace(Conn::Open(client.clone()));
                    let _ = self.events.send(SessionEvent::Reconnected(client.hello().clone())).await;
                }
                Err(Stop::Caller(done)) => {
                    self.end(None).await;
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                Err(Stop::Closed(close)) => {
                    self.end(close).await;
                    return;
                }
            }
        }
    }

    async fn end(&mut self, close: Option<CloseInfo>) {
        self.conn.send_replace(Conn::Ended(close.clone()));
        let _ = self.events.send(SessionEvent::Ended(close)).await;
    }

    fn liveness_interval(&self, client: &Client) -> Duration {
        self.reconnect.liveness_interval.unwrap_or_else(|| Duration::from_millis(client.hello().heartbeat_ms.max(100)))
    }

    /// Deliver the connection's events and apply commands until the socket closes or the caller stops.
    async fn serve(&mut self, client: &Arc<Client>) -> Stop {
        let interval = self.liveness_interval(client);
        let mut quiet = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                event = client.next_event() => match event {
                    Some(event) => {
                        quiet.reset();
                        self.deliver(event).await;
                    }
                    None => return Stop::Closed(client.close_info()),
                },
                command = self.commands.recv() => match command {
                    None => return Stop::Caller(None),
                    Some(Command::Close(done)) => return Stop::Caller(Some(done)),
                    Some(other) => self.apply(other),
                },
                _ = quiet.tick() => {
                    // Nothing heard for a while: a ping proves the socket is alive. The event queue fills
                    // meanwhile; it is drained right after.
                    if tokio::time::timeout(interval, client.ping()).await.is_err() {
                        let dead = CloseInfo { code: 4010, reason: "no pong in time; the socket is dead".into(), bye: None };
                        return Stop::Closed(Some(dead));
                    }
                }
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Track { room, since } => {
                let state = self.rooms.entry(room).or_default();
                if state.last.is_none() {
                    state.last = since;
                }
            }
            Command::Advance { room, seq } => {
                let state = self.rooms.entry(room).or_default();
                state.last = Some(state.last.map_or(seq, |last| last.max(seq)));
            }
            Command::Untrack(room) => {
                self.rooms.remove(&room);
            }
            Command::Watch(users) => self.watched.extend(users),
            Command::Unwatch(users) => {
                for user in users {
                    self.watched.remove(&user);
                }
            }
            Command::Close(_) => unreachable!("handled by the caller"),
        }
    }

    /// Pass an event on unless it was delivered already (seq at or below the room's last).
    async fn deliver(&mut self, event: ServerEvent) {
        if let Some((room, seq)) = event.room_seq() {
            // A room first seen here (a DM, or events that overtook their join's reply) is tracked from now on.
            let state = self.rooms.entry(room.clone()).or_default();
            if state.last.is_some_and(|last| seq <= last) {
                return;
            }
            state.last = Some(seq);
            if let ServerEvent::RoomDeleted { room, .. } = &event {
                // A deleted room is not resumed: a join would create a new room under its name.
                self.rooms.remove(room);
            }
        }
        let _ = self.events.send(SessionEvent::Event(event)).await;
    }

    /// Wait, connect, resume; again and again until it works, the caller closes, or the attempts run out.
    async fn reconnect(&mut self, mut close: Option<CloseInfo>) -> Result<Arc<Client>, Stop> {
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            if self.reconnect.max_attempts.is_some_and(|max| attempt > max) {
                return Err(Stop::Closed(close));
            }
            let delay = next_delay(attempt, close.as_ref(), &self.reconnect, random_unit());
            let _ = self.events.send(SessionEvent::Reconnecting { attempt, delay, close: close.clone() }).await;
            self.pause(delay).await?;

            let mut options = self.options.clone();
            if let Some(source) = &self.reconnect.auth_source {
                match source().await {
                    Ok(auth) => options.auth = auth,
                    Err(error) => {
                        tracing::warn!(%error, "could not get a credential to reconnect with");
                        continue;
                    }
                }
            }
            let client = match Client::connect(options).await {
                Ok(client) => Arc::new(client),
                Err(error) => {
                    tracing::debug!(%error, attempt, "reconnect failed");
                    close = match error {
                        ClientError::Closed(info) => info,
                        // Refused before the upgrade: the credential is no longer good.
                        ClientError::Http { status: 401 | 403, body } => {
                            Some(CloseInfo { code: 4001, reason: format!("upgrade refused: {body}"), bye: None })
                        }
                        _ => None,
                    };
                    if is_final(&close, self.reconnect.auth_source.is_some()) {
                        return Err(Stop::Closed(close));
                    }
                    continue;
                }
            };
            match self.resume(&client).await {
                Ok(()) => return Ok(client),
                Err(error) => {
                    tracing::debug!(%error, attempt, "resume failed; reconnecting");
                    close = client.close_info();
                    client.close().await;
                }
            }
        }
    }

    /// Sleep, applying commands meanwhile (a join issued now is resumed too); the caller may close.
    async fn pause(&mut self, delay: Duration) -> Result<(), Stop> {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return Ok(()),
                command = self.commands.recv() => match command {
                    None => return Err(Stop::Caller(None)),
                    Some(Command::Close(done)) => return Err(Stop::Caller(Some(done))),
                    Some(other) => self.apply(other),
                },
            }
        }
    }

    /// Re-join every tracked room with `since`, re-watch watched users.
    async fn resume(&mut self, client: &Client) -> Result<(), ClientError> {
        // Commands that arrive meanwhile are applied once the session serves again; a join issued meanwhile waits
        // for the open session and so runs after this.
        let rooms: Vec<(RoomId, Option<u64>)> = self.rooms.iter().map(|(room, s)| (room.clone(), s.last)).collect();
        for (room, from) in rooms {
            match client.join(room.as_str(), from).await {
                Ok(seq) => {
                    // The replayed events sit in the connection's queue; they are delivered (and deduplicated)
                    // once the session is open again.
                    let _ = self.events.send(SessionEvent::Resumed { room, from, to: seq }).await;
                }
                Err(error) if error.code() == Some(ErrorCode::ResumeGap) => {
                    let seq = client.join(room.as_str(), None).await?;
                    if let Some(state) = self.rooms.get_mut(&room) {
                        state.last = Some(seq);
                    }
                    let _ = self.events.send(SessionEvent::Gap { room, from, to: seq }).await;
                }
                Err(error) if matches!(error.code(), Some(ErrorCode::Forbidden | ErrorCode::NotFound)) => {
                    self.rooms.remove(&room);
                    let _ = self.events.send(SessionEvent::Dropped { room, error: error.to_string() }).await;
                }
                Err(error) => return Err(error),
            }
        }
        if !self.watched.is_empty() {
            let users: Vec<UserId> = self.watched.iter().cloned().collect();
            client.request(ClientOp::Watch { users }).await?.into_result()?;
        }
        Ok(())
    }
}

fn seq_of(fields: &serde_json::Map<String, serde_json::Value>) -> Result<u64, ClientError> {
    fields
        .get("seq")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| ClientError::UnexpectedReply(Detail::new(format!("no seq in {fields:?}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_below_a_capped_exponential_ceiling() {
        let base = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        for attempt in 0..40 {
            let ceiling = (base * 2u32.saturating_pow(attempt.min(20))).min(cap);
            assert_eq!(backoff_delay(attempt, base, cap, 0.0), Duration::ZERO);
            let top = backoff_delay(attempt, base, cap, 0.999_999);
            assert!(top < ceiling && top >= ceiling.mul_f64(0.99), "attempt {attempt}: {top:?} vs {ceiling:?}");
            let half = backoff_delay(attempt, base, cap, 0.5);
            assert_eq!(half, ceiling / 2);
        }
    }

    #[test]
    fn a_bye_with_reconnect_after_ms_sets_the_first_delay_only() {
        let options = ReconnectOptions {
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(1),
            ..ReconnectOptions::default()
        };
        let bye = crate::Bye { code: 1001, reason: "draining".into(), reconnect_after_ms: Some(2_345) };
        let drained = CloseInfo { code: 1001, reason: "draining".into(), bye: Some(bye) };
        assert_eq!(next_delay(1, Some(&drained), &options, 0.5), Duration::from_millis(2_345));
        assert_eq!(next_delay(2, Some(&drained), &options, 0.5), Duration::from_millis(100));
        let dropped = CloseInfo { code: 1006, reason: String::new(), bye: None };
        assert_eq!(next_delay(1, Some(&dropped), &options, 0.5), Duration::from_millis(50));
        assert_eq!(next_delay(4, None, &options, 0.5), Duration::from_millis(400));
        assert_eq!(next_delay(30, None, &options, 0.5), Duration::from_millis(500));
    }

    #[test]
    fn random_unit_is_in_range_and_varies() {
        let draws: Vec<f64> = (0..1000).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|d| (0.0..1.0).contains(d)));
        let below_half = draws.iter().filter(|d| **d < 0.5).count();
        assert!((350..650).contains(&below_half), "{below_half} of 1000 below 0.5");
        assert_ne!(new_cmid(), new_cmid());
        assert_eq!(new_cmid().len(), CMID_LEN);
    }

    #[test]
    fn only_repeatable_ops_are_retried_and_only_4003_or_unrefreshable_4001_is_final() {
        let room = RoomId::parse("r").unwrap();
        let send = |cmid: Option<&str>| ClientOp::Send {
            room: room.clone(),
            body: "x".into(),
            attrs: None,
            reply_to: None,
            cmid: cmid.map(String::from),
        };
        assert!(repeatable(&send(Some("c1"))));
        assert!(!repeatable(&send(None)));
        assert!(repeatable(&ClientOp::Join { room: room.clone(), since: Some(3) }));
        assert!(!repeatable(&ClientOp::Edit { room: room.clone(), seq: 1, body: "y".into() }));
        let close = |code| Some(CloseInfo { code, reason: String::new(), bye: None });
        assert!(is_final(&close(4003), true));
        assert!(is_final(&close(4001), false));
        assert!(!is_final(&close(4001), true));
        assert!(!is_final(&close(1001), false));
        assert!(!is_final(&close(4009), false));
        assert!(!is_final(&None, false));
    }

    #[test]
    fn sequenced_events_are_recognised() {
        let room = RoomId::parse("r").unwrap();
        let user = UserId::parse("u").unwrap();
        let typing = ServerEvent::Typing { room: room.clone(), user: user.clone() };
        assert_eq!(typing.room_seq(), None);
        let joined = ServerEvent::Joined { room: room.clone(), seq: 7, user, ts: 1 };
        assert_eq!(joined.room_seq(), Some((&room, 7)));
    }
}
