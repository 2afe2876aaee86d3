//! Frame building and frame reading for one session: client ops with a `rid` encoded in the session's format, and
//! server frames sorted into hello, replies, events, `bye` and application pings.
//!
//! This module only converts bytes; it does no I/O and does not decide where a frame goes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::borrow::Cow;
use switchyard_protocol::client::{encode_frame, ClientOp, Format, ServerEvent};
use switchyard_protocol::{ErrorCode, ProjectId, UserId};

/// The server's greeting after authentication.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Hello {
    /// The session id the server assigned to this socket.
    pub session: String,
    /// The authenticated user.
    pub user: UserId,
    /// The tenant the user belongs to.
    pub project_id: ProjectId,
    /// The server's heartbeat interval in milliseconds.
    pub heartbeat_ms: u64,
    /// The largest frame the server accepts, in bytes.
    pub max_frame: usize,
}

/// A `bye` frame, sent by the server just before it closes the socket.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Bye {
    /// The close code that follows.
    pub code: u16,
    /// Why the server closes.
    pub reason: String,
    /// How long to wait before reconnecting, when the server says so (draining).
    #[serde(default)]
    pub reconnect_after_ms: Option<u64>,
}

/// The answer to one request: an `ok` (or `pong`) with its result fields, or an `err`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The fields of the `ok` (or `pong`) besides `op` and `rid`.
    Ok(Map<String, Value>),
    /// An `err` frame.
    Err {
        /// The error code.
        code: ErrorCode,
        /// The server's human-readable explanation.
        message: String,
        /// How long to wait before retrying, sent with `rate_limited`.
        retry_after_ms: Option<u64>,
    },
}

impl Reply {
    /// Whether this is an `ok`.
    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Ok(_))
    }

    /// The error code of an `err`, `None` for an `ok`.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            Reply::Ok(_) => None,
            Reply::Err { code, .. } => Some(*code),
        }
    }

    /// The `ok` fields, or the `err` as [`crate::ClientError::Server`].
    pub fn into_result(self) -> Result<Map<String, Value>, crate::ClientError> {
        match self {
            Reply::Ok(fields) => Ok(fields),
            Reply::Err { code, message, .. } => Err(crate::ClientError::Server { code, message }),
        }
    }
}

/// A reply that no request was waiting for: it had no `rid`, an unknown one, or came after its request timed out.
#[derive(Debug, Clone, PartialEq)]
pub struct UnmatchedReply {
    /// The frame's op: `ok`, `err` or `pong`.
    pub op: String,
    /// The `rid` the frame carried, if any.
    pub rid: Option<u64>,
    /// The reply itself.
    pub reply: Reply,
}

/// One server frame, sorted by what the client does with it.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// The greeting after authentication.
    Hello(Hello),
    /// An `ok`, `err` or `pong`, to be matched to a request by `rid`.
    Reply {
        /// The frame's op: `ok`, `err` or `pong`.
        op: String,
        /// The echoed request id.
        rid: Option<u64>,
        /// The reply.
        reply: Reply,
    },
    /// A room or presence event.
    Event(ServerEvent),
    /// The notice that precedes a server-initiated close.
    Bye(Bye),
    /// An application-level `{"op": "ping"}`; the client answers `{"op": "pong"}`.
    Ping,
}

/// A server frame that could not be read. `rid` is set when the frame was a reply whose `rid` could be read, so
/// the request waiting for it can be told.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("malformed server frame: {message}")]
pub struct DecodeError {
    /// The `rid` of a malformed reply, when it could be read.
    pub rid: Option<u64>,
    /// What was wrong.
    pub message: String,
}

impl DecodeError {
    fn new(rid: Option<u64>, message: impl Into<String>) -> Self {
        DecodeError { rid, message: message.into() }
    }
}

#[derive(Serialize)]
struct WithRid<'a, T> {
    #[serde(skip_serializing_if = "Option::is_none")]
    rid: Option<u64>,
    #[serde(flatten)]
    frame: &'a T,
}

