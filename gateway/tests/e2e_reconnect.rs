//! The Rust client's `ReconnectingClient` against a real fleet, with its socket cut by a TCP relay in the test (as a
//! network failure would cut it): it reconnects with backoff, resumes every room gap-free and duplicate-free, sends
//! a request issued while away once it is back, posts an interrupted send exactly once (cmid), and stops for good
//! on 4003.
//!
//! The relay is the only thing between client and gateway that the test controls; the gateway, router shards,
//! persistor, NATS and Redis are real.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::Fleet;
use switchyard_client::{
    Auth, Client, ClientError, ConnectOptions, Format, ReconnectOptions, ReconnectingClient, ServerEvent, SessionEvent,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);

/// A TCP relay to the gateway whose connections the test can cut, and which can refuse new ones for a while.
struct Relay {
    addr: std::net::SocketAddr,
    refusing: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: std::net::SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let refusing = Arc::new(AtomicBool::new(false));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let acceptor = {
            let (refusing, links) = (refusing.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if refusing.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let link = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    links.lock().expect("links").push(link);
                }
            })
        };
        Relay { addr, refusing, links, acceptor }
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Drop every relayed connection at once, without a close frame.
    fn cut(&self) {
        for link in self.links.lock().expect("links").drain(..) {
            link.abort();
        }
    }

    fn refuse(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.acceptor.abort();
    }
}

fn upstream_addr(fleet: &Fleet) -> std::net::SocketAddr {
    fleet.gateways[0].trim_start_matches("http://").parse().expect("gateway address")
}

/// A fleet whose per-connection op rate does not get in the way of a test that sends in bursts.
async fn fleet() -> Fleet {
    Fleet::start_with(1, 2, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
    })
    .await
}

fn fast_reconnect() -> ReconnectOptions {
    ReconnectOptions {
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_millis(800),
        ..ReconnectOptions::default()
    }
}

/// Take session events until `done` says enough, failing after `WAIT`.
async fn collect_until(
    client: &ReconnectingClient,
    seen: &mut Vec<SessionEvent>,
    what: &str,
    done: impl Fn(&[SessionEvent]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !done(seen) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_event_timeout(left).await {
            Some(event) => seen.push(event),
            None => panic!("timed out waiting for {what}; saw {seen:#?}"),
        }
    }
}

