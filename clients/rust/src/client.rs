//! The session handle: connecting (upgrade, authentication, `hello`), requests matched by `rid`, typed helpers for
//! the common ops, raw frames for tests, the event stream and the close record.
//!
//! A [`Client`] is one socket. It does not reconnect or resume; a caller that wants to resume connects again and
//! joins with `since`. Only `ws://` URLs are supported (no TLS).

use crate::error::{ClientError, CloseInfo, Detail};
use crate::frame::{encode_map, encode_op, Hello, Reply, UnmatchedReply};
use crate::task::{self, Channels, Command};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use switchyard_protocol::client::{ClientOp, Format, Message, RoomSummary, ServerEvent};
use switchyard_protocol::{MessageId, RoomId, UserId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch, Mutex};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::{Request, Response};
use tokio_tungstenite::tungstenite::http::header::{
    HeaderName, HeaderValue, AUTHORIZATION, ORIGIN, SEC_WEBSOCKET_PROTOCOL,
};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

/// Capacity of the event queue. When it is full the socket is not read until the caller takes events.
pub const EVENT_QUEUE: usize = 65_536;
/// Capacity of the queue of replies no request waited for; further ones are dropped (and logged).
pub const UNMATCHED_QUEUE: usize = 1_024;
/// Capacity of the queue of frames waiting to be written.
pub const OUTGOING_QUEUE: usize = 1_024;
/// Default for [`ConnectOptions::connect_timeout`] and [`ConnectOptions::request_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How the client authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `Authorization: Bearer <token>` on the upgrade request.
    Header(String),
    /// `?token=<token>` appended to the URL.
    Query(String),
    /// A first frame `{"op": "auth", "token": ...}` right after the upgrade.
    FirstFrame(String),
    /// No authentication (the server closes with 4001 after its grace period).
    None,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The WebSocket URL, e.g. `ws://127.0.0.1:8080/v1/ws`.
    pub url: String,
    /// How to authenticate.
    pub auth: Auth,
    /// The encoding to request; the session uses whatever the server selects.
    pub format: Format,
    /// The subprotocols to request instead of `[format.subprotocol()]`; `Some(vec![])` requests none (the server
    /// then speaks JSON).
    pub subprotocols: Option<Vec<String>>,
    /// An `Origin` header to send.
    pub origin: Option<String>,
    /// Limit on the whole connect: TCP, upgrade, authentication and `hello`.
    pub connect_timeout: Duration,
    /// How long [`Client::request`] waits for a reply.
    pub request_timeout: Duration,
    /// The local address to connect from, e.g. one of several 127.0.0.x addresses to go past one source address's
    /// ephemeral ports; `None` lets the system choose.
    pub bind_ip: Option<std::net::IpAddr>,
}

impl ConnectOptions {
    /// JSON, no origin, default subprotocol list and timeouts.
    pub fn new(url: impl Into<String>, auth: Auth) -> Self {
        ConnectOptions {
            url: url.into(),
            auth,
            format: Format::Json,
            subprotocols: None,
            origin: None,
            connect_timeout: DEFAULT_TIMEOUT,
            request_timeout: DEFAULT_TIMEOUT,
            bind_ip: None,
        }
    }

    /// The same options with `format`.
    pub fn with_format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }
}

/// The result of a `send` or `dm`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Sent {
    /// The new message's id.
    pub id: MessageId,
    /// The seq of the `msg` event that created it.
    pub seq: u64,
    /// Server time, unix milliseconds.
    pub ts: u64,
}

#[derive(Deserialize)]
struct HistoryPage {
    messages: Vec<Message>,
    more: bool,
}

#[derive(Deserialize)]
struct DmSent {
    room: RoomId,
    #[serde(flatten)]
    sent: Sent,
}

/// One authenticated WebSocket session. Methods take `&self`, so a client can be shared (e.g. in an `Arc`) by a
/// task that sends and one that reads events. Dropping it closes the socket with 1000.
#[derive(Debug)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    events: Mutex<mpsc::Receiver<ServerEvent>>,
    unmatched: Mutex<mpsc::Receiver<UnmatchedReply>>,
    closed: watch::Receiver<Option<CloseInfo>>,
    hello: Hello,
    format: Format,
    next_rid: AtomicU64,
    request_timeout: Duration,
}

