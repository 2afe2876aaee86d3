//! The session actor: one task per WebSocket. It authenticates (when the upgrade did not), says `hello`, parses
//! client frames, enforces the per-connection limits, runs ops one at a time in arrival order (without blocking
//! outbound delivery), and writes each room's events in seq order with no gap it can see and no duplicate.
//!
//! It owns all of its state; the hub reaches it only through its bounded outbound queue. It does not sequence
//! anything (router shards do) and never blocks other sessions: a session that cannot keep up is closed with 4009.
//!
//! A session is idle most of its life, and its task holds inline the largest future it can await. So work that
//! runs rarely or briefly (first-frame auth, a client frame, an op's completion, a gap fill, the close) is boxed:
//! it costs memory only while it runs, and an idle session stays small (see the test at the end).
//!
//! Everything a session does runs inside a `session` tracing span carrying its session id, tenant and user (never
//! its token). When the gateway drains, the session finishes the op in flight (its `ok` is written), answers every
//! other op `unavailable`, says `bye` with a jittered `reconnect_after_ms` and closes with 1001.

use crate::auth::{authenticate, AuthError, Identity};
use crate::limits::{tenant_rate_refusal, AbuseCounter};
use crate::moderation;
use crate::presend::{self, Draft, Screened};
use crate::resume;
use crate::revocation::CloseSignal;
use crate::rooms::{self, HistoryPage, Reader};
use crate::sockets::{self, SocketSlot};
use crate::telemetry;
use crate::upstream::{self, UpstreamError};
use crate::ws::hub::{LiveEvent, SessionTx};
use crate::ws::upgrade::Unauthenticated;
use crate::Gateway;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::future::BoxFuture;
use futures::stream::{SplitSink, SplitStream};
use futures::{FutureExt, SinkExt, StreamExt};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_protocol::client::{
    decode_client_frame, encode_frame, ClientOp, ClientRequest, Format, OkResult, ServerFrame,
};
use switchyard_protocol::hooks::PreSendOp;
use switchyard_protocol::internal::{EventBody, Moderation, RoomCommand};
use switchyard_protocol::{
    limits, subjects, ClientMessageId, ClientMessageIdError, CloseCode, ErrorCode, RoomId, UserId,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);
/// Ops waiting behind the one in flight; more than this is answered `rate_limited`.
const MAX_QUEUED_OPS: usize = 64;
/// A session relays at most one typing signal per room in this interval (router shards throttle fleet-wide too).
const TYPING_INTERVAL: Duration = Duration::from_secs(2);
/// The outbound queue depth is sampled on every this many events a session takes from it (a power of two).
const QUEUE_DEPTH_SAMPLE_EVERY: u64 = 32;
/// At most this many queued events are written between two flushes of the socket, so other work (ops, pings, the
/// drain) is not starved by a steady stream of events.
const DELIVERY_BATCH: usize = 64;
/// ... and at most about this many bytes: what a batch adds to the socket's write buffer, on top of the bounded
/// outbound queue, while a client that stopped reading blocks the flush.
const DELIVERY_BATCH_BYTES: usize = 64 * 1024;

/// A session's view of one room it receives.
enum RoomDelivery {
    /// A join is in flight: live events are held until its `ok` says where delivery starts; the events its
    /// `since` replays are written as they come (`replayed`: the last of them written so far). `previous` is the
    /// delivery (`last_seq`, `joined_at`) a repeated join started from. `inbox_dms`: a direct-message room joined
    /// without `since` and not received before; its inbox brings it to the session without a join, so the messages
    /// that arrived that way up to the join point are written before the `ok` rather than dropped as history.
    Joining { held: Vec<Arc<LiveEvent>>, previous: Option<(u64, u64)>, replayed: u64, inbox_dms: bool },
    /// Delivering; `last_seq` is the last seq written (or the join point). `joined_at` is the point of the latest
    /// join: the user's own `left` before it ended an earlier membership (a kick the join raced) and does not stop
    /// delivery.
    Live { last_seq: u64, joined_at: u64 },
}

/// What a finished op asks the session to do.
enum Completion {
    Reply(ServerFrame),
    Joined {
        rid: Option<u64>,
        room: RoomId,
        /// The join point, and the seq of the last missed event the join queued for replay (`None`: none).
        result: Result<(u64, Option<u64>), UpstreamError>,
    },
    Left {
        rid: Option<u64>,
        room: RoomId,
        result: Result<(), UpstreamError>,
    },
    Watched {
        rid: Option<u64>,
        users: Vec<UserId>,
        result: Result<(), UpstreamError>,
    },
}

/// A join whose `ok` waits for its replayed events to be written: they are queued, the session writes them in
/// turn, and the `ok` follows the last of them. No other op starts meanwhile.
struct PendingJoin {
    rid: Option<u64>,
    room: RoomId,
    /// The join point.
    seq: u64,
    /// The seq of the last replayed event; the `ok` is written right after it.
    last_replayed: u64,
}

/// A token bucket for the per-connection op rate.
struct OpBudget {
    tokens: f64,
    per_sec: f64,
    burst: f64,
    refilled_at: Instant,
}

impl OpBudget {
    fn new(per_sec: u32, burst: u32) -> Self {
        OpBudget {
            tokens: f64::from(burst),
            per_sec: f64::from(per_sec),
            burst: f64::from(burst),
            refilled_at: Instant::now(),
        }
    }

    /// Take one op's token, or say how long until one is available.
    fn take(&mut self) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.refilled_at).as_secs_f64() * self.per_sec).min(self.burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }
}

/// Why a session ended, when the server ends it.
struct Close {
    code: CloseCode,
    reason: &'static str,
}

/// What a session does after it handled a client frame.
enum AfterFrame {
    /// Read the next frame.
    Continue,
    /// End without a close of its own: the client closed, or the socket failed under a write.
    End,
    /// End with this close.
    Close(Close),
}

impl Close {
    fn draining() -> Close {
        Close { code: CloseCode::Draining, reason: "gateway is draining" }
    }
}

/// An open socket, counted in `switchyard_gateway_open_sockets` from the upgrade until the task ends.
struct OpenSocket {
    subprotocol: &'static str,
}

impl OpenSocket {
    fn new(format: Format) -> Self {
        let subprotocol = telemetry::subprotocol_label(format);
        metrics::gauge!("switchyard_gateway_open_sockets", "subprotocol" => subprotocol).increment(1.0);
        OpenSocket { subprotocol }
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        metrics::gauge!("switchyard_gateway_open_sockets", "subprotocol" => self.subprotocol).decrement(1.0);
    }
}

/// Count how a socket ended: the server's close code, or `client` when the client closed or vanished.
fn count_close(code: Option<CloseCode>) {
    let label = match code {
        Some(code) => code.code().to_string(),
        None => "client".to_owned(),
    };
    metrics::counter!("switchyard_gateway_closes_total", "code" => label).increment(1);
}

