//! Authentication at the WebSocket edge, through real Redis: opaque tokens by header, query or first frame, and
//! clear refusals (HTTP 401 before the upgrade, close 4001 after it). Also the admin and tenant HTTP APIs' refusals.

mod support;

use serde_json::json;
use std::time::Duration;
use support::Fleet;
use switchyard_client::{Auth, Client, ClientError, ConnectOptions, Format};

fn options(fleet: &Fleet, auth: Auth) -> ConnectOptions {
    let mut options = ConnectOptions::new(fleet.ws_url(0), auth);
    options.connect_timeout = Duration::from_secs(15);
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_token_path_works_and_bad_tokens_are_refused() {
    let fleet = Fleet::start_with(1, 1, |config| config.auth_timeout_ms = 1_000).await;
    let tenant = fleet.create_tenant().await;
    let token = fleet.token(&tenant, "dave").await;

    for auth in [Auth::Header(token.clone()), Auth::Query(token.clone()), Auth::FirstFrame(token.clone())] {
        let client = Client::connect(options(&fleet, auth).with_format(Format::MsgPack)).await.expect("connect");
        assert_eq!(client.hello().user.as_str(), "dave");
        client.ping().await.expect("ping");
    }

    let unknown = switchyard_protocol::ids::opaque_token::generate();
    for auth in [Auth::Header(unknown.clone()), Auth::Query("sytok_nonsense".into())] {
        match Client::connect(options(&fleet, auth)).await {
            Err(ClientError::Http { status: 401, body }) => {
                assert!(body.contains("unauthorized"), "{body}")
            }
            Err(other) => panic!("expected HTTP 401, got {other:?}"),
            Ok(_) => panic!("an unknown token was admitted"),
        }
    }
    match Client::connect(options(&fleet, Auth::FirstFrame(unknown))).await {
        Err(error) => assert_eq!(error.close_code(), Some(4001), "{error:?}"),
        Ok(_) => panic!("an unknown first-frame token was admitted"),
    }
    // No auth at all: closed with 4001 once the auth window passes.
    match Client::connect(options(&fleet, Auth::None)).await {
        Err(error) => assert_eq!(error.close_code(), Some(4001), "{error:?}"),
        Ok(_) => panic!("an unauthenticated socket got a hello"),
    }

    // Unsupported subprotocols are refused before the upgrade.
    let mut wrong = options(&fleet, Auth::Header(token));
    wrong.subprotocols = Some(vec!["chat.v9".into()]);
    match Client::connect(wrong).await {
        Err(ClientError::Http { status: 400, .. }) => {}
        other => panic!("expected HTTP 400, got {:?}", other.map(|_| "a session")),
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_apis_refuse_wrong_credentials_and_bad_bodies() {
    let fleet = Fleet::start(1, 1).await;
    let base = &fleet.gateways[0];
    let http = &fleet.http;
    let status = |response: reqwest::Response| response.status().as_u16();

    let wrong_admin =
        http.post(format!("{base}/v1/admin/tenants")).bearer_auth("not-the-admin-token").json(&json!({"name": "x"}));
    assert_eq!(status(wrong_admin.send().await.unwrap()), 401);
    let bad_body = http.post(format!("{base}/v1/admin/tenants")).bearer_auth(&fleet.admin_token).body("{nope");
    assert_eq!(status(bad_body.send().await.unwrap()), 400);

    let tenant = fleet.create_tenant().await;
    let shown = http.get(format!("{base}/v1/admin/tenants/{}", tenant.project_id)).bearer_auth(&fleet.admin_token);
    let shown: serde_json::Value = shown.send().await.unwrap().json().await.unwrap();
    assert_eq!(shown["project_id"], tenant.project_id.as_str());
    assert!(shown.get("api_key").is_none() && !shown.to_string().contains(&tenant.api_key), "no secrets: {shown}");

    let forged_key = format!("sk_{}_{}", tenant.project_id, "A".repeat(32));
    let forged = http.post(format!("{base}/v1/tokens")).bearer_auth(forged_key).json(&json!({"user_id": "eve"}));
    assert_eq!(status(forged.send().await.unwrap()), 401);
    let bad_user = http.post(format!("{base}/v1/tokens")).bearer_auth(&tenant.api_key).json(&json!({"user_id": "a.b"}));
    assert_eq!(status(bad_user.send().await.unwrap()), 400);
    let long_ttl = http
        .post(format!("{base}/v1/tokens"))
        .bearer_auth(&tenant.api_key)
        .json(&json!({"user_id": "a", "ttl_secs": 86_401}));
    assert_eq!(status(long_ttl.send().await.unwrap()), 400);

    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200, "ready with NATS and Redis up");
    let metrics = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("switchyard_gateway"), "metrics are exported: {metrics}");
    fleet.stop().await;
}
