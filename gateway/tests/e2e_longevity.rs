//! Membership and resume on the paths where a step fails or an event is missed, through a real fleet: a kick whose
//! append the stream refuses takes effect when repeated; a `left` lost from live delivery and filled from the
//! stream stops the room for the removed user; a client that stops reading during a `join {since}` replay is
//! closed 4009 while the gateway's memory stays bounded.

mod chat_support;
mod support;

use chat_support::*;
use futures::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use support::Fleet;
use switchyard_client::{ClientOp, ErrorCode, Format, Reply, ServerEvent};
use switchyard_protocol::internal::{EventBody, RoomEvent, INTERNAL_VERSION};
use switchyard_protocol::shard::shard_of_room;
use switchyard_protocol::{codec, limits, subjects, ProjectId};
use tokio_tungstenite::tungstenite::Message as WsMessage;

async fn fleet(adjust: impl Fn(&mut switchyard_gateway::GatewayConfig)) -> Fleet {
    Fleet::start_with(1, 1, |config| {
        config.ops_per_sec = 100_000;
        config.ops_burst = 100_000;
        config.tenant_msgs_per_sec = 1_000_000;
        config.tenant_msgs_burst = 1_000_000;
        adjust(config);
    })
    .await
}

/// The events stream, for fault injection and direct reads.
async fn events_stream() -> (async_nats::jetstream::Context, async_nats::jetstream::stream::Stream) {
    let nats = async_nats::connect(support::nats_servers()).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(nats);
    let stream = js.get_stream(subjects::EVENTS_STREAM).await.expect("events stream");
    (js, stream)
}

