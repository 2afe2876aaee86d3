//! Tests of the session handle against an in-process fake server on an in-memory stream; they check what the
//! client sends and how it routes what it receives, not the real server's behaviour.

use super::*;
use serde_json::json;
use std::sync::{Arc, Mutex as StdMutex};
use switchyard_protocol::client::{decode_client_frame, SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK};
use switchyard_protocol::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::handshake::server::{
    ErrorResponse, Request as ServerRequest, Response as ServerResponse,
};
use tokio_tungstenite::tungstenite::http::HeaderMap;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::WebSocketStream;

use futures::{SinkExt, StreamExt};

const WAIT: Duration = Duration::from_secs(5);

struct Fake {
    ws: WebSocketStream<DuplexStream>,
    format: Format,
    uri: String,
    headers: HeaderMap,
}

impl Fake {
    // The handshake callback's error type is fixed by the library.
    #[allow(clippy::result_large_err)]
    async fn accept(io: DuplexStream, selected: Option<&'static str>) -> Fake {
        let seen = Arc::new(StdMutex::new(None));
        let seen_in_callback = Arc::clone(&seen);
        let callback = move |request: &ServerRequest, mut response: ServerResponse| {
            *seen_in_callback.lock().unwrap() = Some((request.uri().to_string(), request.headers().clone()));
            if let Some(protocol) = selected {
                response.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol));
            }
            Ok::<_, ErrorResponse>(response)
        };
        let ws = tokio_tungstenite::accept_hdr_async(io, callback).await.unwrap();
        let (uri, headers) = seen.lock().unwrap().take().unwrap();
        let format = selected.and_then(Format::from_subprotocol).unwrap_or(Format::Json);
        Fake { ws, format, uri, headers }
    }

    async fn send(&mut self, frame: Value) {
        let message = match self.format {
            Format::Json => WsMessage::text(serde_json::to_string(&frame).unwrap()),
            Format::MsgPack => WsMessage::binary(rmp_serde::to_vec_named(&frame).unwrap()),
        };
        self.ws.send(message).await.unwrap();
    }

    async fn hello(&mut self) {
        self.send(json!({"op": "hello", "session": "s-1", "user": "alice",
                         "project_id": "pj_abcdefghij0123456789", "heartbeat_ms": 25000, "max_frame": 65536}))
            .await;
    }

    /// The next data frame, with its frame type checked against the session format.
    async fn recv_bytes(&mut self) -> Vec<u8> {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame from the client")
                .expect("the stream is open")
                .expect("a readable frame");
            match (message, self.format) {
                (WsMessage::Text(text), Format::Json) => return text.as_bytes().to_vec(),
                (WsMessage::Binary(bytes), Format::MsgPack) => return bytes.to_vec(),
                (WsMessage::Ping(_) | WsMessage::Pong(_), _) => continue,
                (other, format) => panic!("unexpected {other:?} in a {format:?} session"),
            }
        }
    }

    async fn recv_op(&mut self) -> (Option<u64>, ClientOp) {
        let bytes = self.recv_bytes().await;
        let request = decode_client_frame(&bytes, self.format).unwrap();
        (request.rid, request.op)
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: CloseCode::from(code), reason: reason.into() };
        self.ws.close(Some(frame)).await.unwrap();
    }

    /// Read until the client's close frame; its code.
    async fn expect_close(&mut self) -> u16 {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next()).await.expect("a close from the client");
            match message {
                Some(Ok(WsMessage::Close(frame))) => return frame.map(|f| u16::from(f.code)).unwrap_or(1005),
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    }
}

/// Connect a client to a fake server that selects `selected` and greets with `hello`.
async fn session(opts: ConnectOptions, selected: Option<&'static str>) -> (Client, Fake) {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut fake = Fake::accept(server_io, selected).await;
        fake.hello().await;
        fake
    });
    let request = build_request(&opts).unwrap();
    let client = Client::handshake(&opts, request, client_io).await.unwrap();
    (client, server.await.unwrap())
}

fn opts(auth: Auth) -> ConnectOptions {
    ConnectOptions::new("ws://gateway.test:8080/v1/ws", auth)
}

