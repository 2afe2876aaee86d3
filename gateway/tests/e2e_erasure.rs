//! Erasing and exporting a user end to end, through real NATS and Redis, on the embedded store and on the real
//! Cassandra: `GET /v1/users/{user}/export` pages the user's messages and lists their memberships and read
//! markers; `DELETE /v1/users/{user}` leaves nothing of them reachable through history, threads, the HTTP API,
//! resume, room lists, members or presence, and their tokens stop working.

mod chat_support;
mod support;

use chat_support::*;
use reqwest::Method;
use serde_json::{json, Value};
use support::{refusal, Fleet, StoreKind};
use switchyard_client::{Auth, Client, ClientOp, Format, Reply, ServerEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn erasure_on_the_embedded_store() {
    erasure(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn erasure_on_cql() {
    erasure(StoreKind::Cql).await;
}

/// The erased user's id, chosen so that no other text of the test contains it.
const ERASED: &str = "zed";

/// Every page of the user's export, as the backend reads it: memberships from the first, messages from all.
async fn export(fleet: &Fleet, api_key: &str, user: &str) -> (Vec<Value>, Vec<Value>) {
    let mut path = format!("/v1/users/{user}/export");
    let (mut memberships, mut messages) = (Vec::new(), Vec::new());
    for page in 0.. {
        assert!(page < 50, "the export does not end");
        let answer = fleet.call(page % 2, Method::GET, &path, api_key, None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        if page == 0 {
            memberships = answer.body["memberships"].as_array().expect("memberships").clone();
        }
        messages.extend(answer.body["messages"].as_array().expect("messages").iter().cloned());
        match &answer.body["next"] {
            Value::Null => return (memberships, messages),
            next => {
                let (room, seq) =
                    (next["after_room"].as_str().expect("room"), next["after_seq"].as_u64().expect("seq"));
                path = format!("/v1/users/{user}/export?after_room={room}&after_seq={seq}");
            }
        }
    }
    unreachable!()
}

/// The events of `room` a join with `since` replays on a fresh session, up to the join point.
async fn replay(client: &Client, room_id: &str, since: u64) -> Vec<ServerEvent> {
    let upto = client.join(room_id, Some(since)).await.expect("resume");
    let mut events = Vec::new();
    while let Some(event) = client.next_event_timeout(std::time::Duration::from_millis(500)).await {
        if room_of(&event).is_some_and(|r| r.as_str() == room_id) && seq_of(&event).is_some_and(|s| s <= upto) {
            events.push(event);
        }
    }
    let seqs: Vec<u64> = events.iter().filter_map(seq_of).collect();
    assert_eq!(seqs, (since + 1..=upto).collect::<Vec<_>>(), "a replay is gapless: {events:?}");
    events
}

fn names_erased(value: &impl serde::Serialize) -> bool {
    serde_json::to_string(value).expect("json").contains(ERASED)
}

async fn erasure(store: StoreKind) {
    let fleet = Fleet::start_on(store, 2, 2, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
    })
    .await;
    let tenant = fleet.create_tenant().await;
    let zed_token = fleet.token(&tenant, ERASED).await;
    let zed = fleet.connect(0, &zed_token, Format::Json).await;
    let bob = fleet.connect(1, &fleet.token(&tenant, "bob").await, Format::MsgPack).await;
    let carol = fleet.connect(0, &fleet.token(&tenant, "carol").await, Format::Json).await;

    // A public room the erased user created and wrote in, answered, reacted to and read.
    ok(&zed, ClientOp::Create { room: room("plaza"), private: false, title: None }).await;
    zed.join("plaza", None).await.expect("join");
    bob.join("plaza", None).await.expect("join");
    let resume_from = carol.join("plaza", None).await.expect("join");
    ok(&carol, ClientOp::Watch { users: vec![user(ERASED)] }).await;
    let attrs = Some(json!({"mood": "the attrs of the secret"}));
    let send = ClientOp::Send { room: room("plaza"), body: "the secret".into(), attrs, reply_to: None, cmid: None };
    let secret = ok(&zed, send).await["seq"].as_u64().expect("seq");
    ok(&zed, ClientOp::Edit { room: room("plaza"), seq: secret, body: "the edited secret".into() }).await;
    let answer = ClientOp::Send {
        room: room("plaza"),
        body: "an answer".into(),
        attrs: None,
        reply_to: Some(secret),
        cmid: None,
    };
    let answer = ok(&bob, answer).await["seq"].as_u64().expect("seq");
    ok(&zed, ClientOp::React { room: room("plaza"), seq: answer, emoji: "👍".into(), remove: false }).await;
    ok(&bob, ClientOp::React { room: room("plaza"), seq: secret, emoji: "👀".into(), remove: false }).await;
    let last = zed.send("plaza", "the last word").await.expect("send").seq;
    zed.read("plaza", last).await.expect("read");
    // A room written in and left, and a direct conversation.
    zed.join("annex", None).await.expect("join");
    bob.join("annex", None).await.expect("join");
    zed.send("annex", "a note left behind").await.expect("send");
    zed.leave("annex").await.expect("leave");
    let (dm, _) = zed.dm("bob", "a private word").await.expect("dm");
    let via_http = json!({"from": ERASED, "body": "sent by the backend"});
    let posted = fleet.call(1, Method::POST, "/v1/rooms/plaza/messages", &tenant.api_key, Some(via_http)).await;
    assert_eq!(posted.status, 201, "{}", posted.body);

    // The export: every membership with its read marker, every message as it reads now; deleted ones are not.
    let (memberships, messages) = export(&fleet, &tenant.api_key, ERASED).await;
    let mut member_of: Vec<(&str, u64)> =
        memberships.iter().map(|m| (m["room"].as_str().expect("room"), m["read"].as_u64().expect("read"))).collect();
    member_of.sort();
    assert_eq!(member_of, vec![(dm.as_str(), 0), ("plaza", last)], "{memberships:?}");
    let mut bodies: Vec<(&str, &str)> =
        messages.iter().map(|m| (m["room"].as_str().expect("room"), m["body"].as_str().expect("body"))).collect();
    bodies.sort();
    let mut expected = vec![
        ("annex", "a note left behind"),
        (dm.as_str(), "a private word"),
        ("plaza", "sent by the backend"),
        ("plaza", "the edited secret"),
        ("plaza", "the last word"),
    ];
    expected.sort();
    assert_eq!(bodies, expected, "{messages:?}");
    assert!(messages.iter().all(|m| m["from"] == ERASED && m.get("reactions").is_none()), "{messages:?}");

    // Erase: the user's socket closes, and the others see the erasure in the room.
    let erased = fleet.call(1, Method::DELETE, &format!("/v1/users/{ERASED}"), &tenant.api_key, None).await;
    assert_eq!(erased.status, 200, "{}", erased.body);
    assert_eq!(erased.body["rooms"], 3, "plaza, annex and the conversation: {}", erased.body);
    let closed = zed.wait_closed(std::time::Duration::from_secs(10)).await.expect("the erased user's socket closes");
    assert_eq!(closed.code, 4003, "{closed:?}");
    let seen = next_where(&carol, "erased", |e| matches!(e, ServerEvent::Erased { .. })).await;
    assert!(!names_erased(&seen), "{seen:?}");
    assert_eq!(refusal(fleet.try_connect(0, Auth::Header(zed_token.clone())).await), 401, "the token is gone");

    // History, the thread, the HTTP API: tombstones with no author, and no reaction of theirs.
    let (page, _) = bob.history("plaza", None, None, None).await.expect("history");
    assert!(!names_erased(&page), "{page:?}");
    let tombstone = page.iter().find(|m| m.seq == secret).expect("the secret's tombstone");
    assert_eq!(
        (&tombstone.from, &tombstone.body, &tombstone.attrs, tombstone.deleted, tombstone.reply_count),
        (&None, &None, &None, true, 1)
    );
    let answered = page.iter().find(|m| m.seq == answer).expect("the answer");
    assert_eq!(answered.body.as_deref(), Some("an answer"));
    assert!(answered.reactions.is_empty(), "{answered:?}");
    assert_eq!(tombstone.reactions.keys().collect::<Vec<_>>(), vec!["👀"], "bob's reaction stays");
    let (thread, _) = bob.thread("plaza", secret, None, None, None).await.expect("thread");
    assert_eq!(thread.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![answer]);
    let (annex, _) = bob.history("annex", None, None, None).await.expect("history");
    assert!(annex.iter().all(|m| m.from.is_none() && m.deleted) && !annex.is_empty(), "{annex:?}");
    let http = fleet.call(0, Method::GET, "/v1/rooms/plaza/messages", &tenant.api_key, None).await;
    assert_eq!(http.status, 200);
    assert!(!names_erased(&http.body), "{}", http.body);

    // The conversation is gone for the other participant; room lists, members and presence know nobody.
    let direct =
        bob.request(ClientOp::History { room: dm.clone(), before: None, after: None, limit: None, thread: None });
    match direct.await.expect("request") {
        Reply::Ok(fields) => assert!(fields["messages"].as_array().is_none_or(Vec::is_empty), "{fields:?}"),
        Reply::Err { .. } => {}
    }
    let rooms = bob.rooms().await.expect("rooms");
    assert!(!names_erased(&rooms), "{rooms:?}");
    let members = ok(&bob, ClientOp::Members { room: room("plaza") }).await;
    assert!(!names_erased(&members), "{members:?}");
    let presence = ok(&carol, ClientOp::Presence { users: vec![user(ERASED)] }).await;
    assert_eq!(presence["users"][ERASED], json!({"online": false}), "{presence:?}");

    // A resume from before the erased events replays stand-ins for them, gapless, and nothing of the user.
    let late = fleet.connect(1, &fleet.token(&tenant, "carol").await, Format::MsgPack).await;
    let replayed = replay(&late, "plaza", resume_from).await;
    assert!(!names_erased(&replayed), "{replayed:?}");
    assert!(replayed.iter().filter(|e| matches!(e, ServerEvent::Erased { .. })).count() >= 5, "{replayed:?}");

    // The export has nothing left, and erasing again finds nothing more to do.
    let (memberships, messages) = export(&fleet, &tenant.api_key, ERASED).await;
    assert!(memberships.is_empty() && messages.is_empty(), "{memberships:?} {messages:?}");
    let again = fleet.call(0, Method::DELETE, &format!("/v1/users/{ERASED}"), &tenant.api_key, None).await;
    assert_eq!(again.status, 200, "{}", again.body);
    // The backend lifts the refusal: a token for the same id is a new user with nothing, and a new conversation
    // with bob is listed for both again.
    let lifted = fleet.call(0, Method::DELETE, &format!("/v1/users/{ERASED}/ban"), &tenant.api_key, None).await;
    assert_eq!(lifted.status, 204, "{}", lifted.body);
    let anew = fleet.connect(0, &fleet.token(&tenant, ERASED).await, Format::Json).await;
    assert!(anew.rooms().await.expect("rooms").is_empty());
    anew.dm("bob", "hello again").await.expect("dm");
    let rooms = bob.rooms().await.expect("rooms");
    assert!(rooms.iter().any(|summary| summary.room == dm), "{rooms:?}");
    let bad = fleet.call(0, Method::DELETE, "/v1/users/a%0Ab", &tenant.api_key, None).await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    for cursor in ["after_room=plaza", "after_room=plaza&after_seq=9223372036854775808", "after_room=a:b&after_seq=1"] {
        let path = format!("/v1/users/{ERASED}/export?{cursor}");
        assert_eq!(fleet.call(0, Method::GET, &path, &tenant.api_key, None).await.status, 400, "{cursor}");
    }
    fleet.stop().await;
}
