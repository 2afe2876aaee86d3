//! Threads end to end, through real NATS and Redis, on the embedded store and on the real Cassandra: replies sent
//! with `reply_to` form their parent's thread, paged by `history` with `thread` over the WebSocket and the HTTP API,
//! and every message in history says how many replies it has.

mod chat_support;
mod support;

use chat_support::*;
use reqwest::Method;
use support::{Fleet, StoreKind};
use switchyard_client::{ClientOp, ErrorCode, Format};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn threads_on_the_embedded_store() {
    threads(StoreKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn threads_on_cql() {
    threads(StoreKind::Cql).await;
}

async fn threads(store: StoreKind) {
    let fleet = Fleet::start_on(store, 2, 2, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
    })
    .await;
    let tenant = fleet.create_tenant().await;
    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    let bob = fleet.connect(1, &fleet.token(&tenant, "bob").await, Format::MsgPack).await;
    let eve = fleet.connect(1, &fleet.token(&tenant, "eve").await, Format::Json).await;
    ok(&alice, ClientOp::Create { room: room("plans"), private: true, title: None }).await;
    ok(&alice, ClientOp::Invite { room: room("plans"), user: user("bob") }).await;
    alice.join("plans", None).await.expect("join");
    bob.join("plans", None).await.expect("join");
    let parent = alice.send("plans", "what shall we build?").await.expect("send").seq;
    let reply = |body: &str| ClientOp::Send {
        room: room("plans"),
        body: body.into(),
        attrs: None,
        reply_to: Some(parent),
        cmid: None,
    };
    let mut replies = Vec::new();
    for body in ["a bridge", "a tower", "a tunnel"] {
        replies.push(ok(&bob, reply(body)).await["seq"].as_u64().expect("seq"));
        alice.send("plans", "elsewhere in the room").await.expect("send");
    }

    let (page, more) = alice.thread("plans", parent, None, None, Some(2)).await.expect("thread");
    assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), replies[1..], "the latest replies first");
    assert!(more);
    let (older, more) = bob.thread("plans", parent, Some(replies[1]), None, None).await.expect("older");
    assert_eq!((older.iter().map(|m| m.seq).collect::<Vec<_>>(), more), (replies[..1].to_vec(), false));
    assert_eq!(older[0].body.as_deref(), Some("a bridge"));
    let (history, _) = bob.history("plans", None, None, None).await.expect("history");
    let counts: Vec<(u64, u64)> = history.iter().map(|m| (m.seq, m.reply_count)).filter(|(_, n)| *n > 0).collect();
    assert_eq!(counts, [(parent, 3)]);

    // The backend reads the same thread; a thread of seq 0 is refused; outsiders of a private room read nothing.
    let path = format!("/v1/rooms/plans/messages?thread={parent}");
    let answer = fleet.call(0, Method::GET, &path, &tenant.api_key, None).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["messages"].as_array().map(Vec::len), Some(3), "{}", answer.body);
    let zero = fleet.call(0, Method::GET, "/v1/rooms/plans/messages?thread=0", &tenant.api_key, None).await;
    assert_eq!(zero.status, 400, "{}", zero.body);
    let thread =
        ClientOp::History { room: room("plans"), before: None, after: None, limit: None, thread: Some(parent) };
    refused(&eve, thread, ErrorCode::Forbidden).await;
    fleet.stop().await;
}
