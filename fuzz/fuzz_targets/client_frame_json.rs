//! Client frames on the `switchyard.v1.json` subprotocol: any bytes a WebSocket text frame can carry.
//!
//! Checks: an accepted frame has valid ids and decodes to itself again from JSON and from MessagePack; a refused one
//! is a `bad_request`; and the same JSON value sent as MessagePack gets exactly the same answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_fuzz::check_decoded;
use switchyard_protocol::client::{decode_client_frame, Format};

fuzz_target!(|data: &[u8]| {
    let decoded = decode_client_frame(data, Format::Json);
    check_decoded(&decoded);
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) {
        let packed = rmp_serde::to_vec_named(&value).expect("a JSON value encodes as MessagePack");
        assert_eq!(decode_client_frame(&packed, Format::MsgPack), decoded, "JSON and MessagePack disagree");
    }
});