/// Encode a client op, with `rid` next to its fields when given, as a JSON text payload or a MessagePack map with
/// field names.
pub fn encode_op(rid: Option<u64>, op: &ClientOp, format: Format) -> Vec<u8> {
    encode_frame(&WithRid { rid, frame: op }, format)
}

/// Encode an arbitrary frame given as a JSON object (for ops or fields the typed [`ClientOp`] cannot express),
/// with `rid` added when given; a `rid` already in the map is replaced.
pub fn encode_map(rid: Option<u64>, mut frame: Map<String, Value>, format: Format) -> Vec<u8> {
    match rid {
        Some(rid) => {
            frame.insert("rid".to_owned(), Value::from(rid));
        }
        None => {
            frame.remove("rid");
        }
    }
    encode_frame(&frame, format)
}

/// The `{"op": "pong"}` answer to a server `ping`.
pub fn encode_pong(format: Format) -> Vec<u8> {
    let mut frame = Map::new();
    frame.insert("op".to_owned(), Value::from("pong"));
    encode_frame(&frame, format)
}

#[derive(Deserialize)]
struct Peek<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(default)]
    rid: Option<u64>,
}

#[derive(Deserialize)]
struct ErrFields {
    code: ErrorCode,
    message: String,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// Why a server frame's bytes do not read as the expected shape, in the session's format.
#[derive(Debug, thiserror::Error)]
enum ParseError {
    /// Not the expected JSON.
    #[error("{0}")]
    Json(#[source] serde_json::Error),
    /// Not the expected MessagePack.
    #[error("{0}")]
    MsgPack(#[source] rmp_serde::decode::Error),
}

fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8], format: Format) -> Result<T, ParseError> {
    match format {
        Format::Json => serde_json::from_slice(bytes).map_err(ParseError::Json),
        Format::MsgPack => rmp_serde::from_slice(bytes).map_err(ParseError::MsgPack),
    }
}

fn parse_owned<T: DeserializeOwned>(bytes: &[u8], format: Format) -> Result<T, ParseError> {
    parse(bytes, format)
}

/// Read one server frame: JSON for [`Format::Json`], a MessagePack map for [`Format::MsgPack`].
pub fn decode_server_frame(bytes: &[u8], format: Format) -> Result<Incoming, DecodeError> {
    let peek: Peek<'_> =
        parse(bytes, format).map_err(|e| DecodeError::new(None, format!("no readable \"op\" (and \"rid\"): {e}")))?;
    let rid = peek.rid;
    match peek.op.as_ref() {
        "ok" | "pong" => {
            let mut fields: Map<String, Value> = parse_owned(bytes, format)
                .map_err(|e| DecodeError::new(rid, format!("unreadable {:?}: {e}", peek.op)))?;
            fields.remove("op");
            fields.remove("rid");
            Ok(Incoming::Reply { op: peek.op.into_owned(), rid, reply: Reply::Ok(fields) })
        }
        "err" => {
            let err: ErrFields =
                parse_owned(bytes, format).map_err(|e| DecodeError::new(rid, format!("unreadable \"err\": {e}")))?;
            Ok(Incoming::Reply {
                op: "err".to_owned(),
                rid,
                reply: Reply::Err { code: err.code, message: err.message, retry_after_ms: err.retry_after_ms },
            })
        }
        "hello" => parse_owned(bytes, format)
            .map(Incoming::Hello)
            .map_err(|e| DecodeError::new(None, format!("unreadable \"hello\": {e}"))),
        "bye" => parse_owned(bytes, format)
            .map(Incoming::Bye)
            .map_err(|e| DecodeError::new(None, format!("unreadable \"bye\": {e}"))),
        "ping" => Ok(Incoming::Ping),
        op => parse_owned(bytes, format)
            .map(Incoming::Event)
            .map_err(|e| DecodeError::new(None, format!("unreadable event {op:?}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use switchyard_protocol::client::{decode_client_frame, ServerFrame};
    use switchyard_protocol::RoomId;

    fn room(name: &str) -> RoomId {
        RoomId::parse(name).unwrap()
    }

    fn send_op() -> ClientOp {
        ClientOp::Send {
            room: room("general"),
            body: "hi".into(),
            attrs: Some(json!({"k": [1, 2], "nested": {"x": true}})),
            reply_to: Some(4),
            cmid: None,
        }
    }

    #[test]
    fn ops_encode_with_rid_in_json() {
        let bytes = encode_op(Some(7), &send_op(), Format::Json);
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            value,
            json!({"op": "send", "rid": 7, "room": "general", "body": "hi",
                   "attrs": {"k": [1, 2], "nested": {"x": true}}, "reply_to": 4})
        );
        let req = decode_client_frame(&bytes, Format::Json).unwrap();
        assert_eq!(req.rid, Some(7));
        assert_eq!(req.op, send_op());
    }

    #[test]
    fn ops_encode_with_rid_in_msgpack() {
        let bytes = encode_op(Some(u64::MAX), &send_op(), Format::MsgPack);
        let value: Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(value["op"], "send");
        assert_eq!(value["rid"], u64::MAX);
        let req = decode_client_frame(&bytes, Format::MsgPack).unwrap();
        assert_eq!(req.rid, Some(u64::MAX));
        assert_eq!(req.op, send_op());
    }

    #[test]
    fn unit_ops_and_no_rid_encode() {
        for format in [Format::Json, Format::MsgPack] {
            let req = decode_client_frame(&encode_op(None, &ClientOp::Rooms, format), format).unwrap();
            assert_eq!(req.rid, None);
            assert_eq!(req.op, ClientOp::Rooms);
            let req = decode_client_frame(&encode_op(Some(1), &ClientOp::Ping, format), format).unwrap();
            assert_eq!(req.rid, Some(1));
            assert_eq!(req.op, ClientOp::Ping);
        }
    }

    #[test]
    fn maps_encode_with_rid_replaced() {
        let mut frame = Map::new();
        frame.insert("op".into(), "fly".into());
        frame.insert("rid".into(), "junk".into());
        for format in [Format::Json, Format::MsgPack] {
            let bytes = encode_map(Some(3), frame.clone(), format);
            let value: Value = match format {
                Format::Json => serde_json::from_slice(&bytes).unwrap(),
                Format::MsgPack => rmp_serde::from_slice(&bytes).unwrap(),
            };
            assert_eq!(value, json!({"op": "fly", "rid": 3}));
        }
    }

    #[test]
    fn pong_encodes() {
        assert_eq!(encode_pong(Format::Json), br#"{"op":"pong"}"#);
        let value: Value = rmp_serde::from_slice(&encode_pong(Format::MsgPack)).unwrap();
        assert_eq!(value, json!({"op": "pong"}));
    }

    fn both(value: &Value) -> [(Vec<u8>, Format); 2] {
        [(serde_json::to_vec(value).unwrap(), Format::Json), (rmp_serde::to_vec_named(value).unwrap(), Format::MsgPack)]
    }

    #[test]
    fn replies_decode_in_both_formats() {
        let ok = json!({"op": "ok", "rid": 9, "room": "general", "seq": 3});
        for (bytes, format) in both(&ok) {
            let Incoming::Reply { op, rid, reply } = decode_server_frame(&bytes, format).unwrap() else {
                panic!("not a reply")
            };
            assert_eq!(op, "ok");
            assert_eq!(rid, Some(9));
            let Reply::Ok(fields) = reply else { panic!("not ok") };
            assert_eq!(Value::Object(fields), json!({"room": "general", "seq": 3}));
        }
        let err = json!({"op": "err", "code": "rate_limited", "message": "slow down", "retry_after_ms": 250});
        for (bytes, format) in both(&err) {
            let decoded = decode_server_frame(&bytes, format).unwrap();
            assert_eq!(
                decoded,
                Incoming::Reply {
                    op: "err".into(),
                    rid: None,
                    reply: Reply::Err {
                        code: ErrorCode::RateLimited,
                        message: "slow down".into(),
                        retry_after_ms: Some(250),
                    },
                }
            );
        }
        let pong = json!({"op": "pong", "rid": 2});
        for (bytes, format) in both(&pong) {
            let decoded = decode_server_frame(&bytes, format).unwrap();
            assert_eq!(decoded, Incoming::Reply { op: "pong".into(), rid: Some(2), reply: Reply::Ok(Map::new()) });
        }
    }

    #[test]
    fn server_encoded_frames_decode() {
        let frame = ServerFrame::Hello {
            session: "s1".into(),
            user: UserId::parse("alice").unwrap(),
            project_id: ProjectId::generate(),
            heartbeat_ms: 25_000,
            max_frame: 65_536,
        };
        for format in [Format::Json, Format::MsgPack] {
            let Incoming::Hello(hello) = decode_server_frame(&encode_frame(&frame, format), format).unwrap() else {
                panic!("not hello")
            };
            assert_eq!(hello.user.as_str(), "alice");
            assert_eq!(hello.heartbeat_ms, 25_000);
            assert_eq!(hello.max_frame, 65_536);

            let bye = ServerFrame::Bye { code: 1001, reason: "draining".into(), reconnect_after_ms: Some(1500) };
            assert_eq!(
                decode_server_frame(&encode_frame(&bye, format), format).unwrap(),
                Incoming::Bye(Bye { code: 1001, reason: "draining".into(), reconnect_after_ms: Some(1500) })
            );
            let ping = serde_json::json!({"op": "ping"});
            assert_eq!(decode_server_frame(&encode_frame(&ping, format), format).unwrap(), Incoming::Ping);
        }
    }

    #[test]
    fn events_decode_in_both_formats() {
        let event = ServerEvent::Msg {
            room: room("general"),
            seq: 12,
            id: switchyard_protocol::MessageId::generate(1_700_000_000_000),
            from: UserId::parse("bob").unwrap(),
            body: "yo".into(),
            attrs: Some(json!({"a": 1})),
            reply_to: None,
            ts: 1_700_000_000_000,
        };
        for format in [Format::Json, Format::MsgPack] {
            let decoded = decode_server_frame(&encode_frame(&event, format), format).unwrap();
            assert_eq!(decoded, Incoming::Event(event.clone()));
        }
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        let cases: &[(&[u8], Format, Option<u64>)] = &[
            (b"", Format::Json, None),
            (b"not json", Format::Json, None),
            (b"[1,2]", Format::Json, None),
            (br#"{"rid":1}"#, Format::Json, None),
            (br#"{"op":42}"#, Format::Json, None),
            (br#"{"op":"ok","rid":-1}"#, Format::Json, None),
            (br#"{"op":"err","rid":5,"code":"nope","message":"x"}"#, Format::Json, Some(5)),
            (br#"{"op":"err","rid":6}"#, Format::Json, Some(6)),
            (br#"{"op":"hello","session":"s"}"#, Format::Json, None),
            (br#"{"op":"msg","room":"a.b"}"#, Format::Json, None),
            (br#"{"op":"warp","x":1}"#, Format::Json, None),
            (b"\xc1\xff\x00", Format::MsgPack, None),
            (b"\x93\x01\x02\x03", Format::MsgPack, None),
        ];
        for (bytes, format, rid) in cases {
            let err = decode_server_frame(bytes, *format).unwrap_err();
            assert_eq!(err.rid, *rid, "{}", String::from_utf8_lossy(bytes));
        }
    }

    #[test]
    fn reply_into_result() {
        let err = Reply::Err { code: ErrorCode::Forbidden, message: "no".into(), retry_after_ms: None };
        assert_eq!(err.error_code(), Some(ErrorCode::Forbidden));
        match err.into_result() {
            Err(crate::ClientError::Server { code, message }) => {
                assert_eq!(code, ErrorCode::Forbidden);
                assert_eq!(message, "no");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(Reply::Ok(Map::new()).into_result().unwrap().is_empty());
    }
}