#[test]
fn query_tokens_are_appended_and_encoded() {
    assert_eq!(with_query_token("ws://h/v1/ws", "sytok_abc"), "ws://h/v1/ws?token=sytok_abc");
    assert_eq!(with_query_token("ws://h/v1/ws?x=1", "a b/c+d"), "ws://h/v1/ws?x=1&token=a%20b%2Fc%2Bd");
    assert_eq!(with_query_token("ws://h/v1/ws?", "t.u-v_w~"), "ws://h/v1/ws?token=t.u-v_w~");
    assert_eq!(with_query_token("ws://h/p#f", "t"), "ws://h/p?token=t#f");
}

#[test]
fn requests_carry_auth_subprotocols_and_origin() {
    let mut options = opts(Auth::Header("tok".into())).with_format(Format::MsgPack);
    options.origin = Some("https://app.example".into());
    let request = build_request(&options).unwrap();
    assert_eq!(request.headers()[AUTHORIZATION], "Bearer tok");
    assert_eq!(request.headers()[SEC_WEBSOCKET_PROTOCOL], SUBPROTOCOL_MSGPACK);
    assert_eq!(request.headers()[ORIGIN], "https://app.example");
    assert_eq!(tcp_address(&request).unwrap(), "gateway.test:8080");

    options.subprotocols = Some(vec!["a".into(), "b".into()]);
    options.auth = Auth::Query("q".into());
    let request = build_request(&options).unwrap();
    assert_eq!(request.headers()[SEC_WEBSOCKET_PROTOCOL], "a, b");
    assert!(request.headers().get(AUTHORIZATION).is_none());
    assert_eq!(request.uri().query(), Some("token=q"));

    options.subprotocols = Some(vec![]);
    let request = build_request(&options).unwrap();
    assert!(request.headers().get(SEC_WEBSOCKET_PROTOCOL).is_none());

    let wss = ConnectOptions::new("wss://h/v1/ws", Auth::None);
    assert!(matches!(build_request(&wss), Err(ClientError::Handshake(_))));
    let bad = ConnectOptions::new("ws://h/v1/ws", Auth::Header("a\nb".into()));
    assert!(matches!(build_request(&bad), Err(ClientError::Handshake(_))));
}

#[tokio::test]
async fn json_session_requests_events_and_hello() {
    let mut options = opts(Auth::Header("tok".into()));
    options.origin = Some("https://app.example".into());
    let (client, mut fake) = session(options, Some(SUBPROTOCOL_JSON)).await;
    assert_eq!(fake.headers[AUTHORIZATION], "Bearer tok");
    assert_eq!(fake.headers[SEC_WEBSOCKET_PROTOCOL], SUBPROTOCOL_JSON);
    assert_eq!(fake.headers[ORIGIN], "https://app.example");
    assert_eq!(client.format(), Format::Json);
    assert_eq!(client.hello().session, "s-1");
    assert_eq!(client.hello().user.as_str(), "alice");
    assert_eq!(client.hello().heartbeat_ms, 25_000);

    let server = async {
        let (rid, op) = fake.recv_op().await;
        assert!(matches!(op, ClientOp::Join { ref room, since: Some(3) } if room.as_str() == "general"));
        fake.send(json!({"op": "msg", "room": "general", "seq": 4, "id": "01HZZZZZZZZZZZZZZZZZZZZZZZ",
                         "from": "bob", "body": "replayed", "ts": 10}))
            .await;
        fake.send(json!({"op": "ok", "rid": rid, "room": "general", "seq": 4})).await;
    };
    let (joined, ()) = tokio::join!(client.join("general", Some(3)), server);
    assert_eq!(joined.unwrap(), 4);
    match client.next_event_timeout(WAIT).await {
        Some(ServerEvent::Msg { seq, body, .. }) => {
            assert_eq!((seq, body.as_str()), (4, "replayed"))
        }
        other => panic!("expected the replayed msg, got {other:?}"),
    }

    // Concurrent requests are matched by rid even when answered out of order.
    let server = async {
        let (rid_a, _) = fake.recv_op().await;
        let (rid_b, _) = fake.recv_op().await;
        assert_ne!(rid_a, rid_b);
        fake.send(json!({"op": "ok", "rid": rid_b, "rooms": []})).await;
        fake.send(json!({"op": "err", "rid": rid_a, "code": "not_found", "message": "no room"})).await;
    };
    let (a, b, ()) = tokio::join!(
        client.request(ClientOp::Members { room: RoomId::parse("general").unwrap() }),
        async {
            // Make sure the first request is queued first.
            tokio::task::yield_now().await;
            client.request(ClientOp::Rooms).await
        },
        server
    );
    assert_eq!(a.unwrap().error_code(), Some(ErrorCode::NotFound));
    let Reply::Ok(fields) = b.unwrap() else { panic!("rooms failed") };
    assert_eq!(fields["rooms"], json!([]));
}

