//! History retention end to end, through real NATS and Redis, on the embedded store and on the real Cassandra: a
//! tenant keeps its history two seconds; a room of its own keeps it for good. Past the retention a message is gone
//! from history and threads, from the room list's preview, and from every replay.

mod chat_support;
mod support;

use chat_support::*;
use reqwest::Method;
use serde_json::json;
use std::time::Duration;
use support::{Fleet, StoreKind};
use switchyard_client::{ClientOp, ErrorCode, Format};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_on_the_embedded_store() {
    retention(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_on_cql() {
    retention(StoreKind::Cql).await;
}

async fn retention(store: StoreKind) {
    let fleet = Fleet::start_on(store, 2, 2, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
    })
    .await;
    let tenant = fleet.create_tenant().await;
    fleet.set_limits(&tenant, json!({"history_retention_secs": 2})).await;
    // Every gateway learns it from its watch of the tenants bucket, within milliseconds on one machine.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let key = tenant.api_key.clone();
    for bad in [json!({"secs": -1}), json!({"secs": 315_360_001u64}), json!({})] {
        let answer = fleet.call(0, Method::PUT, "/v1/rooms/archive/retention", &key, Some(bad.clone())).await;
        assert_eq!(answer.status, 400, "{bad}: {}", answer.body);
    }
    let created = fleet.call(0, Method::POST, "/v1/rooms", &key, Some(json!({"room": "archive"}))).await;
    assert_eq!(created.status, 201, "{}", created.body);
    let kept = fleet.call(0, Method::PUT, "/v1/rooms/archive/retention", &key, Some(json!({"secs": 0}))).await;
    assert_eq!(kept.status, 204, "{}", kept.body);

    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    let bob = fleet.connect(1, &fleet.token(&tenant, "bob").await, Format::MsgPack).await;
    for room_id in ["brief", "archive"] {
        alice.join(room_id, None).await.expect("join");
        bob.join(room_id, None).await.expect("join");
    }
    let brief_first = alice.send("brief", "soon gone").await.expect("send").seq;
    let reply = ClientOp::Send {
        room: room("brief"),
        body: "a reply".into(),
        attrs: None,
        reply_to: Some(brief_first),
        cmid: None,
    };
    ok(&bob, reply).await;
    let archived = alice.send("archive", "kept for good").await.expect("send").seq;
    let (page, _) = bob.history("brief", None, None, None).await.expect("history");
    assert_eq!(page.len(), 2, "within the retention: {page:?}");
    assert!(bob.rooms().await.expect("rooms").iter().any(|r| r.room.as_str() == "brief" && r.last_message.is_some()));

    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let (page, more) = bob.history("brief", None, None, None).await.expect("history");
    assert!(page.is_empty() && !more, "past the retention: {page:?}");
    let (thread, _) = bob.thread("brief", brief_first, None, None, None).await.expect("thread");
    assert!(thread.is_empty(), "{thread:?}");
    let http = fleet.call(1, Method::GET, "/v1/rooms/brief/messages", &key, None).await;
    assert_eq!(http.body["messages"], json!([]), "{}", http.body);
    let (archive, _) = bob.history("archive", None, None, None).await.expect("history");
    assert_eq!(archive.iter().map(|m| m.seq).collect::<Vec<_>>(), [archived], "the room keeps its own for good");
    let rooms = bob.rooms().await.expect("rooms");
    let brief = rooms.iter().find(|r| r.room.as_str() == "brief").expect("brief is listed");
    assert_eq!((brief.last_message.is_none(), brief.unread), (true, 0), "{brief:?}");
    let archive = rooms.iter().find(|r| r.room.as_str() == "archive").expect("archive is listed");
    assert_eq!(archive.last_message.as_ref().map(|m| m.seq), Some(archived));

    // No replay brings the expired events back; the room itself goes on.
    let carol = fleet.connect(0, &fleet.token(&tenant, "carol").await, Format::Json).await;
    let replay = carol.request(ClientOp::Join { room: room("brief"), since: Some(0) }).await.expect("request");
    match replay.into_result() {
        Err(error) => assert_eq!(error.code(), Some(ErrorCode::ResumeGap), "{error:?}"),
        Ok(fields) => panic!("expired events were replayed: {fields:?}"),
    }
    let fresh = alice.send("brief", "a new one").await.expect("send").seq;
    let (page, _) = carol.history("brief", None, None, None).await.expect("history");
    assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), [fresh]);
    let cleared = fleet.call(0, Method::DELETE, "/v1/rooms/archive/retention", &key, None).await;
    assert_eq!(cleared.status, 204, "{}", cleared.body);
    fleet.stop().await;
}
