//! The background task that owns one WebSocket: it writes queued frames, matches replies to waiting requests by
//! `rid`, forwards events, answers application pings, and records how the socket closed.
//!
//! This task does not encode ops (callers do, off the socket's task), reconnect, or resume after a close.

use crate::error::{ClientError, CloseInfo, Detail};
use crate::frame::{decode_server_frame, encode_pong, Bye, Hello, Incoming, Reply, UnmatchedReply};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::time::Duration;
use switchyard_protocol::client::{Format, ServerEvent};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// How long the task waits for the server's side of a close handshake (or for a broken socket to end).
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The most queued frames written before one flush.
const WRITE_BATCH: usize = 128;
/// How many requests are registered between sweeps of waiters that gave up (timed out).
const SWEEP_EVERY: usize = 4096;
/// Close code recorded when the connection ended without a close frame.
pub(crate) const ABNORMAL_CLOSURE: u16 = 1006;

/// Where a waiting request's answer goes.
pub(crate) type ReplySender = oneshot::Sender<Result<Reply, ClientError>>;

/// Work for the task, sent by the [`crate::Client`].
pub(crate) enum Command {
    /// Register `rid`, then write `frame`; the reply (or failure) goes to `reply`.
    Request { rid: u64, frame: Message, reply: ReplySender },
    /// Write a frame that expects no tracked reply.
    Send(Message),
    /// Start the close handshake with 1000.
    Close,
}

/// The task's ends of the channels shared with the [`crate::Client`].
pub(crate) struct Channels {
    pub commands: mpsc::Receiver<Command>,
    pub events: mpsc::Sender<ServerEvent>,
    pub unmatched: mpsc::Sender<UnmatchedReply>,
    pub hello: Option<oneshot::Sender<Hello>>,
    pub closed: watch::Sender<Option<CloseInfo>>,
}

type Sink<S> = SplitSink<WebSocketStream<S>, Message>;

/// The routing state: waiting requests and what was learnt about the close.
pub(crate) struct Router {
    format: Format,
    pending: HashMap<u64, ReplySender>,
    registered_since_sweep: usize,
    events: mpsc::Sender<ServerEvent>,
    unmatched: mpsc::Sender<UnmatchedReply>,
    hello: Option<oneshot::Sender<Hello>>,
    bye: Option<Bye>,
    close_frame: Option<(u16, String)>,
}

/// What the socket must do after a frame was routed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Nothing,
    SendPong,
}

impl Router {
    pub(crate) fn new(
        format: Format,
        events: mpsc::Sender<ServerEvent>,
        unmatched: mpsc::Sender<UnmatchedReply>,
        hello: Option<oneshot::Sender<Hello>>,
    ) -> Self {
        Router {
            format,
            pending: HashMap::new(),
            registered_since_sweep: 0,
            events,
            unmatched,
            hello,
            bye: None,
            close_frame: None,
        }
    }

    /// Register a request before its frame is written, so its reply cannot be missed.
    pub(crate) fn register(&mut self, rid: u64, reply: ReplySender) {
        self.registered_since_sweep += 1;
        if self.registered_since_sweep >= SWEEP_EVERY {
            self.registered_since_sweep = 0;
            self.pending.retain(|_, waiter| !waiter.is_closed());
        }
        if let Some(previous) = self.pending.insert(rid, reply) {
            let _ = previous.send(Err(ClientError::UnexpectedReply(Detail::new(format!(
                "rid {rid} was reused before its reply arrived"
            )))));
        }
    }

