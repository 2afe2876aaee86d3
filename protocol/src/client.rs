//! The client edge of the wire contract: client frames (ops), server frames (replies and events), the history
//! `Message`, and their JSON and MessagePack encodings.
//!
//! This module parses and shapes frames; it does not authorise anything or enforce configurable limits beyond the
//! id rules built into the types.

use crate::error::ErrorCode;
use crate::ids::{MessageId, ProjectId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Subprotocol name of JSON text frames (the default).
pub const SUBPROTOCOL_JSON: &str = "switchyard.v1.json";
/// Subprotocol name of MessagePack binary frames.
pub const SUBPROTOCOL_MSGPACK: &str = "switchyard.v1.msgpack";

/// The encoding a session speaks, fixed at the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `switchyard.v1.json`: text frames holding JSON objects.
    Json,
    /// `switchyard.v1.msgpack`: binary frames holding MessagePack maps with the same field names.
    MsgPack,
}

impl Format {
    /// The format of a subprotocol name, if it is one of ours.
    pub fn from_subprotocol(name: &str) -> Option<Format> {
        match name.trim() {
            SUBPROTOCOL_JSON => Some(Format::Json),
            SUBPROTOCOL_MSGPACK => Some(Format::MsgPack),
            _ => None,
        }
    }

    /// The subprotocol name of this format.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Format::Json => SUBPROTOCOL_JSON,
            Format::MsgPack => SUBPROTOCOL_MSGPACK,
        }
    }
}

/// One client op with its fields. Ids are validated while parsing.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, strum::VariantNames, strum::IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
#[strum(serialize_all = "snake_case")]
pub enum ClientOp {
    Auth {
        token: String,
    },
    Ping,
    Create {
        room: RoomId,
        #[serde(default)]
        private: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
    },
    Join {
        room: RoomId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<u64>,
    },
    Leave {
        room: RoomId,
    },
    Invite {
        room: RoomId,
        user: UserId,
    },
    Kick {
        room: RoomId,
        user: UserId,
    },
    Send {
        room: RoomId,
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attrs: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cmid: Option<String>,
    },
    Dm {
        to: UserId,
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attrs: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cmid: Option<String>,
    },
    Typing {
        room: RoomId,
    },
    Read {
        room: RoomId,
        seq: u64,
    },
    React {
        room: RoomId,
        seq: u64,
        emoji: String,
        #[serde(default)]
        remove: bool,
    },
    Edit {
        room: RoomId,
        seq: u64,
        body: String,
    },
    Delete {
        room: RoomId,
        seq: u64,
    },
    /// Pin message `seq` of the room (room admins; either participant of a direct-message room).
    Pin {
        room: RoomId,
        seq: u64,
    },
    /// Unpin message `seq` of the room (who may pin may unpin).
    Unpin {
        room: RoomId,
        seq: u64,
    },
    /// Ban `user` from the room (room admins): their membership ends and they cannot join, be invited or read it,
    /// for `secs` seconds or, without it, until `unban`.
    Ban {
        room: RoomId,
        user: UserId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secs: Option<u64>,
    },
    Unban {
        room: RoomId,
        user: UserId,
    },
    /// Mute `user` in the room (room admins): they may read but not send, edit or react, for `secs` seconds or,
    /// without it, until `unmute`.
    Mute {
        room: RoomId,
        user: UserId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secs: Option<u64>,
    },
    Unmute {
        room: RoomId,
        user: UserId,
    },
    /// Members other than admins may send one message per `secs` seconds (room admins); 0 turns it off.
    SlowMode {
        room: RoomId,
        secs: u32,
    },
    /// Make the room read-only for every user (room admins).
    Freeze {
        room: RoomId,
    },
    Unfreeze {
        room: RoomId,
    },
    History {
        room: RoomId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        /// Page the replies to message `thread` (those whose `reply_to` is it) instead of the whole room.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        thread: Option<u64>,
    },
    Members {
        room: RoomId,
    },
    Rooms,
    Presence {
        users: Vec<UserId>,
    },
    Watch {
        users: Vec<UserId>,
    },
    Unwatch {
        users: Vec<UserId>,
    },
}

impl ClientOp {
    /// The op's wire name.
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// Whether the op has no fields of its own. Serde cannot refuse unknown fields on such variants of an
    /// internally tagged enum, so the decoder does.
    fn is_fieldless(&self) -> bool {
        match self {
            ClientOp::Ping | ClientOp::Rooms => true,
            ClientOp::Auth { .. }
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
            | ClientOp::Presence { .. }
            | ClientOp::Watch { .. }
            | ClientOp::Unwatch { .. } => false,
        }
    }
}