/// One WebSocket session.
struct Session {
    gw: Arc<Gateway>,
    /// The id `hello` announces, also on every log line of the session.
    session_id: String,
    identity: Identity,
    format: Format,
    sink: SplitSink<WebSocket, Message>,
    /// How the hub reaches this session; cloned into every subscription.
    tx: SessionTx,
    /// Live events from the hub.
    events: mpsc::Receiver<Arc<LiveEvent>>,
    /// Rooms this session receives, with the delivery point of each.
    rooms: HashMap<RoomId, RoomDelivery>,
    /// Live subjects this session is subscribed to in the hub.
    subscribed: HashSet<String>,
    /// Users whose presence this session watches.
    watched: HashSet<UserId>,
    /// When this session last relayed a typing signal, per room.
    typing_sent: HashMap<RoomId, Instant>,
    /// The op being executed, if any. Ops run one at a time so a client's ops take effect in the order sent.
    in_flight: Option<BoxFuture<'static, Completion>>,
    /// Ops waiting for the one in flight.
    queued: VecDeque<ClientRequest>,
    /// A join whose replay is still being written; its `ok` comes after it, and the next op after that.
    pending_join: Option<PendingJoin>,
    budget: OpBudget,
    /// When the client was last heard from (any frame, including pongs).
    last_heard: Instant,
    /// Rate-limited ops in the recent past; too many closes the session with 4008.
    abuse: AbuseCounter,
    /// Set when the gateway drains: no new op starts, the one in flight finishes, then `bye` and 1001.
    draining: bool,
    /// Events taken from the outbound queue, for sampling its depth.
    taken: u64,
}

/// Serve one upgraded socket until it closes.
/// `admitted` is the identity of a socket authenticated before the upgrade, with its place in the socket quotas.
/// `waiting` is the socket's place among those not authenticated yet (with `admitted` `None`), freed once the
/// first-frame `auth` is decided.
pub async fn run(
    gw: Arc<Gateway>,
    socket: WebSocket,
    format: Format,
    admitted: Option<(Identity, SocketSlot)>,
    waiting: Option<Unauthenticated>,
) {
    let _open = OpenSocket::new(format);
    let session_id = format!("ss_{}", switchyard_protocol::ids::random_base62(16));
    let span = tracing::info_span!(
        "session",
        session = %session_id,
        tenant = tracing::field::Empty,
        user = tracing::field::Empty,
        subprotocol = telemetry::subprotocol_label(format),
    );
    if let Some((identity, _)) = &admitted {
        span.record("tenant", identity.tenant.as_str());
        span.record("user", identity.user.as_str());
    }
    run_session(gw, socket, format, admitted, waiting, session_id).instrument(span).await;
}

async fn run_session(
    gw: Arc<Gateway>,
    socket: WebSocket,
    format: Format,
    admitted: Option<(Identity, SocketSlot)>,
    waiting: Option<Unauthenticated>,
    session_id: String,
) {
    let (mut sink, mut stream) = socket.split();
    let window = gw.config.drain_reconnect_window_ms;
    let decided = match admitted {
        Some(admitted) => Ok(admitted),
        None => Box::pin(first_frame_admission(&gw, &mut stream, format)).await,
    };
    // Authenticated or refused: the socket no longer waits to authenticate.
    drop(waiting);
    // The slot keeps the socket counted in its quotas until this function returns.
    let (identity, _slot) = match decided {
        Ok((identity, slot)) => {
            let span = tracing::Span::current();
            span.record("tenant", identity.tenant.as_str());
            span.record("user", identity.user.as_str());
            (identity, slot)
        }
        Err((code, reason)) => {
            tracing::debug!(code = code.code(), %reason, "closing before authentication");
            count_close(Some(code));
            let _ = Box::pin(send_close(&mut sink, format, code, &reason, window)).await;
            return;
        }
    };
    // Registered for revocation until this function returns (the registration deregisters on drop).
    let registration = gw.sessions.register(&identity);
    let (events_tx, events) = mpsc::channel(gw.config.outbound_queue_frames);
    let tx = SessionTx {
        id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
        format,
        events: events_tx,
        queued_bytes: Arc::new(AtomicUsize::new(0)),
        max_queued_bytes: gw.config.outbound_queue_bytes,
        overflow: CancellationToken::new(),
    };
    let abuse = AbuseCounter::new(gw.config.abuse_limit, gw.config.abuse_window());
    let mut session = Session {
        abuse,
        budget: OpBudget::new(gw.config.ops_per_sec, gw.config.ops_burst),
        gw,
        session_id,
        identity,
        format,
        sink,
        tx,
        events,
        rooms: HashMap::new(),
        subscribed: HashSet::new(),
        watched: HashSet::new(),
        typing_sent: HashMap::new(),
        in_flight: None,
        queued: VecDeque::new(),
        pending_join: None,
        last_heard: Instant::now(),
        draining: false,
        taken: 0,
    };
    tracing::debug!("session open");
    let (tenant, user) = (session.identity.tenant.clone(), session.identity.user.clone());
    session.gw.presence.opened(&tenant, &user).await;
    let inbox = subjects::user_inbox(&tenant, &user);
    let close = match Box::pin(session.gw.hub.subscribe(&inbox, session.tx.clone())).await {
        Ok(()) => {
            session.subscribed.insert(inbox);
            session.serve(&mut stream, registration.signal()).await
        }
        Err(error) => {
            tracing::warn!(%error, "cannot subscribe the session's inbox");
            Some(Close { code: CloseCode::Draining, reason: "gateway cannot serve this session now" })
        }
    };
    for subject in &session.subscribed {
        session.gw.hub.unsubscribe(subject, session.tx.id);
    }
    session.gw.presence.closed(&tenant, &user).await;
    drop(registration);
    count_close(close.as_ref().map(|close| close.code));
    match close {
        Some(close) => {
            tracing::debug!(code = close.code.code(), reason = close.reason, "server closes the session");
            let _ = Box::pin(send_close(&mut session.sink, format, close.code, close.reason, window)).await;
            Box::pin(linger(&mut stream)).await;
        }
        // The client closed (or vanished): flush the answer to its close frame, if it sent one.
        None => {
            tracing::debug!("client closed the session");
            let _ = tokio::time::timeout(Duration::from_secs(1), session.sink.close()).await;
        }
    }
}