#[tokio::test]
async fn msgpack_session_uses_binary_frames() {
    let options = opts(Auth::Header("tok".into())).with_format(Format::MsgPack);
    let (client, mut fake) = session(options, Some(SUBPROTOCOL_MSGPACK)).await;
    assert_eq!(fake.headers[SEC_WEBSOCKET_PROTOCOL], SUBPROTOCOL_MSGPACK);
    assert_eq!(client.format(), Format::MsgPack);
    assert_eq!(client.hello().max_frame, 65_536);

    let server = async {
        let (rid, op) = fake.recv_op().await;
        assert!(matches!(op, ClientOp::Send { ref body, .. } if body == "hi"));
        fake.send(json!({"op": "ok", "rid": rid, "room": "general", "id": "01HZZZZZZZZZZZZZZZZZZZZZZZ",
                         "seq": 7, "ts": 1234}))
            .await;
        let (rid, op) = fake.recv_op().await;
        assert!(matches!(op, ClientOp::Create { private: true, .. }));
        fake.send(json!({"op": "err", "rid": rid, "code": "conflict", "message": "exists"})).await;
        let (rid, op) = fake.recv_op().await;
        assert!(matches!(op, ClientOp::History { limit: Some(2), after: Some(1), before: None, .. }));
        fake.send(json!({"op": "ok", "rid": rid, "room": "general", "more": true, "messages": [
            {"seq": 2, "id": "01HZZZZZZZZZZZZZZZZZZZZZZZ", "from": "bob", "body": "x", "ts": 5},
            {"seq": 3, "id": "01HZZZZZZZZZZZZZZZZZZZZZZY", "from": "bob", "ts": 6, "deleted": true},
        ]}))
        .await;
        fake.send(json!({"op": "typing", "room": "general", "user": "bob"})).await;
    };
    let client_side = async {
        let sent = client.send("general", "hi").await.unwrap();
        assert_eq!((sent.seq, sent.ts), (7, 1234));
        match client.create("general", true).await {
            Err(ClientError::Server { code, message }) => {
                assert_eq!((code, message.as_str()), (ErrorCode::Conflict, "exists"))
            }
            other => panic!("expected conflict, got {other:?}"),
        }
        let (messages, more) = client.history("general", None, Some(1), Some(2)).await.unwrap();
        assert!(more);
        assert_eq!(messages.len(), 2);
        assert!(messages[1].deleted && messages[1].body.is_none());
    };
    tokio::join!(client_side, server);
    assert!(matches!(client.next_event_timeout(WAIT).await, Some(ServerEvent::Typing { .. })));
}

#[tokio::test]
async fn query_and_first_frame_auth() {
    let (_client, fake) = session(opts(Auth::Query("a b".into())), Some(SUBPROTOCOL_JSON)).await;
    assert_eq!(fake.uri, "/v1/ws?token=a%20b");
    assert!(fake.headers.get(AUTHORIZATION).is_none());

    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut fake = Fake::accept(server_io, Some(SUBPROTOCOL_MSGPACK)).await;
        let first = fake.recv_op().await;
        fake.hello().await;
        first
    });
    let options = opts(Auth::FirstFrame("tok".into())).with_format(Format::MsgPack);
    let client = Client::handshake(&options, build_request(&options).unwrap(), client_io).await.unwrap();
    let (rid, op) = server.await.unwrap();
    assert_eq!(rid, None);
    assert_eq!(op, ClientOp::Auth { token: "tok".into() });
    assert_eq!(client.hello().user.as_str(), "alice");
}