/// Set the events stream's largest message: a tiny one makes every append fail, -1 lifts the limit.
async fn set_max_message_size(js: &async_nats::jetstream::Context, size: i32) {
    let mut stream = js.get_stream(subjects::EVENTS_STREAM).await.expect("events stream");
    let mut config = stream.info().await.expect("stream info").config.clone();
    config.max_message_size = size;
    js.update_stream(config).await.expect("update the events stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kick_whose_append_fails_takes_effect_when_repeated() {
    let fleet = fleet(|_| {}).await;
    let tenant = fleet.create_tenant().await;
    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    let bob = fleet.connect(0, &fleet.token(&tenant, "bob").await, Format::MsgPack).await;
    ok(&alice, ClientOp::Create { room: room("vault"), private: true, title: None }).await;
    ok(&alice, ClientOp::Invite { room: room("vault"), user: user("bob") }).await;
    bob.join("vault", None).await.expect("bob joins");
    alice.send("vault", "before").await.expect("send before the kick");
    next_where(&bob, "the message before the kick", |e| matches!(e, ServerEvent::Msg { .. })).await;

    let (js, _) = events_stream().await;
    set_max_message_size(&js, 16).await;
    let kick = ClientOp::Kick { room: room("vault"), user: user("bob") };
    let refused_kick = alice.request(kick.clone()).await.expect("kick request");
    set_max_message_size(&js, -1).await;
    match refused_kick {
        Reply::Err { code, .. } => assert_eq!(code, ErrorCode::Unavailable, "a refused append is unavailable"),
        Reply::Ok(fields) => panic!("the kick succeeded although the stream refused every append: {fields:?}"),
    }
    // Nothing happened: bob is still a member and still receives the room.
    let members = ok(&alice, ClientOp::Members { room: room("vault") }).await;
    assert!(
        serde_json::Value::Object(members.clone()).to_string().contains("\"bob\""),
        "bob left the roster without a left event: {members:?}"
    );

    // The repeat completes the kick.
    ok(&alice, kick).await;
    match next_where(&bob, "bob's left", |e| matches!(e, ServerEvent::Left { .. } | ServerEvent::Msg { .. })).await {
        ServerEvent::Left { user, .. } => assert_eq!(user.as_str(), "bob"),
        other => panic!("expected bob's left, got {other:?}"),
    }
    for i in 0..5 {
        alice.send("vault", format!("after {i}")).await.expect("send after the kick");
    }
    none_where(&bob, "an event after bob's left", |e| seq_of(e).is_some()).await;
    let members = ok(&alice, ClientOp::Members { room: room("vault") }).await;
    assert!(
        !serde_json::Value::Object(members.clone()).to_string().contains("\"bob\""),
        "bob is still listed: {members:?}"
    );
    refused(
        &bob,
        ClientOp::Send { room: room("vault"), body: "x".into(), attrs: None, reply_to: None, cmid: None },
        ErrorCode::Forbidden,
    )
    .await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_left_lost_from_live_delivery_stops_the_room_where_the_hole_is_filled() {
    let fleet = fleet(|_| {}).await;
    let tenant = fleet.create_tenant().await;
    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    let bob = fleet.connect(0, &fleet.token(&tenant, "bob").await, Format::Json).await;
    alice.join("lobby", None).await.expect("alice creates the room");
    let joined = bob.join("lobby", None).await.expect("bob joins");
    alice.send("lobby", "hello").await.expect("send");
    next_where(&bob, "hello", |e| matches!(e, ServerEvent::Msg { .. })).await;

    // bob's `left` reaches the stream but is never published live, as when its router shard dies between the
    // append and the live publish.
    let (_, stream) = events_stream().await;
    let tenant_id = ProjectId::parse(&tenant.project_id).expect("project id");
    let lobby = room("lobby");
    let subject =
        subjects::event_log(shard_of_room(&tenant_id, &lobby, limits::DEFAULT_SHARD_COUNT), &tenant_id, &lobby);
    let last = stream.get_last_raw_message_by_subject(&subject).await.expect("the room's last event");
    let last_event: RoomEvent = codec::decode(&last.payload).expect("decode");
    assert_eq!(last_event.seq, joined + 1);
    let left = RoomEvent {
        v: INTERNAL_VERSION,
        tenant: tenant_id.clone(),
        room: lobby.clone(),
        seq: last_event.seq + 1,
        ts_us: last_event.ts_us + 1,
        tally: Default::default(),
        expires_ms: None,
        body: EventBody::Left { user: user("bob"), by: Some(user("alice")) },
    };
    let nats = async_nats::connect(support::nats_servers()).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(nats);
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(codec::encode(&left).expect("encode"))
        .expected_last_subject_sequence(last.sequence);
    js.send_publish(subject, publish).await.expect("append").await.expect("append acked");

    // The next live event shows bob's session a hole; it fills it from the stream and stops at its own `left`.
    alice.send("lobby", "after the hole").await.expect("send after the hole");
    match next_where(&bob, "bob's left", |e| seq_of(e).is_some()).await {
        ServerEvent::Left { user, seq, .. } => {
            assert_eq!(user.as_str(), "bob");
            assert_eq!(seq, left.seq);
        }
        other => panic!("expected bob's left from the hole, got {other:?}"),
    }
    alice.send("lobby", "later").await.expect("send later");
    none_where(&bob, "an event after bob's left", |e| seq_of(e).is_some()).await;
    fleet.stop().await;
}

/// The resident set of this process (the in-process gateway and everything else), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// The gateway's count of sessions closed as slow consumers, from its `/metrics`.
/// How many sessions the first gateway has closed with 4009 (slow consumer).
async fn slow_consumer_closes(fleet: &Fleet) -> u64 {
    let text = fleet.http.get(format!("{}/metrics", fleet.gateways[0])).send().await.expect("metrics");
    let text = text.text().await.expect("metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix(r#"switchyard_gateway_closes_total{code="4009"} "#))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_stops_reading_during_a_replay_is_closed_4009() {
    const EVENTS: usize = 10_000;
    const STUCK: usize = 20;
    let fleet = fleet(|config| config.resume_stall_ms = 1_000).await;
    let tenant = fleet.create_tenant().await;
    let alice = std::sync::Arc::new(fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await);
    alice.join("archive", None).await.expect("alice creates the room");
    let bob_token = fleet.token(&tenant, "bob").await;
    let bob = fleet.connect(0, &bob_token, Format::Json).await;
    let since = bob.join("archive", None).await.expect("bob joins");
    bob.close().await;
    let body = "x".repeat(1_000);
    let senders: Vec<_> = (0..8)
        .map(|part| {
            let (alice, body) = (alice.clone(), body.clone());
            tokio::spawn(async move {
                for _ in 0..EVENTS / 8 {
                    alice.send("archive", body.clone()).await.unwrap_or_else(|e| panic!("sender {part}: {e}"));
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.expect("sender");
    }
    let before = rss_kib();

    // Sockets that ask for the whole replay and then read nothing.
    let url = format!("{}?token={}", fleet.ws_url(0), bob_token);
    let mut stuck = Vec::new();
    for _ in 0..STUCK {
        let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url.as_str())
            .expect("request");
        request.headers_mut().insert("Sec-WebSocket-Protocol", "switchyard.v1.json".parse().expect("header"));
        // A small receive buffer, so the kernel cannot absorb the replay for the client.
        let tcp = tokio::net::TcpSocket::new_v4().expect("socket");
        tcp.set_recv_buffer_size(16 * 1024).expect("receive buffer");
        let address = fleet.gateways[0].trim_start_matches("http://").parse().expect("gateway address");
        let tcp = tcp.connect(address).await.expect("connect");
        let (mut socket, _) = tokio_tungstenite::client_async(request, tcp).await.expect("upgrade");
        let join = format!(r#"{{"op":"join","rid":1,"room":"archive","since":{since}}}"#);
        socket.send(WsMessage::text(join)).await.expect("send join");
        stuck.push(socket);
    }
    // Wait until the gateway has closed all of them as slow consumers, keeping the highest RSS seen meanwhile.
    let mut during = rss_kib();
    let deadline = Instant::now() + Duration::from_secs(90);
    while slow_consumer_closes(&fleet).await < STUCK as u64 {
        assert!(Instant::now() < deadline, "the stuck replays were not all closed within 90 s");
        during = during.max(rss_kib());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Reading now finds the start of the replay, then the end of the socket: the close frame when it still fitted
    // in the socket's buffers, a reset otherwise (the gateway gives up on a socket that takes nothing).
    let started = Instant::now();
    for (i, socket) in stuck.iter_mut().enumerate() {
        let mut replayed = 0;
        loop {
            match tokio::time::timeout(Duration::from_secs(20), socket.next()).await {
                Ok(Some(Ok(WsMessage::Close(Some(frame))))) => {
                    assert_eq!(u16::from(frame.code), 4009, "socket {i} after {replayed} replayed events");
                    break;
                }
                Ok(Some(Ok(WsMessage::Text(text)))) if text.contains(r#""op":"msg""#) => replayed += 1,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => break,
                Err(_) => panic!("socket {i} was not closed ({replayed} replayed events read)"),
            }
        }
        assert!(replayed < EVENTS, "socket {i} received the whole replay although it did not read");
    }
    let growth_mib = during.saturating_sub(before) / 1024;
    println!(
        "{STUCK} stuck replays of {EVENTS} events of 1 KiB: process RSS grew {growth_mib} MiB during them; all \
         closed 4009 ({:.1} s to read them out)",
        started.elapsed().as_secs_f64()
    );
    // Each stuck replay holds at most its session's half queue (512 KiB) and one batch (256 KiB).
    assert!(growth_mib < 64, "stuck replays grew the process by {growth_mib} MiB");

    // A reading client gets the whole replay, then the `ok`, then live events.
    let carol = fleet.connect(0, &bob_token, Format::Json).await;
    let seq = carol.join("archive", Some(since)).await.expect("a full replay");
    let mut last = since;
    while last < seq {
        match carol.next_event_timeout(WAIT).await {
            Some(event) => {
                let event_seq = seq_of(&event).expect("a sequenced event");
                assert_eq!(event_seq, last + 1, "the replay skipped or repeated");
                last = event_seq;
            }
            None => panic!("the replay stopped at {last} of {seq}"),
        }
    }
    fleet.stop().await;
}

/// A router shard's metric, from its metrics listener.
async fn router_metric(fleet: &Fleet, name: &str) -> Option<f64> {
    let text = fleet.http.get(format!("{}/metrics", fleet.router_metrics[0])).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_events_stream_refuses_sends_and_its_fill_level_is_reported() {
    let fleet = fleet(|_| {}).await;
    let tenant = fleet.create_tenant().await;
    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    alice.join("full", None).await.expect("join");

    // Bound the stream a little above what it holds, as a stream created with stream_max_bytes is.
    let (js, mut stream) = events_stream().await;
    let info = stream.info().await.expect("stream info").clone();
    let original = info.config.clone();
    let bound = info.state.bytes as i64 + 32 * 1024;
    let mut bounded = original.clone();
    bounded.max_bytes = bound;
    bounded.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    js.update_stream(bounded).await.expect("bound the events stream");

    let body = "f".repeat(1_000);
    let (mut stored, mut refusal) = (0, None);
    for _ in 0..200 {
        let op = ClientOp::Send { room: room("full"), body: body.clone(), attrs: None, reply_to: None, cmid: None };
        match alice.request(op).await.expect("send") {
            Reply::Ok(_) => stored += 1,
            Reply::Err { code, message, .. } => {
                refusal = Some((code, message));
                break;
            }
        }
    }
    let reported = async {
        loop {
            if router_metric(&fleet, "switchyard_router_events_stream_max_bytes").await == Some(bound as f64) {
                return router_metric(&fleet, "switchyard_router_events_stream_bytes").await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let bytes = tokio::time::timeout(Duration::from_secs(40), reported).await;
    js.update_stream(original).await.expect("lift the bound");

    let (code, message) = refusal.expect("the full stream refused a send");
    assert_eq!(code, ErrorCode::Unavailable, "{message}");
    assert!(stored > 0, "the stream refused every send, not only those past its bound");
    let bytes = bytes.expect("the router shard reported the stream's bound within 40 s").expect("its bytes too");
    assert!(bytes > 0.0 && bytes <= bound as f64, "reported {bytes} bytes for a bound of {bound}");
    println!("{stored} sends stored, then refused ({message}); reported {bytes} of {bound} bytes");
    // With the bound lifted, sends are stored again and nothing stored before was lost.
    let seq = alice.send("full", "after the bound").await.expect("send after the bound is lifted").seq;
    assert_eq!(seq, 1 + stored + 1, "seqs continue after the refused sends");
    fleet.stop().await;
}
