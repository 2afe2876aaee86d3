//! Lean idle sockets for the `idle` scenario: a bare WebSocket per socket (tokio-tungstenite with small buffers),
//! authenticated with the `Authorization` header at the upgrade, that waits for `hello`, then only answers the
//! server's pings until it is told to stop.
//!
//! The full client (`switchyard_client::Client`) keeps a task, five channels and request bookkeeping per socket,
//! about 150 KiB; a holder is one task and the socket's buffers, so one load-generator process can hold as many
//! sockets as its file limit allows. It sends no op and checks nothing but `hello` and that the socket stays open.

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchyard_client::frame::{decode_server_frame, Incoming};
use switchyard_protocol::client::Format;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

/// Bytes the socket reads at a time; `hello` and pings are far smaller, and a larger frame grows the buffer.
const READ_BUFFER_BYTES: usize = 512;

/// Where and how holders connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub format: Format,
    /// Sockets are spread over 127.0.0.1 ..= 127.0.0.`sources`.
    pub sources: usize,
}

/// The sockets held by one run: how many are open, and the signal that closes them all.
#[derive(Debug, Default)]
pub struct Holders {
    open: Arc<AtomicUsize>,
    /// Sockets the server closed (or that failed) while held.
    lost: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Holders {
    pub fn new() -> Holders {
        Holders::default()
    }

    /// Sockets open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Sockets that closed without being told to.
    pub fn lost(&self) -> usize {
        self.lost.load(Ordering::Relaxed)
    }

    /// Connect socket number `i` (its source address is chosen round-robin), authenticate with `token`, wait for
    /// `hello`, and hold the socket in a task of its own until [`Holders::stop`] (or drop).
    pub async fn connect(&self, target: &Target, i: usize, token: &str, timeout: Duration) -> Result<()> {
        let source = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1 + (i % target.sources.max(1)) as u8));
        let ws = tokio::time::timeout(timeout, open(target, source, token))
            .await
            .map_err(|_| anyhow::anyhow!("no hello within {}s", timeout.as_secs()))??;
        self.open.fetch_add(1, Ordering::Relaxed);
        let (open, lost, stop) = (self.open.clone(), self.lost.clone(), self.stop.clone());
        tokio::spawn(async move {
            let stopped = hold(ws, &stop).await;
            open.fetch_sub(1, Ordering::Relaxed);
            if !stopped {
                lost.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(())
    }

    /// Close every held socket.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Dial from `source`, upgrade with the token and the subprotocol, and read `hello`.
async fn open(target: &Target, source: IpAddr, token: &str) -> Result<WebSocketStream<TcpStream>> {
    let mut request = target.url.as_str().into_client_request().context("the fleet's WebSocket URL")?;
    let headers = request.headers_mut();
    headers.insert(AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}"))?);
    headers.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(target.format.subprotocol()));
    let host = request.uri().host().context("no host in the WebSocket URL")?;
    let port = request.uri().port_u16().unwrap_or(80);
    let address: SocketAddr = tokio::net::lookup_host((host, port))
        .await?
        .find(|a| a.is_ipv4() == source.is_ipv4())
        .with_context(|| format!("no address of {host} matches {source}"))?;
    let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(source, 0)).with_context(|| format!("binding to {source}"))?;
    let tcp = socket.connect(address).await?;
    tcp.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        // Write every frame (pongs) at once rather than collecting them.
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20));
    let (mut ws, _response) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config))
        .await
        .map_err(|e| anyhow::anyhow!("upgrade refused: {e}"))?;
    loop {
        let bytes = match ws.next().await {
            None => bail!("closed before hello"),
            Some(Err(e)) => bail!("closed before hello: {e}"),
            Some(Ok(Message::Binary(bytes))) => bytes,
            Some(Ok(Message::Text(text))) => text.as_bytes().to_vec().into(),
            Some(Ok(Message::Close(frame))) => bail!("closed before hello: {frame:?}"),
            Some(Ok(_)) => continue,
        };
        return match decode_server_frame(&bytes, target.format) {
            Ok(Incoming::Hello(_)) => Ok(ws),
            Ok(_) => bail!("the first frame is not hello"),
            Err(e) => bail!("unreadable first frame: {e:?}"),
        };
    }
}

/// Answer pings until `stop` (true) or until the socket closes (false).
async fn hold(mut ws: WebSocketStream<TcpStream>, stop: &CancellationToken) -> bool {
    loop {
        let frame = tokio::select! {
            _ = stop.cancelled() => return true,
            frame = ws.next() => frame,
        };
        match frame {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return false,
            // Reading the ping queued the pong; write it now.
            Some(Ok(Message::Ping(_))) => {
                if ws.flush().await.is_err() {
                    return false;
                }
            }
            // Idle sockets receive nothing else that needs an answer.
            Some(Ok(_)) => {}
        }
    }
}
