//! A Redis outage, for real: this test starts its own `redis-server`, points its own fleet at it, kills it with
//! SIGKILL and checks that existing sockets keep working, JWT connects keep working (JWT revocation too, from the
//! gateways' local cache, and a ban from the tenant too), opaque-token connects and token minting fail clearly (HTTP 503 `unavailable`, or close
//! 1013 after the upgrade) and nothing is admitted unverified, that the tenant message rate fails open; then it
//! restarts Redis and checks that everything recovers by itself.

mod support;

use reqwest::Method;
use serde_json::json;
use std::time::{Duration, Instant};
use support::{refusal, Fleet, JwtSigner, OwnRedis};
use switchyard_client::{Auth, ClientOp, ErrorCode, Format, Reply, ServerEvent};
use switchyard_protocol::RoomId;

async fn wait_ready(fleet: &Fleet, gateway: usize, ready: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = fleet
            .http
            .get(format!("{}/readyz", fleet.gateways[gateway]))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if (status == 200) == ready {
            return;
        }
        assert!(Instant::now() < deadline, "gateway {gateway} never became ready={ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn send_op(body: &str) -> ClientOp {
    ClientOp::Send {
        room: RoomId::parse("ops").unwrap(),
        body: body.to_owned(),
        attrs: None,
        reply_to: None,
        cmid: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_outage_blocks_only_what_needs_redis_and_recovers() {
    let mut redis = OwnRedis::start();
    let url = redis.url();
    let fleet = Fleet::start_with(2, 1, |c| {
        c.redis_url = url.clone();
        c.auth_timeout_ms = 2_000;
    })
    .await;
    let tenant = fleet.create_tenant().await;
    let signer = JwtSigner::hs256("outage-test-secret-0123456789abcdefgh");
    fleet.set_jwt(&tenant, &signer).await;
    fleet.set_limits(&tenant, json!({"msgs_per_sec": 1, "msgs_burst": 1})).await;
    let opaque = fleet.token(&tenant, "olga").await;
    let sender = fleet.connect(0, &opaque, Format::Json).await;
    let receiver = fleet.connect(1, &signer.token(&tenant, "jack", 600, json!({})), Format::MsgPack).await;
    sender.join("ops", None).await.unwrap();
    receiver.join("ops", None).await.unwrap();
    while receiver.try_next_event().is_some() {}
    // With Redis up the tenant's rate (1/s, burst 1) is enforced.
    sender.request(send_op("first")).await.unwrap().into_result().expect("first send");
    let second = sender.request(send_op("second")).await.unwrap();
    assert!(
        matches!(second, Reply::Err { code: ErrorCode::RateLimited, .. }),
        "rate enforced while Redis is up: {second:?}"
    );

    // A user banned from the tenant while Redis is up.
    let ban = fleet.call(1, Method::PUT, "/v1/users/mallory/ban", &tenant.api_key, None).await;
    assert_eq!(ban.status, 204, "{}", ban.body);

    redis.stop();
    wait_ready(&fleet, 0, false).await;
    wait_ready(&fleet, 1, false).await;

    // Existing sockets keep working, across gateways; the tenant rate fails open.
    for i in 0..3 {
        let body = format!("during outage {i}");
        sender.request(send_op(&body)).await.unwrap().into_result().expect("send fails open");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match receiver.next_event_timeout(Duration::from_secs(10)).await {
                Some(ServerEvent::Msg { body: got, .. }) if got == body => break,
                Some(_) if Instant::now() < deadline => continue,
                other => panic!("no delivery during the outage: {other:?}"),
            }
        }
    }

    // JWT connects keep working, by header and by first frame.
    let jwt = signer.token(&tenant, "jill", 600, json!({"jti": "jill-1"}));
    let jill = fleet.try_connect(1, Auth::Header(jwt.clone())).await.expect("JWT connect");
    fleet.try_connect(0, Auth::FirstFrame(jwt.clone())).await.expect("JWT first-frame connect");
    // The banned user's JWT is refused on every gateway: each remembers the bans it heard of.
    let mallory = signer.token(&tenant, "mallory", 600, json!({}));
    assert_eq!(refusal(fleet.try_connect(0, Auth::Header(mallory.clone())).await), 403);
    assert_eq!(refusal(fleet.try_connect(1, Auth::FirstFrame(mallory)).await), 4003);
    // A forged JWT is still refused: nothing is admitted unverified.
    let forged = JwtSigner::hs256("not-the-tenant-secret-0123456789abcdef").token(&tenant, "jill", 600, json!({}));
    assert_eq!(refusal(fleet.try_connect(0, Auth::Header(forged)).await), 401);

    // Opaque tokens cannot be checked: a clear 503 before the upgrade, 1013 after it; minting is 503 too.
    for gateway in 0..2 {
        match fleet.try_connect(gateway, Auth::Header(opaque.clone())).await {
            Err(switchyard_client::ClientError::Http { status: 503, body }) => {
                assert!(body.contains("unavailable"), "{body}")
            }
            other => panic!("expected 503 unavailable, got {:?}", other.map(|c| c.hello().clone())),
        }
    }
    assert_eq!(refusal(fleet.try_connect(0, Auth::FirstFrame(opaque.clone())).await), 1013);
    let minted = fleet.call(0, Method::POST, "/v1/tokens", &tenant.api_key, Some(json!({"user_id": "x"}))).await;
    assert_eq!((minted.status, minted.body["code"].as_str()), (503, Some("unavailable")));

    // Revoking a JWT still closes its sockets everywhere and refuses it from then on (the local caches), though
    // the durable marker could not be written (503: retry).
    let revoked = fleet.call(0, Method::DELETE, &format!("/v1/tokens/{jwt}"), &tenant.api_key, None).await;
    assert_eq!(revoked.status, 503, "{}", revoked.body);
    let closed = jill.wait_closed(Duration::from_secs(2)).await.expect("jill closed");
    assert_eq!(closed.code, 4003);
    for gateway in 0..2 {
        assert_eq!(refusal(fleet.try_connect(gateway, Auth::Header(jwt.clone())).await), 401);
    }

    // Redis comes back (empty): everything recovers without a restart.
    redis.restart();
    wait_ready(&fleet, 0, true).await;
    wait_ready(&fleet, 1, true).await;
    let fresh = fleet.token(&tenant, "olga").await;
    fleet.try_connect(1, Auth::Header(fresh.clone())).await.expect("opaque connect after recovery");
    fleet.try_connect(0, Auth::FirstFrame(fresh)).await.expect("first-frame opaque connect after recovery");
    assert_eq!(
        refusal(fleet.try_connect(0, Auth::Header(opaque)).await),
        401,
        "a token Redis no longer holds is refused"
    );
    sender.ping().await.expect("the old socket survived it all");
    // The rate is enforced again.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut limited = false;
    for i in 0..3 {
        if let Reply::Err { code: ErrorCode::RateLimited, .. } =
            sender.request(send_op(&format!("after {i}"))).await.unwrap()
        {
            limited = true;
        }
    }
    assert!(limited, "the tenant rate is enforced again after recovery");
    fleet.stop().await;
}
