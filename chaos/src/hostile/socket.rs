//! One raw WebSocket of the fuzzer (tokio-tungstenite, JSON text frames): it sends exactly the bytes the plan says,
//! malformed ones included, and records everything: each frame sent with the answer matched to it by `rid`,
//! answers without a `rid`, every event in arrival order, the `bye` and the close frame.
//!
//! It judges nothing (the records go to `check`) and never retries or reconnects: a socket the server closed
//! stays closed, and what it saw until then is judged as it is.

use super::gen::{Payload, Reply, Req, SockSpec};
use anyhow::{bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// A frame the server sent, with when and in which position it arrived on this socket.
#[derive(Debug, Clone)]
pub struct Recv {
    pub at: Duration,
    pub pos: usize,
    pub frame: Value,
}

/// A frame this socket sent, and its answer when one came.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: Duration,
    pub req: Req,
    pub answer: Option<Recv>,
}

/// Everything one socket saw.
#[derive(Debug, Clone, Default)]
pub struct SockLog {
    pub sent: Vec<Sent>,
    /// `rid` -> index in `sent`.
    pub by_rid: HashMap<u64, usize>,
    /// Events (and any server frame that is neither an answer nor `bye`), in arrival order.
    pub events: Vec<Recv>,
    /// `ok`, `err` and `pong` frames without a `rid`.
    pub ridless: Vec<Recv>,
    /// Frames that make no sense on this socket: not JSON, binary, an answer to an unknown or answered `rid`.
    pub stray: Vec<String>,
    pub bye: Option<Value>,
    /// The server's close frame: code and reason.
    pub close: Option<(u16, String)>,
    /// The connection ended without a close frame while this side had not closed it.
    pub dropped: bool,
    /// This side started closing (the end of the seed).
    pub closing: bool,
    /// When the oversize frame was sent.
    pub oversize_at: Option<Duration>,
    frames: usize,
}

impl SockLog {
    /// Whether the server ended this socket (close frame or dropped connection).
    pub fn server_closed(&self) -> bool {
        self.close.is_some() || self.dropped
    }

    /// Requests still waiting for an answer that must come.
    pub fn pending(&self) -> usize {
        self.sent.iter().filter(|s| matches!(s.req.reply, Some(Reply::Rid(_))) && s.answer.is_none()).count()
    }
}

/// A connected socket: a reader task filling the log, and a writer task fed by `send`.
pub struct Sock {
    pub spec: SockSpec,
    pub log: Arc<Mutex<SockLog>>,
    out: mpsc::UnboundedSender<Message>,
    epoch: Instant,
}

