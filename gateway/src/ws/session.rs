//! The session actor: one task per WebSocket. It authenticates (when the upgrade did not), says `hello`, parses
//! client frames, enforces the per-connection limits, runs ops one at a time in arrival order (without blocking
//! outbound delivery), and writes live events in seq order with no gap it can see and no duplicate.
//!
//! It owns all of its state; the hub reaches it only through its bounded outbound queue. It does not sequence
//! anything (router shards do) and never blocks other sessions: a session that cannot keep up is closed with 4009.

use crate::auth::{authenticate, Identity};
use crate::limits::{tenant_rate_refusal, AbuseCounter};
use crate::revocation::{self, CloseSignal};
use crate::upstream::{self, UpstreamError};
use crate::ws::hub::{LiveEvent, SessionTx};
use crate::Gateway;
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::future::BoxFuture;
use futures::stream::{SplitSink, SplitStream};
use futures::{FutureExt, SinkExt, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_protocol::client::{
    decode_client_frame, encode_frame, ClientOp, ClientRequest, Format, OkResult, ServerFrame,
};
use switchyard_protocol::internal::{HistoryReply, HistoryRequest, RoomCommand, INTERNAL_VERSION};
use switchyard_protocol::{limits, CloseCode, ErrorCode, RoomId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);
/// Ops waiting behind the one in flight; more than this is answered `rate_limited`.
const MAX_QUEUED_OPS: usize = 64;

/// A session's view of one room it is subscribed to.
enum RoomDelivery {
    /// A join is in flight: live events are held until its `ok` says where delivery starts.
    Joining { held: Vec<Arc<LiveEvent>> },
    /// Delivering; `last_seq` is the last seq written (or the join point).
    Live { last_seq: u64 },
}

/// What a finished op asks the session to do.
enum Completion {
    Reply(ServerFrame),
    Joined { rid: Option<u64>, room: RoomId, result: Result<u64, UpstreamError> },
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

/// One WebSocket session.
struct Session {
    gw: Arc<Gateway>,
    identity: Identity,
    format: Format,
    sink: SplitSink<WebSocket, Message>,
    /// How the hub reaches this session; cloned into every room it joins.
    tx: SessionTx,
    /// Live events from the hub.
    events: mpsc::Receiver<Arc<LiveEvent>>,
    /// Rooms this session is subscribed to.
    rooms: HashMap<RoomId, RoomDelivery>,
    /// The op being executed, if any. Ops run one at a time so a client's ops take effect in the order sent.
    in_flight: Option<BoxFuture<'static, Completion>>,
    /// Ops waiting for the one in flight.
    queued: VecDeque<ClientRequest>,
    budget: OpBudget,
    /// When the client was last heard from (any frame, including pongs).
    last_heard: Instant,
    /// Rate-limited ops in the recent past; too many closes the session with 4008.
    abuse: AbuseCounter,
}

/// Serve one upgraded socket until it closes.
pub async fn run(gw: Arc<Gateway>, socket: WebSocket, format: Format, identity: Option<Identity>) {
    let (mut sink, mut stream) = socket.split();
    let identity = match identity {
        Some(identity) => identity,
        None => match first_frame_auth(&gw, &mut stream, format).await {
            Ok(identity) => identity,
            Err((code, reason)) => {
                let _ = send_close(&mut sink, format, code, &reason).await;
                return;
            }
        },
    };
    // Registered for revocation until this function returns (the registration deregisters on drop).
    let registration = match revocation::register(&gw, &identity) {
        Ok(registration) => registration,
        Err(refused) => {
            let _ = send_close(&mut sink, format, refused.code, refused.reason).await;
            return;
        }
    };
    let (events_tx, events) = mpsc::channel(gw.config.outbound_queue_frames);
    let tx = SessionTx {
        id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
        format,
        events: events_tx,
        queued_bytes: Arc::new(AtomicUsize::new(0)),
        max_queued_bytes: gw.config.outbound_queue_bytes,
        overflow: CancellationToken::new(),
    };
    let gw_abuse = (gw.config.abuse_limit, gw.config.abuse_window());
    let mut session = Session {
        budget: OpBudget::new(gw.config.ops_per_sec, gw.config.ops_burst),
        gw,
        identity,
        format,
        sink,
        tx,
        events,
        rooms: HashMap::new(),
        in_flight: None,
        queued: VecDeque::new(),
        last_heard: Instant::now(),
        abuse: AbuseCounter::new(gw_abuse.0, gw_abuse.1),
    };
    metrics::gauge!("switchyard_gateway_sessions").increment(1.0);
    let close = session.serve(&mut stream, registration.signal()).await;
    for room in session.rooms.keys() {
        session.gw.hub.unsubscribe(&session.identity.tenant, room, session.tx.id);
    }
    metrics::gauge!("switchyard_gateway_sessions").decrement(1.0);
    drop(registration);
    if let Some(close) = close {
        let _ = send_close(&mut session.sink, format, close.code, close.reason).await;
        linger(&mut stream).await;
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
async fn first_frame_auth(
    gw: &Arc<Gateway>,
    stream: &mut SplitStream<WebSocket>,
    format: Format,
) -> Result<Identity, (CloseCode, String)> {
    let unauthenticated = |reason: &str| (CloseCode::Unauthenticated, reason.to_owned());
    let deadline = tokio::time::Instant::now() + gw.config.auth_timeout();
    loop {
        let frame = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return Err(unauthenticated("no authentication within the time allowed")),
            Ok(None) | Ok(Some(Err(_))) => return Err(unauthenticated("socket closed before authentication")),
            Ok(Some(Ok(frame))) => frame,
        };
        let bytes = match frame {
            Message::Text(text) => text.as_bytes().to_vec(),
            Message::Binary(bytes) => bytes.to_vec(),
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return Err(unauthenticated("socket closed before authentication")),
        };
        return match decode_client_frame(&bytes, format) {
            Ok(ClientRequest { op: ClientOp::Auth { token }, .. }) => authenticate(gw, &token).await.map_err(|e| {
                // A token store outage is no verdict on the token: the client may retry (1013).
                let code = if e.code == ErrorCode::Unavailable {
                    CloseCode::TryAgainLater
                } else {
                    CloseCode::Unauthenticated
                };
                (code, format!("authentication failed: {}", e.message))
            }),
            Ok(_) => Err(unauthenticated("the first frame must be an auth op")),
            Err(e) => Err((CloseCode::Unauthenticated, format!("the first frame must be an auth op: {}", e.message))),
        };
    }
}

async fn send_close(
    sink: &mut SplitSink<WebSocket, Message>,
    format: Format,
    code: CloseCode,
    reason: &str,
) -> Result<(), axum::Error> {
    let reconnect_after_ms = (code == CloseCode::Draining).then(|| 500 + u64::from(rand_jitter()) % 4_500);
    let bye = ServerFrame::Bye { code: code.code(), reason: reason.to_owned(), reconnect_after_ms };
    let write = async {
        sink.send(frame_message(&bye, format)).await?;
        sink.send(Message::Close(Some(CloseFrame { code: code.code(), reason: reason.to_owned().into() }))).await
    };
    tokio::time::timeout(Duration::from_secs(1), write).await.unwrap_or(Ok(()))
}

fn rand_jitter() -> u16 {
    // Sub-second clock noise is jitter enough to spread reconnects.
    (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0) % 65_521)
        as u16
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

impl Session {
    /// The session loop. Returns how the server wants to close, or `None` when the client went away.
    async fn serve(&mut self, stream: &mut SplitStream<WebSocket>, revoked: CloseSignal) -> Option<Close> {
        let hello = ServerFrame::Hello {
            session: format!("ss_{}", switchyard_protocol::ids::random_base62(16)),
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
        loop {
            tokio::select! {
                biased;
                _ = overflow.cancelled() => {
                    metrics::counter!("switchyard_gateway_slow_consumer_closes_total").increment(1);
                    return Some(Close { code: CloseCode::SlowConsumer, reason: "outbound queue full" });
                }
                _ = shutdown.cancelled() => {
                    return Some(Close { code: CloseCode::Draining, reason: "gateway is draining" });
                }
                (code, reason) = revoked.fired() => return Some(Close { code, reason }),
                completion = async { self.in_flight.as_mut().expect("guarded by the select condition").await },
                    if self.in_flight.is_some() => {
                    self.in_flight = None;
                    self.complete(completion).await.ok()?;
                    self.start_next();
                }
                event = self.events.recv() => {
                    let event = event?;
                    self.tx.queued_bytes.fetch_sub(event.encoded_len(self.format), Ordering::Relaxed);
                    self.deliver(event).await.ok()?;
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
                    if let Some(close) = self.on_frame(frame).await {
                        return close;
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
        self.sink.send(frame_message(frame, self.format)).await
    }

    /// Handle one client frame. `Some(close)` ends the session (`Some(None)`: the client closed).
    async fn on_frame(&mut self, frame: Message) -> Option<Option<Close>> {
        let bytes = match frame {
            Message::Text(text) => {
                if self.format != Format::Json {
                    return self
                        .reply_now(err_frame(
                            None,
                            ErrorCode::BadRequest,
                            "this session speaks MessagePack: send binary frames",
                        ))
                        .await;
                }
                text.as_bytes().to_vec()
            }
            Message::Binary(bytes) => {
                if self.format != Format::MsgPack {
                    return self
                        .reply_now(err_frame(None, ErrorCode::BadRequest, "this session speaks JSON: send text frames"))
                        .await;
                }
                bytes.to_vec()
            }
            Message::Ping(_) | Message::Pong(_) => return None,
            Message::Close(_) => return Some(None),
        };
        if bytes.len() > self.gw.config.max_frame_bytes {
            return Some(Some(Close { code: CloseCode::FrameTooBig, reason: "frame too big" }));
        }
        let request = match decode_client_frame(&bytes, self.format) {
            Ok(request) => request,
            Err(error) => return self.reply_now(err_frame(error.rid, error.code, error.message)).await,
        };
        if let Err(wait) = self.budget.take() {
            metrics::counter!("switchyard_gateway_rate_limited_total").increment(1);
            if self.abuse.record(wait) {
                let reason = "too many rate-limited ops";
                return Some(Some(Close { code: CloseCode::RateLimitAbuse, reason }));
            }
            let frame = ServerFrame::Err {
                rid: request.rid,
                code: ErrorCode::RateLimited,
                message: "too many ops on this connection".into(),
                retry_after_ms: Some(wait.as_millis() as u64 + 1),
            };
            return self.reply_now(frame).await;
        }
        if let Err(message) = self.check_limits(&request.op) {
            return self.reply_now(err_frame(request.rid, ErrorCode::TooLarge, message)).await;
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
            // Typing indicators are not relayed by this version; the op is accepted and has no effect.
            ClientOp::Typing { .. } => None,
            ClientOp::Join { since: Some(_), .. } => {
                let message = "join with since is not supported by this server version; join without it";
                self.reply_now(err_frame(request.rid, ErrorCode::BadRequest, message)).await
            }
            ClientOp::Create { .. } | ClientOp::Join { .. } | ClientOp::Send { .. } | ClientOp::History { .. } => {
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
                None
            }
            other => {
                let message = format!("op {:?} is not supported by this server version", other.name());
                self.reply_now(err_frame(request.rid, ErrorCode::BadRequest, message)).await
            }
        }
    }

    async fn reply_now(&mut self, frame: ServerFrame) -> Option<Option<Close>> {
        match self.write(&frame).await {
            Ok(()) => None,
            Err(_) => Some(None),
        }
    }

    /// Limits that depend on configuration; the id rules were checked while parsing.
    fn check_limits(&self, op: &ClientOp) -> Result<(), String> {
        let config = &self.gw.config;
        let (body, attrs, cmid) = match op {
            ClientOp::Send { body, attrs, cmid, .. } | ClientOp::Dm { body, attrs, cmid, .. } => {
                (Some(body), attrs.as_ref(), cmid.as_ref())
            }
            ClientOp::Edit { body, .. } => (Some(body), None, None),
            _ => (None, None, None),
        };
        if body.is_some_and(|b| b.len() > config.max_body_bytes) {
            return Err(format!("body exceeds {} bytes", config.max_body_bytes));
        }
        if let Some(attrs) = attrs {
            if !attrs.is_object() {
                return Err("attrs must be a JSON object".into());
            }
            let size = serde_json::to_vec(attrs).map(|v| v.len()).unwrap_or(usize::MAX);
            if size > config.max_attrs_bytes {
                return Err(format!("attrs exceed {} bytes of JSON", config.max_attrs_bytes));
            }
        }
        if cmid.is_some_and(|c| c.chars().count() > limits::MAX_CMID_CHARS || c.is_empty()) {
            return Err(format!("cmid must be 1 to {} characters", limits::MAX_CMID_CHARS));
        }
        Ok(())
    }

    /// Start the next queued op if none is in flight.
    fn start_next(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        let Some(request) = self.queued.pop_front() else {
            return;
        };
        let gw = self.gw.clone();
        let identity = self.identity.clone();
        let rid = request.rid;
        let future: BoxFuture<'static, Completion> = match request.op {
            ClientOp::Join { room, since: _ } => {
                if !self.rooms.contains_key(&room) {
                    self.rooms.insert(room.clone(), RoomDelivery::Joining { held: Vec::new() });
                    let hub = gw.hub.clone();
                    let tx = self.tx.clone();
                    async move {
                        if let Err(error) = hub.subscribe(&identity.tenant, &room, tx).await {
                            let result =
                                Err(UpstreamError { code: ErrorCode::Unavailable, message: error.to_string() });
                            return Completion::Joined { rid, room, result };
                        }
                        let command = RoomCommand::Join { room: room.clone(), grants: identity.grants.clone() };
                        let result = upstream::command(&gw, &identity.tenant, &identity.user, command).await;
                        Completion::Joined { rid, room, result: result.map(|ok| ok_seq(&ok)) }
                    }
                    .boxed()
                } else {
                    async move {
                        let command = RoomCommand::Join { room: room.clone(), grants: identity.grants.clone() };
                        let result = upstream::command(&gw, &identity.tenant, &identity.user, command).await;
                        Completion::Joined { rid, room, result: result.map(|ok| ok_seq(&ok)) }
                    }
                    .boxed()
                }
            }
            ClientOp::Create { room, private, title } => {
                let command = RoomCommand::Create { room, private, title };
                run_command(gw, identity, rid, command).boxed()
            }
            ClientOp::Send { room, body, attrs, reply_to, cmid } => {
                let command = RoomCommand::Send { room, body, attrs, reply_to, cmid };
                run_command(gw, identity, rid, command).boxed()
            }
            ClientOp::History { room, before, after, limit } => {
                run_history(gw, identity, rid, room, before, after, limit).boxed()
            }
            other => {
                let message = format!("op {:?} cannot be queued", other.name());
                async move { Completion::Reply(err_frame(rid, ErrorCode::Internal, message)) }.boxed()
            }
        };
        self.in_flight = Some(future);
    }

    async fn complete(&mut self, completion: Completion) -> Result<(), axum::Error> {
        match completion {
            Completion::Reply(frame) => self.write(&frame).await,
            Completion::Joined { rid, room, result } => match result {
                Ok(seq) => {
                    let previous = self.rooms.remove(&room);
                    // A repeated join keeps the delivery point already reached.
                    let point = match &previous {
                        Some(RoomDelivery::Live { last_seq }) => (*last_seq).max(seq),
                        _ => seq,
                    };
                    self.rooms.insert(room.clone(), RoomDelivery::Live { last_seq: point });
                    self.write(&ServerFrame::Ok { rid, result: OkResult::RoomSeq { room, seq } }).await?;
                    if let Some(RoomDelivery::Joining { held }) = previous {
                        for event in held {
                            self.deliver(event).await?;
                        }
                    }
                    Ok(())
                }
                Err(error) => {
                    if matches!(self.rooms.get(&room), Some(RoomDelivery::Joining { .. })) {
                        self.rooms.remove(&room);
                        self.gw.hub.unsubscribe(&self.identity.tenant, &room, self.tx.id);
                    }
                    self.write(&err_frame(rid, error.code, error.message)).await
                }
            },
        }
    }

    /// Write a live event if it is the session's next one for its room; hold it while the room's join is pending.
    async fn deliver(&mut self, event: Arc<LiveEvent>) -> Result<(), axum::Error> {
        let limit = self.gw.config.outbound_queue_frames;
        match self.rooms.get_mut(&event.room) {
            None => Ok(()),
            Some(RoomDelivery::Joining { held }) => {
                if held.len() >= limit {
                    self.tx.overflow.cancel();
                } else {
                    held.push(event);
                }
                Ok(())
            }
            Some(RoomDelivery::Live { last_seq }) => {
                if event.seq <= *last_seq {
                    return Ok(());
                }
                if event.seq != *last_seq + 1 {
                    metrics::counter!("switchyard_gateway_live_gaps_total").increment(1);
                    tracing::warn!(room = %event.room, expected = *last_seq + 1, got = event.seq, "gap in live events");
                }
                *last_seq = event.seq;
                self.sink.send(event.message(self.format)).await
            }
        }
    }
}

fn ok_seq(result: &OkResult) -> u64 {
    match result {
        OkResult::RoomSeq { seq, .. } | OkResult::Sent { seq, .. } => *seq,
        _ => 0,
    }
}

async fn run_command(gw: Arc<Gateway>, identity: Identity, rid: Option<u64>, command: RoomCommand) -> Completion {
    Completion::Reply(match upstream::command(&gw, &identity.tenant, &identity.user, command).await {
        Ok(result) => ServerFrame::Ok { rid, result },
        Err(error) => err_frame(rid, error.code, error.message),
    })
}

async fn run_history(
    gw: Arc<Gateway>,
    identity: Identity,
    rid: Option<u64>,
    room: RoomId,
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<u32>,
) -> Completion {
    let limit = limit.unwrap_or(limits::HISTORY_DEFAULT_LIMIT);
    if !(1..=limits::HISTORY_MAX_LIMIT).contains(&limit) {
        return Completion::Reply(err_frame(rid, ErrorCode::BadRequest, "limit must be 1 to 100"));
    }
    Completion::Reply(match read_history(&gw, &identity, &room, before, after, limit).await {
        Ok((messages, more)) => ServerFrame::Ok { rid, result: OkResult::History { room, messages, more } },
        Err(error) => err_frame(rid, error.code, error.message),
    })
}

/// Authorise a history read with the room's router shard, then read the page from a persistor.
pub async fn read_history(
    gw: &Gateway,
    identity: &Identity,
    room: &RoomId,
    before: Option<u64>,
    after: Option<u64>,
    limit: u32,
) -> Result<(Vec<switchyard_protocol::client::Message>, bool), UpstreamError> {
    let command = RoomCommand::CanRead { room: room.clone(), grants: identity.grants.clone() };
    let allowed = upstream::command(gw, &identity.tenant, &identity.user, command).await?;
    let request = HistoryRequest {
        v: INTERNAL_VERSION,
        tenant: identity.tenant.clone(),
        room: room.clone(),
        before,
        after,
        limit,
        min_seq: ok_seq(&allowed),
    };
    match upstream::history(gw, request).await? {
        HistoryReply::Ok { messages, more } => Ok((messages, more)),
        HistoryReply::Err { code, message } => Err(UpstreamError { code, message }),
    }
}
