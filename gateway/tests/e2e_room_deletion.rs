//! Deleting a room end to end, through real NATS and Redis, on the embedded store and on the real Cassandra: the
//! backend's `DELETE /v1/rooms/{room}` tells the sessions in the room with a `room_deleted` event, erases its
//! history, ends every membership, and frees the name for a new room that starts with nothing of the old one.

mod chat_support;
mod support;

use chat_support::*;
use reqwest::Method;
use serde_json::json;
use support::{Fleet, StoreKind};
use switchyard_client::{ClientOp, ErrorCode, Format, ServerEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_deletion_on_the_embedded_store() {
    room_deletion(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_deletion_on_cql() {
    room_deletion(StoreKind::Cql).await;
}

async fn room_deletion(store: StoreKind) {
    let fleet = Fleet::start_on(store, 2, 2, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
    })
    .await;
    let tenant = fleet.create_tenant().await;
    // One room at a time: the room created again below fits only because the deleted one freed its place.
    fleet.set_limits(&tenant, json!({"max_rooms": 1})).await;
    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    let bob = fleet.connect(1, &fleet.token(&tenant, "bob").await, Format::MsgPack).await;
    ok(&alice, ClientOp::Create { room: room("attic"), private: true, title: Some("old things".into()) }).await;
    ok(&alice, ClientOp::Invite { room: room("attic"), user: user("bob") }).await;
    alice.join("attic", None).await.expect("join");
    bob.join("attic", None).await.expect("join");
    let first = alice.send("attic", "an old secret").await.expect("send").seq;
    let reply =
        ClientOp::Send { room: room("attic"), body: "a reply".into(), attrs: None, reply_to: Some(first), cmid: None };
    ok(&bob, reply).await;
    ok(&bob, ClientOp::React { room: room("attic"), seq: first, emoji: "👀".into(), remove: false }).await;
    let (before, _) = bob.history("attic", None, None, None).await.expect("history");
    assert_eq!(before.len(), 2);

    // The backend deletes it: both sessions are told, in order after everything before.
    let deleted = fleet.call(0, Method::DELETE, "/v1/rooms/attic", &tenant.api_key, None).await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    let deleted_seq = deleted.body["seq"].as_u64().expect("seq");
    for client in [&alice, &bob] {
        match next_where(client, "room_deleted", |e| matches!(e, ServerEvent::RoomDeleted { .. })).await {
            ServerEvent::RoomDeleted { room: gone, seq, .. } => {
                assert_eq!((gone.as_str(), seq), ("attic", deleted_seq))
            }
            other => panic!("not a room_deleted: {other:?}"),
        }
    }

    // Nothing of it is reachable: history, members, the room lists, the HTTP API; a second delete finds nothing.
    refused(
        &bob,
        ClientOp::History { room: room("attic"), before: None, after: None, limit: None, thread: None },
        ErrorCode::NotFound,
    )
    .await;
    let thread = ClientOp::History { room: room("attic"), before: None, after: None, limit: None, thread: Some(first) };
    refused(&alice, thread, ErrorCode::NotFound).await;
    refused(&alice, ClientOp::Members { room: room("attic") }, ErrorCode::NotFound).await;
    for client in [&alice, &bob] {
        let rooms = client.rooms().await.expect("rooms");
        assert!(rooms.iter().all(|summary| summary.room.as_str() != "attic"), "{rooms:?}");
    }
    let messages = fleet.call(1, Method::GET, "/v1/rooms/attic/messages", &tenant.api_key, None).await;
    assert_eq!(messages.status, 404, "{}", messages.body);
    let again = fleet.call(1, Method::DELETE, "/v1/rooms/attic", &tenant.api_key, None).await;
    assert_eq!(again.status, 404, "{}", again.body);
    let direct = fleet.call(1, Method::DELETE, "/v1/rooms/dm:alice:bob", &tenant.api_key, None).await;
    assert_eq!(direct.status, 400, "{}", direct.body);
    let send = ClientOp::Send { room: room("attic"), body: "anyone?".into(), attrs: None, reply_to: None, cmid: None };
    assert!(alice.request(send).await.expect("request").into_result().is_err(), "a send to a deleted room fails");
    none_where(&bob, "an event after the deletion", |e| room_of(e).is_some_and(|r| r.as_str() == "attic")).await;

    // The name is free: a new room under it starts with nothing of the old one, and no join replays the old events.
    let created = fleet.call(0, Method::POST, "/v1/rooms", &tenant.api_key, Some(json!({"room": "attic"}))).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let carol = fleet.connect(0, &fleet.token(&tenant, "carol").await, Format::Json).await;
    let joined = carol.join("attic", None).await.expect("join the new room");
    assert!(joined > deleted_seq, "the new room continues after the deletion: {joined} vs {deleted_seq}");
    let fresh = carol.send("attic", "a new start").await.expect("send").seq;
    let (page, more) = carol.history("attic", None, None, None).await.expect("history of the new room");
    assert_eq!((page.iter().map(|m| m.seq).collect::<Vec<_>>(), more), (vec![fresh], false));
    let (old_thread, _) = carol.thread("attic", first, None, None, None).await.expect("thread");
    assert!(old_thread.is_empty(), "the old thread is gone: {old_thread:?}");
    let replay = bob.request(ClientOp::Join { room: room("attic"), since: Some(first - 1) }).await.expect("request");
    match replay.into_result() {
        Err(error) => assert_eq!(error.code(), Some(ErrorCode::ResumeGap), "{error:?}"),
        Ok(fields) => panic!("the old events were replayed: {fields:?}"),
    }
    fleet.stop().await;
}