/// After a server-initiated close, read and drop what the client still sends until its close frame (or a second),
/// so that closing the socket with client frames unread cannot reset the connection and lose `bye` and the close.
async fn linger(stream: &mut SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(frame)) = stream.next().await {
            if matches!(frame, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Wait for `{"op": "auth"}` as the first frame.
/// Authenticate by a first-frame `auth`, then count the socket in its quotas (over one: close 4008).
async fn first_frame_admission(
    gw: &Arc<Gateway>,
    stream: &mut SplitStream<WebSocket>,
    format: Format,
) -> Result<(Identity, SocketSlot), (CloseCode, String)> {
    let identity = first_frame_auth(gw, stream, format).await?;
    match sockets::admit(gw, &identity.tenant, &identity.user).await {
        Ok(slot) => Ok((identity, slot)),
        Err(over) => Err((CloseCode::RateLimitAbuse, over.reason().to_owned())),
    }
}

async fn first_frame_auth(
    gw: &Arc<Gateway>,
    stream: &mut SplitStream<WebSocket>,
    format: Format,
) -> Result<Identity, (CloseCode, String)> {
    let unauthenticated = |reason: &str| (CloseCode::Unauthenticated, reason.to_owned());
    let deadline = tokio::time::Instant::now() + gw.config.auth_timeout();
    loop {
        let next = tokio::select! {
            _ = gw.shutdown.cancelled() => return Err((CloseCode::Draining, "gateway is draining".to_owned())),
            next = tokio::time::timeout_at(deadline, stream.next()) => next,
        };
        let frame = match next {
            Err(_) => {
                telemetry::auth_failure("timeout");
                return Err(unauthenticated("no authentication within the time allowed"));
            }
            Ok(None) | Ok(Some(Err(_))) => return Err(unauthenticated("socket closed before authentication")),
            Ok(Some(Ok(frame))) => frame,
        };
        let bytes = match frame {
            Message::Text(text) => text.as_bytes().to_vec(),
            Message::Binary(bytes) => bytes.to_vec(),
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return Err(unauthenticated("socket closed before authentication")),
        };
        let decoded = decode_client_frame(&bytes, format);
        telemetry::frame_received(decoded.as_ref().ok().map(|request| request.op.name()));
        return match decoded {
            Ok(ClientRequest { op: ClientOp::Auth { token }, .. }) => authenticate(gw, &token).await.map_err(|e| {
                // A token store outage is no verdict on the token: the client may retry (1013).
                let code = match &e {
                    _ if e.is_unavailable() => CloseCode::TryAgainLater,
                    // Final: a new token would be refused as well.
                    AuthError::Banned => CloseCode::Revoked,
                    _ => CloseCode::Unauthenticated,
                };
                (code, format!("authentication failed: {e}"))
            }),
            Ok(_) => {
                telemetry::auth_failure("no_auth_frame");
                Err(unauthenticated("the first frame must be an auth op"))
            }
            Err(e) => {
                telemetry::auth_failure("no_auth_frame");
                Err((CloseCode::Unauthenticated, format!("the first frame must be an auth op: {}", e.message)))
            }
        };
    }
}

/// Say `bye` and close with `code`. A draining close (1001) tells the client when to reconnect: a delay drawn
/// uniformly from `[0, reconnect_window_ms)`, so the clients of a drained gateway come back spread over the window
/// rather than all at once.
async fn send_close(
    sink: &mut SplitSink<WebSocket, Message>,
    format: Format,
    code: CloseCode,
    reason: &str,
    reconnect_window_ms: u64,
) -> Result<(), axum::Error> {
    let reconnect_after_ms = (code == CloseCode::Draining).then(|| rand::random_range(0..reconnect_window_ms.max(1)));
    let bye = ServerFrame::Bye { code: code.code(), reason: reason.to_owned(), reconnect_after_ms };
    let write = async {
        sink.send(frame_message(&bye, format)).await?;
        telemetry::frame_sent("bye");
        sink.send(Message::Close(Some(CloseFrame { code: code.code(), reason: reason.to_owned().into() }))).await
    };
    tokio::time::timeout(Duration::from_secs(1), write).await.unwrap_or(Ok(()))
}

fn frame_message(frame: &ServerFrame, format: Format) -> Message {
    let bytes = encode_frame(frame, format);
    match format {
        Format::Json => match String::from_utf8(bytes) {
            Ok(text) => Message::Text(text.into()),
            Err(_) => Message::Text("{}".into()),
        },
        Format::MsgPack => Message::Binary(bytes.into()),
    }
}

fn err_frame(rid: Option<u64>, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    ServerFrame::Err { rid, code, message: message.into(), retry_after_ms: None }
}

/// The contract's answer to a refused `cmid`: `too_large` when it is too long, `bad_request` otherwise.
fn cmid_refusal(error: ClientMessageIdError) -> (ErrorCode, String) {
    let code = match error {
        ClientMessageIdError::TooLong => ErrorCode::TooLarge,
        ClientMessageIdError::Empty | ClientMessageIdError::Character => ErrorCode::BadRequest,
    };
    (code, error.to_string())
}

/// A send's `cmid` as the validated id the router shard gets (checked already when the op was queued).
fn parse_cmid(rid: Option<u64>, cmid: Option<String>) -> Result<Option<ClientMessageId>, ServerFrame> {
    cmid.map(|c| ClientMessageId::parse(&c)).transpose().map_err(|error| {
        let (code, message) = cmid_refusal(error);
        err_frame(rid, code, message)
    })
}

/// The answer to an op that arrives (or waits) while the gateway drains: it was not executed; retry it after
/// reconnecting (to another gateway).
fn draining_refusal(rid: Option<u64>) -> ServerFrame {
    err_frame(rid, ErrorCode::Unavailable, "gateway is draining; reconnect and retry")
}

impl Session {
    /// The session loop. Returns how the server wants to close, or `None` when the client went away.
    async fn serve(&mut self, stream: &mut SplitStream<WebSocket>, revoked: CloseSignal) -> Option<Close> {
        let hello = ServerFrame::Hello {
            session: self.session_id.clone(),
            user: self.identity.user.clone(),
            project_id: self.identity.tenant.clone(),
            heartbeat_ms: self.gw.config.heartbeat_ms,
            max_frame: self.gw.config.max_frame_bytes,
        };
        self.write(&hello).await.ok()?;
        let mut heartbeat = tokio::time::interval(self.gw.config.heartbeat());
        heartbeat.tick().await;
        let overflow = self.tx.overflow.clone();
        let shutdown = self.gw.shutdown.clone();
        // Set when the drain begins: the op in flight must be done by then.
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        loop {
            let deadline = drain_deadline.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                _ = overflow.cancelled() => {
                    metrics::counter!("switchyard_gateway_slow_consumer_closes_total").increment(1);
                    return Some(Close { code: CloseCode::SlowConsumer, reason: "outbound queue full" });
                }
                _ = shutdown.cancelled(), if !self.draining => {
                    self.draining = true;
                    drain_deadline = Some(self.gw.drain_deadline());
                    self.refuse_queued().await.ok()?;
                    if self.in_flight.is_none() {
                        return Some(Close::draining());
                    }
                }
                _ = tokio::time::sleep_until(deadline), if drain_deadline.is_some() => {
                    tracing::warn!("op still in flight at the drain deadline; closing without its reply");
                    return Some(Close::draining());
                }
                (code, reason) = revoked.fired() => return Some(Close { code, reason }),
                completion = async { self.in_flight.as_mut().expect("guarded by the select condition").await },
                    if self.in_flight.is_some() => {
                    self.in_flight = None;
                    if let Err(error) = Box::pin(self.complete(completion)).await {
                        return closing_after(error);
                    }
                    if self.draining {
                        return Some(Close::draining());
                    }
                    self.start_next();
                }
                event = self.events.recv() => {
                    let event = event?;
                    // A client that stops reading blocks these writes once its socket buffers are full; the hub then
                    // overflows the queue, and the session must not wait for the writes to close it.
                    let overflowed = tokio::select! {
                        biased;
                        written = self.deliver_batch(event) => {
                            if let Err(error) = written {
                                return closing_after(error);
                            }
                            false
                        }
                        _ = overflow.cancelled() => true,
                    };
                    if overflowed {
                        metrics::counter!("switchyard_gateway_slow_consumer_closes_total").increment(1);
                        return Some(Close { code: CloseCode::SlowConsumer, reason: "outbound queue full" });
                    }
                }
                frame = stream.next() => {
                    let frame = match frame {
                        None => return None,
                        Some(Ok(frame)) => frame,
                        Some(Err(error)) => {
                            let text = error.to_string();
                            tracing::debug!(error = %text, "socket read failed");
                            if text.contains("too long") || text.contains("limit") || text.contains("too big") {
                                return Some(Close { code: CloseCode::FrameTooBig, reason: "frame too big" });
                            }
                            return None;
                        }
                    };
                    self.last_heard = Instant::now();
                    match Box::pin(self.on_frame(frame)).await {
                        AfterFrame::Continue => {}
                        AfterFrame::End => return None,
                        AfterFrame::Close(close) => return Some(close),
                    }
                }
                _ = heartbeat.tick() => {
                    if self.last_heard.elapsed() > 2 * self.gw.config.heartbeat() {
                        return Some(Close { code: CloseCode::HeartbeatTimeout, reason: "no answer to pings" });
                    }
                    self.sink.send(Message::Ping(bytes::Bytes::new())).await.ok()?;
                }
            }
        }
    }

    async fn write(&mut self, frame: &ServerFrame) -> Result<(), axum::Error> {
        self.sink.send(frame_message(frame, self.format)).await?;
        telemetry::frame_sent(frame.name());
        Ok(())
    }

    /// Buffer a room event or signal for the socket; the next flush (or `write`) sends it.
    async fn send_event(&mut self, event: &LiveEvent) -> Result<(), axum::Error> {
        self.sink.feed(event.message(self.format)).await?;
        telemetry::frame_sent(event.op);
        Ok(())
    }

    /// Deliver `first` and whatever else is already queued (up to `DELIVERY_BATCH` events), then flush once: a
    /// busy session pays one socket write for a batch of events instead of one per event.
    async fn deliver_batch(&mut self, first: Arc<LiveEvent>) -> Result<(), axum::Error> {
        let mut event = first;
        let (mut delivered, mut fed_bytes) = (0, 0);
        loop {
            let len = event.encoded_len(self.format);
            fed_bytes += len;
            self.tx.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            if self.taken & (QUEUE_DEPTH_SAMPLE_EVERY - 1) == 0 {
                metrics::histogram!("switchyard_gateway_outbound_queue_depth_frames").record(self.events.len() as f64);
            }
            self.taken += 1;
            self.deliver(event).await?;
            delivered += 1;
            if delivered == DELIVERY_BATCH || fed_bytes >= DELIVERY_BATCH_BYTES {
                break;
            }
            match self.events.try_recv() {
                Ok(next) => event = next,
                Err(_) => break,
            }
        }
        self.sink.flush().await
    }

    /// Answer every queued op `unavailable`: the gateway is draining and starts no new op.
    async fn refuse_queued(&mut self) -> Result<(), axum::Error> {
        while let Some(request) = self.queued.pop_front() {
            self.write(&draining_refusal(request.rid)).await?;
        }
        Ok(())
    }

    /// Handle one client frame.
    async fn on_frame(&mut self, frame: Message) -> AfterFrame {
        let bytes = match frame {
            Message::Text(text) => {
                if self.format != Format::Json {
                    let message = "this session speaks MessagePack: send binary frames";
                    return self.reply_now(err_frame(None, ErrorCode::BadRequest, message)).await;
                }
                text.as_bytes().to_vec()
            }
            Message::Binary(bytes) => {
                if self.format != Format::MsgPack {
                    let message = "this session speaks JSON: send text frames";
                    return self.reply_now(err_frame(None, ErrorCode::BadRequest, message)).await;
                }
                bytes.to_vec()
            }
            Message::Ping(_) | Message::Pong(_) => return AfterFrame::Continue,
            Message::Close(_) => return AfterFrame::End,
        };
        if bytes.len() > self.gw.config.max_frame_bytes {
            return AfterFrame::Close(Close { code: CloseCode::FrameTooBig, reason: "frame too big" });
        }
        let request = match decode_client_frame(&bytes, self.format) {
            Ok(request) => request,
            Err(error) => {
                telemetry::frame_received(None);
                return self.reply_now(err_frame(error.rid, error.code, error.message)).await;
            }
        };
        telemetry::frame_received(Some(request.op.name()));
        if let Err(wait) = self.budget.take() {
            metrics::counter!("switchyard_gateway_rate_limited_total").increment(1);
            if self.abuse.record(wait) {
                return AfterFrame::Close(Close {
                    code: CloseCode::RateLimitAbuse,
                    reason: "too many rate-limited ops",
                });
            }
            if matches!(request.op, ClientOp::Typing { .. }) {
                return AfterFrame::Continue;
            }
            let frame = ServerFrame::Err {
                rid: request.rid,
                code: ErrorCode::RateLimited,
                message: "too many ops on this connection".into(),
                retry_after_ms: Some(wait.as_millis() as u64 + 1),
            };
            return self.reply_now(frame).await;
        }
        if let Err((code, message)) = self.check_op(&request.op) {
            if matches!(request.op, ClientOp::Typing { .. }) {
                return AfterFrame::Continue;
            }
            return self.reply_now(err_frame(request.rid, code, message)).await;
        }
        let tenant = &self.identity.tenant;
        if let Some(refusal) = tenant_rate_refusal(&self.gw, tenant, request.rid, &request.op).await {
            return self.reply_now(refusal).await;
        }
        match request.op {
            ClientOp::Ping => self.reply_now(ServerFrame::Pong { rid: request.rid }).await,
            ClientOp::Auth { .. } => {
                self.reply_now(err_frame(request.rid, ErrorCode::BadRequest, "this session is already authenticated"))
                    .await
            }
            ClientOp::Typing { room } => {
                self.typing(room).await;
                AfterFrame::Continue
            }
            ClientOp::Create { .. }
            | ClientOp::Join { .. }
            | ClientOp::Leave { .. }
            | ClientOp::Invite { .. }
            | ClientOp::Kick { .. }
            | ClientOp::Send { .. }
            | ClientOp::Dm { .. }
            | ClientOp::Read { .. }
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
            | ClientOp::Unfreeze { .. }
            | ClientOp::History { .. }
            | ClientOp::Members { .. }
            | ClientOp::Rooms
            | ClientOp::Presence { .. }
            | ClientOp::Watch { .. }
            | ClientOp::Unwatch { .. } => self.queue(request).await,
        }
    }

    /// Queue an op that is answered in order with the others (`start_next` runs it), unless the session is
    /// draining or its queue is full.
    async fn queue(&mut self, request: ClientRequest) -> AfterFrame {
        if self.draining {
            return self.reply_now(draining_refusal(request.rid)).await;
        }
        if self.queued.len() >= MAX_QUEUED_OPS {
            let frame = ServerFrame::Err {
                rid: request.rid,
                code: ErrorCode::RateLimited,
                message: "too many ops waiting on this connection".into(),
                retry_after_ms: Some(100),
            };
            return self.reply_now(frame).await;
        }
        self.queued.push_back(request);
        self.start_next();
        AfterFrame::Continue
    }

    async fn reply_now(&mut self, frame: ServerFrame) -> AfterFrame {
        match self.write(&frame).await {
            Ok(()) => AfterFrame::Continue,
            Err(_) => AfterFrame::End,
        }
    }

    /// Users this session may watch (its tenant's quota).
    fn max_watched(&self) -> usize {
        crate::limits::max_watched(&self.gw, &self.identity.tenant)
    }

    fn too_many_watched(&self) -> (ErrorCode, String) {
        (ErrorCode::BadRequest, format!("a session watches at most {} users", self.max_watched()))
    }

    /// Users of a `watch` this session does not watch yet, each once.
    fn newly_watched<'u>(&self, users: &'u [UserId]) -> Vec<&'u UserId> {
        let mut new: Vec<&UserId> = users.iter().filter(|user| !self.watched.contains(*user)).collect();
        new.sort();
        new.dedup();
        new
    }

    /// Checks that need the configuration or the session's state; the id rules were checked while parsing.
    fn check_op(&self, op: &ClientOp) -> Result<(), (ErrorCode, String)> {
        let config = &self.gw.config;
        let too_large = |message: String| Err((ErrorCode::TooLarge, message));
        let bad = |message: &str| Err((ErrorCode::BadRequest, message.to_owned()));
        let (body, attrs, cmid) = match op {
            ClientOp::Send { body, attrs, cmid, .. } | ClientOp::Dm { body, attrs, cmid, .. } => {
                (Some(body), attrs.as_ref(), cmid.as_ref())
            }
            ClientOp::Edit { body, .. } => (Some(body), None, None),
            ClientOp::Auth { .. }
            | ClientOp::Ping
            | ClientOp::Create { .. }
            | ClientOp::Join { .. }
            | ClientOp::Leave { .. }
            | ClientOp::Invite { .. }
            | ClientOp::Kick { .. }
            | ClientOp::Typing { .. }
            | ClientOp::Read { .. }
            | ClientOp::React { .. }
            | ClientOp::Delete { .. }
            | ClientOp::Pin { .. }
            | ClientOp::Unpin { .. }
            | ClientOp::Ban { .. }
            | ClientOp::Unban { .. }
            | ClientOp::Mute { .. }
            | ClientOp::Unmute { .. }
            | ClientOp::SlowMode { .. }
            | ClientOp::Freeze { .. }
            | ClientOp::Unfreeze { .. }
            | ClientOp::History { .. }
            | ClientOp::Members { .. }
            | ClientOp::Rooms
            | ClientOp::Presence { .. }
            | ClientOp::Watch { .. }
            | ClientOp::Unwatch { .. } => (None, None, None),
        };
        if body.is_some_and(|b| b.len() > config.max_body_bytes) {
            return too_large(format!("body exceeds {} bytes", config.max_body_bytes));
        }
        if let Some(attrs) = attrs {
            if !attrs.is_object() {
                return bad("attrs must be a JSON object");
            }
            let size = serde_json::to_vec(attrs).map(|v| v.len()).unwrap_or(usize::MAX);
            if size > config.max_attrs_bytes {
                return too_large(format!("attrs exceed {} bytes of JSON", config.max_attrs_bytes));
            }
        }
        if let Some(Err(error)) = cmid.map(|c| ClientMessageId::parse(c)) {
            return Err(cmid_refusal(error));
        }
        match op {
            ClientOp::Create { title: Some(title), .. } if title.len() > limits::MAX_TITLE_BYTES => {
                bad(&format!("title must be at most {} bytes", limits::MAX_TITLE_BYTES))
            }
            ClientOp::React { emoji, .. } if !limits::EMOJI_BYTES.contains(&emoji.len()) => {
                bad(&format!("emoji must be {} to {} bytes", limits::EMOJI_BYTES.start(), limits::EMOJI_BYTES.end()))
            }
            ClientOp::Dm { to, .. } if to == &self.identity.user => bad("a direct message needs another user"),
            ClientOp::Presence { users } | ClientOp::Watch { users } | ClientOp::Unwatch { users }
                if users.len() > limits::MAX_USERS_PER_OP =>
            {
                bad(&format!("at most {} users per op", limits::MAX_USERS_PER_OP))
            }
            ClientOp::Watch { users } if self.watched.len() + self.newly_watched(users).len() > self.max_watched() => {
                Err(self.too_many_watched())
            }
            ClientOp::History { limit: Some(limit), .. } if rooms::history_limit(Some(*limit)).is_err() => {
                bad(&rooms::HistoryLimitError.to_string())
            }
            ClientOp::Ban { secs: Some(secs), .. } | ClientOp::Mute { secs: Some(secs), .. }
                if moderation::check_secs(Some(*secs)).is_err() =>
            {
                bad(&moderation::DurationError.to_string())
            }
            ClientOp::Auth { .. }
            | ClientOp::Ping
            | ClientOp::Create { .. }
            | ClientOp::Join { .. }
            | ClientOp::Leave { .. }
            | ClientOp::Invite { .. }
            | ClientOp::Kick { .. }
            | ClientOp::Send { .. }
            | ClientOp::Dm { .. }
            | ClientOp::Typing { .. }
            | ClientOp::Read { .. }
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
            | ClientOp::Unfreeze { .. }
            | ClientOp::History { .. }
            | ClientOp::Members { .. }
            | ClientOp::Rooms
            | ClientOp::Presence { .. }
            | ClientOp::Watch { .. }
            | ClientOp::Unwatch { .. } => Ok(()),
        }
    }

    /// Relay a typing signal for a room this session receives, at most once per interval.
    async fn typing(&mut self, room: RoomId) {
        if !matches!(self.rooms.get(&room), Some(RoomDelivery::Live { .. })) {
            return;
        }
        let now = Instant::now();
        if self.typing_sent.get(&room).is_some_and(|at| now.duration_since(*at) < TYPING_INTERVAL) {
            return;
        }
        self.typing_sent.insert(room.clone(), now);
        upstream::notify(&self.gw, &self.identity.tenant, &self.identity.user, RoomCommand::Typing { room }).await;
    }

    /// Start the next queued op if none is in flight.
    fn start_next(&mut self) {
        if self.in_flight.is_some() || self.pending_join.is_some() {
            return;
        }
        let Some(request) = self.queued.pop_front() else { return };
        let gw = self.gw.clone();
        let identity = self.identity.clone();
        let rid = request.rid;
        let command = |command: RoomCommand| run_command(gw.clone(), identity.clone(), rid, command).boxed();
        let moderate =
            |room: RoomId, action: Moderation, secs: Option<u64>| match moderation::command(room, action, secs) {
                Ok(moderate) => command(moderate),
                Err(error) => {
                    let refusal = err_frame(rid, ErrorCode::BadRequest, error.to_string());
                    async move { Completion::Reply(refusal) }.boxed()
                }
            };
        let future: BoxFuture<'static, Completion> = match request.op {
            ClientOp::Join { room, since } => {
                // Direct-message rooms arrive through the user's inbox, which every session subscribes to.
                let subscribe = match (self.rooms.contains_key(&room), room.is_dm()) {
                    (false, false) => Some((subjects::room_live(&identity.tenant, &room), self.tx.clone())),
                    _ => None,
                };
                // Live events are held from here until the join's `ok`; a repeated join keeps the point reached.
                let previous = match self.rooms.remove(&room) {
                    Some(RoomDelivery::Live { last_seq, joined_at }) => Some((last_seq, joined_at)),
                    Some(RoomDelivery::Joining { previous, .. }) => previous,
                    None => None,
                };
                let inbox_dms = room.is_dm() && since.is_none() && previous.is_none();
                let joining = RoomDelivery::Joining { held: Vec::new(), previous, replayed: 0, inbox_dms };
                self.rooms.insert(room.clone(), joining);
                if let Some((subject, _)) = &subscribe {
                    self.subscribed.insert(subject.clone());
                }
                let replay_to = self.tx.clone();
                run_join(gw, identity, rid, room, since, subscribe, replay_to).boxed()
            }
            ClientOp::Leave { room } => {
                let leave = RoomCommand::Leave { room: room.clone() };
                async move {
                    let result =
                        upstream::command(&gw, &identity.tenant, Some(&identity.user), leave).await.map(|_| ());
                    Completion::Left { rid, room, result }
                }
                .boxed()
            }
            ClientOp::Create { room, private, title } => command(RoomCommand::Create { room, private, title }),
            ClientOp::Send { room, body, attrs, reply_to, cmid } => match parse_cmid(rid, cmid) {
                Ok(cmid) => {
                    let draft = Draft { op: PreSendOp::Send, room, body, attrs, reply_to, target: None };
                    screened(gw, identity, rid, draft, move |room, body, attrs| RoomCommand::Send {
                        room,
                        body,
                        attrs,
                        reply_to,
                        cmid,
                    })
                }
                Err(refusal) => async move { Completion::Reply(refusal) }.boxed(),
            },
            ClientOp::Dm { to, body, attrs, cmid } => match (RoomId::dm(&identity.user, &to), parse_cmid(rid, cmid)) {
                (_, Err(refusal)) => async move { Completion::Reply(refusal) }.boxed(),
                (Some(room), Ok(cmid)) => {
                    let draft = Draft { op: PreSendOp::Dm, room, body, attrs, reply_to: None, target: None };
                    screened(gw, identity, rid, draft, move |room, body, attrs| RoomCommand::Send {
                        room,
                        body,
                        attrs,
                        reply_to: None,
                        cmid,
                    })
                }
                (None, Ok(_)) => async move {
                    Completion::Reply(err_frame(rid, ErrorCode::BadRequest, "a direct message needs another user"))
                }
                .boxed(),
            },
            ClientOp::Invite { room, user } => command(RoomCommand::Invite { room, user }),
            ClientOp::Kick { room, user } => command(RoomCommand::Kick { room, user }),
            ClientOp::Read { room, seq } => command(RoomCommand::Read { room, seq }),
            ClientOp::React { room, seq, emoji, remove } => {
                command(RoomCommand::React { room, target: seq, emoji, remove })
            }
            ClientOp::Edit { room, seq, body } => {
                let draft = Draft { op: PreSendOp::Edit, room, body, attrs: None, reply_to: None, target: Some(seq) };
                screened(gw, identity, rid, draft, move |room, body, _| RoomCommand::Edit { room, target: seq, body })
            }
            ClientOp::Delete { room, seq } => command(RoomCommand::Delete { room, target: seq }),
            ClientOp::Pin { room, seq } => command(RoomCommand::Pin { room, target: seq, pinned: true }),
            ClientOp::Unpin { room, seq } => command(RoomCommand::Pin { room, target: seq, pinned: false }),
            ClientOp::Ban { room, user, secs } => moderate(room, moderation::ban(user, true), secs),
            ClientOp::Unban { room, user } => moderate(room, moderation::ban(user, false), None),
            ClientOp::Mute { room, user, secs } => moderate(room, moderation::mute(user, true), secs),
            ClientOp::Unmute { room, user } => moderate(room, moderation::mute(user, false), None),
            ClientOp::SlowMode { room, secs } => moderate(room, Moderation::SlowMode { secs }, None),
            ClientOp::Freeze { room } => moderate(room, Moderation::Freeze { frozen: true }, None),
            ClientOp::Unfreeze { room } => moderate(room, Moderation::Freeze { frozen: false }, None),
            ClientOp::Members { room } => async move {
                Completion::Reply(match rooms::members(&gw, &identity.tenant, Reader::User(&identity), &room).await {
                    Ok(members) => ServerFrame::Ok { rid, result: OkResult::Members { members } },
                    Err(error) => err_frame(rid, error.code, error.message),
                })
            }
            .boxed(),
            ClientOp::Rooms => async move {
                let result = upstream::rooms(&gw, &identity.tenant, &identity.user).await;
                Completion::Reply(match result {
                    Ok(rooms) => ServerFrame::Ok { rid, result: OkResult::Rooms { rooms } },
                    Err(error) => err_frame(rid, error.code, error.message),
                })
            }
            .boxed(),
            ClientOp::Presence { users } => async move {
                Completion::Reply(match upstream::presence(&gw, &identity.tenant, &users).await {
                    Ok(users) => ServerFrame::Ok { rid, result: OkResult::Presence { users } },
                    Err(error) => err_frame(rid, error.code, error.message),
                })
            }
            .boxed(),
            ClientOp::Watch { users } => {
                let hub = gw.hub.clone();
                let tx = self.tx.clone();
                let subjects: Vec<String> = self
                    .newly_watched(&users)
                    .into_iter()
                    .map(|user| subjects::presence_events(&identity.tenant, user))
                    .collect();
                // Checked again as the op starts: watches queued behind each other were each checked against the
                // users watched when they arrived, not against those the ones before them added.
                if self.watched.len() + subjects.len() > self.max_watched() {
                    let (code, message) = self.too_many_watched();
                    let refusal = err_frame(rid, code, &message);
                    async move { Completion::Reply(refusal) }.boxed()
                } else {
                    self.subscribed.extend(subjects.iter().cloned());
                    async move {
                        for subject in &subjects {
                            if let Err(error) = hub.subscribe(subject, tx.clone()).await {
                                let error = UpstreamError::new(ErrorCode::Unavailable, error.to_string());
                                return Completion::Watched { rid, users, result: Err(error) };
                            }
                        }
                        Completion::Watched { rid, users, result: Ok(()) }
                    }
                    .boxed()
                }
            }
            ClientOp::Unwatch { users } => {
                for user in &users {
                    if self.watched.remove(user) {
                        let subject = subjects::presence_events(&identity.tenant, user);
                        self.gw.hub.unsubscribe(&subject, self.tx.id);
                        self.subscribed.remove(&subject);
                    }
                }
                async move { Completion::Reply(ServerFrame::Ok { rid, result: OkResult::Empty {} }) }.boxed()
            }
            ClientOp::History { room, before, after, limit, thread } => {
                // `check_op` refused a limit out of bounds.
                let limit = rooms::history_limit(limit).unwrap_or(limits::HISTORY_DEFAULT_LIMIT);
                run_history(gw, identity, rid, room, HistoryPage { before, after, limit, thread }).boxed()
            }
            // Answered by `on_op` itself, never queued.
            other @ (ClientOp::Auth { .. } | ClientOp::Ping | ClientOp::Typing { .. }) => {
                let message = format!("op {:?} cannot be queued", other.name());
                async move { Completion::Reply(err_frame(rid, ErrorCode::Internal, message)) }.boxed()
            }
        };
        self.in_flight = Some(future);
    }

    async fn complete(&mut self, completion: Completion) -> Result<(), axum::Error> {
        match completion {
            Completion::Reply(frame) => self.write(&frame).await,
            Completion::Joined { rid, room, result } => {
                if result.is_ok()
                    && matches!(self.rooms.get(&room), Some(RoomDelivery::Joining { inbox_dms: true, .. }))
                {
                    // The router published the room's earlier messages to the inbox before it answered the join,
                    // on the same connection: once the inbox's task has handed on what it holds, they are queued.
                    let inbox = subjects::user_inbox(&self.identity.tenant, &self.identity.user);
                    self.gw.hub.barrier(&inbox).await;
                    self.deliver_queued().await?;
                }
                self.complete_join(rid, room, result).await
            }
            Completion::Left { rid, room, result } => match result {
                Ok(()) => {
                    self.stop_receiving(&room);
                    self.write(&ServerFrame::Ok { rid, result: OkResult::Room { room } }).await
                }
                Err(error) => self.write(&err_frame(rid, error.code, error.message)).await,
            },
            Completion::Watched { rid, users, result } => match result {
                Ok(()) => {
                    self.watched.extend(users);
                    self.write(&ServerFrame::Ok { rid, result: OkResult::Empty {} }).await
                }
                Err(error) => {
                    for user in users.iter().filter(|user| !self.watched.contains(*user)) {
                        let subject = subjects::presence_events(&self.identity.tenant, user);
                        self.gw.hub.unsubscribe(&subject, self.tx.id);
                        self.subscribed.remove(&subject);
                    }
                    self.write(&err_frame(rid, error.code, error.message)).await
                }
            },
        }
    }

    /// Answer a join: its `ok` once its replay is written, or its refusal.
    async fn complete_join(
        &mut self,
        rid: Option<u64>,
        room: RoomId,
        result: Result<(u64, Option<u64>), UpstreamError>,
    ) -> Result<(), axum::Error> {
        match result {
            Ok((seq, Some(last_replayed))) if matches!(self.rooms.get(&room), Some(RoomDelivery::Joining { replayed, .. }) if *replayed < last_replayed) =>
            {
                // The replayed events are queued; the `ok` follows the last of them (see `deliver`).
                self.pending_join = Some(PendingJoin { rid, room, seq, last_replayed });
                Ok(())
            }
            Ok((seq, _)) => self.finish_join(rid, room, seq).await,
            Err(error) => {
                match self.rooms.remove(&room) {
                    // A repeated join that failed leaves the room as it was received.
                    Some(RoomDelivery::Joining { held, previous: Some((last_seq, joined_at)), .. }) => {
                        self.rooms.insert(room.clone(), RoomDelivery::Live { last_seq, joined_at });
                        self.release_held(held).await?;
                    }
                    // Direct messages reach the session without a join: what the inbox brought meanwhile stays.
                    Some(RoomDelivery::Joining { held, inbox_dms: true, .. }) => {
                        if let Some(first) = held.iter().filter_map(|event| event.seq).min() {
                            self.rooms.insert(room.clone(), RoomDelivery::Live { last_seq: first - 1, joined_at: 0 });
                            self.release_held(held).await?;
                        }
                    }
                    Some(RoomDelivery::Joining { .. }) | None => self.stop_receiving(&room),
                    Some(live) => {
                        self.rooms.insert(room.clone(), live);
                    }
                }
                self.write(&err_frame(rid, error.code, error.message)).await
            }
        }
    }

    /// Deliver the events already queued for the session (holding those of a room whose join is in flight), at
    /// most a queue's worth.
    async fn deliver_queued(&mut self) -> Result<(), axum::Error> {
        for _ in 0..self.events.max_capacity() {
            let Ok(event) = self.events.try_recv() else { break };
            self.tx.queued_bytes.fetch_sub(event.encoded_len(self.format), Ordering::Relaxed);
            self.taken += 1;
            self.deliver(event).await?;
        }
        Ok(())
    }

    /// Write a join's `ok` (after its replay) and start live delivery of the room at the join point, delivering what
    /// was held meanwhile. A repeated join keeps the point delivery had reached (or its replay reached): the events
    /// up to its own seq that were still in flight are delivered, not skipped.
    async fn finish_join(&mut self, rid: Option<u64>, room: RoomId, seq: u64) -> Result<(), axum::Error> {
        let (held, point) = match self.rooms.remove(&room) {
            Some(RoomDelivery::Joining { held, inbox_dms: true, .. }) => {
                let (before, after): (Vec<_>, Vec<_>) =
                    held.into_iter().partition(|event| event.seq.is_some_and(|held_seq| held_seq <= seq));
                if !self.deliver_before_join(&room, before, seq).await? {
                    // The room was deleted meanwhile; the join still took effect.
                    return self.write(&ServerFrame::Ok { rid, result: OkResult::RoomSeq { room, seq } }).await;
                }
                (after, seq)
            }
            Some(RoomDelivery::Joining { held, previous, replayed, inbox_dms: false }) => {
                (held, previous.map_or(seq, |(last_seq, _)| last_seq.max(replayed)))
            }
            Some(RoomDelivery::Live { last_seq, .. }) => (Vec::new(), last_seq.max(seq)),
            None => {
                // The replay ended with the user's own `left` and the room was stopped; the join still took effect.
                return self.write(&ServerFrame::Ok { rid, result: OkResult::RoomSeq { room, seq } }).await;
            }
        };
        self.rooms.insert(room.clone(), RoomDelivery::Live { last_seq: point, joined_at: seq });
        self.write(&ServerFrame::Ok { rid, result: OkResult::RoomSeq { room, seq } }).await?;
        self.release_held(held).await
    }

    /// Write a direct-message room's messages that its inbox brought while the session's first join of it was in
    /// flight and that precede the join point `seq`, filling holes up to `seq` from the stream. Returns false when
    /// the room ended among them.
    async fn deliver_before_join(
        &mut self,
        room: &RoomId,
        before: Vec<Arc<LiveEvent>>,
        seq: u64,
    ) -> Result<bool, axum::Error> {
        let Some(first) = before.iter().filter_map(|event| event.seq).min() else { return Ok(true) };
        self.rooms.insert(room.clone(), RoomDelivery::Live { last_seq: first - 1, joined_at: 0 });
        for event in before {
            self.deliver(event).await?;
        }
        let last_seq = match self.rooms.get(room) {
            Some(RoomDelivery::Live { last_seq, .. }) => *last_seq,
            _ => return Ok(false),
        };
        if last_seq < seq {
            Box::pin(self.fill_gap(room, last_seq, seq)).await?;
        }
        Ok(self.rooms.remove(room).is_some())
    }

    /// Deliver live events held while a join was in flight, now that the room is live again.
    async fn release_held(&mut self, held: Vec<Arc<LiveEvent>>) -> Result<(), axum::Error> {
        if held.is_empty() {
            return Ok(());
        }
        for event in held {
            self.deliver(event).await?;
        }
        self.sink.flush().await
    }

    /// Stop receiving a room: forget its delivery state and drop its live subscription.
    fn stop_receiving(&mut self, room: &RoomId) {
        self.rooms.remove(room);
        self.typing_sent.remove(room);
        if !room.is_dm() {
            let subject = subjects::room_live(&self.identity.tenant, room);
            if self.subscribed.remove(&subject) {
                self.gw.hub.unsubscribe(&subject, self.tx.id);
            }
        }
    }

    /// Write the room's events with `after < seq <= upto` from the events stream, up to the session's own `left`
    /// (which stops the room). A hole that cannot be filled is never skipped: the session ends (1013), and the
    /// client's resume (`join {since}`) replays the events or says `resume_gap`.
    async fn fill_gap(&mut self, room: &RoomId, after: u64, upto: u64) -> Result<(), axum::Error> {
        let events = match resume::missed_events(&self.gw, &self.identity.tenant, room, after, upto).await {
            Ok(events) => events,
            Err(error) => {
                tracing::warn!(%room, after, upto, %error, "cannot fill a gap in live events; closing");
                return Err(axum::Error::new(UnfilledGap));
            }
        };
        for replayed in events {
            let event = match replayed {
                resume::Replayed::Event(event) => event,
                erased @ resume::Replayed::Erased { .. } => {
                    self.send_event(&erased.into_live(room)).await?;
                    continue;
                }
            };
            let joined_at = match self.rooms.get(room) {
                Some(RoomDelivery::Live { joined_at, .. }) => *joined_at,
                _ => 0,
            };
            let mine = |user: &UserId| user == &self.identity.user;
            let left = event.seq > joined_at && matches!(&event.body, EventBody::Left { user, .. } if mine(user))
                || matches!(event.body, EventBody::RoomDeleted {});
            if event.seq == joined_at && matches!(&event.body, EventBody::Joined { user } if mine(user)) {
                continue;
            }
            self.send_event(&LiveEvent::replayed(event)).await?;
            if left {
                self.stop_receiving(room);
                break;
            }
        }
        Ok(())
    }

    /// Write a live message if the session should see it: a room event when it is the room's next one (held while
    /// the room's join is pending), a room signal when the session receives the room, the user's own `read` when
    /// it does not (it has the room's), presence always.
    async fn deliver(&mut self, event: Arc<LiveEvent>) -> Result<(), axum::Error> {
        let limit = self.gw.config.outbound_queue_frames;
        let Some(room) = event.room.clone() else {
            return self.send_event(&event).await;
        };
        let Some(seq) = event.seq else {
            let receiving = matches!(self.rooms.get(&room), Some(RoomDelivery::Live { .. }));
            if event.own_read {
                if receiving {
                    return Ok(());
                }
                return self.send_event(&event).await;
            }
            if receiving && event.typing_user.as_ref() != Some(&self.identity.user) {
                return self.send_event(&event).await;
            }
            return Ok(());
        };
        if room.is_dm() && !self.rooms.contains_key(&room) {
            // Direct messages reach every session of both users without a join.
            self.rooms.insert(room.clone(), RoomDelivery::Live { last_seq: seq - 1, joined_at: 0 });
        }
        if event.replayed {
            return Box::pin(self.deliver_replayed(&room, seq, &event)).await;
        }
        match self.rooms.get_mut(&room) {
            None => Ok(()),
            Some(RoomDelivery::Joining { held, .. }) => {
                if held.len() >= limit {
                    self.tx.overflow.cancel();
                } else {
                    held.push(event);
                }
                Ok(())
            }
            Some(RoomDelivery::Live { last_seq, joined_at }) => {
                let joined_at = *joined_at;
                if seq <= *last_seq {
                    return Ok(());
                }
                // The user's own `joined` at a repeated join's point (the join raced a kick and made them a member
                // again) is the join point itself: not delivered, as for a first join.
                let own_join = seq == joined_at && event.joined_user.as_ref() == Some(&self.identity.user);
                let expected = *last_seq + 1;
                *last_seq = seq;
                if seq != expected {
                    // A live publish was lost (its router shard died after the append): fill the gap from the log.
                    metrics::counter!("switchyard_gateway_live_gaps_total").increment(1);
                    Box::pin(self.fill_gap(&room, expected - 1, seq - 1)).await?;
                    if !self.rooms.contains_key(&room) {
                        // The hole held the session's own `left`: nothing after it is for this session.
                        return Ok(());
                    }
                }
                if own_join {
                    return Ok(());
                }
                self.send_event(&event).await?;
                if event.ends_room || seq > joined_at && event.left_user.as_ref() == Some(&self.identity.user) {
                    self.stop_receiving(&room);
                }
                Ok(())
            }
        }
    }
}

