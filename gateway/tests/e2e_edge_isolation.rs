//! Tenant isolation, end to end through real NATS, Redis and the history store: two tenants with identical user and
//! room ids; a few thousand randomized ops from tenant A (joins, creates, sends, history, over WebSockets on two
//! gateways and over HTTP) never yield an event, a reply or a history row of tenant B, and B never sees A's.
//!
//! Every body carries its tenant's marker, so any crossing shows up wherever it lands.

mod support;

use reqwest::Method;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use support::Fleet;
use switchyard_client::{ClientOp, Format, Reply, ServerEvent};
use switchyard_persistor::store::{HistoryQuery, HistoryStore};
use switchyard_protocol::{ProjectId, RoomId};

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
const ROOMS: [&str; 5] = ["general", "random", "ops", "secret", "lobby"];
const OPS_PER_CLIENT: usize = 350;

/// A small deterministic generator (xorshift), seeded per client, so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

fn room(name: &str) -> RoomId {
    RoomId::parse(name).unwrap()
}

/// Every message body in a reply or event, wherever it sits.
fn bodies(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("body", Value::String(body)) => out.push(body.clone()),
                    _ => bodies(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| bodies(v, out)),
        _ => {}
    }
}

fn assert_all_marked(where_: &str, found: &[String], marker: &str) {
    for body in found {
        assert!(body.starts_with(marker), "{where_}: {body:?} does not belong here");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_random_ops_of_one_tenant_never_reach_another() {
    let fleet = Arc::new(
        Fleet::start_with(2, 2, |c| {
            c.ops_per_sec = 10_000;
            c.ops_burst = 10_000;
        })
        .await,
    );
    let a = fleet.create_tenant().await;
    let b = fleet.create_tenant().await;

    // Tenant B: the same users in the same rooms, on both gateways; a few messages of its own.
    let mut b_clients = Vec::new();
    for (i, user) in USERS.iter().enumerate() {
        let client = fleet.connect(i % 2, &fleet.token(&b, user).await, Format::Json).await;
        for name in ROOMS {
            client.join(name, None).await.expect("B joins");
        }
        b_clients.push(client);
    }
    let mut b_sent = 0;
    for (i, client) in b_clients.iter().enumerate() {
        for name in ROOMS {
            client.send(name, format!("B:{i}:{name}")).await.expect("B sends");
            b_sent += 1;
        }
    }
    let b_last_seq = b_clients[0].join("general", None).await.unwrap();

    // Tenant A: the same user ids, thousands of random ops, from both gateways and over HTTP.
    let mut tasks = Vec::new();
    for (i, user) in USERS.iter().enumerate() {
        for gateway in 0..2 {
            let token = fleet.token(&a, user).await;
            let format = if gateway == 0 { Format::Json } else { Format::MsgPack };
            let client = fleet.connect(gateway, &token, format).await;
            let (fleet, api_key) = (fleet.clone(), a.api_key.clone());
            tasks.push(tokio::spawn(async move {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((i as u64) << 8 | gateway as u64));
                let mut found = Vec::new();
                for n in 0..OPS_PER_CLIENT {
                    let name = rng.pick(&ROOMS);
                    let op = match rng.next() % 6 {
                        0 => ClientOp::Join { room: room(name), since: None },
                        1 => ClientOp::Create {
                            room: room(&format!("{name}-{}", rng.next() % 8)),
                            private: rng.next() & 1 == 0,
                            title: None,
                        },
                        2 | 3 => ClientOp::Send {
                            room: room(name),
                            body: format!("A:{i}:{gateway}:{n}"),
                            attrs: None,
                            reply_to: None,
                            cmid: None,
                        },
                        4 => ClientOp::History {
                            room: room(name),
                            before: None,
                            after: None,
                            limit: Some(100),
                            thread: None,
                        },
                        _ => {
                            // Over HTTP: post or read as the tenant's backend.
                            let path = format!("/v1/rooms/{name}/messages");
                            let answer = if rng.next() & 1 == 0 {
                                let body = json!({"from": USERS[i], "body": format!("A:http:{i}:{n}")});
                                fleet.call(gateway, Method::POST, &path, &api_key, Some(body)).await
                            } else {
                                fleet.call(gateway, Method::GET, &format!("{path}?limit=100"), &api_key, None).await
                            };
                            bodies(&answer.body, &mut found);
                            continue;
                        }
                    };
                    match client.request(op).await.expect("A's request") {
                        Reply::Ok(fields) => bodies(&Value::Object(fields), &mut found),
                        Reply::Err { message, .. } => found.push(format!("A:err {message}")),
                    }
                    while let Some(event) = client.try_next_event() {
                        bodies(&serde_json::to_value(&event).unwrap(), &mut found);
                    }
                }
                while let Some(event) = client.next_event_timeout(Duration::from_millis(200)).await {
                    bodies(&serde_json::to_value(&event).unwrap(), &mut found);
                }
                found
            }));
        }
    }
    let mut a_found = 0;
    for task in tasks {
        let found = task.await.expect("A's client task");
        assert_all_marked("a reply or event of tenant A", &found, "A:");
        a_found += found.len();
    }
    assert!(a_found > 1_000, "A's clients saw their own traffic ({a_found} bodies)");

    // B saw nothing of A: only B's bodies, and B's rooms did not move.
    for (i, client) in b_clients.iter().enumerate() {
        let mut found = Vec::new();
        while let Some(event) = client.next_event_timeout(Duration::from_millis(100)).await {
            if let ServerEvent::Msg { body, .. } = &event {
                found.push(body.clone());
            }
        }
        assert_all_marked(&format!("an event of B's client {i}"), &found, "B:");
    }
    assert_eq!(b_clients[1].join("general", None).await.unwrap(), b_last_seq, "A's ops did not advance B's room seq");
    for name in ROOMS {
        let (messages, _) = b_clients[2].history(name, None, None, Some(100)).await.unwrap();
        let found: Vec<String> = messages.iter().filter_map(|m| m.body.clone()).collect();
        assert_all_marked("B's history", &found, "B:");
        assert_eq!(found.len(), USERS.len(), "B's room {name} holds B's messages only");
    }
    // And the store: B's rows are B's alone.
    let b_id = ProjectId::parse(&b.project_id).unwrap();
    let mut rows = 0;
    for name in ROOMS {
        let page = fleet
            .store
            .history(&HistoryQuery { tenant: b_id.clone(), room: room(name), before: None, after: None, limit: 100 })
            .await
            .expect("store page");
        let found: Vec<String> = page.messages.iter().filter_map(|m| m.body.clone()).collect();
        assert_all_marked("a history row of B", &found, "B:");
        rows += found.len();
    }
    assert_eq!(rows, b_sent);
    match Arc::try_unwrap(fleet) {
        Ok(fleet) => fleet.stop().await,
        Err(_) => panic!("fleet still shared"),
    }
}
