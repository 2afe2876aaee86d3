//! Revocation across two gateways through real NATS and Redis, timed: a revoked opaque token, a revoked JWT, a user's
//! sessions and a disabled tenant (by the admin API, and by a bare change of the tenants bucket that only the
//! gateways' KV watch can notice) close every affected socket, on both gateways, with 4003 within 1 s of the request,
//! while every other socket stays open; afterwards new requests get 401 or 403.

mod support;

use async_nats::jetstream;
use reqwest::Method;
use serde_json::json;
use std::time::{Duration, Instant};
use support::{refusal, Fleet, JwtSigner};
use switchyard_client::{Auth, Client, Format};
use switchyard_protocol::internal::TenantRecord;
use switchyard_protocol::{codec, subjects, ProjectId};

const BOUND: Duration = Duration::from_secs(1);

/// Wait for each client to close; assert each closed with 4003 (after a `bye`) within 1 s of `started`.
async fn assert_revoked_in_time(what: &str, started: Instant, clients: &[&Client]) {
    for (i, client) in clients.iter().enumerate() {
        let closed = client
            .wait_closed(Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{what}: socket {i} still open after 5 s"));
        let took = started.elapsed();
        assert_eq!(closed.code, 4003, "{what}: socket {i}: {closed:?}");
        assert_eq!(closed.bye.as_ref().map(|b| b.code), Some(4003), "{what}: bye");
        assert!(took < BOUND, "{what}: socket {i} closed after {took:?}");
        eprintln!("{what}: socket {i} closed with 4003 within {took:?}");
    }
}

async fn assert_open(clients: &[&Client]) {
    for client in clients {
        client.ping().await.expect("an unaffected socket stays open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocations_reach_every_gateway_within_a_second() {
    let fleet = Fleet::start(2, 1).await;
    let tenant = fleet.create_tenant().await;
    let bystander_tenant = fleet.create_tenant().await;
    let signer = JwtSigner::hs256("revocation-test-secret-0123456789abcdef");
    fleet.set_jwt(&tenant, &signer).await;
    let jwt = |user: &str, jti: &str| signer.token(&tenant, user, 600, json!({"jti": jti}));

    let bystander = fleet.connect(1, &fleet.token(&bystander_tenant, "alice").await, Format::Json).await;
    let bob = fleet.connect(1, &fleet.token(&tenant, "bob").await, Format::Json).await;

    // An opaque token, revoked through gateway 0, used on both gateways.
    let alice_token = fleet.token(&tenant, "alice").await;
    let alice_1 = fleet.connect(1, &alice_token, Format::MsgPack).await;
    let alice_0 = fleet.connect(0, &alice_token, Format::Json).await;
    let alice_other = fleet.connect(1, &fleet.token(&tenant, "alice").await, Format::Json).await;
    let started = Instant::now();
    let answer = fleet.call(0, Method::DELETE, &format!("/v1/tokens/{alice_token}"), &tenant.api_key, None).await;
    assert_eq!(answer.status, 204);
    assert_revoked_in_time("opaque token", started, &[&alice_1, &alice_0]).await;
    assert_open(&[&alice_other, &bob, &bystander]).await;
    assert_eq!(refusal(fleet.try_connect(1, Auth::Header(alice_token)).await), 401);

    // A JWT (by jti), revoked through gateway 1, used on gateway 0.
    let carol_jwt = jwt("carol", "carol-1");
    let carol = fleet.connect(0, &carol_jwt, Format::Json).await;
    let carol_other = fleet.connect(0, &jwt("carol", "carol-2"), Format::Json).await;
    let started = Instant::now();
    let answer = fleet.call(1, Method::DELETE, &format!("/v1/tokens/{carol_jwt}"), &tenant.api_key, None).await;
    assert_eq!(answer.status, 204, "{}", answer.body);
    assert_revoked_in_time("JWT", started, &[&carol]).await;
    assert_open(&[&carol_other, &bob, &bystander]).await;
    assert_eq!(refusal(fleet.try_connect(1, Auth::Header(carol_jwt)).await), 401);

    // Every session of a user, on both gateways, whatever the credential.
    let dave_token = fleet.token(&tenant, "dave").await;
    let dave_0 = fleet.connect(0, &dave_token, Format::Json).await;
    let dave_1 = fleet.connect(1, &jwt("dave", "dave-1"), Format::MsgPack).await;
    let dave_2 = fleet.connect(1, &fleet.token(&tenant, "dave").await, Format::Json).await;
    let bystander_dave = fleet.connect(0, &fleet.token(&bystander_tenant, "dave").await, Format::Json).await;
    let started = Instant::now();
    let answer = fleet.call(1, Method::DELETE, "/v1/users/dave/sessions", &tenant.api_key, None).await;
    assert_eq!(answer.status, 204);
    assert_revoked_in_time("user sessions", started, &[&dave_0, &dave_1, &dave_2]).await;
    assert_open(&[&carol_other, &bob, &bystander, &bystander_dave]).await;
    assert_eq!(
        refusal(fleet.try_connect(0, Auth::Header(dave_token)).await),
        401,
        "the user's opaque tokens are revoked too"
    );

    // The tenant, disabled through the admin API on gateway 0.
    let erin_token = fleet.token(&tenant, "erin").await;
    let erin_0 = fleet.connect(0, &erin_token, Format::Json).await;
    let frank_1 = fleet.connect(1, &jwt("frank", "frank-1"), Format::Json).await;
    let started = Instant::now();
    let path = format!("/v1/admin/tenants/{}", tenant.project_id);
    let answer = fleet.call(0, Method::DELETE, &path, &fleet.admin_token, None).await;
    assert_eq!(answer.status, 204);
    assert_revoked_in_time("tenant disabled", started, &[&erin_0, &frank_1, &bob, &carol_other, &alice_other]).await;
    assert_open(&[&bystander, &bystander_dave]).await;
    for gateway in 0..2 {
        assert_eq!(refusal(fleet.try_connect(gateway, Auth::Header(erin_token.clone())).await), 403);
        assert_eq!(refusal(fleet.try_connect(gateway, Auth::Header(jwt("frank", "frank-2"))).await), 403);
        let minted =
            fleet.call(gateway, Method::POST, "/v1/tokens", &tenant.api_key, Some(json!({"user_id": "x"}))).await;
        assert_eq!(minted.status, 403);
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_disabled_in_the_bucket_is_closed_by_every_gateways_watch() {
    let fleet = Fleet::start(2, 1).await;
    let tenant = fleet.create_tenant().await;
    let bystander_tenant = fleet.create_tenant().await;
    let on_0 = fleet.connect(0, &fleet.token(&tenant, "a").await, Format::Json).await;
    let on_1 = fleet.connect(1, &fleet.token(&tenant, "b").await, Format::Json).await;
    let bystander = fleet.connect(1, &fleet.token(&bystander_tenant, "a").await, Format::Json).await;

    // Change the record directly, as another tool would: no broadcast, only the bucket changes.
    let nats = async_nats::connect(support::nats_servers()).await.unwrap();
    let kv = jetstream::new(nats).get_key_value(subjects::TENANTS_BUCKET).await.unwrap();
    let key = subjects::tenant_key(&ProjectId::parse(&tenant.project_id).unwrap());
    let entry = kv.entry(&key).await.unwrap().expect("tenant record");
    let mut record: TenantRecord = codec::decode(&entry.value).unwrap();
    record.disabled = true;
    let started = Instant::now();
    kv.update(&key, codec::encode(&record).unwrap(), entry.revision).await.unwrap();
    assert_revoked_in_time("tenant disabled in the bucket", started, &[&on_0, &on_1]).await;
    assert_open(&[&bystander]).await;
    fleet.stop().await;
}
