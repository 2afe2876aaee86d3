//! Chat semantics end to end, through real NATS and Redis, with users on two gateways, under both subprotocols:
//! every op, and every permission rule allowed and refused.

mod chat_support;
mod support;

use chat_support::*;
use serde_json::json;
use std::time::{Duration, Instant};
use support::Fleet;
use switchyard_client::{Client, ClientOp, ErrorCode, Format, ServerEvent};

async fn fleet() -> Fleet {
    Fleet::start_with(2, 2, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
    })
    .await
}

/// Connect `name` of `tenant` to gateway `gateway`.
async fn connect(fleet: &Fleet, tenant: &support::Tenant, name: &str, gateway: usize, format: Format) -> Client {
    fleet.connect(gateway, &fleet.token(tenant, name).await, format).await
}

macro_rules! both_formats {
    ($scenario:ident, $json:ident, $msgpack:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $json() {
            $scenario(Format::Json).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $msgpack() {
            $scenario(Format::MsgPack).await;
        }
    };
}

both_formats!(membership_and_permissions, membership_and_permissions_json, membership_and_permissions_msgpack);
both_formats!(message_lifecycle, message_lifecycle_json, message_lifecycle_msgpack);
both_formats!(direct_messages, direct_messages_json, direct_messages_msgpack);
both_formats!(typing_read_and_presence, typing_read_and_presence_json, typing_read_and_presence_msgpack);
both_formats!(pins, pins_json, pins_msgpack);

async fn membership_and_permissions(format: Format) {
    let fleet = fleet().await;
    let tenant = fleet.create_tenant().await;
    let alice = connect(&fleet, &tenant, "alice", 0, format).await;
    let bob = connect(&fleet, &tenant, "bob", 1, format).await;
    let bob_too = connect(&fleet, &tenant, "bob", 0, format).await;
    let carol = connect(&fleet, &tenant, "carol", 1, format).await;

    // create: the creator becomes admin; a second create conflicts.
    ok(&alice, ClientOp::Create { room: room("secret"), private: true, title: Some("Secret".into()) }).await;
    refused(&bob, ClientOp::Create { room: room("secret"), private: false, title: None }, ErrorCode::Conflict).await;
    refused(&bob, ClientOp::Create { room: room("dm:alice:bob"), private: false, title: None }, ErrorCode::BadRequest)
        .await;
    // A private room refuses joins, history and members to non-members.
    refused(&bob, ClientOp::Join { room: room("secret"), since: None }, ErrorCode::Forbidden).await;
    let history = ClientOp::History { room: room("secret"), before: None, after: None, limit: None, thread: None };
    refused(&bob, history.clone(), ErrorCode::Forbidden).await;
    refused(&bob, ClientOp::Members { room: room("secret") }, ErrorCode::Forbidden).await;
    assert_eq!(alice.join("secret", None).await.unwrap(), 1, "creating sequenced the creator's join");
    // invite: admins only.
    refused(&carol, ClientOp::Invite { room: room("secret"), user: user("bob") }, ErrorCode::Forbidden).await;
    ok(&alice, ClientOp::Invite { room: room("secret"), user: user("bob") }).await;
    match next_where(&alice, "bob's joined", |e| matches!(e, ServerEvent::Joined { .. })).await {
        ServerEvent::Joined { seq: 2, user, .. } => assert_eq!(user.as_str(), "bob"),
        other => panic!("{other:?}"),
    }
    assert_eq!(bob.join("secret", None).await.unwrap(), 2, "an invited member's join adds no event");
    assert_eq!(bob_too.join("secret", None).await.unwrap(), 2);
    ok(&bob, history).await;

    // members and rooms.
    let members = ok(&bob, ClientOp::Members { room: room("secret") }).await;
    let listed: Vec<(String, String, bool)> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (m["user"].as_str().unwrap().into(), m["role"].as_str().unwrap().into(), m["online"].as_bool().unwrap())
        })
        .collect();
    assert_eq!(listed, vec![("alice".into(), "admin".into(), true), ("bob".into(), "member".into(), true)]);
    let rooms = ok(&bob, ClientOp::Rooms).await;
    assert_eq!(rooms["rooms"], json!([{"room": "secret", "role": "member", "seq": 2, "read": 0, "unread": 0}]));

    // A public room: anyone of the tenant may read it and join it.
    carol.join("lobby", None).await.unwrap();
    ok(&alice, ClientOp::History { room: room("lobby"), before: None, after: None, limit: Some(5), thread: None })
        .await;
    refused(&alice, ClientOp::Kick { room: room("lobby"), user: user("carol") }, ErrorCode::Forbidden).await;
    refused(&alice, ClientOp::Leave { room: room("lobby") }, ErrorCode::NotFound).await;

    // kick: the kicked user's sessions get `left` with `by`, then nothing more of the room.
    refused(&bob, ClientOp::Kick { room: room("secret"), user: user("alice") }, ErrorCode::Forbidden).await;
    ok(&alice, ClientOp::Kick { room: room("secret"), user: user("bob") }).await;
    for session in [&bob, &bob_too] {
        match next_where(session, "left", |e| matches!(e, ServerEvent::Left { .. })).await {
            ServerEvent::Left { seq: 3, user, by, .. } => {
                assert_eq!(user.as_str(), "bob");
                assert_eq!(by.map(|b| b.to_string()).as_deref(), Some("alice"));
            }
            other => panic!("{other:?}"),
        }
    }
    alice.send("secret", "after the kick").await.unwrap();
    for session in [&bob, &bob_too] {
        none_where(session, "event of a room bob was kicked from", |e| room_of(e) == Some(&room("secret"))).await;
    }
    refused(
        &bob,
        ClientOp::Send { room: room("secret"), body: "x".into(), attrs: None, reply_to: None, cmid: None },
        ErrorCode::Forbidden,
    )
    .await;
    refused(&alice, ClientOp::Kick { room: room("secret"), user: user("bob") }, ErrorCode::NotFound).await;

    // leave: ends membership and the subscriptions of every session of the user.
    ok(&alice, ClientOp::Invite { room: room("secret"), user: user("carol") }).await;
    carol.join("secret", None).await.unwrap();
    ok(&carol, ClientOp::Leave { room: room("secret") }).await;
    match next_where(
        &alice,
        "carol's left",
        |e| matches!(e, ServerEvent::Left { user, .. } if user.as_str() == "carol"),
    )
    .await
    {
        ServerEvent::Left { by, .. } => assert!(by.is_none()),
        other => panic!("{other:?}"),
    }
    alice.send("secret", "after carol left").await.unwrap();
    // The session that asked may see its own `left` before its `ok`, and nothing of the room after it.
    none_where(&carol, "event of a room carol left", |e| {
        room_of(e) == Some(&room("secret")) && !matches!(e, ServerEvent::Left { user, .. } if user.as_str() == "carol")
    })
    .await;
    refused(&carol, ClientOp::Members { room: room("secret") }, ErrorCode::Forbidden).await;
    fleet.stop().await;
}