impl Client {
    /// Connect, authenticate and wait for `hello`, all within `opts.connect_timeout`.
    ///
    /// An HTTP error status before the upgrade is [`ClientError::Http`]; a close before `hello` (a failed
    /// first-frame auth, 4001) is [`ClientError::Closed`] with the close code.
    pub async fn connect(opts: ConnectOptions) -> Result<Client, ClientError> {
        let limit = opts.connect_timeout;
        tokio::time::timeout(limit, async move {
            let request = build_request(&opts)?;
            let address = tcp_address(&request)?;
            let tcp = dial(&address, opts.bind_ip)
                .await
                .map_err(|e| ClientError::WebSocket(Box::new(tungstenite::Error::Io(e))))?;
            tcp.set_nodelay(true).map_err(|e| ClientError::WebSocket(Box::new(tungstenite::Error::Io(e))))?;
            Client::handshake(&opts, request, tcp).await
        })
        .await
        .map_err(|_| ClientError::Timeout("connect and hello"))?
    }

    /// Upgrade over an established stream, then authenticate and wait for `hello`.
    pub(crate) async fn handshake<S>(opts: &ConnectOptions, request: Request, stream: S) -> Result<Client, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (ws, response) = tokio_tungstenite::client_async(request, stream).await.map_err(upgrade_error)?;
        let format = negotiated_format(&response)?;

        let (commands_tx, commands_rx) = mpsc::channel(OUTGOING_QUEUE);
        let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (unmatched_tx, unmatched_rx) = mpsc::channel(UNMATCHED_QUEUE);
        let (hello_tx, hello_rx) = oneshot::channel();
        let (closed_tx, closed_rx) = watch::channel(None);
        tokio::spawn(task::run(
            ws,
            format,
            Channels {
                commands: commands_rx,
                events: events_tx,
                unmatched: unmatched_tx,
                hello: Some(hello_tx),
                closed: closed_tx,
            },
        ));

