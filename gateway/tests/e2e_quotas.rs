//! The tenant quotas on rooms, through a real fleet: rooms per tenant, members per room, rooms per user (invites and
//! the backend's additions count too), and the option that only the tenant's backend creates rooms, each as a fleet default and
//! as a tenant's own value set through the admin limits API. Each refusal is `forbidden` (HTTP 403) with a message
//! naming the quota, and changes nothing.

mod support;

use reqwest::Method;
use serde_json::json;
use support::Fleet;
use switchyard_client::{Client, ClientError, ClientOp, ErrorCode, Format};
use switchyard_protocol::{RoomId, UserId};

/// The error a refused request must be: `forbidden`, naming the quota.
fn assert_quota_refusal(result: Result<impl std::fmt::Debug, ClientError>, needle: &str) {
    match result {
        Err(ClientError::Server { code: ErrorCode::Forbidden, message, .. }) => {
            assert!(message.contains(needle), "the refusal names the quota ({needle:?}): {message}")
        }
        other => panic!("expected forbidden ({needle}), got {other:?}"),
    }
}

async fn invite(client: &Client, room: &str, user: &str) -> Result<(), ClientError> {
    let op = ClientOp::Invite { room: RoomId::parse(room).unwrap(), user: UserId::parse(user).unwrap() };
    client.request(op).await?.into_result().map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn members_per_room_is_a_tenant_quota_for_clients_and_the_backend() {
    let fleet = Fleet::start(1, 1).await;
    let tenant = fleet.create_tenant().await;
    let other = fleet.create_tenant().await;
    fleet.set_limits(&tenant, json!({"max_members_per_room": 2})).await;
    let ann = fleet.connect(0, &fleet.token(&tenant, "ann").await, Format::Json).await;
    let bob = fleet.connect(0, &fleet.token(&tenant, "bob").await, Format::Json).await;
    let cat = fleet.connect(0, &fleet.token(&tenant, "cat").await, Format::MsgPack).await;
    ann.join("small", None).await.expect("the creator is the first member");
    bob.join("small", None).await.expect("the second member fits");
    assert_quota_refusal(cat.join("small", None).await, "2 members");
    // The backend is held to it too, and a refused join left no member behind.
    let path = "/v1/rooms/small/members/dan";
    let added = fleet.call(0, Method::PUT, path, &tenant.api_key, Some(json!({"role": "member"}))).await;
    assert_eq!((added.status, added.body["code"].as_str()), (403, Some("forbidden")), "{}", added.body);
    let members = fleet.call(0, Method::GET, "/v1/rooms/small/members", &tenant.api_key, None).await;
    assert_eq!(members.body["members"].as_array().map(Vec::len), Some(2), "{}", members.body);
    // A member who leaves frees a place.
    bob.leave("small").await.unwrap();
    cat.join("small", None).await.expect("a freed place is usable");
    // Another tenant has the fleet's default.
    for user in ["ann", "bob", "cat"] {
        let client = fleet.connect(0, &fleet.token(&other, user).await, Format::Json).await;
        client.join("small", None).await.expect("another tenant's room is not capped at 2");
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rooms_per_user_counts_joins_creates_and_invites() {
    let fleet = Fleet::start_with(1, 1, |config| config.max_rooms_per_user = 3).await;
    let tenant = fleet.create_tenant().await;
    let roomy = fleet.create_tenant().await;
    fleet.set_limits(&roomy, json!({"max_rooms_per_user": 5})).await;
    let ann = fleet.connect(0, &fleet.token(&tenant, "ann").await, Format::Json).await;
    let bob = fleet.connect(0, &fleet.token(&tenant, "bob").await, Format::Json).await;
    for room in ["r1", "r2"] {
        ann.join(room, None).await.unwrap();
    }
    ann.create("r3", false).await.expect("a created room counts as the third");
    assert_quota_refusal(ann.join("r4", None).await, "3 rooms");
    assert_quota_refusal(ann.create("r5", false).await, "3 rooms");
    // The refused create made no room: bob creates it himself.
    bob.create("r5", false).await.expect("the refused create left no room behind");
    // An invite counts against the invitee.
    assert_quota_refusal(invite(&bob, "r5", "ann").await, "3 rooms");
    ann.leave("r1").await.unwrap();
    invite(&bob, "r5", "ann").await.expect("a room left frees a place for an invite");
    // The backend's additions count too.
    let added =
        fleet.call(0, Method::PUT, "/v1/rooms/r2/members/bob", &tenant.api_key, Some(json!({"role": "member"}))).await;
    assert_eq!(added.status, 204, "{}", added.body);
    let rooms = ann.request(ClientOp::Rooms).await.unwrap().into_result().unwrap();
    assert_eq!(rooms["rooms"].as_array().map(Vec::len), Some(3), "{rooms:?}");
    // A tenant's own quota replaces the default.
    let other = fleet.connect(0, &fleet.token(&roomy, "ann").await, Format::Json).await;
    for room in ["a", "b", "c", "d", "e"] {
        other.join(room, None).await.expect("five rooms fit the tenant's own quota");
    }
    assert_quota_refusal(other.join("f", None).await, "5 rooms");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tenant_can_let_only_its_backend_create_rooms() {
    let fleet = Fleet::start(1, 1).await;
    let tenant = fleet.create_tenant().await;
    let open = fleet.create_tenant().await;
    fleet.set_limits(&tenant, json!({"backend_creates_rooms": true})).await;
    let ann = fleet.connect(0, &fleet.token(&tenant, "ann").await, Format::Json).await;
    assert_quota_refusal(ann.create("lobby", false).await, "created by its backend");
    assert_quota_refusal(ann.join("lobby", None).await, "created by its backend");
    let missing = fleet.call(0, Method::GET, "/v1/rooms/lobby/members", &tenant.api_key, None).await;
    assert_eq!(missing.status, 404, "the refused join made no room: {}", missing.body);
    let created = fleet.call(0, Method::POST, "/v1/rooms", &tenant.api_key, Some(json!({"room": "lobby"}))).await;
    assert_eq!(created.status, 201, "{}", created.body);
    ann.join("lobby", None).await.expect("a room the backend created is joined as usual");
    ann.send("lobby", "hello").await.expect("and used");
    // Another tenant's clients still create rooms.
    let free = fleet.connect(0, &fleet.token(&open, "ann").await, Format::Json).await;
    free.create("lobby", false).await.expect("the option is the tenant's own");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rooms_per_tenant_bounds_every_way_a_room_is_created() {
    let fleet = Fleet::start_with(1, 1, |config| config.max_rooms_per_tenant = Some(5)).await;
    let tenant = fleet.create_tenant().await;
    let other = fleet.create_tenant().await;
    fleet.set_limits(&tenant, json!({"max_rooms": 2})).await;
    let ann = fleet.connect(0, &fleet.token(&tenant, "ann").await, Format::Json).await;
    ann.create("one", false).await.expect("the first room");
    ann.join("two", None).await.expect("a join that creates the second room");
    assert_quota_refusal(ann.create("three", false).await, "quota of 2 rooms");
    assert_quota_refusal(ann.join("three", None).await, "quota of 2 rooms");
    let created = fleet.call(0, Method::POST, "/v1/rooms", &tenant.api_key, Some(json!({"room": "three"}))).await;
    assert_eq!((created.status, created.body["code"].as_str()), (403, Some("forbidden")), "{}", created.body);
    ann.join("one", None).await.expect("existing rooms are joined as usual");
    // Another tenant has the fleet's default of five.
    let free = fleet.connect(0, &fleet.token(&other, "ann").await, Format::Json).await;
    for room in ["a", "b", "c", "d", "e"] {
        free.create(room, false).await.expect("five rooms fit the default");
    }
    assert_quota_refusal(free.create("f", false).await, "quota of 5 rooms");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_api_refuses_quotas_past_the_ceilings() {
    let fleet = Fleet::start(1, 0).await;
    let tenant = fleet.create_tenant().await;
    let path = format!("/v1/admin/tenants/{}/limits", tenant.project_id);
    for body in [
        json!({"max_members_per_room": 0}),
        json!({"max_members_per_room": 10_001}),
        json!({"max_rooms_per_user": 20_000}),
        json!({"backend_creates_rooms": "yes"}),
    ] {
        let answer = fleet.call(0, Method::PUT, &path, &fleet.admin_token, Some(body.clone())).await;
        assert_eq!(answer.status, 400, "{body}: {}", answer.body);
    }
    fleet.set_limits(&tenant, json!({"max_members_per_room": 10_000, "backend_creates_rooms": false})).await;
    let shown =
        fleet.call(0, Method::GET, &format!("/v1/admin/tenants/{}", tenant.project_id), &fleet.admin_token, None).await;
    assert_eq!(shown.body["limits"]["max_members_per_room"], 10_000, "{}", shown.body);
    assert_eq!(shown.body["limits"]["backend_creates_rooms"], false, "{}", shown.body);
    fleet.stop().await;
}