/// The names of every op, for telling an unknown op from a malformed known one.
pub const OP_NAMES: &[&str] = <ClientOp as strum::VariantNames>::VARIANTS;

/// A parsed client frame: its op and the request id to echo.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientRequest {
    pub rid: Option<u64>,
    pub op: ClientOp,
}

/// A frame that could not be parsed, with the `rid` when it could be read, so the `err` can echo it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct FrameError {
    pub rid: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    pub fn bad_request(rid: Option<u64>, message: impl Into<String>) -> Self {
        FrameError { rid, code: ErrorCode::BadRequest, message: message.into() }
    }
}

/// Parse one client frame. Every failure is a `bad_request` that names what was wrong.
pub fn decode_client_frame(bytes: &[u8], format: Format) -> Result<ClientRequest, FrameError> {
    let value: Value = match format {
        Format::Json => serde_json::from_slice(bytes)
            .map_err(|e| FrameError::bad_request(None, format!("frame is not valid JSON: {e}")))?,
        Format::MsgPack => decode_msgpack_value(bytes)
            .map_err(|e| FrameError::bad_request(None, format!("frame is not valid MessagePack: {e}")))?,
    };
    let Value::Object(mut map) = value else {
        return Err(FrameError::bad_request(None, "frame must be an object with an \"op\" field"));
    };
    let rid = match map.remove("rid") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(rid) => Some(rid),
            None => return Err(FrameError::bad_request(None, "\"rid\" must be an unsigned 64-bit integer")),
        },
        Some(_) => return Err(FrameError::bad_request(None, "\"rid\" must be an unsigned 64-bit integer")),
    };
    let op_name = match map.get("op") {
        Some(Value::String(op)) => op.clone(),
        Some(_) => return Err(FrameError::bad_request(rid, "\"op\" must be a string")),
        None => return Err(FrameError::bad_request(rid, "frame has no \"op\" field")),
    };
    if !OP_NAMES.contains(&op_name.as_str()) {
        return Err(FrameError::bad_request(rid, format!("unknown op {op_name:?}")));
    }
    let unknown = map.keys().find(|key| key.as_str() != "op").cloned();
    let op: ClientOp = serde_json::from_value(Value::Object(map))
        .map_err(|e| FrameError::bad_request(rid, format!("invalid {op_name:?} frame: {e}")))?;
    if let (true, Some(field)) = (op.is_fieldless(), unknown) {
        return Err(FrameError::bad_request(rid, format!("invalid {op_name:?} frame: unknown field `{field}`")));
    }
    Ok(ClientRequest { rid, op })
}

/// Deepest nesting of maps and arrays a client frame may hold, counting the frame itself: serde_json's own
/// recursion limit, applied to MessagePack too so both formats accept the same frames. Deeper values are refused
/// before they are built, since building, checking and dropping them recurses once per level: without a bound, a
/// 2 KiB MessagePack frame of nested arrays overflows a task's stack and aborts the process.
pub const MAX_FRAME_DEPTH: usize = 128;

/// Why a MessagePack frame is not one readable value.
#[derive(Debug, thiserror::Error)]
enum MsgPackValueError {
    /// The bytes do not decode (or nest too deep).
    #[error("{0}")]
    Decode(#[source] rmp_serde::decode::Error),
    /// Bytes follow the first value.
    #[error("{rest} bytes follow the first value")]
    Trailing {
        /// How many bytes follow.
        rest: usize,
    },
}

/// One MessagePack value, nested at most `MAX_FRAME_DEPTH` deep and followed by nothing (as in JSON, where trailing
/// characters are an error too).
fn decode_msgpack_value(bytes: &[u8]) -> Result<Value, MsgPackValueError> {
    let mut de = rmp_serde::Deserializer::new(bytes);
    de.set_max_depth(MAX_FRAME_DEPTH);
    let value = Value::deserialize(&mut de).map_err(MsgPackValueError::Decode)?;
    let rest = de.get_ref().len();
    if rest > 0 {
        return Err(MsgPackValueError::Trailing { rest });
    }
    Ok(value)
}

/// Encode a frame (any serialisable shape: server frames, or a client's own frames) in a session's format: JSON text or a MessagePack map with field names.
pub fn encode_frame<T: Serialize>(frame: &T, format: Format) -> Vec<u8> {
    match format {
        // Serialising our own types to JSON cannot fail: every map key is a string.
        Format::Json => serde_json::to_vec(frame).expect("server frames serialise to JSON"),
        Format::MsgPack => rmp_serde::to_vec_named(frame).expect("server frames serialise to MessagePack"),
    }
}

/// A server reply or control frame.
#[derive(Debug, Clone, PartialEq, Serialize, strum::VariantNames, strum::IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ServerFrame {
    Hello {
        session: String,
        user: UserId,
        project_id: ProjectId,
        heartbeat_ms: u64,
        max_frame: usize,
    },
    Ok {
        #[serde(skip_serializing_if = "Option::is_none")]
        rid: Option<u64>,
        #[serde(flatten)]
        result: OkResult,
    },
    Err {
        #[serde(skip_serializing_if = "Option::is_none")]
        rid: Option<u64>,
        code: ErrorCode,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        rid: Option<u64>,
    },
    Bye {
        code: u16,
        reason: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        reconnect_after_ms: Option<u64>,
    },
}

