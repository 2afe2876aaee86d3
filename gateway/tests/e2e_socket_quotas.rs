//! Sockets per user, counted across the fleet in real Redis: the quota holds across two gateways, before the
//! upgrade (429) and after a first-frame `auth` (4008); a closed socket frees its place on every gateway; a gateway
//! that drains gives its counts back; and the counts of a gateway whose lease ran out (a killed gateway) no longer
//! count, while those of a live one do.

mod support;

use fred::prelude::*;
use serde_json::json;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{refusal, Fleet};
use switchyard_client::{Auth, Format};
use switchyard_protocol::{redis_keys, ProjectId, UserId};

/// Connect until admitted or `within` passed: counts reach Redis a moment after a socket opens or closes.
async fn connect_within(fleet: &Fleet, gateway: usize, token: &str, within: Duration) -> switchyard_client::Client {
    let deadline = Instant::now() + within;
    loop {
        match fleet.try_connect(gateway, Auth::Header(token.to_owned())).await {
            Ok(client) => return client,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(error) => panic!("a freed place was never usable: {error:?}"),
        }
    }
}

/// The refusal of a connect, retried for a while: counts reach Redis a moment after a socket opens, so a connect
/// right after may still be admitted (it is closed again at once).
async fn refused_within(fleet: &Fleet, gateway: usize, auth: Auth) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fleet.try_connect(gateway, auth.clone()).await {
            Ok(admitted) if Instant::now() < deadline => {
                drop(admitted);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            result => return refusal(result),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_users_sockets_are_counted_across_the_fleet() {
    let mut fleet = Fleet::start(2, 1).await;
    let third_gateway = fleet.add_gateway(|_| {}).await;
    let tenant = fleet.create_tenant().await;
    fleet.set_limits(&tenant, json!({"max_connections_per_user": 2})).await;
    let token = fleet.token(&tenant, "phone").await;
    let on_0 = fleet.connect(0, &token, Format::Json).await;
    let on_1 = fleet.connect(1, &token, Format::MsgPack).await;

    // A third socket of the user is refused on every gateway, though each holds at most one.
    for gateway in 0..3 {
        assert_eq!(refused_within(&fleet, gateway, Auth::Header(token.clone())).await, 429, "gateway {gateway}");
    }
    let closed = fleet.try_connect(third_gateway, Auth::FirstFrame(token.clone())).await;
    assert_eq!(refusal(closed), 4008);
    // Another user of the tenant is not affected.
    let other = fleet.connect(0, &fleet.token(&tenant, "laptop").await, Format::Json).await;
    other.ping().await.expect("another user connects");
    on_0.ping().await.expect("the user's first socket is unaffected");

    // A closed socket frees its place for a socket on another gateway.
    drop(on_0);
    let again = connect_within(&fleet, third_gateway, &token, Duration::from_secs(5)).await;
    again.ping().await.expect("admitted once a place was freed");
    drop((on_1, again, other));
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_gateway_gives_its_counts_back_and_a_dead_ones_stop_counting() {
    let mut fleet = Fleet::start(1, 1).await;
    let tenant = fleet.create_tenant().await;
    fleet.set_limits(&tenant, json!({"max_connections_per_user": 2})).await;
    let token = fleet.token(&tenant, "tablet").await;
    let redis = fred::clients::Client::new(Config::from_url(&support::redis_url()).unwrap(), None, None, None);
    redis.init().await.expect("connect to Redis");
    let project = ProjectId::parse(&tenant.project_id).unwrap();
    let user_key = redis_keys::user_sockets(&project, &UserId::parse("tablet").unwrap());
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as f64;

    // A gateway whose lease ended a minute ago still has 5 sockets of the user in Redis: they do not count.
    let _: i64 =
        redis.zadd(redis_keys::GATEWAYS, None, None, false, false, (now_ms - 60_000.0, "gw-dead")).await.unwrap();
    let _: i64 = redis.hset(&user_key, ("gw-dead", 5)).await.unwrap();
    // A live gateway elsewhere holds one: it counts.
    let _: i64 =
        redis.zadd(redis_keys::GATEWAYS, None, None, false, false, (now_ms + 60_000.0, "gw-alive")).await.unwrap();
    let _: i64 = redis.hset(&user_key, ("gw-alive", 1)).await.unwrap();

    let first = fleet.connect(0, &token, Format::Json).await;
    assert_eq!(refused_within(&fleet, 0, Auth::Header(token.clone())).await, 429, "1 elsewhere + 1 here");
    let dead: Option<i64> = redis.hget(&user_key, "gw-dead").await.unwrap();
    assert_eq!(dead, None, "the dead gateway's field was deleted");

    // A second gateway that drains with a socket of the user open writes its count back to zero.
    let second = fleet.add_gateway(|_| {}).await;
    let _: i64 = redis.hdel(&user_key, "gw-alive").await.unwrap();
    let on_second = fleet.connect(second, &token, Format::Json).await;
    assert_eq!(refused_within(&fleet, 0, Auth::Header(token.clone())).await, 429);
    let fields: std::collections::HashMap<String, i64> = redis.hgetall(&user_key).await.unwrap();
    assert_eq!(fields.len(), 2, "one field per gateway holding a socket: {fields:?}");
    assert!(fields.values().all(|count| *count == 1), "{fields:?}");
    drop(first);
    let third = connect_within(&fleet, 0, &token, Duration::from_secs(5)).await;
    // Both gateways drain with a socket of the user open, and each writes its count back.
    fleet.stop().await;
    drop((on_second, third));
    let fields: std::collections::HashMap<String, i64> = redis.hgetall(&user_key).await.unwrap();
    assert!(fields.is_empty(), "counts left after every gateway drained: {fields:?}");
    let _: i64 = redis.zrem(redis_keys::GATEWAYS, "gw-alive").await.unwrap();
    let _: i64 = redis.zrem(redis_keys::GATEWAYS, "gw-dead").await.unwrap();
}
