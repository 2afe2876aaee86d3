//! The internal codec: MessagePack with field names, for every message in `internal` and every KV value.
//!
//! Field names cost a few bytes and buy tolerance to added fields across versions. This module does not touch the
//! client edge (see `client::encode_frame`).

use serde::{de::DeserializeOwned, Serialize};

/// An internal message that could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode internal message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("cannot decode internal message: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

pub fn encode<T: Serialize>(value: &T) -> Result<bytes::Bytes, CodecError> {
    Ok(rmp_serde::to_vec_named(value)?.into())
}

/// Deepest nesting of maps and arrays an internal message may hold. Client input reaches internal messages only
/// within `client::MAX_FRAME_DEPTH` levels, plus the few of the message around it, so this refuses only malformed
/// messages, before their recursion could exhaust a task's stack.
pub const MAX_DEPTH: usize = 256;

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    Ok(T::deserialize(&mut de)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::internal::*;
    use crate::{MessageId, ProjectId, RoomId, UserId};

    #[test]
    fn room_events_round_trip() {
        let event = RoomEvent {
            v: INTERNAL_VERSION,
            tenant: ProjectId::generate(),
            room: RoomId::parse("dm:a:b").unwrap(),
            seq: 42,
            ts_us: 1_700_000_000_123_456,
            tally: Default::default(),
            expires_ms: None,
            body: EventBody::Msg {
                id: MessageId::generate(1_700_000_000_123),
                from: UserId::parse("a").unwrap(),
                body: "hello".into(),
                attrs: Some(serde_json::json!({"n": [1, 2.5, "x"], "nested": {"ok": true}})),
                reply_to: Some(3),
            },
        };
        let back: RoomEvent = decode(&encode(&event).unwrap()).unwrap();
        assert_eq!(back, event);
        assert_eq!(back.ts_ms(), 1_700_000_000_123);
    }

    #[test]
    fn tenant_records_without_limits_still_decode_and_hide_secrets() {
        #[derive(serde::Serialize)]
        struct OldRecord {
            v: u8,
            project_id: ProjectId,
            name: String,
            created_at_ms: u64,
            api_key_sha256: String,
            jwt: Option<JwtKey>,
            disabled: bool,
        }
        let old = OldRecord {
            v: 1,
            project_id: ProjectId::generate(),
            name: "acme".into(),
            created_at_ms: 1,
            api_key_sha256: "00".into(),
            jwt: Some(JwtKey::HS256 { secret: "s3cret-s3cret".into() }),
            disabled: false,
        };
        let record: TenantRecord = decode(&encode(&old).unwrap()).unwrap();
        assert_eq!(record.limits, TenantLimits::default());
        assert!(!format!("{record:?}").contains("s3cret"));
        let revocation = Revocation {
            v: 1,
            tenant: record.project_id.clone(),
            target: RevocationTarget::User { user: UserId::parse("alice").unwrap() },
            at_ms: 5,
        };
        assert_eq!(decode::<Revocation>(&encode(&revocation).unwrap()).unwrap(), revocation);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode::<RoomEvent>(b"\xc1\xff\x00").is_err());
        assert!(decode::<CommandRequest>(&[]).is_err());
    }
}