/// The result fields of an `ok`, one shape per kind of op. Shapes repeat across ops (`{room, seq}` answers `join`,
/// `read`, `react`, `edit`, `delete`, `pin` and `unpin`), so the variants are named by shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OkResult {
    Sent { room: RoomId, id: MessageId, seq: u64, ts: u64 },
    History { room: RoomId, messages: Vec<Message>, more: bool },
    RoomSeq { room: RoomId, seq: u64 },
    Room { room: RoomId },
    Members { members: Vec<Member> },
    Rooms { rooms: Vec<RoomSummary> },
    Presence { users: BTreeMap<String, PresenceState> },
    Empty {},
}

/// A room member, as `members` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub user: UserId,
    pub role: Role,
    pub online: bool,
}

/// A member's role in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Member,
    Admin,
}

/// One of the user's rooms, as `rooms` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomSummary {
    pub room: RoomId,
    pub role: Role,
    pub seq: u64,
    pub read: u64,
    /// Messages after the user's read marker (or after their join, when that is later); see `UserRoom::unread`.
    /// 0 from router shards of earlier releases.
    #[serde(default)]
    pub unread: u64,
    /// The room's latest message, as its edits and deletion left it; absent when the room has none (or its last
    /// event predates previews).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message: Option<MessagePreview>,
}

/// The start of a room's latest message, for a list of rooms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePreview {
    pub seq: u64,
    pub id: MessageId,
    pub from: UserId,
    /// The body's first [`crate::limits::PREVIEW_BYTES`] bytes, cut at a character boundary; empty once deleted.
    pub body: String,
    pub ts: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edited: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

impl MessagePreview {
    /// The preview of a message whose body is `body`.
    pub fn new(seq: u64, id: MessageId, from: UserId, body: &str, ts: u64) -> MessagePreview {
        MessagePreview { seq, id, from, body: cut(body).to_owned(), ts, edited: false, deleted: false }
    }
}

/// `body` cut to at most [`crate::limits::PREVIEW_BYTES`] bytes at a character boundary.
fn cut(body: &str) -> &str {
    let mut end = body.len().min(crate::limits::PREVIEW_BYTES);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    &body[..end]
}

/// A user's presence, as `presence` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresenceState {
    pub online: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
}

/// A message as history returns it. A deleted message has no body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub seq: u64,
    pub id: MessageId,
    /// The author; absent from the tombstone of an erased user's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<UserId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attrs: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    pub ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_ts: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reactions: BTreeMap<String, Vec<UserId>>,
    /// The last `pin` event for the message pinned it (and it is not deleted); only written when true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
    /// How many messages reply to this one (its thread, deleted replies included); only written when not 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reply_count: u64,
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