async fn message_lifecycle(format: Format) {
    let fleet = fleet().await;
    let tenant = fleet.create_tenant().await;
    let alice = connect(&fleet, &tenant, "alice", 0, format).await;
    let bob = connect(&fleet, &tenant, "bob", 1, format).await;
    alice.join("general", None).await.unwrap();
    bob.join("general", None).await.unwrap();
    let first = alice.send("general", "first").await.unwrap();
    let reply = ok(
        &bob,
        ClientOp::Send {
            room: room("general"),
            body: "second".into(),
            attrs: Some(json!({"kind": "reply"})),
            reply_to: Some(first.seq),
            cmid: None,
        },
    )
    .await;
    let second = reply["seq"].as_u64().unwrap();
    refused(
        &bob,
        ClientOp::Send { room: room("general"), body: "x".into(), attrs: None, reply_to: Some(999), cmid: None },
        ErrorCode::BadRequest,
    )
    .await;
    drain(&alice).await;
    drain(&bob).await;

    // react: members only, on existing messages, emoji 1..=32 bytes; the ok carries the new event's seq.
    let react = |seq, emoji: &str, remove| ClientOp::React { room: room("general"), seq, emoji: emoji.into(), remove };
    let reacted = ok(&bob, react(first.seq, "👍", false)).await;
    let reaction_seq = reacted["seq"].as_u64().unwrap();
    assert_eq!(reaction_seq, second + 1);
    match next_where(&alice, "reaction", |e| matches!(e, ServerEvent::Reaction { .. })).await {
        ServerEvent::Reaction { seq, target, user, emoji, removed, .. } => {
            assert_eq!(
                (seq, target, user.as_str(), emoji.as_str(), removed),
                (reaction_seq, first.seq, "bob", "👍", false)
            );
        }
        other => panic!("{other:?}"),
    }
    ok(&alice, react(first.seq, "🎉", false)).await;
    ok(&alice, react(first.seq, "🎉", true)).await;
    refused(&bob, react(first.seq, "", false), ErrorCode::BadRequest).await;
    refused(&bob, react(first.seq, &"x".repeat(33), false), ErrorCode::BadRequest).await;
    refused(&bob, react(9_999, "👍", false), ErrorCode::NotFound).await;
    refused(&bob, react(1, "👍", false), ErrorCode::NotFound).await; // seq 1 is alice's joined event
    let outsider = connect(&fleet, &tenant, "outsider", 0, format).await;
    refused(&outsider, react(first.seq, "👍", false), ErrorCode::Forbidden).await;

    // edit: the author only.
    let edit = |seq, body: &str| ClientOp::Edit { room: room("general"), seq, body: body.into() };
    refused(&bob, edit(first.seq, "hijacked"), ErrorCode::Forbidden).await;
    let edited = ok(&alice, edit(first.seq, "first, edited")).await;
    match next_where(&bob, "edit", |e| matches!(e, ServerEvent::Edit { .. })).await {
        ServerEvent::Edit { seq, target, from, body, .. } => {
            assert_eq!(
                (seq, target, from.as_str(), body.as_str()),
                (edited["seq"].as_u64().unwrap(), first.seq, "alice", "first, edited")
            );
        }
        other => panic!("{other:?}"),
    }

    // delete: the author or a room admin; alice created the room, so she is its admin.
    let delete = |seq| ClientOp::Delete { room: room("general"), seq };
    refused(&bob, delete(first.seq), ErrorCode::Forbidden).await;
    ok(&alice, delete(second)).await;
    match next_where(&bob, "delete", |e| matches!(e, ServerEvent::Delete { .. })).await {
        ServerEvent::Delete { target, by, .. } => assert_eq!((target, by.as_str()), (second, "alice")),
        other => panic!("{other:?}"),
    }
    refused(&alice, delete(second), ErrorCode::NotFound).await;
    refused(&alice, edit(second, "too late"), ErrorCode::NotFound).await;

    // history carries the current state of each message.
    let (messages, more) = bob.history("general", None, None, None).await.unwrap();
    assert!(!more);
    assert_eq!(messages.len(), 2);
    let first_now = &messages[0];
    assert_eq!(first_now.body.as_deref(), Some("first, edited"));
    assert!(first_now.edited_ts.is_some());
    assert_eq!(first_now.reactions.keys().collect::<Vec<_>>(), vec!["👍"]);
    assert_eq!(first_now.reactions["👍"].iter().map(|u| u.as_str()).collect::<Vec<_>>(), vec!["bob"]);
    let second_now = &messages[1];
    assert!(second_now.deleted && second_now.body.is_none(), "a tombstone without body: {second_now:?}");
    assert_eq!(second_now.reply_to, Some(first.seq));

    // paging: before/after/limit with `more`.
    for n in 0..5 {
        alice.send("general", format!("page {n}")).await.unwrap();
    }
    let (page, more) = bob.history("general", None, None, Some(3)).await.unwrap();
    assert!(more);
    assert_eq!(page.iter().map(|m| m.body.clone().unwrap()).collect::<Vec<_>>(), vec!["page 2", "page 3", "page 4"]);
    let (older, more) = bob.history("general", Some(page[0].seq), None, Some(3)).await.unwrap();
    assert!(more);
    assert_eq!(
        older.iter().map(|m| m.body.clone().unwrap_or_default()).collect::<Vec<_>>(),
        vec!["", "page 0", "page 1"]
    );
    let (after, more) = bob.history("general", None, Some(first.seq), Some(2)).await.unwrap();
    assert!(more);
    assert_eq!(after[0].seq, second);
    refused(
        &bob,
        ClientOp::History { room: room("general"), before: None, after: None, limit: Some(0), thread: None },
        ErrorCode::BadRequest,
    )
    .await;
    refused(
        &bob,
        ClientOp::History { room: room("general"), before: None, after: None, limit: Some(101), thread: None },
        ErrorCode::BadRequest,
    )
    .await;

    // cmid: a repeat through the other gateway returns the first ok and creates nothing.
    let alice_elsewhere = connect(&fleet, &tenant, "alice", 1, format).await;
    let send = |body: &str| ClientOp::Send {
        room: room("general"),
        body: body.into(),
        attrs: None,
        reply_to: None,
        cmid: Some("c-1".into()),
    };
    let once = ok(&alice, send("idempotent")).await;
    let again = ok(&alice_elsewhere, send("idempotent, repeated")).await;
    assert_eq!(once, again);
    let (latest, _) = bob.history("general", None, None, Some(1)).await.unwrap();
    assert_eq!(latest[0].body.as_deref(), Some("idempotent"));
    // The same cmid in another room is still the first send: its ok names the first room, nothing new is created.
    alice.join("elsewhere", None).await.unwrap();
    let elsewhere = ok(
        &alice,
        ClientOp::Send {
            room: room("elsewhere"),
            body: "x".into(),
            attrs: None,
            reply_to: None,
            cmid: Some("c-1".into()),
        },
    )
    .await;
    assert_eq!(elsewhere, once);
    let (nothing, _) = alice.history("elsewhere", None, None, None).await.unwrap();
    assert!(nothing.is_empty(), "{nothing:?}");
    refused(
        &alice,
        ClientOp::Send {
            room: room("general"),
            body: "x".into(),
            attrs: None,
            reply_to: None,
            cmid: Some(String::new()),
        },
        ErrorCode::BadRequest,
    )
    .await;
    fleet.stop().await;
}

