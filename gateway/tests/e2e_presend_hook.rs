//! The pre-send hook through a real fleet and a real HTTP receiver started by the test: allow, deny and modify for
//! `send`, `dm` and `edit`; a hook that hangs or fails under each failure policy; every request signed per the
//! Standard Webhooks scheme (checked here with an HMAC of the test's own); tenants without a hook never call one;
//! and the addresses a tenant may not make the gateway reach (loopback, private, link-local, metadata), refused when
//! the hook is set and again when it is called through a name that resolves to one.

mod support;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{Fleet, Tenant};
use switchyard_client::{Client, ClientError, ClientOp, ErrorCode, Format, ServerEvent};
use switchyard_protocol::hooks::{FailurePolicy, HookUrl, PreSendHook, SigningSecret, TenantHooks};
use switchyard_protocol::internal::TenantRecord;
use switchyard_protocol::{codec, subjects, ProjectId, RoomId};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Vec<u8>,
    at: Instant,
}

/// A hook receiver: what it answers depends on the first word of the message body.
#[derive(Clone, Default)]
struct Receiver {
    seen: Arc<Mutex<Vec<Received>>>,
    /// Requests to the path the `redirect` answer points to.
    followed: Arc<Mutex<u32>>,
}

async fn answer(State(receiver): State<Receiver>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    receiver.seen.lock().unwrap().push(Received { headers, body: body.to_vec(), at: Instant::now() });
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let text = request["body"].as_str().unwrap_or_default().to_owned();
    match text.split(' ').next().unwrap_or_default() {
        "deny" => axum::Json(json!({"action": "deny", "code": "forbidden", "message": "no swearing"})).into_response(),
        // An edit has no attrs to modify.
        "modify" if request["op"] == "edit" => {
            axum::Json(json!({"action": "modify", "body": text.to_uppercase()})).into_response()
        }
        "modify" => axum::Json(json!({"action": "modify", "body": text.to_uppercase(), "attrs": {"checked": true}}))
            .into_response(),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            axum::Json(json!({"action": "allow"})).into_response()
        }
        "fail" => (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response(),
        "refuse" => axum::Json(json!({"action": "deny", "code": "bad_request", "message": "rephrase"})).into_response(),
        // Over the gateway's body limit: a modify is held to the client's limits.
        "enlarge" => axum::Json(json!({"action": "modify", "body": "x".repeat(20_000)})).into_response(),
        // Longer than any answer the gateway reads.
        "flood" => {
            let padding = " ".repeat(70_000);
            (StatusCode::OK, format!("{{\"action\":\"allow\"}}{padding}")).into_response()
        }
        // To a path of this same receiver, which the gateway may reach: only following the redirect would ask it.
        "redirect" => (StatusCode::TEMPORARY_REDIRECT, [("location", "/followed")]).into_response(),
        "garbage" => (StatusCode::OK, "{\"action\":\"allow\"").into_response(),
        _ => axum::Json(json!({"action": "allow"})).into_response(),
    }
}

/// Start the receiver on loopback; it stops with the test's runtime.
async fn start_receiver() -> (Receiver, u16) {
    let receiver = Receiver::default();
    let followed = receiver.followed.clone();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(answer))
        .route(
            "/followed",
            axum::routing::any(move || async move {
                *followed.lock().unwrap() += 1;
                axum::Json(json!({"action": "allow"}))
            }),
        )
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, port)
}

/// Whether a request carries a valid Standard Webhooks signature by `secret` (`whsec_<base64 key>`) and a current
/// timestamp, checked independently of the gateway.
fn signed(received: &Received, secret: &str) -> Result<(), String> {
    let header = |name: &str| {
        received.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned).ok_or(format!("no {name}"))
    };
    let (id, timestamp, signature) =
        (header("webhook-id")?, header("webhook-timestamp")?, header("webhook-signature")?);
    if !id.starts_with("msg_") {
        return Err(format!("webhook-id {id}"));
    }
    let sent: u64 = timestamp.parse().map_err(|_| format!("webhook-timestamp {timestamp}"))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    if now.abs_diff(sent) >= 300 {
        return Err(format!("timestamp {sent} is not now ({now})"));
    }
    let key = BASE64.decode(secret.strip_prefix("whsec_").expect("whsec_ prefix")).unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(&received.body);
    let expected = format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()));
    match signature.split(' ').any(|s| s == expected) {
        true => Ok(()),
        false => Err(format!("signature {signature} is not {expected}")),
    }
}

