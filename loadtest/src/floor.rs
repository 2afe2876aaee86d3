//! The floor: the least a WebSocket broadcast server can do, to measure the fleet against. It speaks just enough
//! of the protocol for the load client (`hello`, `join`, `send`, `ping`), keeps rooms in memory, numbers each
//! room's messages, and writes each `msg`, encoded once per format, to every member's queue.
//!
//! It has no authentication, no NATS, no persistence, no limits beyond a bounded queue per socket, and no
//! ordering across rooms. `serve` runs it in its own process (`switchyard-loadtest floor-serve`), so its CPU is
//! measured apart from the load client's; `Floor::spawn` starts that process and stops it when dropped.

use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};
use switchyard_protocol::client::{
    decode_client_frame, encode_frame, ClientOp, Format, OkResult, ServerEvent, ServerFrame, SUBPROTOCOL_MSGPACK,
};
use switchyard_protocol::{ErrorCode, MessageId, ProjectId, RoomId, UserId};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Frames a socket may have waiting; a socket that falls further behind is dropped from its rooms.
const QUEUE_FRAMES: usize = 8192;

#[derive(Default)]
struct Room {
    seq: u64,
    members: Vec<(Format, mpsc::Sender<Message>)>,
}

type Rooms = Arc<Mutex<HashMap<RoomId, Room>>>;

/// Serve on `listen` until stdin closes; prints `listening ADDRESS` first.
pub async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    let stdin_closed = async {
        let mut stdin = tokio::io::stdin();
        let mut byte = [0u8; 1];
        while matches!(stdin.read(&mut byte).await, Ok(n) if n > 0) {}
    };
    serve_until(listener, stdin_closed).await;
    Ok(())
}

/// Accept and serve connections until `stop` completes.
async fn serve_until(listener: TcpListener, stop: impl std::future::Future<Output = ()>) {
    let rooms: Rooms = Arc::default();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, rooms.clone()));
            }
            _ = &mut stop => return,
        }
    }
}

