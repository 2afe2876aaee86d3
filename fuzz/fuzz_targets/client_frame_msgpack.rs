//! Client frames on the `switchyard.v1.msgpack` subprotocol: any bytes a WebSocket binary frame can carry.
//!
//! Checks: an accepted frame has valid ids, attrs within the depth limit, and decodes to itself again from JSON and
//! from MessagePack; a refused one is a `bad_request` that says why.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_fuzz::check_decoded;
use switchyard_protocol::client::{decode_client_frame, Format};

fuzz_target!(|data: &[u8]| {
    check_decoded(&decode_client_frame(data, Format::MsgPack));
});