/// A server event delivered to subscribed sessions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, strum::VariantNames, strum::IntoStaticStr)]
#[serde(tag = "op", rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum ServerEvent {
    Msg {
        room: RoomId,
        seq: u64,
        id: MessageId,
        from: UserId,
        body: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attrs: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<u64>,
        ts: u64,
    },
    Edit {
        room: RoomId,
        seq: u64,
        target: u64,
        from: UserId,
        body: String,
        ts: u64,
    },
    Delete {
        room: RoomId,
        seq: u64,
        target: u64,
        by: UserId,
        ts: u64,
    },
    Reaction {
        room: RoomId,
        seq: u64,
        target: u64,
        user: UserId,
        emoji: String,
        removed: bool,
        ts: u64,
    },
    /// Message `target` was pinned (`pinned: true`) or unpinned by `by`.
    Pin {
        room: RoomId,
        seq: u64,
        target: u64,
        by: UserId,
        pinned: bool,
        ts: u64,
    },
    Joined {
        room: RoomId,
        seq: u64,
        user: UserId,
        ts: u64,
    },
    Left {
        room: RoomId,
        seq: u64,
        user: UserId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<UserId>,
        ts: u64,
    },
    /// A moderation action: `user` for bans and mutes, `until` (unix ms) for those with an expiry, `secs` for slow
    /// mode; `by` is absent when the tenant's backend took it.
    Moderation {
        room: RoomId,
        seq: u64,
        action: ModerationAction,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<UserId>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secs: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<UserId>,
        ts: u64,
    },
    /// The room was deleted by the tenant's backend: nobody receives it any more, and its history is gone.
    RoomDeleted {
        room: RoomId,
        seq: u64,
        ts: u64,
    },
    /// Something at `seq` was erased with a user: the erasure itself (live), or an event of the erased user that a
    /// replay no longer holds. It names nobody; a client showing the room reloads its history and members.
    Erased {
        room: RoomId,
        seq: u64,
    },
    Typing {
        room: RoomId,
        user: UserId,
    },
    Read {
        room: RoomId,
        user: UserId,
        seq: u64,
        /// Only to the reader's own sessions: their messages still unread in the room after this marker.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unread: Option<u64>,
    },
    Presence {
        user: UserId,
        online: bool,
        ts: u64,
    },
}

/// What a `moderation` event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModerationAction {
    Ban,
    Unban,
    Mute,
    Unmute,
    SlowMode,
    Freeze,
    Unfreeze,
}

/// The op names of every server frame that is not an event (replies and control frames).
pub const SERVER_FRAME_OPS: &[&str] = <ServerFrame as strum::VariantNames>::VARIANTS;
/// The op names of every event.
pub const SERVER_EVENT_OPS: &[&str] = <ServerEvent as strum::VariantNames>::VARIANTS;

impl ServerFrame {
    /// The frame's wire name (its `op`).
    pub fn name(&self) -> &'static str {
        self.into()
    }
}

