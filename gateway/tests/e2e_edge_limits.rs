//! The edge's limits, each with its exact status, error or close code, through real NATS and Redis: origin
//! allow-list (403), subprotocols (400), frame size (1009), message body and HTTP body size (`too_large`), floods on
//! one connection (`rate_limited`, then 4008), the fleet-wide per-tenant message rate (`rate_limited` and 429 across
//! two gateways), the per-tenant connection quota across two gateways, connections that send nothing or stall in
//! their headers, and the cap on sockets waiting to authenticate. Sockets per user: `e2e_socket_quotas.rs`.

mod support;

use reqwest::Method;
use serde_json::json;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use support::{refusal, Fleet};
use switchyard_client::{Auth, ClientOp, ConnectOptions, ErrorCode, Format, Reply};
use switchyard_protocol::RoomId;

fn send_op(room: &str, body: String) -> ClientOp {
    ClientOp::Send { room: RoomId::parse(room).unwrap(), body, attrs: None, reply_to: None, cmid: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origins_subprotocols_and_sizes_are_enforced() {
    let fleet = Fleet::start_with(1, 1, |c| {
        c.allowed_origins = vec!["https://app.example".into()];
    })
    .await;
    let tenant = fleet.create_tenant().await;
    let token = fleet.token(&tenant, "sam").await;
    let connect = |origin: Option<&str>, subprotocols: Option<Vec<String>>| {
        let mut options = ConnectOptions::new(fleet.ws_url(0), Auth::Header(token.clone()));
        options.origin = origin.map(str::to_owned);
        options.subprotocols = subprotocols;
        switchyard_client::Client::connect(options)
    };
    assert_eq!(refusal(connect(None, None).await), 403, "no origin");
    assert_eq!(refusal(connect(Some("https://evil.example"), None).await), 403);
    assert_eq!(refusal(connect(Some("https://app.example"), Some(vec!["chat.v9".into()])).await), 400);
    let client = connect(Some("https://app.example"), None).await.expect("allowed origin");

    // A message body over 16 KiB is `too_large`; the session stays open.
    client.join("big", None).await.expect("join");
    let reply = client.request(send_op("big", "x".repeat(16 * 1024 + 1))).await.unwrap();
    assert!(matches!(reply, Reply::Err { code: ErrorCode::TooLarge, .. }), "{reply:?}");
    client.ping().await.expect("still open");

    // A cmid with a control character would become a NATS header with a line break in it: refused at once as
    // `bad_request`, and the next send works.
    for (i, cmid) in ["a\rb", "a\nb", "a\0b", "a\tb"].into_iter().enumerate() {
        let started = Instant::now();
        let op = ClientOp::Send {
            room: RoomId::parse("big").unwrap(),
            body: "x".into(),
            attrs: None,
            reply_to: None,
            cmid: Some(cmid.into()),
        };
        let reply = client.request(op).await.unwrap();
        let took = started.elapsed();
        assert!(matches!(reply, Reply::Err { code: ErrorCode::BadRequest, .. }), "cmid {cmid:?}: {reply:?}");
        assert!(took < Duration::from_secs(1), "cmid {cmid:?} took {took:?} to be refused");
        let next = ClientOp::Send {
            room: RoomId::parse("big").unwrap(),
            body: "after".into(),
            attrs: None,
            reply_to: None,
            cmid: Some(format!("ok-{i}")),
        };
        let reply = client.request(next).await.unwrap();
        assert!(matches!(reply, Reply::Ok(_)), "the send after cmid {cmid:?}: {reply:?}");
    }

    // Over HTTP: a body field over 16 KiB, and a request body over the HTTP limit, are 413 `too_large`.
    let path = "/v1/rooms/big/messages";
    let long = fleet
        .call(0, Method::POST, path, &tenant.api_key, Some(json!({"from": "sam", "body": "y".repeat(16 * 1024 + 1)})))
        .await;
    assert_eq!((long.status, long.body["code"].as_str()), (413, Some("too_large")));
    let huge = fleet
        .call(0, Method::POST, path, &tenant.api_key, Some(json!({"from": "sam", "body": "z".repeat(100 * 1024)})))
        .await;
    assert_eq!((huge.status, huge.body["code"].as_str()), (413, Some("too_large")));

    // A frame over 64 KiB closes the socket with 1009.
    client.send_raw_text("w".repeat(64 * 1024 + 10)).await.unwrap();
    let closed = client.wait_closed(Duration::from_secs(5)).await.expect("closed");
    assert_eq!(closed.code, 1009);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_connection_is_rate_limited_then_closed_with_4008() {
    let fleet = Fleet::start(1, 1).await;
    let tenant = fleet.create_tenant().await;
    let flooder = fleet.connect(0, &fleet.token(&tenant, "flood").await, Format::Json).await;
    let neighbour = fleet.connect(0, &fleet.token(&tenant, "calm").await, Format::Json).await;

    // Pipelined pings, never waiting: first the burst passes, then `rate_limited` with a retry time, then 4008.
    for _ in 0..200 {
        if flooder.send_op(ClientOp::Ping).await.is_err() {
            break;
        }
    }
    let mut rate_limited = None;
    while let Some(reply) = flooder.next_unmatched_timeout(Duration::from_secs(5)).await {
        if let Reply::Err { code: ErrorCode::RateLimited, retry_after_ms, .. } = reply.reply {
            rate_limited = Some(retry_after_ms);
            break;
        }
    }
    let retry_after_ms = rate_limited.expect("a rate_limited reply before the close");
    assert!(retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 1_000), "{retry_after_ms:?}");
    let closed = flooder.wait_closed(Duration::from_secs(5)).await.expect("closed");
    assert_eq!(closed.code, 4008, "{closed:?}");
    assert_eq!(closed.bye.map(|b| b.code), Some(4008));
    neighbour.ping().await.expect("another connection is unaffected");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_tenant_message_rate_and_the_connection_quota_are_fleet_wide() {
    let fleet = Fleet::start(2, 1).await;
    let limited = fleet.create_tenant().await;
    let other = fleet.create_tenant().await;
    fleet.set_limits(&limited, json!({"msgs_per_sec": 2, "msgs_burst": 6, "max_connections": 4})).await;
    let on_0 = fleet.connect(0, &fleet.token(&limited, "a").await, Format::Json).await;
    let on_1 = fleet.connect(1, &fleet.token(&limited, "b").await, Format::MsgPack).await;
    on_0.join("room", None).await.unwrap();
    on_1.join("room", None).await.unwrap();

    // Twelve sends, alternating gateways, as fast as the replies come: the shared bucket (burst 6) runs dry.
    let started = Instant::now();
    let (mut ok, mut limited_replies) = (0, 0);
    for i in 0..12 {
        let client = if i % 2 == 0 { &on_0 } else { &on_1 };
        match client.request(send_op("room", format!("m{i}"))).await.unwrap() {
            Reply::Ok(_) => ok += 1,
            Reply::Err { code: ErrorCode::RateLimited, retry_after_ms, .. } => {
                assert!(retry_after_ms.is_some_and(|ms| ms > 0), "retry_after_ms");
                limited_replies += 1;
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    let allowed = 6 + (started.elapsed().as_secs_f64() * 2.0).ceil() as usize;
    assert!(ok <= allowed, "{ok} sends passed; at most {allowed} may");
    assert!(limited_replies >= 12 - allowed, "{limited_replies} rate_limited");
    assert!(limited_replies > 0);
    // The HTTP API draws from the same bucket.
    let answer = fleet
        .call(1, Method::POST, "/v1/rooms/room/messages", &limited.api_key, Some(json!({"from": "a", "body": "http"})))
        .await;
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert_eq!(answer.body["code"], "rate_limited");
    assert!(answer.body["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0));

    // Another tenant is not affected.
    let free = fleet.connect(0, &fleet.token(&other, "a").await, Format::Json).await;
    free.join("room", None).await.unwrap();
    for i in 0..12 {
        free.send("room", format!("free {i}")).await.expect("other tenant sends freely");
    }

    // The connection quota (4 across the fleet): with two sockets on each gateway, a fifth is refused on either,
    // before or after the upgrade, though neither gateway holds more than two.
    let second = fleet.connect(0, &fleet.token(&limited, "c").await, Format::Json).await;
    let _fourth = fleet.connect(1, &fleet.token(&limited, "e").await, Format::Json).await;
    let third = fleet.token(&limited, "d").await;
    // Counts reach Redis a moment after a socket opens: a connect right after may still be admitted.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(admitted) = fleet.try_connect(0, Auth::Header(third.clone())).await {
        assert!(Instant::now() < deadline, "a fifth socket was still admitted after 5 s");
        drop(admitted);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refusal(fleet.try_connect(0, Auth::Header(third.clone())).await), 429);
    assert_eq!(refusal(fleet.try_connect(1, Auth::Header(third.clone())).await), 429);
    assert_eq!(refusal(fleet.try_connect(0, Auth::FirstFrame(third.clone())).await), 4008);
    drop(second);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fleet.try_connect(0, Auth::Header(third.clone())).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(error) => panic!("a freed slot is usable again: {error:?}"),
        }
    }
    fleet.stop().await;
}

/// Read until EOF or error; the time since `started` when that happened.
fn time_until_closed(mut stream: std::net::TcpStream, started: Instant) -> Duration {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn silent_and_stalling_connections_are_closed() {
    let fleet = Fleet::start_with(1, 1, |c| c.header_read_timeout_ms = 500).await;
    let tenant = fleet.create_tenant().await;
    let token = fleet.token(&tenant, "patient").await;
    let addr = fleet.gateways[0].trim_start_matches("http://").to_owned();

    let started = Instant::now();
    let silent = std::net::TcpStream::connect(&addr).unwrap();
    let mut stalling = std::net::TcpStream::connect(&addr).unwrap();
    stalling.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
    let silent = tokio::task::spawn_blocking(move || time_until_closed(silent, started));
    let stalling = tokio::task::spawn_blocking(move || time_until_closed(stalling, started));
    let (silent, stalling) = (silent.await.unwrap(), stalling.await.unwrap());
    for (what, took) in [("silent", silent), ("stalling", stalling)] {
        assert!(took < Duration::from_secs(3), "{what} connection lived {took:?}");
        assert!(took >= Duration::from_millis(300), "{what} connection closed early ({took:?})");
    }

    // Requests and WebSockets that outlive the header timeout are unaffected.
    let health = fleet.http.get(format!("{}/healthz", fleet.gateways[0])).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let client = fleet.connect(0, &token, Format::Json).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    client.ping().await.expect("an upgraded socket is not subject to the header timeout");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_watches_cannot_pass_the_watch_cap_together() {
    let fleet = Fleet::start(1, 1).await;
    let tenant = fleet.create_tenant().await;
    let client = fleet.connect(0, &fleet.token(&tenant, "wanda").await, Format::Json).await;
    // Eleven watches of 100 new users each, sent at once: each fits the cap of 1,000 alone, all of them do not.
    let watches = (0..11).map(|batch| {
        let users = (0..100).map(|i| switchyard_protocol::UserId::parse(&format!("u{batch}-{i}")).unwrap()).collect();
        client.request(ClientOp::Watch { users })
    });
    let replies = futures::future::join_all(watches).await;
    let refused = replies
        .iter()
        .filter(
            |r| matches!(r, Ok(Reply::Err { code: ErrorCode::BadRequest, message, .. }) if message.contains("1000")),
        )
        .count();
    let accepted = replies.iter().filter(|r| matches!(r, Ok(Reply::Ok(_)))).count();
    assert_eq!((accepted, refused), (10, 1), "{replies:?}");
    fleet.stop().await;
}

/// Upgrade to a WebSocket over a raw TCP connection without a token, and send nothing more; the status line's code.
fn upgrade_without_token(addr: &str) -> (std::net::TcpStream, u16) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
        .write_all(
            b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    let status = std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap();
    (stream, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sockets_waiting_to_authenticate_are_capped_per_gateway() {
    let fleet = Fleet::start_with(1, 1, |c| c.max_unauthenticated = 2).await;
    let tenant = fleet.create_tenant().await;
    let addr = fleet.gateways[0].trim_start_matches("http://").to_owned();
    let first = tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || (upgrade_without_token(&addr), upgrade_without_token(&addr), upgrade_without_token(&addr))
    });
    let ((one, s1), (_two, s2), (_three, s3)) = first.await.unwrap();
    assert_eq!((s1, s2, s3), (101, 101, 503), "two sockets may wait to authenticate, the third is refused");
    // A socket with a token does not wait, and is admitted.
    let token = fleet.token(&tenant, "tokened").await;
    let client = fleet.connect(0, &token, Format::Json).await;
    client.ping().await.expect("a socket with a token is not capped");
    // A waiting socket that goes away frees its place.
    drop(one);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let addr = addr.clone();
        let (_socket, status) = tokio::task::spawn_blocking(move || upgrade_without_token(&addr)).await.unwrap();
        if status == 101 {
            break;
        }
        assert!(Instant::now() < deadline, "the freed place was never usable (last status {status})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_sets_how_many_users_a_session_watches() {
    let fleet = Fleet::start(1, 1).await;
    let small = fleet.create_tenant().await;
    let other = fleet.create_tenant().await;
    fleet.set_limits(&small, json!({"max_watched_per_session": 5})).await;
    let users = |from: usize, to: usize| -> Vec<switchyard_protocol::UserId> {
        (from..to).map(|i| switchyard_protocol::UserId::parse(&format!("w{i}")).unwrap()).collect()
    };
    let watcher = fleet.connect(0, &fleet.token(&small, "watcher").await, Format::Json).await;
    assert!(matches!(watcher.request(ClientOp::Watch { users: users(0, 4) }).await, Ok(Reply::Ok(_))));
    match watcher.request(ClientOp::Watch { users: users(4, 6) }).await {
        Ok(Reply::Err { code: ErrorCode::BadRequest, message, .. }) => {
            assert!(message.contains("at most 5 users"), "{message}")
        }
        other => panic!("a sixth watched user is refused: {other:?}"),
    }
    // Users watched already do not count twice, and the fifth still fits.
    assert!(matches!(watcher.request(ClientOp::Watch { users: users(0, 5) }).await, Ok(Reply::Ok(_))));
    // Another tenant keeps the default of 1,000.
    let free = fleet.connect(0, &fleet.token(&other, "watcher").await, Format::Json).await;
    assert!(matches!(free.request(ClientOp::Watch { users: users(0, 100) }).await, Ok(Reply::Ok(_))));
    // The quota is checked by the admin API.
    let path = format!("/v1/admin/tenants/{}/limits", small.project_id);
    let too_many = json!({"max_watched_per_session": 10_001});
    let answer = fleet.call(0, Method::PUT, &path, &fleet.admin_token, Some(too_many)).await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    fleet.stop().await;
}