async fn direct_messages(format: Format) {
    let fleet = fleet().await;
    let tenant = fleet.create_tenant().await;
    let alice = connect(&fleet, &tenant, "alice", 0, format).await;
    let alice_too = connect(&fleet, &tenant, "alice", 1, format).await;
    let bob = connect(&fleet, &tenant, "bob", 1, format).await;
    let bob_too = connect(&fleet, &tenant, "bob", 0, format).await;
    let mallory = connect(&fleet, &tenant, "mallory", 0, format).await;

    let (dm_room, sent) = bob.dm("alice", "hi alice").await.unwrap();
    assert_eq!(dm_room.as_str(), "dm:alice:bob");
    assert_eq!(sent.seq, 1);
    // Every session of both users gets it without joining, the sender's other session included.
    for session in [&alice, &alice_too, &bob, &bob_too] {
        match next_where(session, "dm", |e| matches!(e, ServerEvent::Msg { .. })).await {
            ServerEvent::Msg { room, seq, from, body, .. } => {
                assert_eq!((room.as_str(), seq, from.as_str(), body.as_str()), ("dm:alice:bob", 1, "bob", "hi alice"));
            }
            other => panic!("{other:?}"),
        }
    }
    none_where(&mallory, "someone else's dm", |_| true).await;
    refused(
        &mallory,
        ClientOp::History { room: room("dm:alice:bob"), before: None, after: None, limit: None, thread: None },
        ErrorCode::Forbidden,
    )
    .await;
    refused(&mallory, ClientOp::Join { room: room("dm:alice:bob"), since: None }, ErrorCode::Forbidden).await;
    refused(
        &mallory,
        ClientOp::Send { room: room("dm:alice:bob"), body: "x".into(), attrs: None, reply_to: None, cmid: None },
        ErrorCode::Forbidden,
    )
    .await;
    refused(
        &alice,
        ClientOp::Dm { to: user("alice"), body: "me".into(), attrs: None, cmid: None },
        ErrorCode::BadRequest,
    )
    .await;
    refused(&alice, ClientOp::Leave { room: room("dm:alice:bob") }, ErrorCode::BadRequest).await;

    // Participants may use the DM room in any room op.
    assert_eq!(alice.join("dm:alice:bob", None).await.unwrap(), 1);
    let reply = alice.send("dm:alice:bob", "hello bob").await.unwrap();
    ok(&bob, ClientOp::React { room: room("dm:alice:bob"), seq: reply.seq, emoji: "❤".into(), remove: false }).await;
    ok(&bob, ClientOp::Read { room: room("dm:alice:bob"), seq: reply.seq }).await;

    // A DM to a user who never connected is kept and readable later.
    alice.dm("dave", "for later").await.unwrap();
    let dave = connect(&fleet, &tenant, "dave", 1, format).await;
    let (messages, _) = dave.history("dm:alice:dave", None, None, None).await.unwrap();
    assert_eq!(messages.iter().map(|m| m.body.clone().unwrap()).collect::<Vec<_>>(), vec!["for later"]);
    let rooms = ok(&dave, ClientOp::Rooms).await;
    let listed = &rooms["rooms"][0];
    assert_eq!(
        (&listed["room"], &listed["seq"], &listed["read"], &listed["unread"], &listed["last_message"]["body"]),
        (&json!("dm:alice:dave"), &json!(1), &json!(0), &json!(1), &json!("for later")),
        "{rooms:?}"
    );
    fleet.stop().await;
}

