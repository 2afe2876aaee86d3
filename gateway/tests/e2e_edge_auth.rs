//! The edge's authentication refusals, each with its exact status or close code, through real NATS and Redis: JWTs
//! (HS256, RS256, ES256) and every way a JWT can be wrong (expired, forged, another tenant's, revoked, wrong
//! algorithm including `none` and RS256/HS256 key confusion, bad claims); opaque tokens (missing, expired, forged,
//! revoked, revoked by another tenant); and the admin API (JWT key validation, key rotation, tenant disable).

mod support;

use reqwest::Method;
use serde_json::json;
use std::time::Duration;
use support::{alg_none_token, refusal, unix_secs, Fleet, JwtSigner};
use switchyard_client::{Auth, Format};

const SECRET_A: &str = "tenant-a-secret-tenant-a-secret-0123";
const SECRET_B: &str = "tenant-b-secret-tenant-b-secret-4567";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwts_of_every_algorithm_connect_and_bad_ones_are_refused() {
    let fleet = Fleet::start_with(1, 1, |c| c.auth_timeout_ms = 1_000).await;
    let a = fleet.create_tenant().await;
    let b = fleet.create_tenant().await;
    let rsa_tenant = fleet.create_tenant().await;
    let ec_tenant = fleet.create_tenant().await;
    let no_key = fleet.create_tenant().await;
    let hs_a = JwtSigner::hs256(SECRET_A);
    let hs_b = JwtSigner::hs256(SECRET_B);
    let (rs, rsa_public_pem) = JwtSigner::rs256(2048);
    let (es, _) = JwtSigner::es256();
    fleet.set_jwt(&a, &hs_a).await;
    fleet.set_jwt(&b, &hs_b).await;
    fleet.set_jwt(&rsa_tenant, &rs).await;
    fleet.set_jwt(&ec_tenant, &es).await;

    // Every algorithm, every way of presenting the token.
    let good = hs_a.token(&a, "alice", 300, json!({"rooms": ["vip-*", "lobby"]}));
    for auth in [Auth::Header(good.clone()), Auth::Query(good.clone()), Auth::FirstFrame(good.clone())] {
        let client = fleet.try_connect(0, auth).await.expect("HS256 JWT admitted");
        assert_eq!(client.hello().user.as_str(), "alice");
        assert_eq!(client.hello().project_id.as_str(), a.project_id);
    }
    let client = fleet
        .try_connect(0, Auth::Header(rs.token(&rsa_tenant, "ron", 300, json!({}))))
        .await
        .expect("RS256 JWT admitted");
    assert_eq!(client.hello().project_id.as_str(), rsa_tenant.project_id);
    let client = fleet
        .try_connect(0, Auth::Header(es.token(&ec_tenant, "eve", 300, json!({}))))
        .await
        .expect("ES256 JWT admitted");
    assert_eq!(client.hello().user.as_str(), "eve");

    // The `rooms` grant lets the user into a private room it is not a member of.
    let owner = fleet.try_connect(0, Auth::Header(hs_a.token(&a, "owner", 300, json!({})))).await.unwrap();
    owner.create("vip-lounge", true).await.expect("create private room");
    let granted = fleet.try_connect(0, Auth::Header(good.clone())).await.unwrap();
    granted.join("vip-lounge", None).await.expect("granted join");
    let ungranted = fleet.try_connect(0, Auth::Header(hs_a.token(&a, "mallory", 300, json!({})))).await.unwrap();
    let refused = ungranted.join("vip-lounge", None).await.unwrap_err();
    assert_eq!(refused.code(), Some(switchyard_client::ErrorCode::Forbidden), "{refused:?}");

    let now = unix_secs();
    let header = |token: String| fleet.try_connect(0, Auth::Header(token));
    let cases: Vec<(&str, String)> = vec![
        ("expired", hs_a.token(&a, "alice", -60, json!({}))),
        ("forged (wrong secret)", JwtSigner::hs256("x".repeat(40).as_str()).token(&a, "alice", 300, json!({}))),
        ("other tenant's pid signed with this key", hs_a.token(&b, "alice", 300, json!({}))),
        ("pid of a tenant signed with another tenant's key", hs_b.token(&a, "alice", 300, json!({}))),
        ("alg none", alg_none_token(&json!({"sub": "alice", "pid": a.project_id, "exp": now + 300}))),
        ("RS256 token for an HS256 tenant", rs.sign(&json!({"sub": "alice", "pid": a.project_id, "exp": now + 300}))),
        (
            "HS256 token for an RS256 tenant, keyed with its public PEM",
            JwtSigner::hs256(&rsa_public_pem).token(&rsa_tenant, "ron", 300, json!({})),
        ),
        (
            "HS384 for an HS256 tenant",
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384),
                &json!({"sub": "alice", "pid": a.project_id, "exp": now + 300}),
                &jsonwebtoken::EncodingKey::from_secret(SECRET_A.as_bytes()),
            )
            .unwrap(),
        ),
        ("no exp", hs_a.sign(&json!({"sub": "alice", "pid": a.project_id}))),
        ("no sub", hs_a.sign(&json!({"pid": a.project_id, "exp": now + 300}))),
        ("no pid", hs_a.sign(&json!({"sub": "alice", "exp": now + 300}))),
        ("sub not a user id", hs_a.token(&a, "a.b", 300, json!({}))),
        ("bad rooms grant", hs_a.token(&a, "alice", 300, json!({"rooms": ["a.>"]}))),
        ("tenant without a JWT key", hs_a.token(&no_key, "alice", 300, json!({}))),
        ("unknown tenant", hs_a.sign(&json!({"sub": "alice", "pid": "pj_aaaaaaaaaaaaaaaaaaaa", "exp": now + 300}))),
        ("garbage", "eyJhbGciOiJIUzI1NiJ9.bm9wZQ.c2ln".to_owned()),
    ];
    for (what, token) in cases {
        assert_eq!(refusal(header(token.clone()).await), 401, "{what}");
    }
    // The same refusals after the upgrade close with 4001.
    let expired = hs_a.token(&a, "alice", -60, json!({}));
    assert_eq!(refusal(fleet.try_connect(0, Auth::FirstFrame(expired)).await), 4001);
    let none = alg_none_token(&json!({"sub": "alice", "pid": a.project_id, "exp": now + 300}));
    assert_eq!(refusal(fleet.try_connect(0, Auth::FirstFrame(none)).await), 4001);

    // Revocation by jti (every token with it) and, without a jti, by the token itself.
    let with_jti = hs_a.token(&a, "alice", 300, json!({"jti": "session-42"}));
    let same_jti = hs_a.token(&a, "alice", 600, json!({"jti": "session-42"}));
    let without = hs_a.token(&a, "bob", 300, json!({}));
    let other = hs_a.token(&a, "bob", 301, json!({}));
    for token in [&with_jti, &without] {
        let path = format!("/v1/tokens/{token}");
        let answer = fleet.call(0, Method::DELETE, &path, &a.api_key, None).await;
        assert_eq!(answer.status, 204, "{}", answer.body);
    }
    for revoked in [with_jti, same_jti, without] {
        assert_eq!(refusal(header(revoked).await), 401, "a revoked JWT");
    }
    fleet.try_connect(0, Auth::Header(other)).await.expect("an unrevoked JWT of the same user still connects");

    // An ES256 JWT without a jti, revoked, then presented with its signature re-encoded as (r, n - s): a valid
    // signature of the same token, and still revoked.
    let revoked_es = es.token(&ec_tenant, "eve", 300, json!({}));
    let twin = with_high_s_twin(&revoked_es);
    assert_ne!(twin, revoked_es);
    fleet.try_connect(0, Auth::Header(twin.clone())).await.expect("the twin signature verifies before the revocation");
    let path = format!("/v1/tokens/{revoked_es}");
    assert_eq!(fleet.call(0, Method::DELETE, &path, &ec_tenant.api_key, None).await.status, 204);
    assert_eq!(refusal(header(revoked_es).await), 401, "the revoked ES256 JWT");
    assert_eq!(refusal(header(twin).await), 401, "the revoked ES256 JWT with its signature's twin");
    // Another tenant cannot revoke this tenant's JWT.
    let victim = hs_a.token(&a, "carol", 300, json!({"jti": "carol-1"}));
    let answer = fleet.call(0, Method::DELETE, &format!("/v1/tokens/{victim}"), &b.api_key, None).await;
    assert_eq!(answer.status, 404, "{}", answer.body);
    fleet.try_connect(0, Auth::Header(victim)).await.expect("still valid");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opaque_token_refusals_have_exact_codes() {
    let fleet = Fleet::start_with(1, 1, |c| c.auth_timeout_ms = 1_000).await;
    let a = fleet.create_tenant().await;
    let b = fleet.create_tenant().await;

    // Missing: no token at all on the HTTP API; no auth on the socket.
    let answer = fleet.call(0, Method::POST, "/v1/tokens", "", Some(json!({"user_id": "x"}))).await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.body["code"], "unauthorized");
    assert_eq!(refusal(fleet.try_connect(0, Auth::None).await), 4001);

    // Forged: well-formed but never issued; and malformed.
    let forged = switchyard_protocol::ids::opaque_token::generate();
    assert_eq!(refusal(fleet.try_connect(0, Auth::Header(forged.clone())).await), 401);
    assert_eq!(refusal(fleet.try_connect(0, Auth::FirstFrame(forged)).await), 4001);
    assert_eq!(refusal(fleet.try_connect(0, Auth::Query("sytok_short".into())).await), 401);

    // Expired.
    let short =
        fleet.call(0, Method::POST, "/v1/tokens", &a.api_key, Some(json!({"user_id": "ann", "ttl_secs": 1}))).await;
    assert_eq!(short.status, 201);
    let short = short.body["token"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(refusal(fleet.try_connect(0, Auth::Header(short)).await), 401);

    // Revoked by another tenant: nothing happens to it.
    let token = fleet.token(&a, "ann").await;
    let live = fleet.connect(0, &token, Format::Json).await;
    let answer = fleet.call(0, Method::DELETE, &format!("/v1/tokens/{token}"), &b.api_key, None).await;
    assert_eq!(answer.status, 204, "revoking is scoped to the caller's tenant");
    live.ping().await.expect("the socket of tenant A is untouched");
    fleet.try_connect(0, Auth::Header(token.clone())).await.expect("the token of tenant A still works");

    // Revoked by its tenant: the socket closes with 4003, new connects get 401.
    let answer = fleet.call(0, Method::DELETE, &format!("/v1/tokens/{token}"), &a.api_key, None).await;
    assert_eq!(answer.status, 204);
    let closed = live.wait_closed(Duration::from_secs(2)).await.expect("closed");
    assert_eq!(closed.code, 4003);
    assert_eq!(closed.bye.as_ref().map(|b| b.code), Some(4003), "bye before the close");
    assert_eq!(refusal(fleet.try_connect(0, Auth::Header(token.clone())).await), 401);
    assert_eq!(refusal(fleet.try_connect(0, Auth::FirstFrame(token)).await), 4001);

    // Bad revocation requests.
    let answer = fleet.call(0, Method::DELETE, "/v1/tokens/not-a-token", &a.api_key, None).await;
    assert_eq!(answer.status, 400);
    let answer = fleet.call(0, Method::DELETE, "/v1/users/a.b/sessions", &a.api_key, None).await;
    assert_eq!(answer.status, 400);
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_api_validates_keys_rotates_and_disables() {
    let fleet = Fleet::start(2, 1).await;
    let admin = fleet.admin_token.clone();
    let tenant = fleet.create_tenant().await;
    let jwt_path = format!("/v1/admin/tenants/{}/jwt", tenant.project_id);
    let put = |body: serde_json::Value| {
        let (path, admin) = (jwt_path.clone(), admin.clone());
        let fleet = &fleet;
        async move { fleet.call(0, Method::PUT, &path, &admin, Some(body)).await.status }
    };
    let (_, private_pem) = JwtSigner::es256();
    let (_, small_rsa_pem) = JwtSigner::rs256(1024);
    let (_, rsa_pem) = JwtSigner::rs256(2048);
    assert_eq!(put(json!({"alg": "HS256", "secret": "too short"})).await, 400);
    assert_eq!(put(json!({"alg": "none"})).await, 400);
    assert_eq!(put(json!({"alg": "HS512", "secret": SECRET_A})).await, 400);
    assert_eq!(put(json!({"alg": "ES256", "public_key_pem": private_pem})).await, 400, "a private key");
    assert_eq!(put(json!({"alg": "ES256", "public_key_pem": rsa_pem})).await, 400, "an RSA key as ES256");
    assert_eq!(put(json!({"alg": "RS256", "public_key_pem": small_rsa_pem})).await, 400, "1024 bits");
    assert_eq!(
        put(json!({"alg": "RS256", "public_key_pem": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"}))
            .await,
        400
    );
    assert_eq!(put(json!({"alg": "HS256", "secret": SECRET_A, "public_key_pem": "x"})).await, 400);
    assert_eq!(put(json!({"alg": "RS256", "public_key_pem": rsa_pem})).await, 204);
    let wrong_admin = fleet
        .call(0, Method::PUT, &jwt_path, "not-the-admin-token", Some(json!({"alg": "HS256", "secret": SECRET_A})))
        .await;
    assert_eq!(wrong_admin.status, 401);
    let unknown = fleet
        .call(
            0,
            Method::PUT,
            "/v1/admin/tenants/pj_aaaaaaaaaaaaaaaaaaaa/jwt",
            &admin,
            Some(json!({"alg": "HS256", "secret": SECRET_A})),
        )
        .await;
    assert_eq!(unknown.status, 404);
    let malformed = fleet.call(0, Method::GET, "/v1/admin/tenants/nope", &admin, None).await;
    assert_eq!(malformed.status, 400);
    let shown = fleet.call(1, Method::GET, &format!("/v1/admin/tenants/{}", tenant.project_id), &admin, None).await;
    assert_eq!(shown.status, 200);
    assert_eq!(shown.body["jwt_alg"], "RS256");
    assert!(!shown.body.to_string().contains("BEGIN"), "no key material shown: {}", shown.body);

    // Rotation: the new key works and the old one is refused at once, on every gateway.
    let rotate =
        fleet.call(0, Method::POST, &format!("/v1/admin/tenants/{}/rotate-key", tenant.project_id), &admin, None).await;
    assert_eq!(rotate.status, 200);
    let new_key = rotate.body["api_key"].as_str().expect("api_key").to_owned();
    assert_ne!(new_key, tenant.api_key);
    for gateway in 0..2 {
        let old = fleet.call(gateway, Method::POST, "/v1/tokens", &tenant.api_key, Some(json!({"user_id": "u"}))).await;
        assert_eq!(old.status, 401, "old key on gateway {gateway}");
        let new = fleet.call(gateway, Method::POST, "/v1/tokens", &new_key, Some(json!({"user_id": "u"}))).await;
        assert_eq!(new.status, 201, "new key on gateway {gateway}");
    }

    // Disable: 204, then the tenant is gone for the admin API and refused for its key.
    let path = format!("/v1/admin/tenants/{}", tenant.project_id);
    assert_eq!(fleet.call(0, Method::DELETE, &path, &admin, None).await.status, 204);
    assert_eq!(fleet.call(0, Method::DELETE, &path, &admin, None).await.status, 204, "idempotent");
    assert_eq!(fleet.call(1, Method::GET, &path, &admin, None).await.status, 404);
    let refused = fleet.call(1, Method::POST, "/v1/tokens", &new_key, Some(json!({"user_id": "u"}))).await;
    assert_eq!(refused.status, 403);
    assert_eq!(
        fleet.call(0, Method::DELETE, "/v1/admin/tenants/pj_aaaaaaaaaaaaaaaaaaaa", &admin, None).await.status,
        404
    );
    fleet.stop().await;
}

/// The same ES256 JWT with its signature (r, s) replaced by (r, n - s), which verifies just as well (ECDSA
/// signatures are malleable), n being the order of P-256.
fn with_high_s_twin(token: &str) -> String {
    use base64::Engine;
    const N: [u8; 32] = [
        0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xBC, 0xE6,
        0xFA, 0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2, 0xFC, 0x63, 0x25, 0x51,
    ];
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (signed, signature) = token.rsplit_once('.').expect("a JWT");
    let mut signature = b64.decode(signature).expect("base64url signature");
    assert_eq!(signature.len(), 64, "an ES256 signature is r and s of 32 bytes each");
    // s := n - s, big-endian with borrow.
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut digit = i16::from(N[i]) - i16::from(signature[32 + i]) - borrow;
        borrow = i16::from(digit < 0);
        if digit < 0 {
            digit += 256;
        }
        signature[32 + i] = digit as u8;
    }
    assert_eq!(borrow, 0, "s is below n");
    format!("{signed}.{}", b64.encode(signature))
}