impl ServerEvent {
    /// The event's wire name (its `op`).
    pub fn name(&self) -> &'static str {
        self.into()
    }

    /// The room and seq of a sequenced event (`msg`, `edit`, `delete`, `reaction`, `pin`, `joined`, `left`,
    /// `moderation`, `room_deleted`, `erased`); `None` for
    /// signals (`typing`, `read`, `presence`), which carry no room seq of their own.
    pub fn room_seq(&self) -> Option<(&RoomId, u64)> {
        match self {
            ServerEvent::Msg { room, seq, .. }
            | ServerEvent::Edit { room, seq, .. }
            | ServerEvent::Delete { room, seq, .. }
            | ServerEvent::Reaction { room, seq, .. }
            | ServerEvent::Pin { room, seq, .. }
            | ServerEvent::Joined { room, seq, .. }
            | ServerEvent::Left { room, seq, .. }
            | ServerEvent::Moderation { room, seq, .. }
            | ServerEvent::RoomDeleted { room, seq, .. }
            | ServerEvent::Erased { room, seq } => Some((room, *seq)),
            ServerEvent::Typing { .. } | ServerEvent::Read { .. } | ServerEvent::Presence { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The derived name lists say what serde reads and writes: every name is a variant serde knows (a frame of
    /// that op alone is at most missing fields), and a name serde does not know is refused as unknown.
    #[test]
    fn the_name_lists_are_the_wire_names() {
        fn known_to_serde<T: serde::de::DeserializeOwned>(name: &str) -> bool {
            match serde_json::from_value::<T>(serde_json::json!({ "op": name })) {
                Ok(_) => true,
                Err(error) => !error.to_string().contains("unknown variant"),
            }
        }
        for name in OP_NAMES {
            assert!(known_to_serde::<ClientOp>(name), "{name}");
        }
        for name in SERVER_EVENT_OPS {
            assert!(known_to_serde::<ServerEvent>(name), "{name}");
        }
        assert!(!known_to_serde::<ClientOp>("fly") && !known_to_serde::<ServerEvent>("pinned"));
        assert!(OP_NAMES.contains(&"pin") && OP_NAMES.contains(&"unpin") && SERVER_EVENT_OPS.contains(&"pin"));
        let frames = [
            ServerFrame::Pong { rid: Some(1) },
            ServerFrame::Bye { code: 1001, reason: String::new(), reconnect_after_ms: None },
            ServerFrame::Ok { rid: None, result: OkResult::Empty {} },
        ];
        for frame in frames {
            let op = serde_json::to_value(&frame).unwrap()["op"].as_str().unwrap().to_owned();
            assert_eq!(frame.name(), op);
            assert!(SERVER_FRAME_OPS.contains(&op.as_str()), "{op}");
        }
        assert_eq!(ClientOp::Rooms.name(), "rooms");
        assert_eq!(SERVER_FRAME_OPS, ["hello", "ok", "err", "pong", "bye"]);
    }

    #[test]
    fn parses_send_in_both_formats() {
        let json = br#"{"op":"send","rid":7,"room":"general","body":"hi","attrs":{"k":1}}"#;
        let req = decode_client_frame(json, Format::Json).unwrap();
        assert_eq!(req.rid, Some(7));
        let ClientOp::Send { room, body, attrs, .. } = &req.op else { panic!("not a send: {req:?}") };
        assert_eq!(room.as_str(), "general");
        assert_eq!(body, "hi");
        assert_eq!(attrs.as_ref().unwrap()["k"], 1);

        let mut map = serde_json::Map::new();
        map.insert("op".into(), "send".into());
        map.insert("rid".into(), 7.into());
        map.insert("room".into(), "general".into());
        map.insert("body".into(), "hi".into());
        map.insert("attrs".into(), serde_json::json!({"k": 1}));
        let packed = rmp_serde::to_vec_named(&map).unwrap();
        assert_eq!(decode_client_frame(&packed, Format::MsgPack).unwrap(), req);
    }

    #[test]
    fn malformed_frames_are_bad_requests_with_rid() {
        let cases: &[(&[u8], Option<u64>, &str)] = &[
            (b"not json", None, "not valid JSON"),
            (b"[1,2]", None, "must be an object"),
            (br#"{"rid":3}"#, Some(3), "no \"op\""),
            (br#"{"op":"fly","rid":4}"#, Some(4), "unknown op"),
            (br#"{"op":"send","rid":5,"room":"general","body":42}"#, Some(5), "invalid \"send\""),
            (br#"{"op":"join","rid":6,"room":"a.b"}"#, Some(6), "room id"),
            (br#"{"op":"join","rid":"x","room":"a"}"#, None, "rid"),
            (br#"{"op":"join","room":"a","extra":1}"#, None, "unknown field"),
            (br#"{"op":"rooms","rid":7,"room":"a"}"#, Some(7), "unknown field `room`"),
            (br#"{"op":"ping","rid":8,"x":null}"#, Some(8), "unknown field `x`"),
        ];
        for (frame, rid, needle) in cases {
            let err = decode_client_frame(frame, Format::Json).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest);
            assert_eq!(err.rid, *rid, "{}", String::from_utf8_lossy(frame));
            assert!(err.message.contains(needle), "{:?} should mention {needle:?}", err.message);
        }
    }

    #[test]
    fn moderation_ops_parse_and_the_event_has_its_wire_shape() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"op":"ban","room":"general","user":"bob","secs":60}"#, "ban"),
            (br#"{"op":"ban","room":"general","user":"bob"}"#, "ban"),
            (br#"{"op":"unban","room":"general","user":"bob"}"#, "unban"),
            (br#"{"op":"mute","room":"general","user":"bob"}"#, "mute"),
            (br#"{"op":"unmute","room":"general","user":"bob"}"#, "unmute"),
            (br#"{"op":"slow_mode","room":"general","secs":30}"#, "slow_mode"),
            (br#"{"op":"freeze","room":"general"}"#, "freeze"),
            (br#"{"op":"unfreeze","room":"general"}"#, "unfreeze"),
        ];
        for (frame, name) in cases {
            let req = decode_client_frame(frame, Format::Json).unwrap();
            assert_eq!(req.op.name(), *name);
            let value: Value = serde_json::from_slice(frame).unwrap();
            let packed = rmp_serde::to_vec_named(&value).unwrap();
            assert_eq!(decode_client_frame(&packed, Format::MsgPack).unwrap(), req);
        }
        for bad in [
            &br#"{"op":"ban","room":"general","user":"bob","secs":-1}"#[..],
            br#"{"op":"ban","room":"general","user":"bo\nb"}"#,
            br#"{"op":"slow_mode","room":"general"}"#,
            br#"{"op":"freeze","room":"general","user":"bob"}"#,
        ] {
            let err = decode_client_frame(bad, Format::Json).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{}", String::from_utf8_lossy(bad));
        }
        let event = ServerEvent::Moderation {
            room: RoomId::parse("general").unwrap(),
            seq: 10,
            action: ModerationAction::Ban,
            user: Some(UserId::parse("bob").unwrap()),
            until: Some(1_000),
            secs: None,
            by: Some(UserId::parse("alice").unwrap()),
            ts: 5,
        };
        let json: Value = serde_json::from_slice(&encode_frame(&event, Format::Json)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "moderation", "room": "general", "seq": 10, "action": "ban", "user": "bob",
                "until": 1000, "by": "alice", "ts": 5})
        );
        let packed: Value = rmp_serde::from_slice(&encode_frame(&event, Format::MsgPack)).unwrap();
        assert_eq!(packed, json);
        assert!(OP_NAMES.contains(&"slow_mode") && SERVER_EVENT_OPS.contains(&"moderation"));
    }

    #[test]
    fn pin_and_unpin_parse_in_both_formats_and_the_event_has_its_wire_shape() {
        for (name, frame) in [
            ("pin", &br#"{"op":"pin","rid":9,"room":"general","seq":4}"#[..]),
            ("unpin", &br#"{"op":"unpin","rid":9,"room":"general","seq":4}"#[..]),
        ] {
            let req = decode_client_frame(frame, Format::Json).unwrap();
            assert_eq!(req.rid, Some(9));
            assert_eq!(req.op.name(), name);
            let (ClientOp::Pin { room, seq } | ClientOp::Unpin { room, seq }) = &req.op else {
                panic!("not a pin: {req:?}")
            };
            assert_eq!((room.as_str(), *seq), ("general", 4));
            let value: Value = serde_json::from_slice(frame).unwrap();
            let packed = rmp_serde::to_vec_named(&value).unwrap();
            assert_eq!(decode_client_frame(&packed, Format::MsgPack).unwrap(), req);
        }
        let err = decode_client_frame(br#"{"op":"pin","rid":3,"room":"general"}"#, Format::Json).unwrap_err();
        assert!(err.message.contains("missing field `seq`"), "{err:?}");
        let event = ServerEvent::Pin {
            room: RoomId::parse("general").unwrap(),
            seq: 10,
            target: 4,
            by: UserId::parse("alice").unwrap(),
            pinned: true,
            ts: 5,
        };
        let json: Value = serde_json::from_slice(&encode_frame(&event, Format::Json)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "pin", "room": "general", "seq": 10, "target": 4, "by": "alice", "pinned": true, "ts": 5})
        );
        let packed: Value = rmp_serde::from_slice(&encode_frame(&event, Format::MsgPack)).unwrap();
        assert_eq!(packed, json);
        assert_eq!(event.name(), "pin");
    }

    /// `pinned` is written only when true, so a message that was never pinned keeps its JSON byte for byte.
    #[test]
    fn a_message_shows_pinned_only_when_pinned() {
        let json = r#"{"seq":4,"id":"01M82HVCTF61YECCASTJT0BHYJ","from":"bob","body":"hi","ts":5}"#;
        let mut message: Message = serde_json::from_str(json).unwrap();
        assert!(!message.pinned);
        assert_eq!(serde_json::to_string(&message).unwrap(), json);
        message.pinned = true;
        let value = serde_json::to_value(&message).unwrap();
        assert_eq!(value["pinned"], true);
    }

    #[test]
    fn ok_frames_flatten_their_result() {
        let frame = ServerFrame::Ok {
            rid: Some(1),
            result: OkResult::RoomSeq { room: RoomId::parse("general").unwrap(), seq: 3 },
        };
        let json: Value = serde_json::from_slice(&encode_frame(&frame, Format::Json)).unwrap();
        assert_eq!(json, serde_json::json!({"op": "ok", "rid": 1, "room": "general", "seq": 3}));
        let packed: Value = rmp_serde::from_slice(&encode_frame(&frame, Format::MsgPack)).unwrap();
        assert_eq!(packed, json);
    }

    #[test]
    fn ok_results_round_trip_by_shape() {
        let sent = OkResult::Sent { room: RoomId::parse("r").unwrap(), id: MessageId::generate(5), seq: 9, ts: 5 };
        let back: OkResult = rmp_serde::from_slice(&rmp_serde::to_vec_named(&sent).unwrap()).unwrap();
        assert_eq!(back, sent);
    }
}