        if let Auth::FirstFrame(token) = &opts.auth {
            let op = ClientOp::Auth { token: token.clone() };
            let frame = task::to_message(encode_op(None, &op, format), format);
            // A send error means the task ended; the hello wait below reports the close.
            let _ = commands_tx.send(Command::Send(frame)).await;
        }
        let hello = match hello_rx.await {
            Ok(hello) => hello,
            Err(_) => return Err(ClientError::Closed(closed_rx.borrow().clone())),
        };
        Ok(Client {
            commands: commands_tx,
            events: Mutex::new(events_rx),
            unmatched: Mutex::new(unmatched_rx),
            closed: closed_rx,
            hello,
            format,
            next_rid: AtomicU64::new(1),
            request_timeout: opts.request_timeout,
        })
    }

    /// The server's `hello`.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// The format the server selected for this session.
    pub fn format(&self) -> Format {
        self.format
    }

    /// A fresh request id.
    pub fn next_rid(&self) -> u64 {
        self.next_rid.fetch_add(1, Ordering::Relaxed)
    }

    fn closed_error(&self) -> ClientError {
        ClientError::Closed(self.close_info())
    }

    async fn enqueue(&self, command: Command) -> Result<(), ClientError> {
        self.commands.send(command).await.map_err(|_| self.closed_error())
    }

    async fn exchange(&self, rid: u64, payload: Vec<u8>, limit: Duration) -> Result<Reply, ClientError> {
        let frame = task::to_message(payload, self.format);
        let (reply_tx, reply_rx) = oneshot::channel();
        let exchange = async {
            self.enqueue(Command::Request { rid, frame, reply: reply_tx }).await?;
            match reply_rx.await {
                Ok(result) => result,
                Err(_) => Err(self.closed_error()),
            }
        };
        tokio::time::timeout(limit, exchange).await.map_err(|_| ClientError::Timeout("reply"))?
    }

    /// Send `op` with a fresh `rid` and wait (up to the request timeout) for the `ok`/`err` (or `pong`) carrying
    /// that rid. A reply that arrives after the timeout goes to [`Client::next_unmatched`].
    pub async fn request(&self, op: ClientOp) -> Result<Reply, ClientError> {
        self.request_with_timeout(op, self.request_timeout).await
    }

    /// [`Client::request`] with its own timeout.
    pub async fn request_with_timeout(&self, op: ClientOp, limit: Duration) -> Result<Reply, ClientError> {
        let rid = self.next_rid();
        self.exchange(rid, encode_op(Some(rid), &op, self.format), limit).await
    }

    /// Send an arbitrary frame, given as a JSON object, with a fresh `rid` (replacing any in the map), and wait for
    /// its reply. For ops or fields that [`ClientOp`] cannot express, such as unknown ops or invalid ids.
    pub async fn request_map(&self, frame: Map<String, Value>) -> Result<Reply, ClientError> {
        let rid = self.next_rid();
        self.exchange(rid, encode_map(Some(rid), frame, self.format), self.request_timeout).await
    }

    /// Send `op` without a `rid` and without waiting for a reply (for `typing`); any reply it earns goes to
    /// [`Client::next_unmatched`].
    pub async fn send_op(&self, op: ClientOp) -> Result<(), ClientError> {
        let frame = task::to_message(encode_op(None, &op, self.format), self.format);
        self.enqueue(Command::Send(frame)).await
    }

    /// Send a text frame exactly as given (for testing malformed frames).
    pub async fn send_raw_text(&self, text: String) -> Result<(), ClientError> {
        self.enqueue(Command::Send(WsMessage::text(text))).await
    }

    /// Send a binary frame exactly as given (for testing malformed frames).
    pub async fn send_raw_binary(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.enqueue(Command::Send(WsMessage::binary(bytes))).await
    }

    /// The next event, waiting as long as it takes; `None` once the socket closed and every event was taken.
    pub async fn next_event(&self) -> Option<ServerEvent> {
        self.events.lock().await.recv().await
    }

    /// The next event within `limit`; `None` on timeout or once closed and drained (see [`Client::close_info`]).
    pub async fn next_event_timeout(&self, limit: Duration) -> Option<ServerEvent> {
        tokio::time::timeout(limit, self.next_event()).await.ok().flatten()
    }

    /// An event that has already arrived, without waiting (`None` as well while another task waits in
    /// [`Client::next_event`]).
    pub fn try_next_event(&self) -> Option<ServerEvent> {
        self.events.try_lock().ok()?.try_recv().ok()
    }

    /// The next reply that no request was waiting for (no `rid`, an unknown one, or after a timeout); `None` once
    /// the socket closed and every such reply was taken.
    pub async fn next_unmatched(&self) -> Option<UnmatchedReply> {
        self.unmatched.lock().await.recv().await
    }

    /// [`Client::next_unmatched`] within `limit`; `None` on timeout.
    pub async fn next_unmatched_timeout(&self, limit: Duration) -> Option<UnmatchedReply> {
        tokio::time::timeout(limit, self.next_unmatched()).await.ok().flatten()
    }

    /// How the socket closed (code, reason and any `bye`), once it has.
    pub fn close_info(&self) -> Option<CloseInfo> {
        self.closed.borrow().clone()
    }

    /// Whether the socket has closed.
    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// Wait up to `limit` for the socket to close; the close record, or `None` if it is still open.
    ///
    /// This does not consume events, but the socket is not read while the event queue is full.
    pub async fn wait_closed(&self, limit: Duration) -> Option<CloseInfo> {
        let mut closed = self.closed.clone();
        let waited = tokio::time::timeout(limit, async {
            // An error means the task ended, which it only does after recording the close.
            let _ = closed.wait_for(Option::is_some).await;
        })
        .await;
        match waited {
            Ok(()) => self.close_info(),
            Err(_) => None,
        }
    }

    /// Close the socket with 1000 and wait for the close handshake; the close record, if it finished.
    pub async fn close(&self) -> Option<CloseInfo> {
        if !self.is_closed() {
            let _ = self.commands.send(Command::Close).await;
        }
        self.wait_closed(task::CLOSE_GRACE + Duration::from_secs(1)).await
    }

    /// `ping`: wait for the `pong` and return the round-trip time.
    pub async fn ping(&self) -> Result<Duration, ClientError> {
        let started = std::time::Instant::now();
        self.request(ClientOp::Ping).await?.into_result()?;
        Ok(started.elapsed())
    }

    /// `create`: create a room; an `err` (e.g. `conflict`) becomes [`ClientError::Server`].
    pub async fn create(&self, room: &str, private: bool) -> Result<(), ClientError> {
        let op = ClientOp::Create { room: RoomId::parse(room)?, private, title: None };
        self.request(op).await?.into_result().map(drop)
    }

    /// `join`: join and subscribe, replaying events after `since` first; the room's seq at subscription.
    pub async fn join(&self, room: &str, since: Option<u64>) -> Result<u64, ClientError> {
        let op = ClientOp::Join { room: RoomId::parse(room)?, since };
        let fields = self.request(op).await?.into_result()?;
        field_u64(&fields, "seq")
    }

    /// `leave`: end membership and this user's subscriptions.
    pub async fn leave(&self, room: &str) -> Result<(), ClientError> {
        let op = ClientOp::Leave { room: RoomId::parse(room)? };
        self.request(op).await?.into_result().map(drop)
    }

    /// `send`: post a message to a room.
    pub async fn send(&self, room: &str, body: impl Into<String>) -> Result<Sent, ClientError> {
        let op =
            ClientOp::Send { room: RoomId::parse(room)?, body: body.into(), attrs: None, reply_to: None, cmid: None };
        let fields = self.request(op).await?.into_result()?;
        from_fields(fields)
    }

    /// `dm`: post a direct message; the `dm:<a>:<b>` room and the sent message.
    pub async fn dm(&self, to: &str, body: impl Into<String>) -> Result<(RoomId, Sent), ClientError> {
        let op = ClientOp::Dm { to: UserId::parse(to)?, body: body.into(), attrs: None, cmid: None };
        let fields = self.request(op).await?.into_result()?;
        let DmSent { room, sent } = from_fields(fields)?;
        Ok((room, sent))
    }

    /// `typing`: sent without a `rid`; the server does not answer it.
    pub async fn typing(&self, room: &str) -> Result<(), ClientError> {
        self.send_op(ClientOp::Typing { room: RoomId::parse(room)? }).await
    }

    /// `history`: a page of messages in ascending seq, and whether there are more.
    pub async fn history(
        &self,
        room: &str,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<(Vec<Message>, bool), ClientError> {
        self.history_page(ClientOp::History { room: RoomId::parse(room)?, before, after, limit, thread: None }).await
    }

    /// `history` of a thread: a page of the replies to message `parent`, in ascending seq, and whether there are
    /// more (`before` and `after` bound the replies' seqs).
    pub async fn thread(
        &self,
        room: &str,
        parent: u64,
        before: Option<u64>,
        after: Option<u64>,
        limit: Option<u32>,
    ) -> Result<(Vec<Message>, bool), ClientError> {
        let op = ClientOp::History { room: RoomId::parse(room)?, before, after, limit, thread: Some(parent) };
        self.history_page(op).await
    }

    /// `rooms`: this user's rooms, each with its last seq, read marker, unread count and latest message.
    pub async fn rooms(&self) -> Result<Vec<RoomSummary>, ClientError> {
        let fields = self.request(ClientOp::Rooms).await?.into_result()?;
        let listed: RoomList = from_fields(fields)?;
        Ok(listed.rooms)
    }

    /// `read`: move this user's read marker in `room` forward; the marker.
    pub async fn read(&self, room: &str, seq: u64) -> Result<u64, ClientError> {
        let fields = self.request(ClientOp::Read { room: RoomId::parse(room)?, seq }).await?.into_result()?;
        field_u64(&fields, "seq")
    }

    async fn history_page(&self, op: ClientOp) -> Result<(Vec<Message>, bool), ClientError> {
        let fields = self.request(op).await?.into_result()?;
        let page: HistoryPage = from_fields(fields)?;
        Ok((page.messages, page.more))
    }
}

