//! Internal messages as they arrive on NATS and in KV buckets: the first byte picks the message type, the rest is
//! its MessagePack encoding. Less exposed than client input (only Switchyard's own processes publish them) but
//! cheap to cover.
//!
//! Checks: decoding never panics; an accepted message re-encodes to bytes that decode and re-encode to the same bytes
//! (nothing is lost or changes meaning on a second trip); a room event becomes a client event that encodes in both
//! formats.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use switchyard_protocol::client::{encode_frame, Format};
use switchyard_protocol::codec;
use switchyard_protocol::internal::*;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(bytes: &[u8]) -> Option<T> {
    let first: T = codec::decode(bytes).ok()?;
    let encoded = codec::encode(&first).expect("a decoded message encodes");
    let second: T = codec::decode(&encoded).expect("a re-encoded message decodes");
    let encoded_again = codec::encode(&second).expect("a decoded message encodes");
    assert_eq!(encoded, encoded_again, "re-encoding {second:?} is not stable");
    Some(second)
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else { return };
    match kind % 15 {
        0 => {
            if let Some(event) = round_trip::<RoomEvent>(bytes) {
                let client_event = event.to_server_event();
                encode_frame(&client_event, Format::Json);
                encode_frame(&client_event, Format::MsgPack);
            }
        }
        1 => {
            round_trip::<CommandRequest>(bytes);
        }
        2 => {
            round_trip::<CommandReply>(bytes);
        }
        3 => {
            round_trip::<UserRequest>(bytes);
        }
        4 => {
            round_trip::<LiveMessage>(bytes);
        }
        5 => {
            round_trip::<HistoryRequest>(bytes);
        }
        6 => {
            round_trip::<HistoryReply>(bytes);
        }
        7 => {
            round_trip::<Revocation>(bytes);
        }
        8 => {
            round_trip::<TenantRecord>(bytes);
        }
        9 => {
            round_trip::<RoomRecord>(bytes);
        }
        10 => {
            round_trip::<Roster>(bytes);
        }
        11 => {
            round_trip::<UserRooms>(bytes);
        }
        12 => {
            round_trip::<PresenceRecord>(bytes);
        }
        13 => {
            round_trip::<PresenceSnapshot>(bytes);
        }
        _ => {
            round_trip::<PresenceResync>(bytes);
        }
    }
});