#[tokio::test]
async fn no_requested_subprotocol_means_json() {
    let mut options = opts(Auth::None);
    options.subprotocols = Some(vec![]);
    let (client, fake) = session(options, None).await;
    assert!(fake.headers.get(SEC_WEBSOCKET_PROTOCOL).is_none());
    assert_eq!(client.format(), Format::Json);
}

#[tokio::test]
async fn http_errors_before_the_upgrade() {
    let (client_io, mut server_io) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            let n = server_io.read(&mut buf).await.unwrap();
            assert!(n > 0);
            request.extend_from_slice(&buf[..n]);
        }
        let body = r#"{"code":"unauthorized","message":"bad token"}"#;
        let response = format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        server_io.write_all(response.as_bytes()).await.unwrap();
        server_io.flush().await.unwrap();
        server_io
    });
    let options = opts(Auth::Header("bad".into()));
    let result = Client::handshake(&options, build_request(&options).unwrap(), client_io).await;
    let _io = server.await.unwrap();
    match result {
        Err(ClientError::Http { status, body }) => {
            assert_eq!(status, 401);
            assert!(body.contains("bad token"), "{body}");
        }
        other => panic!("expected HTTP 401, got {other:?}"),
    }
}

#[tokio::test]
async fn close_before_hello_is_reported() {
    let (client_io, server_io) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut fake = Fake::accept(server_io, Some(SUBPROTOCOL_JSON)).await;
        let _auth = fake.recv_op().await;
        fake.send(json!({"op": "err", "code": "unauthorized", "message": "bad token"})).await;
        fake.close(4001, "unauthenticated").await;
        // Keep the stream alive until the client answers the close.
        while let Some(Ok(_)) = fake.ws.next().await {}
    });
    let options = opts(Auth::FirstFrame("bad".into()));
    let result = Client::handshake(&options, build_request(&options).unwrap(), client_io).await;
    server.await.unwrap();
    match result {
        Err(err @ ClientError::Closed(_)) => assert_eq!(err.close_code(), Some(4001)),
        other => panic!("expected close 4001, got {other:?}"),
    }
}

#[tokio::test]
async fn unmatched_replies_malformed_frames_and_pings() {
    let (client, mut fake) = session(opts(Auth::None), Some(SUBPROTOCOL_JSON)).await;
    fake.ws.send(WsMessage::text("{not json")).await.unwrap();
    fake.ws.send(WsMessage::binary(vec![0xc1, 0xff])).await.unwrap();
    fake.send(json!({"op": "err", "code": "bad_request", "message": "frame is not valid JSON"})).await;
    fake.send(json!({"op": "ok", "rid": 424242})).await;
    fake.send(json!({"op": "ping"})).await;
    fake.send(json!({"op": "read", "room": "r", "user": "bob", "seq": 2})).await;

    let orphan = client.next_unmatched_timeout(WAIT).await.unwrap();
    assert_eq!(orphan.op, "err");
    assert_eq!(orphan.rid, None);
    assert_eq!(orphan.reply.error_code(), Some(ErrorCode::BadRequest));
    let orphan = client.next_unmatched_timeout(WAIT).await.unwrap();
    assert_eq!((orphan.op.as_str(), orphan.rid), ("ok", Some(424242)));

    let pong: Value = serde_json::from_slice(&fake.recv_bytes().await).unwrap();
    assert_eq!(pong, json!({"op": "pong"}));
    assert!(matches!(client.next_event_timeout(WAIT).await, Some(ServerEvent::Read { seq: 2, .. })));

    // Raw frames go out untouched.
    client.send_raw_text("garbage".into()).await.unwrap();
    assert_eq!(fake.recv_bytes().await, b"garbage");
    client.typing("r").await.unwrap();
    let (rid, op) = fake.recv_op().await;
    assert_eq!(rid, None);
    assert!(matches!(op, ClientOp::Typing { .. }));
    let mut frame = Map::new();
    frame.insert("op".into(), "fly".into());
    let (reply, ()) = tokio::join!(client.request_map(frame), async {
        let bytes = fake.recv_bytes().await;
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["op"], "fly");
        fake.send(json!({"op": "err", "rid": value["rid"], "code": "bad_request", "message": "unknown op"})).await;
    });
    assert_eq!(reply.unwrap().error_code(), Some(ErrorCode::BadRequest));
}