    /// Route one data frame's payload. `binary` says which frame type carried it.
    pub(crate) async fn on_payload(&mut self, bytes: &[u8], binary: bool) -> Action {
        let format = if binary { Format::MsgPack } else { Format::Json };
        if format != self.format {
            tracing::debug!(?format, session = ?self.format, "server frame type does not match the session format");
        }
        match decode_server_frame(bytes, format) {
            Ok(Incoming::Event(event)) => {
                // Awaiting here stops reading the socket while the event queue is full: backpressure by design.
                // An error only means the client is gone.
                let _ = self.events.send(event).await;
            }
            Ok(Incoming::Reply { op, rid, reply }) => self.on_reply(op, rid, reply),
            Ok(Incoming::Hello(hello)) => match self.hello.take() {
                Some(waiter) => {
                    let _ = waiter.send(hello);
                }
                None => tracing::warn!(session = %hello.session, "ignoring a second hello"),
            },
            Ok(Incoming::Bye(bye)) => {
                tracing::debug!(code = bye.code, reason = %bye.reason, "server said bye");
                self.bye = Some(bye);
            }
            Ok(Incoming::Ping) => return Action::SendPong,
            Err(err) => {
                tracing::warn!(rid = ?err.rid, error = %err.message, "skipping a malformed server frame");
                if let Some(waiter) = err.rid.and_then(|rid| self.pending.remove(&rid)) {
                    let _ = waiter.send(Err(ClientError::UnexpectedReply(Detail::described(err.message.clone(), err))));
                }
            }
        }
        Action::Nothing
    }

    fn on_reply(&mut self, op: String, rid: Option<u64>, reply: Reply) {
        let reply = match rid.and_then(|rid| self.pending.remove(&rid)) {
            Some(waiter) => match waiter.send(Ok(reply)) {
                Ok(()) => return,
                // The request timed out and stopped waiting.
                Err(Ok(reply)) => reply,
                Err(Err(_)) => return,
            },
            None => reply,
        };
        let unmatched = UnmatchedReply { op, rid, reply };
        if let Err(mpsc::error::TrySendError::Full(dropped)) = self.unmatched.try_send(unmatched) {
            tracing::warn!(rid = ?dropped.rid, op = %dropped.op, "unmatched-reply queue full; dropping a reply");
        }
    }

    /// Note the close frame the server sent (the first one counts).
    pub(crate) fn on_close_frame(&mut self, frame: Option<CloseFrame>) {
        if self.close_frame.is_none() {
            self.close_frame = Some(match frame {
                Some(frame) => (u16::from(frame.code), frame.reason.to_string()),
                // 1005: no status code was present.
                None => (1005, String::new()),
            });
        }
    }

    /// How the socket closed, given why the read side ended when no close frame came.
    pub(crate) fn close_info(&mut self, ended: &str) -> CloseInfo {
        let (code, reason) = self.close_frame.clone().unwrap_or_else(|| (ABNORMAL_CLOSURE, ended.to_owned()));
        CloseInfo { code, reason, bye: self.bye.take() }
    }

    /// Fail every waiting request with the close.
    pub(crate) fn fail_pending(&mut self, info: &CloseInfo) {
        for (_, waiter) in self.pending.drain() {
            let _ = waiter.send(Err(ClientError::Closed(Some(info.clone()))));
        }
    }
}