impl Session {
    /// Write an event a join replays, while that join is in flight or its `ok` waits for the replay; the `ok`
    /// follows the last replayed event.
    async fn deliver_replayed(&mut self, room: &RoomId, seq: u64, event: &LiveEvent) -> Result<(), axum::Error> {
        let Some(RoomDelivery::Joining { replayed, .. }) = self.rooms.get_mut(room) else {
            return Ok(());
        };
        *replayed = seq;
        self.send_event(event).await?;
        let finished = self.pending_join.as_ref().is_some_and(|p| &p.room == room && p.last_replayed <= seq);
        if finished {
            if let Some(PendingJoin { rid, room, seq, .. }) = self.pending_join.take() {
                self.finish_join(rid, room, seq).await?;
                self.start_next();
            }
        }
        Ok(())
    }
}

/// A hole in a room's live events that could not be filled from the events stream.
#[derive(Debug, thiserror::Error)]
#[error("a hole in live events could not be filled")]
struct UnfilledGap;

/// How the session ends after a failed write: a hole it could not fill closes it with 1013 (the client resumes
/// elsewhere or later); any other error is the socket's, and the client is gone.
fn closing_after(error: axum::Error) -> Option<Close> {
    let source = error.into_inner();
    source
        .downcast_ref::<UnfilledGap>()
        .map(|_| Close { code: CloseCode::TryAgainLater, reason: "cannot fill a gap in live events; resume" })
}

