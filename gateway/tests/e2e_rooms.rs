//! End to end through real NATS and Redis: tenants and tokens over HTTP, WebSocket sessions in both formats, room
//! joins and sends sequenced by router shards, delivery to every subscribed session, and history from the store.

mod support;

use std::collections::HashMap;
use std::time::Duration;
use support::Fleet;
use switchyard_client::{ClientOp, ErrorCode, Format, Reply, ServerEvent};
use switchyard_persistor::store::{HistoryQuery, HistoryStore};
use switchyard_protocol::{ProjectId, RoomId, UserId};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_travels_the_whole_path_in_both_formats() {
    let fleet = Fleet::start(1, 2).await;
    let tenant = fleet.create_tenant().await;
    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    let bob = fleet.connect(0, &fleet.token(&tenant, "bob").await, Format::MsgPack).await;
    assert_eq!(alice.hello().user.as_str(), "alice");
    assert_eq!(bob.hello().project_id.as_str(), tenant.project_id);
    assert_eq!(bob.format(), Format::MsgPack);

    let alice_joined_at = alice.join("general", None).await.expect("alice joins");
    assert_eq!(alice_joined_at, 1, "the first join creates the room and its first event");
    let bob_joined_at = bob.join("general", None).await.expect("bob joins");
    assert_eq!(bob_joined_at, 2);
    // Alice sees Bob join; Bob does not see his own join (it is at his join point).
    match alice.next_event_timeout(WAIT).await {
        Some(ServerEvent::Joined { seq: 2, user, .. }) => assert_eq!(user.as_str(), "bob"),
        other => panic!("expected bob's joined event, got {other:?}"),
    }

    let sent = alice.send("general", "hello, bob").await.expect("send");
    assert_eq!(sent.seq, 3);
    for client in [&alice, &bob] {
        match client.next_event_timeout(WAIT).await {
            Some(ServerEvent::Msg { seq, id, from, body, .. }) => {
                assert_eq!((seq, from.as_str(), body.as_str()), (3, "alice", "hello, bob"));
                assert_eq!(id, sent.id);
            }
            other => panic!("expected the message, got {other:?}"),
        }
    }
    let (messages, more) = bob.history("general", None, None, None).await.expect("history");
    assert!(!more);
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].seq, 3);
    assert_eq!(messages[0].body.as_deref(), Some("hello, bob"));
    assert_eq!(messages[0].from.as_ref().map(UserId::as_str), Some("alice"));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_messages_from_ten_clients_through_two_gateways() {
    let fleet = Fleet::start(2, 2).await;
    let tenant = fleet.create_tenant().await;
    let mut clients = Vec::new();
    for i in 0..10 {
        let token = fleet.token(&tenant, &format!("user{i}")).await;
        let format = if i % 2 == 0 { Format::Json } else { Format::MsgPack };
        clients.push(fleet.connect(i % 2, &token, format).await);
    }
    let mut join_points = Vec::new();
    for client in &clients {
        join_points.push(client.join("crowd", None).await.expect("join"));
    }
    let last_join = *join_points.iter().max().expect("ten joins");
    assert_eq!(last_join, 10, "ten joins, ten joined events, seq 1..=10");

    let clients = std::sync::Arc::new(clients);
    let mut senders = Vec::new();
    for i in 0..10 {
        let clients = clients.clone();
        senders.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for n in 0..100 {
                seqs.push(send_paced(&clients[i], "crowd", format!("message {n} from user{i}")).await);
            }
            seqs
        }));
    }
    let mut acked = Vec::new();
    for sender in senders {
        acked.extend(sender.await.expect("sender task"));
    }
    acked.sort_unstable();
    assert_eq!(acked, (last_join + 1..=last_join + 1000).collect::<Vec<_>>(), "acked seqs are gap-free");

    for (i, client) in clients.iter().enumerate() {
        let mut next = join_points[i] + 1;
        let mut messages = 0;
        let mut per_sender: HashMap<String, usize> = HashMap::new();
        while next <= last_join + 1000 {
            let event =
                client.next_event_timeout(WAIT).await.unwrap_or_else(|| panic!("client {i} stalled at seq {next}"));
            let seq = match &event {
                ServerEvent::Msg { seq, from, .. } => {
                    messages += 1;
                    *per_sender.entry(from.to_string()).or_default() += 1;
                    *seq
                }
                ServerEvent::Joined { seq, .. } => *seq,
                other => panic!("client {i}: unexpected event {other:?}"),
            };
            assert_eq!(seq, next, "client {i}: events in seq order with no gap and no duplicate");
            next += 1;
        }
        assert_eq!(messages, 1000, "client {i} got every message");
        assert!(per_sender.values().all(|&n| n == 100), "client {i}: 100 from each sender: {per_sender:?}");
        assert!(client.next_event_timeout(Duration::from_millis(200)).await.is_none(), "client {i}: no extra event");
    }

    // The store holds exactly the thousand messages, once each.
    let tenant_id = ProjectId::parse(&tenant.project_id).unwrap();
    let room = RoomId::parse("crowd").unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while fleet.store.last_seq(&tenant_id, &room).await.unwrap() < last_join + 1000 {
        assert!(tokio::time::Instant::now() < deadline, "persistor did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stored = Vec::new();
    let mut after = Some(0);
    loop {
        let query = HistoryQuery { tenant: tenant_id.clone(), room: room.clone(), before: None, after, limit: 100 };
        let page = fleet.store.history(&query).await.expect("store page");
        stored.extend(page.messages.iter().map(|m| m.seq));
        after = page.messages.last().map(|m| m.seq);
        if !page.more {
            break;
        }
    }
    assert_eq!(stored, (last_join + 1..=last_join + 1000).collect::<Vec<_>>(), "the store holds exactly 1,000 rows");

    let (latest, more) = clients[3].history("crowd", None, None, Some(100)).await.expect("history");
    assert!(more);
    assert_eq!(latest.first().map(|m| m.seq), Some(last_join + 901));
    assert_eq!(latest.last().map(|m| m.seq), Some(last_join + 1000));
    fleet.stop().await;
}

/// Send like a well-behaved client: on `rate_limited`, wait `retry_after_ms` and try again.
async fn send_paced(client: &switchyard_client::Client, room: &str, body: String) -> u64 {
    loop {
        let op = ClientOp::Send {
            room: RoomId::parse(room).unwrap(),
            body: body.clone(),
            attrs: None,
            reply_to: None,
            cmid: None,
        };
        match client.request(op).await.expect("send") {
            Reply::Ok(fields) => return fields["seq"].as_u64().expect("seq in ok"),
            Reply::Err { code: ErrorCode::RateLimited, retry_after_ms, .. } => {
                let wait = retry_after_ms.expect("rate_limited carries retry_after_ms");
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Reply::Err { code, message, .. } => panic!("send failed: {code}: {message}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_frames_get_bad_request_and_the_session_stays_open() {
    let fleet = Fleet::start(1, 1).await;
    let tenant = fleet.create_tenant().await;
    let client = fleet.connect(0, &fleet.token(&tenant, "mallory").await, Format::Json).await;
    let cases = [
        ("not json at all", None),
        (r#"{"op":"teleport","rid":11}"#, Some(11)),
        (r#"{"op":"send","rid":12,"room":"general","body":17}"#, Some(12)),
        (r#"{"op":"join","rid":13,"room":"bad.room>"}"#, Some(13)),
        (r#"{"op":"join","rid":14,"room":"x","since":"yesterday"}"#, Some(14)),
        (r#"[1,2,3]"#, None),
    ];
    for (frame, rid) in cases {
        client.send_raw_text(frame.to_owned()).await.expect("send raw");
        let reply = client.next_unmatched_timeout(WAIT).await.unwrap_or_else(|| panic!("no reply to {frame}"));
        assert_eq!(reply.op, "err", "{frame}");
        assert_eq!(reply.rid, rid, "{frame}");
        assert_eq!(reply.reply.error_code(), Some(ErrorCode::BadRequest), "{frame}");
    }
    client.ping().await.expect("the session is still open");
    let seq = client.join("general", None).await.expect("and still works");
    assert_eq!(seq, 1);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversize_bodies_and_non_members_are_refused_clearly() {
    let fleet = Fleet::start(1, 1).await;
    let tenant = fleet.create_tenant().await;
    let client = fleet.connect(0, &fleet.token(&tenant, "carol").await, Format::Json).await;
    let reply = client
        .request(ClientOp::Send {
            room: RoomId::parse("lobby").unwrap(),
            body: "x".repeat(16 * 1024 + 1),
            attrs: None,
            reply_to: None,
            cmid: None,
        })
        .await
        .expect("reply");
    assert_eq!(reply.error_code(), Some(ErrorCode::TooLarge));
    let error = client.send("lobby", "not a member yet").await.expect_err("non-members cannot send");
    assert_eq!(error.code(), Some(ErrorCode::Forbidden));
    client.ping().await.expect("still open");
    fleet.stop().await;
}

/// A router shard that dies between the append and the live publish leaves a hole in live delivery; sessions fill
/// it from the events stream. The hole is made for real: an event appended to the room's log, never published live.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_live_publish_is_filled_from_the_log() {
    use async_nats::jetstream::message::PublishMessage;
    use switchyard_protocol::internal::{EventBody, RoomEvent, INTERNAL_VERSION};
    use switchyard_protocol::{codec, shard::shard_of_room, subjects, MessageId, UserId};

    let fleet = Fleet::start(1, 1).await;
    let tenant = fleet.create_tenant().await;
    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    let bob = fleet.connect(0, &fleet.token(&tenant, "bob").await, Format::MsgPack).await;
    alice.join("holes", None).await.unwrap();
    bob.join("holes", None).await.unwrap();
    let first = alice.send("holes", "before").await.unwrap();
    for client in [&alice, &bob] {
        while let Some(event) = client.next_event_timeout(Duration::from_millis(300)).await {
            let _ = event;
        }
    }

    let tenant_id = ProjectId::parse(&tenant.project_id).unwrap();
    let room = RoomId::parse("holes").unwrap();
    let subject = subjects::event_log(shard_of_room(&tenant_id, &room, 64), &tenant_id, &room);
    let js = async_nats::jetstream::new(async_nats::connect(support::nats_servers()).await.unwrap());
    let stream = js.get_stream(subjects::EVENTS_STREAM).await.unwrap();
    let last = stream.get_last_raw_message_by_subject(&subject).await.unwrap();
    let previous: RoomEvent = codec::decode(&last.payload).unwrap();
    assert_eq!(previous.seq, first.seq);
    let lost = RoomEvent {
        v: INTERNAL_VERSION,
        tenant: tenant_id.clone(),
        room: room.clone(),
        seq: first.seq + 1,
        ts_us: previous.ts_us + 1,
        tally: Default::default(),
        expires_ms: None,
        body: EventBody::Msg {
            id: MessageId::generate(previous.ts_us / 1000),
            from: UserId::parse("alice").unwrap(),
            body: "appended, never published live".into(),
            attrs: None,
            reply_to: None,
        },
    };
    let publish =
        PublishMessage::build().payload(codec::encode(&lost).unwrap()).expected_last_subject_sequence(last.sequence);
    js.send_publish(subject, publish).await.unwrap().await.expect("appended like a router shard would");

    let after = alice.send("holes", "after").await.unwrap();
    assert_eq!(after.seq, first.seq + 2, "the router shard continued after the appended event");
    for client in [&alice, &bob] {
        let mut bodies = Vec::new();
        while bodies.len() < 2 {
            match client.next_event_timeout(WAIT).await {
                Some(ServerEvent::Msg { seq, body, .. }) => bodies.push((seq, body)),
                Some(_) => {}
                None => panic!("stalled after {bodies:?}"),
            }
        }
        assert_eq!(
            bodies,
            vec![(first.seq + 1, "appended, never published live".to_owned()), (after.seq, "after".to_owned())]
        );
    }
    fleet.stop().await;
}

/// A room's first 400 members join at the same moment (a class starting): its command queue (256) overflows, and
/// every join still succeeds, because the gateway sends again what a full queue did not take.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_join_storm_on_one_room_succeeds_for_everyone() {
    const MEMBERS: usize = 400;
    let fleet = Fleet::start(1, 1).await;
    let tenant = fleet.create_tenant().await;
    let mut clients = Vec::with_capacity(MEMBERS);
    for i in 0..MEMBERS {
        let token = fleet.token(&tenant, &format!("student{i}")).await;
        clients.push(fleet.connect(0, &token, Format::MsgPack).await);
    }
    let joins = clients.iter().map(|client| client.join("lecture", None));
    let results = futures::future::join_all(joins).await;
    let failed: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| format!("{e:?}"))).collect();
    assert!(failed.is_empty(), "{} of {MEMBERS} joins failed, e.g. {:?}", failed.len(), failed.first());
    // Every student is a member: the roster lists them all.
    let members = clients[0].request(ClientOp::Members { room: RoomId::parse("lecture").unwrap() }).await.unwrap();
    let listed = format!("{members:?}");
    let missing: Vec<usize> = (0..MEMBERS).filter(|i| !listed.contains(&format!("\"student{i}\""))).collect();
    assert!(missing.is_empty(), "{} students are not members, e.g. student{:?}", missing.len(), missing.first());
    let metrics = reqwest::get(format!("{}/metrics", fleet.router_metrics[0])).await.unwrap().text().await.unwrap();
    let full = metrics.lines().find(|l| l.starts_with("switchyard_router_room_queue_full_total")).unwrap_or("none");
    println!("room queue full: {full}");
    drop(clients);
    fleet.stop().await;
}
