//! Moderation end to end, through real NATS and Redis, on the embedded store and on the real Cassandra: room admins'
//! ops and the tenant backend's API for bans, mutes, slow mode and freeze, each an event in the room's sequence that
//! live sessions and a resume both see; and a tenant-wide ban that closes every socket of the user with 4003 and
//! refuses their tokens until it is lifted.

mod chat_support;
mod support;

use chat_support::*;
use reqwest::Method;
use serde_json::json;
use std::time::Duration;
use support::{Fleet, StoreKind};
use switchyard_client::{Auth, Client, ClientOp, ErrorCode, Format, ModerationAction, Reply, ServerEvent};

async fn connect(fleet: &Fleet, tenant: &support::Tenant, name: &str, gateway: usize) -> Client {
    fleet.connect(gateway, &fleet.token(tenant, name).await, Format::Json).await
}

/// The next `moderation` event with `action`, skipping others.
async fn moderation(client: &Client, action: ModerationAction) -> ServerEvent {
    next_where(client, "a moderation event", |e| matches!(e, ServerEvent::Moderation { action: a, .. } if *a == action))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_moderation_on_the_embedded_store() {
    room_moderation(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn room_moderation_on_cql() {
    room_moderation(StoreKind::Cql).await;
}

async fn room_moderation(store: StoreKind) {
    let fleet = Fleet::start_on(store, 2, 2, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
    })
    .await;
    let tenant = fleet.create_tenant().await;
    let key = tenant.api_key.clone();
    let alice = connect(&fleet, &tenant, "alice", 0).await;
    let bob = connect(&fleet, &tenant, "bob", 1).await;
    let carol = connect(&fleet, &tenant, "carol", 1).await;
    ok(&alice, ClientOp::Create { room: room("town"), private: false, title: None }).await;
    let start = alice.join("town", None).await.expect("alice joins");
    bob.join("town", None).await.expect("bob joins");
    carol.join("town", None).await.expect("carol joins");
    drain(&alice).await;

    // Only admins moderate; a member's attempt changes nothing.
    refused(&bob, ClientOp::Mute { room: room("town"), user: user("carol"), secs: None }, ErrorCode::Forbidden).await;
    refused(&alice, ClientOp::Ban { room: room("town"), user: user("bob"), secs: Some(0) }, ErrorCode::BadRequest)
        .await;
    refused(&alice, ClientOp::SlowMode { room: room("town"), secs: 90_000 }, ErrorCode::BadRequest).await;

    // A mute: bob reads but cannot send; everyone sees the event.
    ok(&alice, ClientOp::Mute { room: room("town"), user: user("bob"), secs: Some(3600) }).await;
    for client in [&bob, &carol] {
        match moderation(client, ModerationAction::Mute).await {
            ServerEvent::Moderation { user: muted, by, until, .. } => {
                assert_eq!((muted.unwrap().as_str(), by.unwrap().as_str()), ("bob", "alice"));
                assert!(until.is_some(), "a mute for an hour carries its end");
            }
            other => panic!("{other:?}"),
        }
    }
    let send =
        |body: &str| ClientOp::Send { room: room("town"), body: body.into(), attrs: None, reply_to: None, cmid: None };
    refused(&bob, send("muted"), ErrorCode::Forbidden).await;
    ok(&carol, send("carol speaks")).await;
    ok(&alice, ClientOp::Unmute { room: room("town"), user: user("bob") }).await;
    ok(&bob, send("bob speaks again")).await;

    // Slow mode: a member's second message within the interval is rate limited, with when to retry.
    ok(&alice, ClientOp::SlowMode { room: room("town"), secs: 30 }).await;
    ok(&carol, send("first")).await;
    match carol.request(send("second")).await.expect("request") {
        Reply::Err { code, retry_after_ms, .. } => {
            assert_eq!(code, ErrorCode::RateLimited);
            let wait = retry_after_ms.expect("retry_after_ms");
            assert!((25_000..=30_001).contains(&wait), "{wait}");
        }
        Reply::Ok(fields) => panic!("a second message within 30 s was accepted: {fields:?}"),
    }
    ok(&alice, send("admins are exempt")).await;
    ok(&alice, ClientOp::SlowMode { room: room("town"), secs: 0 }).await;

    // Freeze: read-only for every user, admins too; the backend still posts. Thawed through the HTTP API.
    ok(&alice, ClientOp::Freeze { room: room("town") }).await;
    refused(&alice, send("frozen"), ErrorCode::Forbidden).await;
    refused(&carol, send("frozen"), ErrorCode::Forbidden).await;
    let post = fleet
        .call(1, Method::POST, "/v1/rooms/town/messages", &key, Some(json!({"from": "carol", "body": "announcement"})))
        .await;
    assert_eq!(post.status, 201, "{}", post.body);
    let thaw = fleet.call(0, Method::PUT, "/v1/rooms/town/moderation", &key, Some(json!({"frozen": false}))).await;
    assert_eq!(thaw.status, 200, "{}", thaw.body);
    moderation(&carol, ModerationAction::Unfreeze).await;
    ok(&carol, send("thawed")).await;

    // A ban: bob is told, then removed as by a kick, and kept out of the room and its history.
    ok(&alice, ClientOp::Ban { room: room("town"), user: user("bob"), secs: None }).await;
    moderation(&bob, ModerationAction::Ban).await;
    next_where(&bob, "bob's left", |e| matches!(e, ServerEvent::Left { user, .. } if user.as_str() == "bob")).await;
    refused(&bob, ClientOp::Join { room: room("town"), since: None }, ErrorCode::Forbidden).await;
    let history = ClientOp::History { room: room("town"), before: None, after: None, limit: None, thread: None };
    refused(&bob, history.clone(), ErrorCode::Forbidden).await;
    ok(&carol, send("after the ban")).await;
    none_where(&bob, "nothing after the ban", |e| matches!(e, ServerEvent::Msg { .. })).await;
    let members = fleet.call(0, Method::GET, "/v1/rooms/town/members", &key, None).await;
    assert!(!members.body.to_string().contains("\"bob\""), "{}", members.body);
    // The backend lifts it; a second lift finds nothing.
    let lift = fleet.call(1, Method::DELETE, "/v1/rooms/town/bans/bob", &key, None).await;
    assert_eq!(lift.status, 200, "{}", lift.body);
    assert_eq!(fleet.call(1, Method::DELETE, "/v1/rooms/town/bans/bob", &key, None).await.status, 404);
    bob.join("town", None).await.expect("bob joins after the unban");
    let bad = fleet.call(0, Method::PUT, "/v1/rooms/town/mutes/carol", &key, Some(json!({"secs": -1}))).await;
    assert_eq!(bad.status, 400);
    let other = fleet.create_tenant().await;
    let foreign = fleet.call(0, Method::PUT, "/v1/rooms/town/bans/carol", &other.api_key, None).await;
    assert_eq!(foreign.status, 404, "another tenant's key reaches no room of this one: {}", foreign.body);

    // A resume from before the first action replays every moderation event in order, and history kept the
    // messages, the backend's announcement in the frozen room among them.
    let dave = connect(&fleet, &tenant, "dave", 0).await;
    dave.join("town", None).await.expect("dave joins");
    drain(&dave).await;
    let again = connect(&fleet, &tenant, "dave", 1).await;
    again.join("town", Some(start)).await.expect("resume");
    let mut actions = Vec::new();
    while let Some(event) = again.next_event_timeout(Duration::from_millis(500)).await {
        if let ServerEvent::Moderation { action, .. } = event {
            actions.push(action);
        }
    }
    use ModerationAction::*;
    assert_eq!(actions, [Mute, Unmute, SlowMode, SlowMode, Freeze, Unfreeze, Ban, Unban]);
    let (page, _) = dave.history("town", None, None, Some(100)).await.expect("history");
    let bodies: Vec<&str> = page.iter().filter_map(|m| m.body.as_deref()).collect();
    assert_eq!(
        bodies,
        ["carol speaks", "bob speaks again", "first", "admins are exempt", "announcement", "thawed", "after the ban"]
    );
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_ban_closes_every_socket_and_refuses_tokens_until_lifted() {
    let fleet = Fleet::start(2, 1).await;
    let tenant = fleet.create_tenant().await;
    let key = tenant.api_key.clone();
    let token = fleet.token(&tenant, "mallory").await;
    let sockets = [
        fleet.connect(0, &token, Format::Json).await,
        fleet.connect(1, &fleet.token(&tenant, "mallory").await, Format::MsgPack).await,
    ];
    let bystander = connect(&fleet, &tenant, "alice", 1).await;

    let ban = fleet.call(0, Method::PUT, "/v1/users/mallory/ban", &key, None).await;
    assert_eq!(ban.status, 204, "{}", ban.body);
    for (i, socket) in sockets.iter().enumerate() {
        let closed = socket.wait_closed(Duration::from_secs(5)).await.expect("closed");
        assert_eq!(closed.code, 4003, "socket {i}: {closed:?}");
    }
    bystander.ping().await.expect("another user's socket stays open");
    // Every way in is refused while the ban lasts: an old token at the upgrade or in a first frame, a new token.
    assert_eq!(support::refusal(fleet.try_connect(1, Auth::Query(token.clone())).await), 403);
    assert_eq!(support::refusal(fleet.try_connect(0, Auth::FirstFrame(token.clone())).await), 4003);
    let minted = fleet.call(1, Method::POST, "/v1/tokens", &key, Some(json!({"user_id": "mallory"}))).await;
    assert_eq!(minted.status, 403, "{}", minted.body);
    // Another tenant's key cannot lift it; the tenant's own can, once.
    let other = fleet.create_tenant().await;
    assert_eq!(fleet.call(0, Method::DELETE, "/v1/users/mallory/ban", &other.api_key, None).await.status, 404);
    assert_eq!(fleet.call(0, Method::DELETE, "/v1/users/mallory/ban", &key, None).await.status, 204);
    assert_eq!(fleet.call(0, Method::DELETE, "/v1/users/mallory/ban", &key, None).await.status, 404);
    fleet.connect(1, &token, Format::Json).await.ping().await.expect("admitted after the ban was lifted");

    // A ban with an end lifts itself.
    let short = fleet.call(1, Method::PUT, "/v1/users/mallory/ban", &key, Some(json!({"secs": 1}))).await;
    assert_eq!(short.status, 204, "{}", short.body);
    assert_eq!(support::refusal(fleet.try_connect(0, Auth::Header(token.clone())).await), 403);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    fleet.connect(0, &token, Format::Json).await.ping().await.expect("admitted after the ban ended");
    let bad = fleet.call(0, Method::PUT, "/v1/users/mallory/ban", &key, Some(json!({"secs": 0}))).await;
    assert_eq!(bad.status, 400);
    fleet.stop().await;
}