fn ok_seq(result: &OkResult) -> u64 {
    match result {
        OkResult::RoomSeq { seq, .. } | OkResult::Sent { seq, .. } => *seq,
        _ => 0,
    }
}

/// Run a message's command once the tenant's pre-send hook (if any) let it through, with what the hook made of it.
fn screened(
    gw: Arc<Gateway>,
    identity: Identity,
    rid: Option<u64>,
    draft: Draft,
    build: impl FnOnce(RoomId, String, Option<serde_json::Value>) -> RoomCommand + Send + 'static,
) -> BoxFuture<'static, Completion> {
    async move {
        let room = draft.room.clone();
        match presend::screen(&gw, &identity.tenant, &identity.user, draft).await {
            Screened::Proceed { body, attrs } => run_command(gw, identity, rid, build(room, body, attrs)).await,
            Screened::Refuse { code, message } => Completion::Reply(err_frame(rid, code, message)),
        }
    }
    .boxed()
}

async fn run_command(gw: Arc<Gateway>, identity: Identity, rid: Option<u64>, command: RoomCommand) -> Completion {
    Completion::Reply(match upstream::command(&gw, &identity.tenant, Some(&identity.user), command).await {
        Ok(result) => ServerFrame::Ok { rid, result },
        Err(error) => {
            ServerFrame::Err { rid, code: error.code, message: error.message, retry_after_ms: error.retry_after_ms }
        }
    })
}

