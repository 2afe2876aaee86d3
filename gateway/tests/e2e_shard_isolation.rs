//! One user cannot stall a router shard: a user with 10,000 rooms looping `rooms` and `presence` leaves another
//! tenant's sends to rooms of the same shard as fast as before, and a user joining rooms from ten sockets at once
//! has every join succeed. Through real NATS, with the gateways and one router shard of the test fleet.

mod support;

use std::time::{Duration, Instant};
use support::Fleet;
use switchyard_client::{Client, ClientOp, Format, Reply};
use switchyard_protocol::limits::DEFAULT_SHARD_COUNT;
use switchyard_protocol::shard::{shard_of_room, shard_of_user};
use switchyard_protocol::{ProjectId, RoomId, UserId};

/// Join `rooms` (created by the join) from `sockets`, each socket taking every `sockets.len()`-th room; every join
/// must succeed on its first try.
async fn join_all(sockets: &[Client], rooms: &[String]) {
    let joins = sockets.iter().enumerate().map(|(i, socket)| async move {
        for room in rooms.iter().skip(i).step_by(sockets.len()) {
            if let Err(error) = socket.join(room, None).await {
                panic!("join {room} failed: {error:?}");
            }
        }
    });
    futures::future::join_all(joins).await;
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_joins_from_ten_sockets_all_succeed() {
    let fleet = Fleet::start_with(1, 1, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
    })
    .await;
    let tenant = fleet.create_tenant().await;
    let token = fleet.token(&tenant, "roamer").await;
    let mut sockets = Vec::new();
    for _ in 0..10 {
        sockets.push(fleet.connect(0, &token, Format::MsgPack).await);
    }
    let rooms: Vec<String> = (0..1_000).map(|i| format!("joined-{i}")).collect();
    let started = Instant::now();
    join_all(&sockets, &rooms).await;
    println!("1,000 joins from 10 sockets in {:?}", started.elapsed());
    match sockets[0].request(ClientOp::Rooms).await.expect("rooms") {
        Reply::Ok(result) => {
            let listed = result["rooms"].as_array().expect("rooms");
            let mut names: Vec<String> = listed.iter().map(|r| r["room"].as_str().unwrap_or("").to_owned()).collect();
            names.sort();
            let mut expected = rooms.clone();
            expected.sort();
            assert_eq!(names, expected, "every joined room is listed once");
        }
        other => panic!("rooms answered {other:?}"),
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_with_ten_thousand_rooms_does_not_slow_another_tenants_sends() {
    let fleet = Fleet::start_with(1, 1, |config| {
        config.ops_per_sec = 1_000;
        config.ops_burst = 1_000;
    })
    .await;
    let hoarding = fleet.create_tenant().await;
    let other = fleet.create_tenant().await;
    let hoarder = "hoarder";
    let hoarder_token = fleet.token(&hoarding, hoarder).await;
    let mut sockets = Vec::new();
    for _ in 0..10 {
        sockets.push(fleet.connect(0, &hoarder_token, Format::MsgPack).await);
    }
    let rooms: Vec<String> = (0..10_000).map(|i| format!("h{i}")).collect();
    let started = Instant::now();
    join_all(&sockets, &rooms).await;
    println!("10,000 memberships made in {:?}", started.elapsed());

    // The other tenant's rooms live on the shard that serves the hoarder's user requests.
    let hoarding_id = ProjectId::parse(&hoarding.project_id).expect("project id");
    let other_id = ProjectId::parse(&other.project_id).expect("project id");
    let user_shard = shard_of_user(&hoarding_id, &UserId::parse(hoarder).unwrap(), DEFAULT_SHARD_COUNT);
    let victim_rooms: Vec<String> = (0..)
        .map(|i| format!("v{i}"))
        .filter(|room| shard_of_room(&other_id, &RoomId::parse(room).unwrap(), DEFAULT_SHARD_COUNT) == user_shard)
        .take(4)
        .collect();
    let sender = fleet.connect(0, &fleet.token(&other, "sender").await, Format::MsgPack).await;
    for room in &victim_rooms {
        sender.join(room, None).await.expect("join");
    }
    async fn send_for(sender: &Client, rooms: &[String], count: usize) -> Vec<Duration> {
        let mut latencies = Vec::with_capacity(count);
        for i in 0..count {
            let started = Instant::now();
            sender.send(&rooms[i % rooms.len()], format!("m{i}")).await.expect("send");
            latencies.push(started.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        latencies.sort();
        latencies
    }
    let before = send_for(&sender, &victim_rooms, 100).await;

    // Five sockets loop `rooms`, one loops `presence` of 100 users, while the other tenant sends.
    let stop = tokio_util::sync::CancellationToken::new();
    let listed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut loops = Vec::new();
    for socket in sockets.drain(..6) {
        let (stop, listed) = (stop.clone(), listed.clone());
        let presence = loops.len() == 5;
        loops.push(tokio::spawn(async move {
            let users: Vec<UserId> = (0..100).map(|i| UserId::parse(&format!("u{i}")).unwrap()).collect();
            while !stop.is_cancelled() {
                let op = if presence { ClientOp::Presence { users: users.clone() } } else { ClientOp::Rooms };
                match socket.request(op).await.expect("request") {
                    Reply::Ok(result) if presence => {
                        assert_eq!(result["users"].as_object().map(|users| users.len()), Some(100))
                    }
                    Reply::Ok(result) => {
                        assert_eq!(
                            result["rooms"].as_array().map(Vec::len),
                            Some(10_000),
                            "every membership is listed"
                        );
                        listed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    other => panic!("a read answered {other:?}"),
                }
            }
        }));
    }
    let during = send_for(&sender, &victim_rooms, 300).await;
    stop.cancel();
    for handle in loops {
        handle.await.expect("read loop");
    }
    let listings = listed.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "other tenant's send ack: before p50 {:?} p99 {:?}; while `rooms` (10,000 memberships) ran {listings} times: \
         p50 {:?} p99 {:?} max {:?}",
        quantile(&before, 0.5),
        quantile(&before, 0.99),
        quantile(&during, 0.5),
        quantile(&during, 0.99),
        during.last().unwrap()
    );
    assert!(listings >= 5, "the reads made progress ({listings} listings)");
    assert!(quantile(&during, 0.99) < Duration::from_millis(50), "p99 ack {:?}", quantile(&during, 0.99));
    fleet.stop().await;
}