/// Pinning: a room's admins pin and unpin, its members may not; every member receives the `pin` event; history
/// shows the message pinned, then not after the unpin, nor once it is deleted; either participant of a
/// direct-message room pins.
async fn pins(format: Format) {
    let fleet = fleet().await;
    let tenant = fleet.create_tenant().await;
    let alice = connect(&fleet, &tenant, "alice", 0, format).await;
    let bob = connect(&fleet, &tenant, "bob", 1, format).await;
    let carol = connect(&fleet, &tenant, "carol", 0, format).await;
    let outsider = connect(&fleet, &tenant, "outsider", 1, format).await;
    // alice's join creates the room: she is its admin, bob and carol are members.
    alice.join("notice", None).await.unwrap();
    bob.join("notice", None).await.unwrap();
    carol.join("notice", None).await.unwrap();
    let sent = bob.send("notice", "read the rules").await.unwrap();
    for session in [&alice, &bob, &carol] {
        drain(session).await;
    }

    let pin = |seq| ClientOp::Pin { room: room("notice"), seq };
    let unpin = |seq| ClientOp::Unpin { room: room("notice"), seq };
    refused(&bob, pin(sent.seq), ErrorCode::Forbidden).await;
    refused(&bob, unpin(sent.seq), ErrorCode::Forbidden).await;
    refused(&outsider, pin(sent.seq), ErrorCode::Forbidden).await;
    refused(&alice, pin(1), ErrorCode::NotFound).await; // seq 1 is alice's joined event
    refused(&alice, pin(9_999), ErrorCode::NotFound).await;

    // An admin's pin: `ok` with the new event's seq, the event to every member.
    let pinned = ok(&alice, pin(sent.seq)).await;
    let pin_seq = pinned["seq"].as_u64().unwrap();
    assert_eq!((pinned["room"].as_str(), pin_seq), (Some("notice"), sent.seq + 1));
    for session in [&alice, &bob, &carol] {
        match next_where(session, "pin", |e| matches!(e, ServerEvent::Pin { .. })).await {
            ServerEvent::Pin { room, seq, target, by, pinned, .. } => assert_eq!(
                (room.as_str(), seq, target, by.as_str(), pinned),
                ("notice", pin_seq, sent.seq, "alice", true)
            ),
            other => panic!("{other:?}"),
        }
    }
    none_where(&outsider, "a pin of a room not joined", |_| true).await;
    let history = || ClientOp::History { room: room("notice"), before: None, after: None, limit: None, thread: None };
    let (messages, _) = carol.history("notice", None, None, None).await.unwrap();
    assert!(messages[0].pinned, "{messages:?}");
    assert_eq!(ok(&carol, history()).await["messages"][0]["pinned"], json!(true));

    // Unpin: the event says `pinned: false`, and history no longer shows the field.
    let unpinned = ok(&alice, unpin(sent.seq)).await;
    assert_eq!(unpinned["seq"], json!(pin_seq + 1));
    for session in [&alice, &bob, &carol] {
        match next_where(session, "unpin", |e| matches!(e, ServerEvent::Pin { .. })).await {
            ServerEvent::Pin { seq, target, pinned, .. } => {
                assert_eq!((seq, target, pinned), (pin_seq + 1, sent.seq, false))
            }
            other => panic!("{other:?}"),
        }
    }
    let (messages, _) = bob.history("notice", None, None, None).await.unwrap();
    assert!(!messages[0].pinned, "{messages:?}");
    assert_eq!(ok(&bob, history()).await["messages"][0].get("pinned"), None, "unpinned messages carry no field");

    // Pinned, then deleted by its author: not pinned, and no longer pinnable.
    ok(&alice, pin(sent.seq)).await;
    ok(&bob, ClientOp::Delete { room: room("notice"), seq: sent.seq }).await;
    let (messages, _) = alice.history("notice", None, None, None).await.unwrap();
    assert!(messages[0].deleted && !messages[0].pinned, "{messages:?}");
    refused(&alice, unpin(sent.seq), ErrorCode::NotFound).await;

    // A direct-message room: either participant pins, nobody else.
    let (dm_room, reply) = bob.dm("carol", "pin this").await.unwrap();
    let dm_pin = ClientOp::Pin { room: dm_room.clone(), seq: reply.seq };
    refused(&alice, dm_pin.clone(), ErrorCode::Forbidden).await;
    let dm_pinned = ok(&bob, dm_pin).await;
    for session in [&bob, &carol] {
        let in_dm = |e: &ServerEvent| matches!(e, ServerEvent::Pin { room, .. } if room.as_str() == "dm:bob:carol");
        match next_where(session, "dm pin", in_dm).await {
            ServerEvent::Pin { room, seq, by, pinned, .. } => assert_eq!(
                (room.as_str(), Some(seq), by.as_str(), pinned),
                ("dm:bob:carol", dm_pinned["seq"].as_u64(), "bob", true)
            ),
            other => panic!("{other:?}"),
        }
    }
    ok(&carol, ClientOp::Unpin { room: dm_room.clone(), seq: reply.seq }).await;
    ok(&carol, ClientOp::Pin { room: dm_room, seq: reply.seq }).await;
    let (messages, _) = bob.history("dm:bob:carol", None, None, None).await.unwrap();
    assert!(messages[0].pinned, "{messages:?}");
    fleet.stop().await;
}

