//! Properties the fuzz targets check on whatever a decoder accepts: ids that can only ever form one safe NATS subject
//! token, client frames that survive re-encoding in both formats, internal messages that re-encode stably.
//!
//! Every check panics on a violation, which libFuzzer reports as a crash with the input that caused it. Nothing here
//! decodes on its own: the targets in `fuzz_targets/` feed the product's decoders and pass the results here.

use serde_json::Value;
use switchyard_protocol::client::{decode_client_frame, encode_frame, ClientOp, ClientRequest, Format, FrameError};
use switchyard_protocol::ids::{MessageId, ProjectId, RoomId, UserId};
use switchyard_protocol::{subjects, ErrorCode};

/// A fixed, valid tenant for building subjects around fuzzed ids.
pub fn tenant() -> ProjectId {
    ProjectId::parse("pj_abcdefghij0123456789").expect("a valid project id")
}

/// The HS256 secret the JWT targets sign and verify with.
pub const HS256_SECRET: &str = "fuzzing-secret-fuzzing-secret-0123456789";

/// The tenant's prepared HS256 key.
pub fn hs256_key() -> switchyard_gateway::jwt::PreparedKey {
    let key = switchyard_protocol::internal::JwtKey::HS256 { secret: HS256_SECRET.to_owned() };
    switchyard_gateway::jwt::prepare(&key).expect("a valid HS256 key")
}

/// `token` can stand as exactly one token of a NATS subject or KV key: not empty, printable ASCII, and none of
/// NATS's separators or wildcards.
pub fn assert_subject_token(token: &str) {
    assert!(!token.is_empty(), "an empty subject token");
    assert!(
        token.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>')),
        "{token:?} is not a safe subject token"
    );
}

/// `subject` is `tokens` safe tokens joined by dots.
pub fn assert_subject(subject: &str, tokens: usize) {
    let parts: Vec<&str> = subject.split('.').collect();
    assert_eq!(parts.len(), tokens, "{subject:?} should have {tokens} tokens");
    parts.iter().for_each(|part| assert_subject_token(part));
}

pub fn check_project(project: &ProjectId) {
    assert_eq!(ProjectId::parse(project.as_str()).as_ref(), Ok(project));
    assert_eq!(project.as_str().len(), 23);
    assert_subject_token(project.as_str());
    assert_subject(&subjects::revocations(project), 3);
}

pub fn check_user(user: &UserId) {
    assert_eq!(UserId::parse(user.as_str()).as_ref(), Ok(user));
    assert!((1..=64).contains(&user.as_str().len()));
    assert_subject_token(user.as_str());
    assert_subject(&subjects::user_inbox(&tenant(), user), 4);
    assert_subject(&subjects::presence_key(&tenant(), user), 3);
}

pub fn check_room(room: &RoomId) {
    assert_eq!(RoomId::parse(room.as_str()).as_ref(), Ok(room));
    let token = room.token();
    assert_subject_token(&token);
    // The token maps back to the room: no two rooms share a token.
    assert_eq!(token.replace('=', ":"), room.as_str());
    assert_subject(&subjects::room_live(&tenant(), room), 4);
    assert_subject(&subjects::room_key(&tenant(), room), 3);
    let shard = switchyard_protocol::shard::shard_of_room(&tenant(), room, 64);
    assert_subject(&subjects::event_log(shard, &tenant(), room), 5);
    match room.dm_participants() {
        Some((a, b)) => {
            assert!(room.is_dm());
            check_user(&a);
            check_user(&b);
            assert_eq!(RoomId::dm(&a, &b).as_ref(), Some(room));
            assert_eq!(RoomId::dm(&b, &a).as_ref(), Some(room));
        }
        None => assert!(!room.is_dm(), "{room:?} is a dm room without participants"),
    }
}

pub fn check_message_id(id: &MessageId) {
    assert_eq!(MessageId::parse(id.as_str()).as_ref(), Ok(id));
    assert_eq!(id.as_str().len(), 26);
    assert_subject_token(id.as_str());
}

/// Nesting depth of a JSON value: 0 for a scalar, 1 for a flat array or object.
pub fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Every id in an accepted op is valid, and its attrs fit in the frame depth limit.
pub fn check_op(op: &ClientOp) {
    let attrs = match op {
        ClientOp::Send { room, attrs, .. } => {
            check_room(room);
            attrs.as_ref()
        }
        ClientOp::Dm { to, attrs, .. } => {
            check_user(to);
            attrs.as_ref()
        }
        ClientOp::Invite { room, user }
        | ClientOp::Kick { room, user }
        | ClientOp::Ban { room, user, .. }
        | ClientOp::Unban { room, user }
        | ClientOp::Mute { room, user, .. }
        | ClientOp::Unmute { room, user } => {
            check_room(room);
            check_user(user);
            None
        }
        ClientOp::Presence { users } | ClientOp::Watch { users } | ClientOp::Unwatch { users } => {
            users.iter().for_each(check_user);
            None
        }
        ClientOp::Create { room, .. }
        | ClientOp::Join { room, .. }
        | ClientOp::Leave { room }
        | ClientOp::Typing { room }
        | ClientOp::Read { room, .. }
        | ClientOp::React { room, .. }
        | ClientOp::Edit { room, .. }
        | ClientOp::Delete { room, .. }
        | ClientOp::Pin { room, .. }
        | ClientOp::Unpin { room, .. }
        | ClientOp::SlowMode { room, .. }
        | ClientOp::Freeze { room }
        | ClientOp::Unfreeze { room }
        | ClientOp::History { room, .. }
        | ClientOp::Members { room } => {
            check_room(room);
            None
        }
        ClientOp::Auth { .. } | ClientOp::Ping | ClientOp::Rooms => None,
    };
    if let Some(attrs) = attrs {
        // The frame is one level, so attrs may use the rest.
        assert!(
            depth(attrs) < switchyard_protocol::client::MAX_FRAME_DEPTH,
            "attrs nested {} deep were accepted",
            depth(attrs)
        );
    }
}

/// A request encoded as a client would send it: the op's fields, its `op` tag and the `rid`.
pub fn encode_request(request: &ClientRequest, format: Format) -> Vec<u8> {
    let mut value = serde_json::to_value(&request.op).expect("ops serialise");
    if let (Some(rid), Value::Object(map)) = (request.rid, &mut value) {
        map.insert("rid".into(), rid.into());
    }
    encode_frame(&value, format)
}

/// Whatever `decode_client_frame` answered is well formed: an accepted frame has valid ids and decodes to itself
/// again from either format; a refused one is a `bad_request` that says why.
pub fn check_decoded(decoded: &Result<ClientRequest, FrameError>) {
    match decoded {
        Ok(request) => {
            check_op(&request.op);
            assert!(switchyard_protocol::client::OP_NAMES.contains(&request.op.name()));
            for format in [Format::Json, Format::MsgPack] {
                let again = decode_client_frame(&encode_request(request, format), format);
                assert_eq!(again.as_ref(), Ok(request), "re-encoded as {format:?}");
            }
        }
        Err(error) => {
            assert_eq!(error.code, ErrorCode::BadRequest);
            assert!(!error.message.is_empty());
        }
    }
}