/// The writing half and whether it still works.
struct Writer<S> {
    sink: Sink<S>,
    broken: bool,
    close_sent: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Writer<S> {
    async fn feed(&mut self, frame: Message) {
        if self.broken || self.close_sent {
            return;
        }
        if let Err(err) = self.sink.feed(frame).await {
            tracing::debug!(error = %err, "websocket write failed");
            self.broken = true;
        }
    }

    async fn flush(&mut self) {
        if self.broken {
            return;
        }
        if let Err(err) = self.sink.flush().await {
            tracing::debug!(error = %err, "websocket flush failed");
            self.broken = true;
        }
    }

    async fn close(&mut self) {
        if self.close_sent || self.broken {
            self.close_sent = true;
            return;
        }
        self.close_sent = true;
        let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
        if let Err(err) = self.sink.send(Message::Close(Some(frame))).await {
            tracing::debug!(error = %err, "sending the close frame failed");
            self.broken = true;
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Apply one command. Returns true when it asked to close.
async fn apply<S: AsyncRead + AsyncWrite + Unpin>(
    command: Command,
    router: &mut Router,
    writer: &mut Writer<S>,
) -> bool {
    match command {
        Command::Request { rid, frame, reply } => {
            if writer.close_sent {
                let _ = reply.send(Err(ClientError::Closed(None)));
            } else {
                router.register(rid, reply);
                writer.feed(frame).await;
            }
            false
        }
        Command::Send(frame) => {
            writer.feed(frame).await;
            false
        }
        Command::Close => true,
    }
}

/// Run the session until the socket is closed, or the client is gone and the close handshake is done.
pub(crate) async fn run<S>(ws: WebSocketStream<S>, format: Format, channels: Channels)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Channels { mut commands, events, unmatched, hello, closed } = channels;
    let (sink, mut stream): (Sink<S>, SplitStream<WebSocketStream<S>>) = ws.split();
    let mut writer = Writer { sink, broken: false, close_sent: false };
    let mut router = Router::new(format, events, unmatched, hello);
    let mut commands_open = true;
    // Set once the session is ending: the task stops at this instant even if the peer never finishes closing.
    let mut give_up_at: Option<Instant> = None;

    let ended: String = loop {
        if writer.broken {
            // The connection is failing; read what is left (the close frame, if any) for a short while.
            give_up_at.get_or_insert_with(|| Instant::now() + CLOSE_GRACE);
        }
        tokio::select! {
            command = commands.recv(), if commands_open => {
                let close = match command {
                    Some(command) => {
                        let mut close = apply(command, &mut router, &mut writer).await;
                        let mut batched = 1;
                        while !close && batched < WRITE_BATCH {
                            match commands.try_recv() {
                                Ok(command) => {
                                    close = apply(command, &mut router, &mut writer).await;
                                    batched += 1;
                                }
                                Err(_) => break,
                            }
                        }
                        writer.flush().await;
                        close
                    }
                    None => {
                        // Every handle to the client is gone.
                        commands_open = false;
                        true
                    }
                };
                if close {
                    writer.close().await;
                    give_up_at.get_or_insert_with(|| Instant::now() + CLOSE_GRACE);
                }
            }
            message = stream.next() => {
                match message {
                    Some(Ok(Message::Text(text))) => {
                        if router.on_payload(text.as_bytes(), false).await == Action::SendPong {
                            writer.feed(to_message(encode_pong(format), format)).await;
                            writer.flush().await;
                        }
                    }
                    Some(Ok(Message::Binary(bytes))) => {
                        if router.on_payload(&bytes, true).await == Action::SendPong {
                            writer.feed(to_message(encode_pong(format), format)).await;
                            writer.flush().await;
                        }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        // Nothing follows a close frame. Flushing sends the library's queued answer to it (none when
                        // this is the answer to ours); the session ends now rather than when the peer drops TCP.
                        router.on_close_frame(frame);
                        writer.flush().await;
                        break "closed".to_owned();
                    }
                    // WebSocket pings are answered by the library; pongs and raw frames need nothing.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Err(err)) => break err.to_string(),
                    None => break "connection ended without a close frame".to_owned(),
                }
            }
            () = sleep_until_opt(give_up_at) => {
                break "the close handshake did not finish in time".to_owned();
            }
        }
    };

    let info = router.close_info(&ended);
    tracing::debug!(code = info.code, reason = %info.reason, "websocket closed");
    router.fail_pending(&info);
    // Record the close before the event and hello channels drop, so anyone woken by them can read it.
    closed.send_replace(Some(info));
    // Dropping the router closes the event and unmatched queues; dropping the socket ends the connection.
}

/// Wrap an encoded payload in the frame type of its format: text for JSON, binary for MessagePack.
pub(crate) fn to_message(bytes: Vec<u8>, format: Format) -> Message {
    match format {
        Format::Json => match String::from_utf8(bytes) {
            Ok(text) => Message::text(text),
            Err(err) => Message::binary(err.into_bytes()),
        },
        Format::MsgPack => Message::binary(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map};
    use switchyard_protocol::ErrorCode;

    fn router() -> (Router, mpsc::Receiver<ServerEvent>, mpsc::Receiver<UnmatchedReply>) {
        let (events_tx, events_rx) = mpsc::channel(16);
        let (unmatched_tx, unmatched_rx) = mpsc::channel(16);
        (Router::new(Format::Json, events_tx, unmatched_tx, None), events_rx, unmatched_rx)
    }

    fn bytes(value: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&value).unwrap()
    }

    #[tokio::test]
    async fn replies_go_to_their_waiter() {
        let (mut router, _events, mut unmatched) = router();
        let (tx1, rx1) = oneshot::channel();
        let (tx2, rx2) = oneshot::channel();
        router.register(1, tx1);
        router.register(2, tx2);
        let action = router.on_payload(&bytes(json!({"op": "ok", "rid": 2, "room": "r"})), false).await;
        assert_eq!(action, Action::Nothing);
        let action = router
            .on_payload(&bytes(json!({"op": "err", "rid": 1, "code": "forbidden", "message": "no"})), false)
            .await;
        assert_eq!(action, Action::Nothing);
        let mut expected = Map::new();
        expected.insert("room".into(), "r".into());
        assert_eq!(rx2.await.unwrap().unwrap(), Reply::Ok(expected));
        assert_eq!(rx1.await.unwrap().unwrap().error_code(), Some(ErrorCode::Forbidden));
        assert!(unmatched.try_recv().is_err());
    }

    #[tokio::test]
    async fn unmatched_and_late_replies_are_kept() {
        let (mut router, _events, mut unmatched) = router();
        router.on_payload(&bytes(json!({"op": "err", "code": "bad_request", "message": "not JSON"})), false).await;
        router.on_payload(&bytes(json!({"op": "ok", "rid": 99})), false).await;
        let (tx, rx) = oneshot::channel();
        router.register(5, tx);
        drop(rx); // the request timed out
        router.on_payload(&bytes(json!({"op": "pong", "rid": 5})), false).await;

        let first = unmatched.try_recv().unwrap();
        assert_eq!(first.rid, None);
        assert_eq!(first.reply.error_code(), Some(ErrorCode::BadRequest));
        let second = unmatched.try_recv().unwrap();
        assert_eq!((second.op.as_str(), second.rid), ("ok", Some(99)));
        let third = unmatched.try_recv().unwrap();
        assert_eq!((third.op.as_str(), third.rid), ("pong", Some(5)));
    }

    #[tokio::test]
    async fn malformed_reply_fails_its_waiter_and_events_flow() {
        let (mut router, mut events, _unmatched) = router();
        let (tx, rx) = oneshot::channel();
        router.register(3, tx);
        router.on_payload(br#"{"op":"err","rid":3,"code":"???","message":"x"}"#, false).await;
        assert!(matches!(rx.await.unwrap(), Err(ClientError::UnexpectedReply(_))));
        assert_eq!(router.on_payload(b"\x00garbage", false).await, Action::Nothing);
        assert_eq!(router.on_payload(br#"{"op":"ping"}"#, false).await, Action::SendPong);
        let typing = json!({"op": "typing", "room": "r", "user": "u"});
        router.on_payload(&bytes(typing.clone()), false).await;
        let packed = rmp_serde::to_vec_named(&typing).unwrap();
        router.on_payload(&packed, true).await;
        for _ in 0..2 {
            assert!(matches!(events.try_recv().unwrap(), ServerEvent::Typing { .. }));
        }
    }

    #[tokio::test]
    async fn close_info_keeps_bye_and_first_close_frame() {
        let (mut router, _events, _unmatched) = router();
        router
            .on_payload(
                &bytes(json!({"op": "bye", "code": 1001, "reason": "draining", "reconnect_after_ms": 700})),
                false,
            )
            .await;
        router.on_close_frame(Some(CloseFrame { code: CloseCode::Away, reason: "draining".into() }));
        router.on_close_frame(Some(CloseFrame { code: CloseCode::Normal, reason: "".into() }));
        let (tx, rx) = oneshot::channel();
        router.register(8, tx);
        let info = router.close_info("ignored");
        assert_eq!(info.code, 1001);
        assert_eq!(info.reason, "draining");
        assert_eq!(info.bye.as_ref().unwrap().reconnect_after_ms, Some(700));
        router.fail_pending(&info);
        assert_eq!(rx.await.unwrap().unwrap_err().close_code(), Some(1001));

        let (mut router, _events, _unmatched) = self::router();
        let info = router.close_info("reset by peer");
        assert_eq!((info.code, info.reason.as_str()), (1006, "reset by peer"));
    }
}