async fn typing_read_and_presence(format: Format) {
    let fleet = fleet().await;
    let tenant = fleet.create_tenant().await;
    let alice = connect(&fleet, &tenant, "alice", 0, format).await;
    let bob = connect(&fleet, &tenant, "bob", 1, format).await;
    alice.join("desk", None).await.unwrap();
    bob.join("desk", None).await.unwrap();
    let sent = alice.send("desk", "read me").await.unwrap();
    drain(&alice).await;
    drain(&bob).await;

    // typing: to other subscribed sessions, not the typist's; at most one per 2 s.
    alice.typing("desk").await.unwrap();
    alice.typing("desk").await.unwrap();
    match next_where(&bob, "typing", |e| matches!(e, ServerEvent::Typing { .. })).await {
        ServerEvent::Typing { room, user } => assert_eq!((room.as_str(), user.as_str()), ("desk", "alice")),
        other => panic!("{other:?}"),
    }
    none_where(&bob, "a second typing within 2 s", |e| matches!(e, ServerEvent::Typing { .. })).await;
    none_where(&alice, "one's own typing", |e| matches!(e, ServerEvent::Typing { .. })).await;

    // read: forward only, persisted, broadcast.
    let read = |seq| ClientOp::Read { room: room("desk"), seq };
    assert_eq!(ok(&bob, read(sent.seq)).await["seq"], json!(sent.seq));
    match next_where(&alice, "read", |e| matches!(e, ServerEvent::Read { .. })).await {
        ServerEvent::Read { user, seq, .. } => assert_eq!((user.as_str(), seq), ("bob", sent.seq)),
        other => panic!("{other:?}"),
    }
    assert_eq!(ok(&bob, read(1)).await["seq"], json!(sent.seq), "a marker never moves back");
    assert_eq!(ok(&bob, read(sent.seq)).await["seq"], json!(sent.seq));
    none_where(&alice, "a read event for a marker that did not move", |e| matches!(e, ServerEvent::Read { .. })).await;
    refused(&bob, read(sent.seq + 100), ErrorCode::BadRequest).await;
    let rooms = ok(&bob, ClientOp::Rooms).await;
    assert_eq!(rooms["rooms"][0]["read"], json!(sent.seq));
    let outsider = connect(&fleet, &tenant, "outsider", 0, format).await;
    refused(&outsider, read(1), ErrorCode::Forbidden).await;

    // presence and watch: events on the first open and the last close only.
    ok(&alice, ClientOp::Watch { users: vec![user("carol")] }).await;
    let state = ok(&alice, ClientOp::Presence { users: vec![user("carol"), user("bob")] }).await;
    assert_eq!(state["users"]["bob"]["online"], json!(true));
    assert_eq!(state["users"]["carol"]["online"], json!(false));
    let carol = connect(&fleet, &tenant, "carol", 1, format).await;
    match next_where(&alice, "carol online", |e| matches!(e, ServerEvent::Presence { .. })).await {
        ServerEvent::Presence { user, online, .. } => assert_eq!((user.as_str(), online), ("carol", true)),
        other => panic!("{other:?}"),
    }
    let carol_too = connect(&fleet, &tenant, "carol", 0, format).await;
    carol.close().await;
    none_where(&alice, "presence while carol still has a session", |e| matches!(e, ServerEvent::Presence { .. })).await;
    carol_too.close().await;
    match next_where(&alice, "carol offline", |e| matches!(e, ServerEvent::Presence { .. })).await {
        ServerEvent::Presence { user, online, .. } => assert_eq!((user.as_str(), online), ("carol", false)),
        other => panic!("{other:?}"),
    }
    let state = ok(&alice, ClientOp::Presence { users: vec![user("carol")] }).await;
    assert_eq!(state["users"]["carol"]["online"], json!(false));
    assert!(state["users"]["carol"]["last_seen"].as_u64().is_some(), "last_seen kept: {state:?}");
    ok(&alice, ClientOp::Unwatch { users: vec![user("carol")] }).await;
    let _carol_again = connect(&fleet, &tenant, "carol", 1, format).await;
    none_where(&alice, "presence of an unwatched user", |e| matches!(e, ServerEvent::Presence { .. })).await;
    let too_many: Vec<_> = (0..101).map(|i| user(&format!("u{i}"))).collect();
    refused(&alice, ClientOp::Presence { users: too_many }, ErrorCode::BadRequest).await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenant_backend_room_api() {
    let fleet = fleet().await;
    let tenant = fleet.create_tenant().await;
    let base = &fleet.gateways[1];
    let http = &fleet.http;
    let alice = connect(&fleet, &tenant, "alice", 0, Format::Json).await;

    let create = http
        .post(format!("{base}/v1/rooms"))
        .bearer_auth(&tenant.api_key)
        .json(&json!({"room": "ops", "private": true, "title": "Ops"}));
    assert_eq!(create.send().await.unwrap().status(), 201);
    let again = http.post(format!("{base}/v1/rooms")).bearer_auth(&tenant.api_key).json(&json!({"room": "ops"}));
    assert_eq!(again.send().await.unwrap().status(), 409);
    refused(&alice, ClientOp::Join { room: room("ops"), since: None }, ErrorCode::Forbidden).await;

    let put = http
        .put(format!("{base}/v1/rooms/ops/members/alice"))
        .bearer_auth(&tenant.api_key)
        .json(&json!({"role": "admin"}));
    assert_eq!(put.send().await.unwrap().status(), 204);
    assert_eq!(alice.join("ops", None).await.unwrap(), 1, "the backend's member add is the room's first event");
    let bad_role = http
        .put(format!("{base}/v1/rooms/ops/members/bob"))
        .bearer_auth(&tenant.api_key)
        .json(&json!({"role": "owner"}));
    assert_eq!(bad_role.send().await.unwrap().status(), 400);
    let put = http
        .put(format!("{base}/v1/rooms/ops/members/bob"))
        .bearer_auth(&tenant.api_key)
        .json(&json!({"role": "member"}));
    assert_eq!(put.send().await.unwrap().status(), 204);
    next_where(&alice, "bob's joined", |e| matches!(e, ServerEvent::Joined { user, .. } if user.as_str() == "bob"))
        .await;

    let members: serde_json::Value = http
        .get(format!("{base}/v1/rooms/ops/members"))
        .bearer_auth(&tenant.api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        members["members"],
        json!([{"user": "alice", "role": "admin", "online": true}, {"user": "bob", "role": "member", "online": false}])
    );

    let post = http
        .post(format!("{base}/v1/rooms/ops/messages"))
        .bearer_auth(&tenant.api_key)
        .json(&json!({"from": "bob", "body": "from the backend", "attrs": {"via": "api"}}));
    let response = post.send().await.unwrap();
    assert_eq!(response.status(), 201);
    let posted: serde_json::Value = response.json().await.unwrap();
    match next_where(&alice, "posted message", |e| matches!(e, ServerEvent::Msg { .. })).await {
        ServerEvent::Msg { seq, from, body, attrs, .. } => {
            assert_eq!(
                (seq, from.as_str(), body.as_str()),
                (posted["seq"].as_u64().unwrap(), "bob", "from the backend")
            );
            assert_eq!(attrs, Some(json!({"via": "api"})));
        }
        other => panic!("{other:?}"),
    }
    let page: serde_json::Value = http
        .get(format!("{base}/v1/rooms/ops/messages?limit=10"))
        .bearer_auth(&tenant.api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["messages"][0]["body"], json!("from the backend"));
    assert_eq!(page["more"], json!(false));

    let kick = http.delete(format!("{base}/v1/rooms/ops/members/bob")).bearer_auth(&tenant.api_key);
    assert_eq!(kick.send().await.unwrap().status(), 204);
    match next_where(&alice, "bob's left", |e| matches!(e, ServerEvent::Left { .. })).await {
        ServerEvent::Left { user, by, .. } => assert_eq!((user.as_str(), by), ("bob", None)),
        other => panic!("{other:?}"),
    }
    let missing = http.delete(format!("{base}/v1/rooms/ops/members/bob")).bearer_auth(&tenant.api_key);
    assert_eq!(missing.send().await.unwrap().status(), 404);
    let not_member = http
        .post(format!("{base}/v1/rooms/ops/messages"))
        .bearer_auth(&tenant.api_key)
        .json(&json!({"from": "bob", "body": "x"}));
    assert_eq!(not_member.send().await.unwrap().status(), 403);
    let bad_room = http.get(format!("{base}/v1/rooms/bad.room/members")).bearer_auth(&tenant.api_key);
    assert_eq!(bad_room.send().await.unwrap().status(), 400);
    let other_tenant = fleet.create_tenant().await;
    let foreign = http.get(format!("{base}/v1/rooms/ops/members")).bearer_auth(&other_tenant.api_key);
    assert_eq!(foreign.send().await.unwrap().status(), 404, "another tenant's room does not exist for it");
    fleet.stop().await;
}

/// A client in five rooms disconnects while 500 events are sent, reconnects through the other gateway with
/// `join {since}` and ends with exactly the per-room sequence of a client that never disconnected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_through_the_other_gateway_is_exact() {
    let fleet = fleet().await;
    let tenant = fleet.create_tenant().await;
    let rooms: Vec<String> = (0..5).map(|i| format!("resume-{i}")).collect();
    let writer = connect(&fleet, &tenant, "writer", 0, Format::MsgPack).await;
    let steady = connect(&fleet, &tenant, "steady", 0, Format::Json).await;
    let roamer = connect(&fleet, &tenant, "roamer", 0, Format::Json).await;
    for name in &rooms {
        writer.join(name, None).await.unwrap();
        steady.join(name, None).await.unwrap();
        roamer.join(name, None).await.unwrap();
    }
    let mut last_seen: std::collections::HashMap<String, u64> = Default::default();
    let mut roamer_log: std::collections::HashMap<String, Vec<ServerEvent>> = Default::default();
    // The roamer sees some traffic, then drops.
    for name in &rooms {
        writer.send(name, "before the drop").await.unwrap();
    }
    let mut pending = rooms.len();
    while pending > 0 {
        let event = roamer.next_event_timeout(WAIT).await.expect("event before the drop");
        if let (Some(room), Some(seq)) = (room_of(&event).map(|r| r.to_string()), seq_of(&event)) {
            if matches!(event, ServerEvent::Msg { .. }) {
                pending -= 1;
            }
            last_seen.insert(room.clone(), seq);
            roamer_log.entry(room).or_default().push(event);
        }
    }
    drop(roamer);

    // 500 events while it is away: messages, edits, deletes and reactions.
    let mut sent = 0;
    let mut n = 0;
    while sent < 500 {
        let name = &rooms[n % rooms.len()];
        let message = writer.send(name, format!("away {n}")).await.unwrap();
        sent += 1;
        match n % 4 {
            1 => {
                ok(&writer, ClientOp::Edit { room: room(name), seq: message.seq, body: format!("away {n}, edited") })
                    .await;
                sent += 1;
            }
            2 => {
                ok(&writer, ClientOp::React { room: room(name), seq: message.seq, emoji: "✅".into(), remove: false })
                    .await;
                sent += 1;
            }
            3 => {
                ok(&writer, ClientOp::Delete { room: room(name), seq: message.seq }).await;
                sent += 1;
            }
            _ => {}
        }
        n += 1;
    }
    // It comes back through the other gateway while traffic continues.
    let roamer = connect(&fleet, &tenant, "roamer", 1, Format::MsgPack).await;
    let writer_task = {
        let rooms = rooms.clone();
        tokio::spawn(async move {
            for (i, name) in rooms.iter().cycle().take(20).enumerate() {
                writer.send(name, format!("during resume {i}")).await.unwrap();
            }
            writer
        })
    };
    for name in &rooms {
        roamer.join(name, Some(last_seen[name])).await.unwrap();
    }
    let writer = writer_task.await.unwrap();
    let final_seqs: std::collections::HashMap<String, u64> = {
        let mut map = Default::default();
        for name in &rooms {
            let (latest, _) = writer.history(name, None, None, Some(1)).await.unwrap();
            map = {
                let mut m: std::collections::HashMap<String, u64> = map;
                m.insert(name.clone(), latest[0].seq);
                m
            };
        }
        map
    };
    // Collect both clients' per-room sequences up to each room's final seq.
    async fn collect(
        client: &Client,
        until: &std::collections::HashMap<String, u64>,
        log: &mut std::collections::HashMap<String, Vec<ServerEvent>>,
    ) {
        let done = |log: &std::collections::HashMap<String, Vec<ServerEvent>>| {
            until
                .iter()
                .all(|(room, seq)| log.get(room).and_then(|events| events.last()).and_then(seq_of) == Some(*seq))
        };
        while !done(log) {
            let event = client.next_event_timeout(WAIT).await.expect("events keep coming");
            if let (Some(room), Some(_)) = (room_of(&event).map(|r| r.to_string()), seq_of(&event)) {
                log.entry(room).or_default().push(event);
            }
        }
    }
    let mut steady_log = Default::default();
    collect(&steady, &final_seqs, &mut steady_log).await;
    collect(&roamer, &final_seqs, &mut roamer_log).await;
    // The steady client's log starts after the writer's joins; compare from the roamer's first event on.
    for name in &rooms {
        let roamer_events = &roamer_log[name];
        let first = seq_of(&roamer_events[0]).unwrap();
        let steady_events: Vec<&ServerEvent> =
            steady_log[name].iter().filter(|e| seq_of(e).unwrap() >= first).collect();
        assert_eq!(roamer_events.len(), steady_events.len(), "room {name}: same number of events");
        for (a, b) in roamer_events.iter().zip(steady_events) {
            assert_eq!(a, b, "room {name}: identical events in identical order");
        }
        let seqs: Vec<u64> = roamer_events.iter().filter_map(seq_of).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "room {name}: gap-free");
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_gap_when_since_is_older_than_what_is_kept() {
    let fleet = Fleet::start_with(1, 1, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
        config.resume_max_events = 20;
    })
    .await;
    let tenant = fleet.create_tenant().await;
    let alice = connect(&fleet, &tenant, "alice", 0, Format::Json).await;
    alice.join("busy", None).await.unwrap();
    for n in 0..30 {
        alice.send("busy", format!("{n}")).await.unwrap();
    }
    let bob = connect(&fleet, &tenant, "bob", 0, Format::Json).await;
    refused(&bob, ClientOp::Join { room: room("busy"), since: Some(1) }, ErrorCode::ResumeGap).await;
    let started = Instant::now();
    let seq = bob.join("busy", Some(20)).await.unwrap();
    assert_eq!(seq, 32);
    let replayed: Vec<u64> = std::iter::from_fn(|| bob.try_next_event()).filter_map(|e| seq_of(&e)).collect();
    assert_eq!(replayed, (21..=32).collect::<Vec<_>>(), "replayed before the ok, in order ({:?})", started.elapsed());
    assert!(bob.next_event_timeout(Duration::from_millis(300)).await.is_none());
    fleet.stop().await;
}