/// The `msg` events of `room`, as (seq, body).
fn messages(events: &[SessionEvent], room: &str) -> Vec<(u64, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Event(ServerEvent::Msg { room: r, seq, body, .. }) if r.as_str() == room => {
                Some((*seq, body.clone()))
            }
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_socket_reconnects_and_resumes_every_room_without_gap_or_duplicate() {
    let fleet = fleet().await;
    let tenant = fleet.create_tenant().await;
    let relay = Relay::start(upstream_addr(&fleet)).await;
    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    let bob_token = fleet.token(&tenant, "bob").await;
    let refreshes = Arc::new(AtomicUsize::new(0));
    let options = ReconnectOptions {
        auth_source: Some({
            let (refreshes, token) = (refreshes.clone(), bob_token.clone());
            Arc::new(move || {
                refreshes.fetch_add(1, Ordering::SeqCst);
                let token = token.clone();
                Box::pin(async move { Ok(Auth::FirstFrame(token)) })
            })
        }),
        ..fast_reconnect()
    };
    let bob = ReconnectingClient::connect(
        ConnectOptions::new(relay.ws_url(), Auth::Header(bob_token.clone())).with_format(Format::MsgPack),
        options,
    )
    .await
    .expect("bob connects");

    let rooms = ["north", "south"];
    for room in rooms {
        alice.join(room, None).await.expect("alice joins");
        bob.join(room, None).await.expect("bob joins");
    }
    for i in 0..5 {
        for room in rooms {
            alice.send(room, format!("before {i}")).await.expect("send");
        }
    }
    let mut seen = Vec::new();
    collect_until(&bob, &mut seen, "the first messages", |s| rooms.iter().all(|r| messages(s, r).len() == 5)).await;

    // The network goes away: bob's socket dies and he cannot reconnect for a while.
    relay.refuse(true);
    relay.cut();
    collect_until(&bob, &mut seen, "bob noticing the drop", |s| {
        s.iter().any(|e| matches!(e, SessionEvent::Reconnecting { .. }))
    })
    .await;
    assert!(!bob.is_connected());
    // Bob sends while away: the request waits for the resumed session.
    let bob = Arc::new(bob);
    let pending = {
        let bob = bob.clone();
        tokio::spawn(async move { bob.send("north", "bob, sent while away").await })
    };
    for i in 0..20 {
        for room in rooms {
            alice.send(room, format!("away {i}")).await.expect("send");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.refuse(false);

    let sent = tokio::time::timeout(WAIT, pending).await.expect("the queued send finishes").unwrap().expect("sent");
    collect_until(&bob, &mut seen, "every message after the resume", |s| {
        messages(s, "north").len() == 26 && messages(s, "south").len() == 25
    })
    .await;
    // Anything duplicated would arrive right behind.
    while let Some(event) = bob.next_event_timeout(Duration::from_millis(500)).await {
        seen.push(event);
    }

    for room in rooms {
        let got = messages(&seen, room);
        let seqs: Vec<u64> = got.iter().map(|(seq, _)| *seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{room}: seqs without gap or duplicate: {seqs:?}");
        let mut expected: Vec<String> = (0..5).map(|i| format!("before {i}")).collect();
        expected.extend((0..20).map(|i| format!("away {i}")));
        let bodies: Vec<String> = got.iter().map(|(_, b)| b.clone()).filter(|b| b != "bob, sent while away").collect();
        assert_eq!(bodies, expected, "{room}: every message once, in order");
    }
    assert!(messages(&seen, "north").iter().any(|(seq, body)| *seq == sent.seq && body == "bob, sent while away"));
    let resumed: HashMap<String, Option<u64>> = seen
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Resumed { room, from, .. } => Some((room.as_str().to_owned(), *from)),
            _ => None,
        })
        .collect();
    assert!(
        rooms.iter().all(|r| resumed.get(*r).is_some_and(|from| from.is_some())),
        "resumed with since: {resumed:?}"
    );
    assert!(seen.iter().any(|e| matches!(e, SessionEvent::Reconnected(_))));
    let attempts = seen.iter().filter(|e| matches!(e, SessionEvent::Reconnecting { .. })).count();
    assert!(attempts >= 2, "the refused attempts were retried ({attempts})");
    for event in &seen {
        if let SessionEvent::Reconnecting { delay, .. } = event {
            assert!(*delay < Duration::from_millis(800), "backoff stays under its cap: {delay:?}");
        }
    }
    assert!(refreshes.load(Ordering::SeqCst) >= 1, "every reconnect asked the auth source");

    // Revoking bob's sessions ends the session for good: no reconnect, requests fail.
    let revoked = fleet
        .http
        .delete(format!("{}/v1/users/bob/sessions", fleet.gateways[0]))
        .bearer_auth(&tenant.api_key)
        .send()
        .await
        .expect("revoke");
    assert_eq!(revoked.status(), 204);
    let mut after = Vec::new();
    collect_until(&bob, &mut after, "the end of the session", |s| {
        s.iter().any(|e| matches!(e, SessionEvent::Ended(_)))
    })
    .await;
    let Some(SessionEvent::Ended(Some(close))) = after.last() else { panic!("no close record: {after:?}") };
    assert_eq!(close.code, 4003);
    assert!(!after.iter().any(|e| matches!(e, SessionEvent::Reconnecting { .. })), "no reconnect after 4003");
    assert!(matches!(bob.send("north", "too late").await, Err(ClientError::Closed(Some(_)))));
    assert!(bob.next_event().await.is_none());
    alice.close().await;
    drop(relay);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_send_cut_off_before_its_reply_posts_exactly_once() {
    let fleet = fleet().await;
    let tenant = fleet.create_tenant().await;
    let relay = Relay::start(upstream_addr(&fleet)).await;
    let token = fleet.token(&tenant, "carol").await;
    let carol = Arc::new(
        ReconnectingClient::connect(ConnectOptions::new(relay.ws_url(), Auth::Header(token)), fast_reconnect())
            .await
            .expect("carol connects"),
    );
    carol.join("east", None).await.expect("join");
    let mut results = Vec::new();
    for i in 0..6 {
        let task = {
            let carol = carol.clone();
            tokio::spawn(async move { carol.send("east", format!("interrupted {i}")).await })
        };
        // Cut at different moments: before the frame left, while it is in flight, or after the reply.
        tokio::time::sleep(Duration::from_millis(i * 3)).await;
        relay.cut();
        results.push(tokio::time::timeout(WAIT, task).await.expect("the send finishes").unwrap().expect("sent"));
    }

    let reader = Client::connect(ConnectOptions::new(fleet.ws_url(0), Auth::Header(fleet.token(&tenant, "dan").await)))
        .await
        .expect("reader connects");
    let (page, _) = reader.history("east", None, None, Some(100)).await.expect("history");
    let bodies: Vec<&str> = page.iter().filter_map(|m| m.body.as_deref()).collect();
    let expected: Vec<String> = (0..6).map(|i| format!("interrupted {i}")).collect();
    assert_eq!(bodies, expected, "each send posted exactly once");
    let seqs: Vec<u64> = page.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, results.iter().map(|r| r.seq).collect::<Vec<_>>(), "each retry got the first reply");
    carol.close().await;
    let mut last = None;
    while let Some(event) = carol.next_event_timeout(Duration::from_secs(5)).await {
        last = Some(event);
    }
    assert!(matches!(last, Some(SessionEvent::Ended(_))), "closing ends the session: {last:?}");
    assert!(matches!(carol.send("east", "after close").await, Err(ClientError::Closed(_))));
    reader.close().await;
    drop(relay);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_typed_helpers_work_through_the_reconnecting_client() {
    let fleet = fleet().await;
    let tenant = fleet.create_tenant().await;
    let connect = |user: &'static str| {
        let fleet = &fleet;
        let tenant = &tenant;
        async move {
            let token = fleet.token(tenant, user).await;
            ReconnectingClient::connect(ConnectOptions::new(fleet.ws_url(0), Auth::Header(token)), fast_reconnect())
                .await
                .expect("connect")
        }
    };
    let erin = connect("erin").await;
    let frank = connect("frank").await;
    erin.join("west", None).await.expect("join");
    frank.join("west", None).await.expect("join");
    erin.watch(&["frank"]).await.expect("watch");
    let sent = erin.send("west", "first").await.expect("send");
    let reaction = frank.react("west", sent.seq, "🎉", false).await.expect("react");
    let edit = erin.edit("west", sent.seq, "first, edited").await.expect("edit");
    assert!(matches!(frank.edit("west", sent.seq, "not mine").await, Err(ClientError::Server { .. })));
    let marker = frank.read("west", edit).await.expect("read");
    assert_eq!(marker, edit);
    let deleted = erin.delete("west", sent.seq).await.expect("delete");
    assert_eq!((reaction, edit, deleted), (sent.seq + 1, sent.seq + 2, sent.seq + 3));
    let (dm_room, _) = frank.dm("erin", "psst").await.expect("dm");

    let mut seen = Vec::new();
    collect_until(&erin, &mut seen, "the dm", |s| {
        s.iter().any(|e| matches!(e, SessionEvent::Event(ServerEvent::Msg { room, .. }) if *room == dm_room))
    })
    .await;
    let ops: Vec<u64> = seen
        .iter()
        .filter_map(|e| match e {
            SessionEvent::Event(
                ServerEvent::Reaction { seq, .. } | ServerEvent::Edit { seq, .. } | ServerEvent::Delete { seq, .. },
            ) => Some(*seq),
            _ => None,
        })
        .collect();
    assert_eq!(ops, vec![reaction, edit, deleted]);
    let (page, more) = frank.history("west", None, None, Some(10)).await.expect("history");
    assert!(!more);
    assert!(page.iter().any(|m| m.seq == sent.seq && m.deleted), "{page:?}");
    frank.close().await;
    collect_until(&erin, &mut seen, "frank going offline", |s| {
        s.iter().any(|e| matches!(e, SessionEvent::Event(ServerEvent::Presence { online: false, .. })))
    })
    .await;
    erin.close().await;
    fleet.stop().await;
}