fn lock(log: &Mutex<SockLog>) -> MutexGuard<'_, SockLog> {
    // A panic while holding the lock would be a bug in this file; the log is still worth judging.
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sock {
    /// Connect with a bearer token and wait for `hello`.
    pub async fn connect(url: &str, token: &str, spec: SockSpec, epoch: Instant) -> Result<Sock> {
        let mut request = url.into_client_request()?;
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
        let (mut stream, _) = tokio::time::timeout(Duration::from_secs(20), tokio_tungstenite::connect_async(request))
            .await
            .context("WebSocket upgrade timed out")?
            .context("WebSocket upgrade")?;
        let hello = tokio::time::timeout(Duration::from_secs(15), stream.next()).await.context("no hello in 15 s")?;
        match hello {
            Some(Ok(Message::Text(text))) if text.contains("\"hello\"") => {}
            other => bail!("expected hello, got {other:?}"),
        }
        let (mut sink, mut source) = stream.split();
        let (out, mut rx) = mpsc::unbounded_channel::<Message>();
        let log = Arc::new(Mutex::new(SockLog::default()));
        tokio::spawn(async move {
            while let Some(message) = rx.recv().await {
                let closing = matches!(message, Message::Close(_));
                if sink.send(message).await.is_err() || closing {
                    break;
                }
            }
        });
        let reader_log = log.clone();
        tokio::spawn(async move {
            loop {
                let next = source.next().await;
                let at = epoch.elapsed();
                let mut log = lock(&reader_log);
                match next {
                    Some(Ok(Message::Text(text))) => on_text(&mut log, at, text.as_str()),
                    Some(Ok(Message::Binary(bytes))) => {
                        log.stray.push(format!("a binary frame of {} bytes on a JSON session", bytes.len()))
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let (code, reason) =
                            frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                        if !log.closing {
                            log.close = Some((code, reason));
                        }
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => {
                        if !log.closing && log.close.is_none() {
                            log.dropped = true;
                        }
                        break;
                    }
                }
            }
        });
        Ok(Sock { spec, log, out, epoch })
    }

    /// Record `req` and send it.
    pub fn send(&self, req: Req) {
        let message = match &req.payload {
            Payload::Text(text) => Message::Text(text.clone().into()),
            Payload::Binary(bytes) => Message::Binary(bytes.clone().into()),
        };
        {
            let mut log = lock(&self.log);
            let index = log.sent.len();
            if let Some(Reply::Rid(rid)) = req.reply {
                log.by_rid.insert(rid, index);
            }
            log.sent.push(Sent { at: self.epoch.elapsed(), req, answer: None });
        }
        let _ = self.out.send(message);
    }

    /// Send a frame over `max_frame`.
    pub fn send_oversize(&self) {
        let body = "z".repeat(70_000);
        let frame = format!("{{\"op\":\"send\",\"rid\":999999,\"room\":\"lobby\",\"body\":\"{body}\"}}");
        lock(&self.log).oversize_at = Some(self.epoch.elapsed());
        let _ = self.out.send(Message::Text(frame.into()));
    }

    /// Send `req` and wait up to `limit` for its answer.
    pub async fn request(&self, req: Req, limit: Duration) -> Option<Value> {
        let Some(Reply::Rid(rid)) = req.reply else {
            self.send(req);
            return None;
        };
        self.send(req);
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            {
                let log = lock(&self.log);
                if let Some(answer) = log.by_rid.get(&rid).and_then(|i| log.sent[*i].answer.as_ref()) {
                    return Some(answer.frame.clone());
                }
                if log.server_closed() {
                    return None;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    pub fn pending(&self) -> usize {
        lock(&self.log).pending()
    }

    pub fn server_closed(&self) -> bool {
        lock(&self.log).server_closed()
    }

    /// Close from this side (the end of the seed).
    pub fn close(&self) {
        lock(&self.log).closing = true;
        let _ = self.out.send(Message::Close(None));
    }

    /// A copy of the log, for judging.
    pub fn snapshot(&self) -> SockLog {
        lock(&self.log).clone()
    }

    /// The highest seq this socket received in `room`.
    pub fn last_seq(&self, room: &str) -> u64 {
        let log = lock(&self.log);
        log.events
            .iter()
            .filter(|e| e.frame.get("room").and_then(Value::as_str) == Some(room))
            .filter_map(|e| e.frame.get("seq").and_then(Value::as_u64))
            .max()
            .unwrap_or(0)
    }

    /// The highest seq an `ok` on this socket named in `room` (the event an op created, or a join point).
    pub fn max_acked_seq(&self, room: &str) -> u64 {
        let log = lock(&self.log);
        log.sent
            .iter()
            .filter(|s| s.req.info.room.as_deref() == Some(room))
            .filter_map(|s| s.answer.as_ref())
            .filter(|a| a.frame.get("op").and_then(Value::as_str) == Some("ok"))
            .filter(|a| a.frame.get("room").and_then(Value::as_str) == Some(room))
            .filter_map(|a| a.frame.get("seq").and_then(Value::as_u64))
            .max()
            .unwrap_or(0)
    }
}

fn on_text(log: &mut SockLog, at: Duration, text: &str) {
    log.frames += 1;
    let pos = log.frames;
    let frame: Value = match serde_json::from_str(text) {
        Ok(frame) => frame,
        Err(error) => {
            let head: String = text.chars().take(120).collect();
            log.stray.push(format!("a text frame that is not JSON ({error}): {head:?}"));
            return;
        }
    };
    let op = frame.get("op").and_then(Value::as_str).unwrap_or("").to_owned();
    let recv = Recv { at, pos, frame };
    match op.as_str() {
        "ok" | "err" | "pong" => match recv.frame.get("rid") {
            None => log.ridless.push(recv),
            Some(rid) => {
                let Some(rid) = rid.as_u64() else {
                    log.stray.push(format!("an answer with a rid that is not a u64: {}", recv.frame));
                    return;
                };
                match log.by_rid.get(&rid).copied() {
                    None => log.stray.push(format!("an answer to rid {rid}, which was never sent: {}", recv.frame)),
                    Some(i) if log.sent[i].answer.is_some() => {
                        log.stray.push(format!("a second answer to rid {rid}: {}", recv.frame))
                    }
                    Some(i) => log.sent[i].answer = Some(recv),
                }
            }
        },
        "bye" => log.bye = Some(recv.frame),
        _ => log.events.push(recv),
    }
}