/// A gateway that dies sends nothing more: its users' presence must lapse by itself, within 15 s. The dead gateway is
/// played through its NATS messages alone: it reports a user online, then falls silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_gateways_users_go_offline_within_fifteen_seconds() {
    use switchyard_protocol::internal::{UserCommand, UserRequest, INTERNAL_VERSION};
    use switchyard_protocol::{codec, shard::shard_of_user, subjects, ProjectId};

    let fleet = fleet().await;
    let tenant = fleet.create_tenant().await;
    let watcher = connect(&fleet, &tenant, "watcher", 0, Format::Json).await;
    ok(&watcher, ClientOp::Watch { users: vec![user("ghost")] }).await;

    let tenant_id = ProjectId::parse(&tenant.project_id).unwrap();
    let nats = async_nats::connect(support::nats_servers()).await.unwrap();
    let report = UserRequest {
        v: INTERNAL_VERSION,
        tenant: tenant_id.clone(),
        user: user("ghost"),
        command: UserCommand::SessionsChanged { gateway: "gw-doomed".into(), online: true },
    };
    let shard = shard_of_user(&tenant_id, &user("ghost"), 64);
    nats.request(subjects::user_command(shard), codec::encode(&report).unwrap()).await.expect("reported");
    let reported = Instant::now();
    match next_where(&watcher, "ghost online", |e| matches!(e, ServerEvent::Presence { .. })).await {
        ServerEvent::Presence { online, .. } => assert!(online),
        other => panic!("{other:?}"),
    }
    // The gateway is gone: no snapshot, no close. The watcher must hear of it within 15 s.
    let deadline = reported + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match watcher.next_event_timeout(left).await {
            Some(ServerEvent::Presence { user, online: false, .. }) => {
                assert_eq!(user.as_str(), "ghost");
                println!("offline {:.1} s after the dead gateway's last report", reported.elapsed().as_secs_f64());
                break;
            }
            Some(_) => continue,
            None => panic!("no offline event within 15 s of the gateway's last report"),
        }
    }
    fleet.stop().await;
}