#[derive(Deserialize)]
struct RoomList {
    rooms: Vec<RoomSummary>,
}

fn field_u64(fields: &Map<String, Value>, name: &str) -> Result<u64, ClientError> {
    fields
        .get(name)
        .and_then(Value::as_u64)
        .ok_or_else(|| ClientError::UnexpectedReply(Detail::new(format!("no unsigned {name:?} in {fields:?}"))))
}

fn from_fields<T: serde::de::DeserializeOwned>(fields: Map<String, Value>) -> Result<T, ClientError> {
    serde_json::from_value(Value::Object(fields)).map_err(|e| ClientError::UnexpectedReply(Detail::of(e)))
}

/// A TCP connection to `address` (`host:port`), from `bind_ip` when one is given.
async fn dial(address: &str, bind_ip: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(ip) = bind_ip else { return TcpStream::connect(address).await };
    let mut last_error = None;
    for target in tokio::net::lookup_host(address).await? {
        if target.is_ipv4() != ip.is_ipv4() {
            continue;
        }
        let socket = if ip.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.bind(std::net::SocketAddr::new(ip, 0))?;
        match socket.connect(target).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, format!("no address of {address} matches {ip}"))
    }))
}

/// Percent-encode everything but RFC 3986 unreserved characters.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `url` with `token=<token>` added to its query.
fn with_query_token(url: &str, token: &str) -> String {
    let (base, fragment) = match url.find('#') {
        Some(at) => url.split_at(at),
        None => (url, ""),
    };
    let separator = match base.find('?') {
        None => "?",
        Some(_) if base.ends_with('?') || base.ends_with('&') => "",
        Some(_) => "&",
    };
    format!("{base}{separator}token={}{fragment}", percent_encode(token))
}