/// Subscribe (when asked) before joining, so no event after the join point can be missed; then read what the
/// client missed since `since`.
async fn run_join(
    gw: Arc<Gateway>,
    identity: Identity,
    rid: Option<u64>,
    room: RoomId,
    since: Option<u64>,
    subscribe: Option<(String, SessionTx)>,
    replay_to: SessionTx,
) -> Completion {
    let result = async {
        if let Some((subject, tx)) = subscribe {
            gw.hub
                .subscribe(&subject, tx)
                .await
                .map_err(|error| UpstreamError::new(ErrorCode::Unavailable, error.to_string()))?;
        }
        let join = RoomCommand::Join { room: room.clone(), grants: identity.grants.clone() };
        let seq = ok_seq(&upstream::command(&gw, &identity.tenant, Some(&identity.user), join).await?);
        let replayed = match since {
            Some(since) if since < seq => {
                // The replay runs beside the session: it must keep its own deadline while the session's writes
                // wait for a client that stopped reading. Dropping the join (the session ended) stops it.
                let (gw, tenant, user, room) =
                    (gw.clone(), identity.tenant.clone(), identity.user.clone(), room.clone());
                let replay = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                    resume::replay_into(&gw, &replay_to, &tenant, &user, &room, since, seq).await
                }));
                replay.await.map_err(|error| {
                    UpstreamError::new(ErrorCode::Unavailable, format!("the replay stopped: {error}"))
                })??
            }
            _ => None,
        };
        Ok((seq, replayed))
    }
    .await;
    Completion::Joined { rid, room, result }
}

async fn run_history(
    gw: Arc<Gateway>,
    identity: Identity,
    rid: Option<u64>,
    room: RoomId,
    page: HistoryPage,
) -> Completion {
    Completion::Reply(match rooms::read_history(&gw, &identity.tenant, Reader::User(&identity), &room, page).await {
        Ok((messages, more)) => ServerFrame::Ok { rid, result: OkResult::History { room, messages, more } },
        Err(error) => err_frame(rid, error.code, error.message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, without calling it.
    fn future_size<F, A, B, C, D, E, Fut>(_: &F) -> usize
    where
        F: Fn(A, B, C, D, E) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every open socket holds its session's future for as long as it is open: rarely-run work must stay boxed.
    #[test]
    fn an_idle_session_future_stays_small() {
        let size = future_size(&run);
        println!("session future: {size} bytes");
        // Unoptimised builds lay futures out larger than release builds; this bound holds for both.
        assert!(size <= 4096, "the session future grew to {size} bytes; box the big, rarely-run awaits");
    }
}