#[tokio::test]
async fn late_replies_become_unmatched() {
    let (client, mut fake) = session(opts(Auth::None), Some(SUBPROTOCOL_JSON)).await;
    let result = client.request_with_timeout(ClientOp::Ping, Duration::from_millis(50)).await;
    assert!(matches!(result, Err(ClientError::Timeout(_))));
    let (rid, op) = fake.recv_op().await;
    assert_eq!(op, ClientOp::Ping);
    fake.send(json!({"op": "pong", "rid": rid})).await;
    let late = client.next_unmatched_timeout(WAIT).await.unwrap();
    assert_eq!((late.op.as_str(), late.rid), ("pong", rid));

    let (rtt, ()) = tokio::join!(client.ping(), async {
        let (rid, _) = fake.recv_op().await;
        fake.send(json!({"op": "pong", "rid": rid})).await;
    });
    assert!(rtt.is_ok());
}

#[tokio::test]
async fn bye_and_server_close_are_recorded() {
    let (client, mut fake) = session(opts(Auth::None), Some(SUBPROTOCOL_JSON)).await;
    let server = async {
        let (rid, _) = fake.recv_op().await;
        assert!(rid.is_some());
        fake.send(json!({"op": "presence", "user": "bob", "online": true, "ts": 1})).await;
        fake.send(json!({"op": "bye", "code": 4009, "reason": "slow consumer"})).await;
        fake.close(4009, "slow consumer").await;
        while let Some(Ok(_)) = fake.ws.next().await {}
    };
    let (reply, ()) = tokio::join!(client.request(ClientOp::Rooms), server);
    match reply {
        Err(err @ ClientError::Closed(_)) => assert_eq!(err.close_code(), Some(4009)),
        other => panic!("expected the close, got {other:?}"),
    }
    let info = client.wait_closed(WAIT).await.unwrap();
    assert_eq!((info.code, info.reason.as_str()), (4009, "slow consumer"));
    assert_eq!(info.bye.unwrap().code, 4009);
    assert!(client.is_closed());
    // Events that arrived before the close are still delivered, then the stream ends.
    assert!(matches!(client.next_event().await, Some(ServerEvent::Presence { online: true, .. })));
    assert_eq!(client.next_event().await, None);
    assert_eq!(client.request(ClientOp::Rooms).await.unwrap_err().close_code(), Some(4009));
}

#[tokio::test]
async fn client_close_and_drop_send_1000() {
    let (client, mut fake) = session(opts(Auth::None), Some(SUBPROTOCOL_JSON)).await;
    let (info, code) = tokio::join!(client.close(), async {
        let code = fake.expect_close().await;
        // Let the server side answer the close.
        while let Some(Ok(_)) = fake.ws.next().await {}
        code
    });
    assert_eq!(code, 1000);
    assert_eq!(info.unwrap().code, 1000);
    assert!(client.send_raw_text("x".into()).await.is_err());

    let (client, mut fake) = session(opts(Auth::None), Some(SUBPROTOCOL_JSON)).await;
    drop(client);
    assert_eq!(fake.expect_close().await, 1000);
}

#[tokio::test]
async fn connection_lost_without_close_frame() {
    let (client, fake) = session(opts(Auth::None), Some(SUBPROTOCOL_JSON)).await;
    drop(fake);
    let info = client.wait_closed(WAIT).await.unwrap();
    assert_eq!(info.code, 1006);
    assert_eq!(client.next_event().await, None);
}