// The handshake callback's error type is tungstenite's (an HTTP response), large by its design.
#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream, rooms: Rooms) {
    let chosen = Arc::new(Mutex::new(Format::Json));
    let chosen_in_callback = chosen.clone();
    let select = move |request: &Request, mut response: Response| {
        let asked = request.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).unwrap_or("");
        if let Some(name) = asked.split(',').map(str::trim).find(|p| Format::from_subprotocol(p).is_some()) {
            *chosen_in_callback.lock().expect("format lock") = Format::from_subprotocol(name).unwrap_or(Format::Json);
            response.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(static_name(name)));
        }
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, select).await else { return };
    let format = *chosen.lock().expect("format lock");
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(QUEUE_FRAMES);
    let writer = tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            if sink.feed(first).await.is_err() {
                return;
            }
            while let Ok(more) = rx.try_recv() {
                if sink.feed(more).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let hello = ServerFrame::Hello {
        session: "floor".into(),
        user: UserId::parse("floor").expect("valid user id"),
        project_id: ProjectId::parse("pj_00000000000000000000").expect("valid project id"),
        heartbeat_ms: 25_000,
        max_frame: 65_536,
    };
    let _ = tx.send(frame(&hello, format)).await;
    while let Some(Ok(message)) = source.next().await {
        let bytes = match &message {
            Message::Text(text) => text.as_bytes(),
            Message::Binary(bytes) => bytes,
            Message::Close(_) => break,
            _ => continue,
        };
        let reply = match decode_client_frame(bytes, format) {
            Err(e) => ServerFrame::Err { rid: e.rid, code: e.code, message: e.message, retry_after_ms: None },
            Ok(request) => {
                let rid = request.rid;
                match request.op {
                    ClientOp::Join { room, .. } => {
                        let mut rooms = rooms.lock().expect("rooms lock");
                        let entry = rooms.entry(room.clone()).or_default();
                        entry.members.push((format, tx.clone()));
                        ServerFrame::Ok { rid, result: OkResult::RoomSeq { room, seq: entry.seq } }
                    }
                    ClientOp::Send { room, body, .. } => match broadcast(&rooms, room, body) {
                        Some(result) => ServerFrame::Ok { rid, result },
                        None => not_member(rid),
                    },
                    ClientOp::Ping => ServerFrame::Pong { rid },
                    other @ (ClientOp::Auth { .. }
                    | ClientOp::Create { .. }
                    | ClientOp::Leave { .. }
                    | ClientOp::Invite { .. }
                    | ClientOp::Kick { .. }
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
                    | ClientOp::Unwatch { .. }) => ServerFrame::Err {
                        rid,
                        code: ErrorCode::BadRequest,
                        message: format!("the floor does not serve {:?}", other.name()),
                        retry_after_ms: None,
                    },
                }
            }
        };
        // The reply goes after the broadcast was queued, as the gateway acks before the live event arrives.
        if tx.send(frame(&reply, format)).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Number the message, queue it to every member (encoded once per format), and answer with what `send` returns.
fn broadcast(rooms: &Rooms, room: RoomId, body: String) -> Option<OkResult> {
    let ts = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let mut rooms = rooms.lock().expect("rooms lock");
    let entry = rooms.get_mut(&room)?;
    entry.seq += 1;
    let id = MessageId::generate(ts);
    let event = ServerEvent::Msg {
        room: room.clone(),
        seq: entry.seq,
        id: id.clone(),
        from: UserId::parse("floor").expect("valid user id"),
        body,
        attrs: None,
        reply_to: None,
        ts,
    };
    let mut encoded: [Option<Message>; 2] = [None, None];
    entry.members.retain(|(format, member)| {
        let slot = &mut encoded[usize::from(*format == Format::MsgPack)];
        let message = slot.get_or_insert_with(|| frame(&event, *format)).clone();
        member.try_send(message).is_ok()
    });
    Some(OkResult::Sent { room, id, seq: entry.seq, ts })
}

fn not_member(rid: Option<u64>) -> ServerFrame {
    ServerFrame::Err { rid, code: ErrorCode::Forbidden, message: "join the room first".into(), retry_after_ms: None }
}

fn frame<T: serde::Serialize>(value: &T, format: Format) -> Message {
    let bytes = encode_frame(value, format);
    match format {
        Format::Json => Message::Text(String::from_utf8(bytes).expect("JSON is UTF-8").into()),
        Format::MsgPack => Message::Binary(bytes.into()),
    }
}

fn static_name(name: &str) -> &'static str {
    if name == SUBPROTOCOL_MSGPACK {
        SUBPROTOCOL_MSGPACK
    } else {
        switchyard_protocol::client::SUBPROTOCOL_JSON
    }
}

/// A floor server running as a child process; killed when dropped.
pub struct Floor {
    pub ws: String,
    pub pid: u32,
    _child: tokio::process::Child,
}

impl Floor {
    pub async fn spawn() -> Result<Floor> {
        let exe = std::env::current_exe().context("finding this program to start the floor")?;
        let mut child = tokio::process::Command::new(exe)
            .args(["floor-serve", "--listen", "127.0.0.1:0"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the floor server")?;
        let pid = child.id().context("the floor exited at once")?;
        let stdout = child.stdout.take().context("no stdout from the floor")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).await?;
        let Some(address) = line.trim().strip_prefix("listening ") else {
            bail!("the floor did not say where it listens: {line:?}");
        };
        Ok(Floor { ws: format!("ws://{address}/"), pid, _child: child })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_client::{Auth, Client, ConnectOptions};

    #[tokio::test]
    async fn members_get_each_message_once_in_order_in_both_formats() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_until(listener, async move {
            let _ = stop_rx.await;
        }));
        let json = Client::connect(ConnectOptions::new(&url, Auth::None)).await.unwrap();
        let packed = Client::connect(ConnectOptions::new(&url, Auth::None).with_format(Format::MsgPack)).await.unwrap();
        assert_eq!(packed.format(), Format::MsgPack);
        json.join("r", None).await.unwrap();
        packed.join("r", None).await.unwrap();
        for i in 1..=3u64 {
            assert_eq!(json.send("r", format!("m{i}")).await.unwrap().seq, i);
        }
        assert!(json.send("elsewhere", "x").await.is_err(), "sending to a room one has not joined is refused");
        for client in [&json, &packed] {
            for i in 1..=3u64 {
                match client.next_event_timeout(std::time::Duration::from_secs(5)).await {
                    Some(ServerEvent::Msg { seq, body, .. }) => assert_eq!((seq, body), (i, format!("m{i}"))),
                    other => panic!("expected message {i}, got {other:?}"),
                }
            }
        }
        let _ = stop_tx.send(());
        server.await.unwrap();
    }
}