/// Set the tenant's pre-send hook; returns the signing secret.
async fn set_hook(fleet: &Fleet, tenant: &Tenant, url: &str, timeout_ms: u32, on_failure: &str) -> String {
    let body = json!({"url": url, "timeout_ms": timeout_ms, "on_failure": on_failure});
    let set = fleet.call(0, Method::PUT, "/v1/hooks/pre-send", &tenant.api_key, Some(body)).await;
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(set.body["pre_send"]["on_failure"], on_failure, "{}", set.body);
    set.body["signing_secret"].as_str().expect("a signing secret").to_owned()
}

fn refused_with(result: Result<impl std::fmt::Debug, ClientError>, code: ErrorCode) -> String {
    match result {
        Err(ClientError::Server { code: got, message, .. }) if got == code => message,
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

/// The next message event `client` receives, within a few seconds.
async fn next_msg(client: &Client) -> (String, Option<Value>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Some(event) = client.next_event_timeout(deadline.saturating_duration_since(Instant::now())).await {
        if let ServerEvent::Msg { body, attrs, .. } = event {
            return (body, attrs);
        }
    }
    panic!("no message arrived");
}

async fn history_bodies(fleet: &Fleet, tenant: &Tenant, room: &str) -> Vec<String> {
    let page = fleet.call(0, Method::GET, &format!("/v1/rooms/{room}/messages"), &tenant.api_key, None).await;
    assert_eq!(page.status, 200, "{}", page.body);
    page.body["messages"].as_array().unwrap().iter().filter_map(|m| m["body"].as_str().map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_hook_allows_denies_and_modifies_sends_dms_and_edits() {
    let fleet = Fleet::start_with(1, 1, |config| config.hooks_allowed_networks = vec!["127.0.0.0/8".into()]).await;
    let (receiver, port) = start_receiver().await;
    let tenant = fleet.create_tenant().await;
    let plain = fleet.create_tenant().await;
    let url = format!("http://127.0.0.1:{port}/hook");
    let secret = set_hook(&fleet, &tenant, &url, 1000, "deny").await;
    let shown = fleet.call(0, Method::GET, "/v1/hooks", &tenant.api_key, None).await;
    assert_eq!(shown.body["signing_secret"], secret.as_str());
    assert_eq!(shown.body["pre_send"]["url"], url.as_str());

    let ann = fleet.connect(0, &fleet.token(&tenant, "ann").await, Format::Json).await;
    let bob = fleet.connect(0, &fleet.token(&tenant, "bob").await, Format::MsgPack).await;
    ann.join("lobby", None).await.unwrap();
    bob.join("lobby", None).await.unwrap();

    ann.send("lobby", "allow this").await.expect("an allowed message is sent");
    assert_eq!(next_msg(&bob).await.0, "allow this");
    let message = refused_with(ann.send("lobby", "deny this").await, ErrorCode::Forbidden);
    assert_eq!(message, "no swearing");
    let message = refused_with(ann.send("lobby", "refuse this").await, ErrorCode::BadRequest);
    assert_eq!(message, "rephrase");
    let sent = ann.send("lobby", "modify this").await.expect("a modified message is sent");
    let (body, attrs) = next_msg(&bob).await;
    assert_eq!((body.as_str(), attrs), ("MODIFY THIS", Some(json!({"checked": true}))));
    // Direct messages and edits are asked too.
    refused_with(ann.dm("bob", "deny me").await, ErrorCode::Forbidden);
    let edit = ClientOp::Edit { room: RoomId::parse("lobby").unwrap(), seq: sent.seq, body: "deny edit".into() };
    let edited = ann.request(edit).await.unwrap().into_result();
    assert!(matches!(edited, Err(ClientError::Server { code: ErrorCode::Forbidden, .. })), "{edited:?}");
    let edit = ClientOp::Edit { room: RoomId::parse("lobby").unwrap(), seq: sent.seq, body: "modify edit".into() };
    ann.request(edit).await.unwrap().into_result().expect("a modified edit is made");
    // A denied message was never sequenced; a modified one is stored as modified.
    assert_eq!(history_bodies(&fleet, &tenant, "lobby").await, vec!["allow this", "MODIFY EDIT"]);

    let seen = receiver.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 7, "one call per send, dm and edit");
    for received in &seen {
        signed(received, &secret).unwrap();
    }
    let requests: Vec<Value> = seen.iter().map(|r| serde_json::from_slice(&r.body).unwrap()).collect();
    assert_eq!(requests[0]["type"], "message.pre_send");
    assert_eq!(requests[0]["project_id"], tenant.project_id.as_str());
    assert_eq!((requests[0]["op"].as_str(), requests[0]["user"].as_str()), (Some("send"), Some("ann")));
    assert_eq!((requests[4]["op"].as_str(), requests[4]["room"].as_str()), (Some("dm"), Some("dm:ann:bob")));
    assert_eq!((requests[5]["op"].as_str(), requests[5]["seq"].as_u64()), (Some("edit"), Some(sent.seq)));
    // A forged signature would not pass the same check.
    let mut forged = seen[0].clone();
    forged.body.push(b' ');
    assert!(signed(&forged, &secret).is_err());

    // A tenant without a hook never calls one.
    let cat = fleet.connect(0, &fleet.token(&plain, "cat").await, Format::Json).await;
    cat.join("lobby", None).await.unwrap();
    cat.send("lobby", "deny nothing here").await.expect("no hook, no refusal");
    assert_eq!(receiver.seen.lock().unwrap().len(), 7, "the receiver heard nothing from a tenant without a hook");

    // After a rotation, requests are signed with the new secret and, for a grace period, with the old one too.
    let rotated = fleet.call(0, Method::POST, "/v1/hooks/rotate-secret", &tenant.api_key, None).await;
    let new_secret = rotated.body["signing_secret"].as_str().expect("a new secret").to_owned();
    assert_ne!(new_secret, secret);
    wait_until(|| async {
        ann.send("lobby", "allow after rotation").await.expect("allowed");
        let last = receiver.seen.lock().unwrap().last().cloned().expect("a call");
        signed(&last, &new_secret).is_ok()
    })
    .await;
    let last = receiver.seen.lock().unwrap().last().cloned().unwrap();
    signed(&last, &secret).expect("the old secret still signs during its grace");
    assert!(signed(&last, "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_err(), "an unrelated secret does not verify");

    // A removed hook is no longer called.
    let removed = fleet.call(0, Method::DELETE, "/v1/hooks/pre-send", &tenant.api_key, None).await;
    assert_eq!(removed.status, 204);
    wait_until(|| async { ann.send("lobby", "deny again").await.is_ok() }).await;
    fleet.stop().await;
}

/// Retry `check` for a few seconds: a setting reaches the gateway's tenant cache through a watch.
async fn wait_until<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check().await {
        assert!(Instant::now() < deadline, "the setting did not take effect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hook_that_hangs_or_fails_applies_the_tenants_policy() {
    let fleet = Fleet::start_with(1, 1, |config| {
        config.hooks_allowed_networks = vec!["127.0.0.1".into()];
        config.hooks_concurrency_per_tenant = 1;
    })
    .await;
    let (receiver, port) = start_receiver().await;
    let url = format!("http://127.0.0.1:{port}/hook");
    let open = fleet.create_tenant().await;
    let closed = fleet.create_tenant().await;
    set_hook(&fleet, &open, &url, 300, "allow").await;
    set_hook(&fleet, &closed, &url, 300, "deny").await;
    let ann = fleet.connect(0, &fleet.token(&open, "ann").await, Format::Json).await;
    let zed = fleet.connect(0, &fleet.token(&closed, "zed").await, Format::Json).await;
    ann.join("room", None).await.unwrap();
    zed.join("room", None).await.unwrap();

    for failing in ["hang", "fail", "redirect", "garbage", "enlarge", "flood"] {
        let started = Instant::now();
        ann.send("room", format!("{failing} open")).await.unwrap_or_else(|e| panic!("{failing}: fail open: {e:?}"));
        let waited = started.elapsed();
        let message = refused_with(zed.send("room", format!("{failing} closed")).await, ErrorCode::Unavailable);
        assert!(message.contains("pre-send"), "{message}");
        println!("{failing}: fail-open send took {} ms", waited.as_millis());
        if failing == "hang" {
            assert!(waited >= Duration::from_millis(300), "the deadline was waited for: {waited:?}");
            assert!(waited < Duration::from_millis(2500), "the deadline was kept: {waited:?}");
        }
    }
    // One call in flight per tenant (this fleet's setting): while one of its hooks hangs, the tenant's next call
    // finds no slot within its deadline, and another tenant's hook is asked at once.
    let yan = fleet.connect(0, &fleet.token(&closed, "yan").await, Format::Json).await;
    yan.join("room", None).await.unwrap();
    let quick = async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        ann.send("room", "quick").await.expect("another tenant's hook answers");
        started.elapsed()
    };
    let (hung, queued, quick) = tokio::join!(zed.send("room", "hang a"), yan.send("room", "hang b"), quick);
    refused_with(hung, ErrorCode::Unavailable);
    refused_with(queued, ErrorCode::Unavailable);
    // The second call of the tenant could only start once the first had given up its slot.
    let hung_calls: Vec<Instant> = receiver
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains("\"hang "))
        .map(|r| r.at)
        .collect();
    if let [.., first, second] = hung_calls[..] {
        let apart = second.duration_since(first);
        assert!(apart >= Duration::from_millis(250), "two calls of one tenant overlapped ({apart:?} apart)");
    }
    println!("another tenant's send while this one's hook hangs: {} ms", quick.as_millis());
    assert!(quick < Duration::from_millis(250), "another tenant waited {quick:?}");

    let open_bodies = history_bodies(&fleet, &open, "room").await;
    assert_eq!(open_bodies.len(), 7, "every fail-open message was sent: {open_bodies:?}");
    assert!(history_bodies(&fleet, &closed, "room").await.is_empty(), "no fail-closed message was sent");
    // The redirect was answered, not followed.
    assert_eq!(*receiver.followed.lock().unwrap(), 0, "a redirect was followed");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hooks_may_not_reach_reserved_addresses_unless_the_operator_allows_them() {
    let fleet = Fleet::start(1, 1).await;
    let (receiver, port) = start_receiver().await;
    let tenant = fleet.create_tenant().await;
    for url in [
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://localhost:{port}/hook"),
        format!("http://[::1]:{port}/hook"),
        format!("http://[::ffff:127.0.0.1]:{port}/hook"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/hook".to_owned(),
        "http://192.168.1.1/hook".to_owned(),
        "http://0.0.0.0/hook".to_owned(),
        "http://[fd00:ec2::254]/".to_owned(),
    ] {
        let body = json!({"url": url, "on_failure": "deny"});
        let set = fleet.call(0, Method::PUT, "/v1/hooks/pre-send", &tenant.api_key, Some(body)).await;
        assert_eq!(set.status, 400, "{url}: {}", set.body);
        assert!(set.body["message"].as_str().unwrap_or_default().contains("address"), "{url}: {}", set.body);
    }
    // A name that passed when it was set but resolves to loopback when called is refused at the call: stored here
    // directly, as if the name's address had changed since.
    // The same holds for addresses written in the URL. Each on a tenant of its own, so that the refusal seen is
    // this hook's.
    for stored in [
        format!("http://localhost:{port}/hook"),
        format!("http://127.0.0.1:{port}/hook"),
        format!("http://[::ffff:7f00:1]:{port}/hook"),
    ] {
        let tenant = fleet.create_tenant().await;
        let mut record = read_record(&tenant).await;
        let hook = PreSendHook::new(HookUrl::parse(&stored).unwrap(), Some(500), FailurePolicy::Deny).unwrap();
        record.hooks = Some(TenantHooks { pre_send: Some(hook), ..TenantHooks::new(SigningSecret::generate()) });
        write_record(&tenant, &record).await;
        let ann = fleet.connect(0, &fleet.token(&tenant, "ann").await, Format::Json).await;
        ann.join("room", None).await.unwrap();
        // Until the change reaches the gateway's cache, the tenant has no hook and the send goes through.
        wait_until(|| async {
            matches!(ann.send("room", "hello").await, Err(ClientError::Server { code: ErrorCode::Unavailable, .. }))
        })
        .await;
        assert!(receiver.seen.lock().unwrap().is_empty(), "{stored}: nothing reached the loopback receiver");
    }
    fleet.stop().await;
}

async fn tenants_bucket() -> async_nats::jetstream::kv::Store {
    let client = async_nats::connect(support::nats_servers()).await.unwrap();
    async_nats::jetstream::new(client).get_key_value(subjects::TENANTS_BUCKET).await.unwrap()
}

fn record_key(tenant: &Tenant) -> String {
    subjects::tenant_key(&ProjectId::parse(&tenant.project_id).unwrap())
}

async fn read_record(tenant: &Tenant) -> TenantRecord {
    let entry = tenants_bucket().await.entry(record_key(tenant)).await.unwrap().expect("the tenant's record");
    codec::decode(&entry.value).unwrap()
}

async fn write_record(tenant: &Tenant, record: &TenantRecord) {
    tenants_bucket().await.put(record_key(tenant), codec::encode(record).unwrap()).await.unwrap();
}