fn header_value(name: &HeaderName, value: &str) -> Result<HeaderValue, ClientError> {
    HeaderValue::from_str(value)
        .map_err(|e| ClientError::Handshake(Detail::caused(&format!("invalid {name} header"), e)))
}

/// The upgrade request for `opts`: URL (with the query token), Authorization, subprotocols and Origin.
pub(crate) fn build_request(opts: &ConnectOptions) -> Result<Request, ClientError> {
    let url = match &opts.auth {
        Auth::Query(token) => with_query_token(&opts.url, token),
        _ => opts.url.clone(),
    };
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| ClientError::Handshake(Detail::caused(&format!("invalid URL {url:?}"), e)))?;
    match request.uri().scheme_str() {
        Some("ws") => {}
        other => {
            return Err(ClientError::Handshake(Detail::new(format!(
                "unsupported URL scheme {other:?} (only ws:// is supported)"
            ))))
        }
    }
    let headers = request.headers_mut();
    if let Auth::Header(token) = &opts.auth {
        headers.insert(AUTHORIZATION, header_value(&AUTHORIZATION, &format!("Bearer {token}"))?);
    }
    let subprotocols = match &opts.subprotocols {
        Some(list) => list.join(", "),
        None => opts.format.subprotocol().to_owned(),
    };
    if !subprotocols.is_empty() {
        headers.insert(SEC_WEBSOCKET_PROTOCOL, header_value(&SEC_WEBSOCKET_PROTOCOL, &subprotocols)?);
    }
    if let Some(origin) = &opts.origin {
        headers.insert(ORIGIN, header_value(&ORIGIN, origin)?);
    }
    Ok(request)
}

/// `host:port` to dial for a `ws://` request.
fn tcp_address(request: &Request) -> Result<String, ClientError> {
    let uri = request.uri();
    let host = uri.host().ok_or_else(|| ClientError::Handshake(Detail::new(format!("no host in {uri}"))))?;
    let port = uri.port_u16().unwrap_or(80);
    Ok(format!("{host}:{port}"))
}

/// The session format from the response's subprotocol: JSON when the server selected none.
fn negotiated_format(response: &Response) -> Result<Format, ClientError> {
    let Some(value) = response.headers().get(SEC_WEBSOCKET_PROTOCOL) else {
        return Ok(Format::Json);
    };
    let name =
        value.to_str().map_err(|e| ClientError::Handshake(Detail::caused("unreadable subprotocol header", e)))?;
    Format::from_subprotocol(name)
        .ok_or_else(|| ClientError::Handshake(Detail::new(format!("server selected unknown subprotocol {name:?}"))))
}

fn upgrade_error(err: tungstenite::Error) -> ClientError {
    match err {
        tungstenite::Error::Http(response) => {
            let body = response.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
            ClientError::Http { status: response.status().as_u16(), body }
        }
        tungstenite::Error::Protocol(protocol) => ClientError::Handshake(Detail::of(protocol)),
        tungstenite::Error::Url(url) => ClientError::Handshake(Detail::of(url)),
        other => ClientError::WebSocket(Box::new(other)),
    }
}

#[cfg(test)]
mod tests;
