//! Unread counts and previews end to end, through real NATS and Redis, on the embedded store and on the real
//! Cassandra: `rooms` tells each room's unread count and latest message from the room's last event and the user's
//! read marker, the same on every device, and a `read` reaches the reader's other sessions at once.

mod chat_support;
mod support;

use chat_support::*;
use reqwest::Method;
use serde_json::json;
use support::{Fleet, StoreKind};
use switchyard_client::{Client, ClientOp, Format, RoomSummary, ServerEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unread_counts_on_the_embedded_store() {
    unread_counts(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unread_counts_on_cql() {
    unread_counts(StoreKind::Cql).await;
}

async fn listed(client: &Client, room_id: &str) -> RoomSummary {
    let rooms = client.rooms().await.expect("rooms");
    rooms.into_iter().find(|summary| summary.room.as_str() == room_id).expect("the room is listed")
}

/// The next `read` event carrying an unread count (the reader's own, from another session).
async fn own_read(client: &Client) -> (u64, Option<u64>) {
    match next_where(client, "an own read", |e| matches!(e, ServerEvent::Read { unread: Some(_), .. })).await {
        ServerEvent::Read { seq, unread, .. } => (seq, unread),
        other => panic!("not a read: {other:?}"),
    }
}

async fn unread_counts(store: StoreKind) {
    let fleet = Fleet::start_on(store, 2, 2, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
    })
    .await;
    let tenant = fleet.create_tenant().await;
    fleet.set_limits(&tenant, json!({"msgs_per_sec": 5_000, "msgs_burst": 5_000})).await;
    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    let bob_phone = fleet.connect(0, &fleet.token(&tenant, "bob").await, Format::MsgPack).await;
    let bob_laptop = fleet.connect(1, &fleet.token(&tenant, "bob").await, Format::Json).await;
    alice.join("lounge", None).await.expect("join");
    bob_phone.join("lounge", None).await.expect("join");
    let mut sent = Vec::new();
    for body in ["one", "two", "three"] {
        sent.push(alice.send("lounge", body).await.expect("send").seq);
    }
    let react = ClientOp::React { room: room("lounge"), seq: sent[0], emoji: "+1".into(), remove: false };
    let reaction = ok(&bob_phone, react).await["seq"].as_u64().expect("seq");

    // Both of bob's devices see the same: three messages unread (a reaction is none), the third as the preview.
    for device in [&bob_phone, &bob_laptop] {
        let summary = listed(device, "lounge").await;
        assert_eq!((summary.seq, summary.read, summary.unread), (reaction, 0, 3), "{summary:?}");
        let last = summary.last_message.expect("a preview");
        assert_eq!((last.seq, last.from.as_str(), last.body.as_str()), (sent[2], "alice", "three"));
    }
    // A member who joins later has only what follows the join unread.
    let carol = fleet.connect(1, &fleet.token(&tenant, "carol").await, Format::Json).await;
    carol.join("lounge", None).await.expect("join");
    assert_eq!(listed(&carol, "lounge").await.unread, 0);
    sent.push(alice.send("lounge", "four").await.expect("send").seq);
    assert_eq!(listed(&carol, "lounge").await.unread, 1);

    // A read on the phone reaches the laptop, which does not receive the room, with what is left unread; the
    // phone, which receives the room, gets the room's read only.
    drain(&bob_laptop).await;
    assert_eq!(bob_phone.read("lounge", sent[1]).await.expect("read"), sent[1]);
    assert_eq!(own_read(&bob_laptop).await, (sent[1], Some(2)));
    let room_read = next_where(&bob_phone, "the room's read", |e| matches!(e, ServerEvent::Read { .. })).await;
    assert!(matches!(room_read, ServerEvent::Read { unread: None, .. }), "{room_read:?}");
    none_where(&bob_phone, "a second read", |e| matches!(e, ServerEvent::Read { .. })).await;
    let summary = listed(&bob_laptop, "lounge").await;
    assert_eq!((summary.read, summary.unread), (sent[1], 2));

    // The preview follows an edit and a deletion of the latest message.
    let edit = ClientOp::Edit { room: room("lounge"), seq: sent[3], body: "four, edited".into() };
    ok(&alice, edit).await;
    let last = listed(&bob_laptop, "lounge").await.last_message.expect("a preview");
    assert_eq!((last.seq, last.body.as_str(), last.edited), (sent[3], "four, edited", true));
    ok(&alice, ClientOp::Delete { room: room("lounge"), seq: sent[3] }).await;
    let summary = listed(&bob_laptop, "lounge").await;
    let last = summary.last_message.clone().expect("a preview");
    assert_eq!((last.body.as_str(), last.deleted, summary.unread), ("", true, 2), "{summary:?}");

    // A direct message is unread for its recipient, on every device.
    let (dm, _) = alice.dm("bob", "psst").await.expect("dm");
    let summary = listed(&bob_laptop, dm.as_str()).await;
    assert_eq!((summary.unread, summary.last_message.map(|last| last.body)), (1, Some("psst".to_owned())));
    let dm_seq = summary.seq;
    drain(&bob_laptop).await;
    bob_phone.read(dm.as_str(), dm_seq).await.expect("read the dm");
    let read = next_where(&bob_laptop, "the dm's read", |e| matches!(e, ServerEvent::Read { .. })).await;
    assert!(matches!(read, ServerEvent::Read { seq, .. } if seq == dm_seq), "{read:?}");
    assert_eq!(listed(&bob_laptop, dm.as_str()).await.unread, 0);

    // More messages than a room's actor keeps counts of: a read far back is counted from the stream.
    let mut many = Vec::new();
    for n in 0..530 {
        let post = json!({"from": "alice", "body": format!("bulk {n}")});
        let answer = fleet.call(0, Method::POST, "/v1/rooms/lounge/messages", &tenant.api_key, Some(post)).await;
        assert_eq!(answer.status, 201, "{}", answer.body);
        many.push(answer.body["seq"].as_u64().expect("seq"));
    }
    drain(&bob_laptop).await;
    bob_phone.read("lounge", many[9]).await.expect("read far back");
    assert_eq!(own_read(&bob_laptop).await, (many[9], Some(520)));
    let summary = listed(&bob_laptop, "lounge").await;
    assert_eq!((summary.unread, summary.last_message.map(|last| last.body)), (520, Some("bulk 529".to_owned())));
    fleet.stop().await;
}
