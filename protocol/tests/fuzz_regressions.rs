//! Inputs the fuzz targets (`fuzz/`, see docs/fuzzing.md) found or were written to guard against, kept here so
//! `cargo test` checks them without the fuzzer. Each test names the bug it pins.

use switchyard_protocol::client::{decode_client_frame, Format, MAX_FRAME_DEPTH};
use switchyard_protocol::internal::{EventBody, RoomEvent};
use switchyard_protocol::{codec, ErrorCode};

/// The stack of a tokio worker thread, where the gateway decodes frames and the services decode internal messages.
const TASK_STACK_BYTES: usize = 2 * 1024 * 1024;

/// Runs `f` on a thread with a task-sized stack. A stack overflow aborts the whole test binary, which fails the
/// test run as loudly as it would crash a service.
fn on_task_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().stack_size(TASK_STACK_BYTES).spawn(f).unwrap().join().unwrap()
}

/// MessagePack fixstr.
fn str8(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 32);
    out.push(0xa0 | s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

/// `{"op":"send","room":"r","body":"b","attrs":{"a":[[...null...]]}}` with `arrays` nested arrays, as MessagePack.
fn deep_send_msgpack(arrays: usize) -> Vec<u8> {
    let mut out = vec![0x84];
    for (k, v) in [("op", "send"), ("room", "r"), ("body", "b")] {
        str8(&mut out, k);
        str8(&mut out, v);
    }
    str8(&mut out, "attrs");
    out.push(0x81);
    str8(&mut out, "a");
    out.extend(std::iter::repeat_n(0x91, arrays));
    out.push(0xc0);
    out
}

/// The same frame as JSON.
fn deep_send_json(arrays: usize) -> Vec<u8> {
    format!(r#"{{"op":"send","room":"r","body":"b","attrs":{{"a":{}null{}}}}}"#, "[".repeat(arrays), "]".repeat(arrays))
        .into_bytes()
}

/// A 5 KB MessagePack frame of nested arrays used to recurse once per level through decoding (up to MessagePack's
/// default limit of 1024 levels), validation and drop, overflowing a 2 MiB task stack: one small frame aborted the
/// gateway. Now it is a `bad_request` like any other malformed frame.
#[test]
fn deeply_nested_msgpack_frame_is_refused_on_a_task_stack() {
    for arrays in [1_000, 1_022, 5_000] {
        let frame = deep_send_msgpack(arrays);
        let result = on_task_stack(move || decode_client_frame(&frame, Format::MsgPack));
        let error = result.expect_err("a frame nested 1000 deep must be refused");
        assert_eq!(error.code, ErrorCode::BadRequest);
        assert!(error.message.contains("depth"), "{:?} should say the frame is too deep", error.message);
    }
}

/// JSON and MessagePack accept exactly the same nesting: the limit sits at the same level in both formats.
#[test]
fn both_formats_share_one_depth_limit() {
    let mut accepted = Vec::new();
    // The frame is one level and `attrs` another, so the attrs' arrays reach the limit near MAX_FRAME_DEPTH - 2.
    for arrays in MAX_FRAME_DEPTH - 6..MAX_FRAME_DEPTH + 2 {
        let json = decode_client_frame(&deep_send_json(arrays), Format::Json);
        let msgpack = decode_client_frame(&deep_send_msgpack(arrays), Format::MsgPack);
        assert_eq!(json.is_ok(), msgpack.is_ok(), "{arrays} nested arrays: JSON {json:?}, MessagePack {msgpack:?}");
        if let (Ok(json), Ok(msgpack)) = (&json, &msgpack) {
            assert_eq!(json, msgpack);
        }
        accepted.push(json.is_ok());
    }
    // The range straddles the limit: the shallow frames pass, the deep ones do not.
    assert!(accepted.first() == Some(&true) && accepted.last() == Some(&false), "{accepted:?}");
}

/// A MessagePack frame is one value, as a JSON frame is: bytes after it used to be ignored silently.
#[test]
fn msgpack_frame_with_trailing_bytes_is_refused() {
    let ping = b"\x82\xa2op\xa4ping\xa3rid\x01";
    assert_eq!(decode_client_frame(ping, Format::MsgPack).unwrap().rid, Some(1));
    let mut trailing = ping.to_vec();
    trailing.push(0xc0);
    let error = decode_client_frame(&trailing, Format::MsgPack).unwrap_err();
    assert_eq!(error.code, ErrorCode::BadRequest);
    assert!(error.message.contains("1 bytes follow"), "{:?}", error.message);
    assert!(decode_client_frame(br#"{"op":"ping"} null"#, Format::Json).is_err());
}

/// Internal messages have a depth bound too, so a malformed message on NATS cannot crash a router shard or a
/// persistor, while everything a client can send still fits.
#[test]
fn internal_messages_refuse_excessive_nesting_and_keep_client_depth() {
    let event = |arrays: usize| {
        let mut attrs = serde_json::Value::Null;
        for _ in 0..arrays {
            attrs = serde_json::Value::Array(vec![attrs]);
        }
        RoomEvent {
            v: 1,
            tenant: switchyard_protocol::ProjectId::generate(),
            room: switchyard_protocol::RoomId::parse("r").unwrap(),
            seq: 1,
            ts_us: 1,
            tally: Default::default(),
            expires_ms: None,
            body: EventBody::Msg {
                id: switchyard_protocol::MessageId::generate(1),
                from: switchyard_protocol::UserId::parse("u").unwrap(),
                body: "b".into(),
                attrs: Some(serde_json::json!({ "a": attrs })),
                reply_to: None,
            },
        }
    };
    // As deep as a client frame can make it.
    let fits = event(MAX_FRAME_DEPTH - 2);
    let bytes = codec::encode(&fits).unwrap();
    assert_eq!(on_task_stack(move || codec::decode::<RoomEvent>(&bytes).unwrap()), fits);
    // Far deeper than any client frame. Building and encoding it recurses too, so that happens on a big stack.
    let bytes = std::thread::Builder::new()
        .stack_size(64 * 1024 * 1024)
        .spawn(move || codec::encode(&event(1_000)).unwrap())
        .unwrap()
        .join()
        .unwrap();
    let result = on_task_stack(move || codec::decode::<RoomEvent>(&bytes).map(|_| ()).map_err(|e| e.to_string()));
    assert!(result.unwrap_err().contains("depth"));
}

/// serde_json's default float parsing is not always correctly rounded. `client_frame_json` found this frame: its
/// number re-encodes as `2.2222222222222224e48`, which parsed back one unit off, so the frame did not decode to
/// itself again, and a client sending that number had it delivered to every other client changed in its last
/// digit. Parsing is exact now (serde_json's `float_roundtrip`).
#[test]
fn json_numbers_parse_exactly_and_survive_re_encoding() {
    let number = "2222222222222222222222222222222222222222222222221.22";
    let frame = format!(r#"{{"op":"send","rid":6,"room":"general","body":"x","attrs":[{number}]}}"#);
    let request = decode_client_frame(frame.as_bytes(), Format::Json).unwrap();
    let switchyard_protocol::client::ClientOp::Send { attrs: Some(attrs), .. } = &request.op else {
        panic!("not a send with attrs: {request:?}")
    };
    // The standard library's parser is correctly rounded.
    assert_eq!(attrs[0].as_f64(), Some(number.parse::<f64>().unwrap()));
    let shortest: f64 = "2.2222222222222224e48".parse().unwrap();
    let sent = br#"{"op":"send","room":"general","body":"x","attrs":[2.2222222222222224e48]}"#;
    let received = decode_client_frame(sent, Format::Json).unwrap();
    let switchyard_protocol::client::ClientOp::Send { attrs: Some(attrs), .. } = &received.op else { unreachable!() };
    assert_eq!(attrs[0].as_f64(), Some(shortest));
    for format in [Format::Json, Format::MsgPack] {
        let mut value = serde_json::to_value(&request.op).unwrap();
        value["rid"] = 6.into();
        let again = decode_client_frame(&switchyard_protocol::client::encode_frame(&value, format), format);
        assert_eq!(again.as_ref(), Ok(&request), "{format:?}");
    }
}
