//! Connections to NATS and Redis over TLS and with credentials, each against a real server this file starts and
//! configures that way, with certificates it generates:
//! - NATS with TLS and users by password and by NKey (and JetStream over it), with TLS that verifies clients and a
//!   token, and in operator mode with a `.creds` file;
//! - Redis with TLS that verifies clients and an ACL user, under a whole gateway whose tokens live there.
//!
//! Each refused credential or untrusted server is an error at once, naming what was refused; the gateway binary
//! exits at start with it. The servers come from `SWITCHYARD_TEST_NATS_SERVER` and `SWITCHYARD_TEST_REDIS_SERVER`
//! (set by `cargo xtask test`) and are stopped when the test ends, also on failure.

mod support;

use base64::Engine as _;
use futures::StreamExt;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::tls::TestPki;
use switchyard_service::nats::{connect, ConnectError, NatsAuth};
use switchyard_testkit::process::{command, free_port, wait_for_port, ManagedChild};

fn binary(var: &str) -> PathBuf {
    std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: run the tests with `cargo xtask test`"))
}

/// A nats-server started from `config` (its `listen` line is added: a port of the server's choosing), and the
/// port it reports.
fn start_nats(dir: &Path, name: &str, config: &str) -> (ManagedChild, u16) {
    let file = dir.join(format!("{name}.conf"));
    std::fs::write(&file, format!("listen: \"127.0.0.1:-1\"\n{config}")).unwrap();
    let mut cmd = command(binary("SWITCHYARD_TEST_NATS_SERVER"), nix::sys::signal::Signal::SIGKILL);
    cmd.arg("-c").arg(&file);
    let log = dir.join(format!("{name}.log"));
    let child = ManagedChild::spawn(name, cmd, &log, Duration::from_secs(5)).expect("start nats-server");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let port = text.lines().find_map(|line| {
            let (_, rest) = line.split_once("Listening for client connections on ")?;
            rest.trim().rsplit(':').next()?.parse::<u16>().ok()
        });
        if let (Some(port), true) = (port, text.contains("Server is ready")) {
            return (child, port);
        }
        assert!(Instant::now() < deadline, "{name} did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One publish and its delivery through `client`: the connection works, not only its handshake.
async fn round_trip(client: &async_nats::Client) {
    let subject = format!("tls.check.{}", free_port().unwrap());
    let mut subscription = client.subscribe(subject.clone()).await.expect("subscribe");
    client.publish(subject, "ping".into()).await.expect("publish");
    let message = tokio::time::timeout(Duration::from_secs(5), subscription.next()).await.expect("delivery in 5 s");
    assert_eq!(message.expect("a message").payload.as_ref(), b"ping");
}

fn nats_conf_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

fn refusal(result: Result<async_nats::Client, ConnectError>) -> String {
    match result {
        Ok(_) => panic!("connected although the server should refuse"),
        Err(error) => {
            let text = error.to_string();
            assert!(matches!(error, ConnectError::Refused { .. }), "not a refusal: {text}");
            text
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_with_a_password_or_an_nkey() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(&dir.path().join("pki")).unwrap();
    let user = nkeys::KeyPair::new_user();
    let (_server, port) = start_nats(
        dir.path(),
        "nats-tls",
        &format!(
            "tls {{\n  cert_file: {}\n  key_file: {}\n}}\nauthorization {{\n  users: [\n    {{ user: app, password: \
             \"s3cret-pw\" }}\n    {{ nkey: {} }}\n  ]\n}}\njetstream {{ store_dir: {} }}\n",
            nats_conf_path(&pki.server_cert),
            nats_conf_path(&pki.server_key),
            user.public_key(),
            nats_conf_path(&dir.path().join("js")),
        ),
    );
    let url = format!("tls://127.0.0.1:{port}");
    let tls = NatsAuth { nats_tls_ca_file: Some(pki.ca.clone()), ..NatsAuth::default() };

    let by_password =
        NatsAuth { nats_user: Some("app".into()), nats_password: Some("s3cret-pw".into()), ..tls.clone() };
    assert!(by_password.problems().is_empty(), "{:?}", by_password.problems());
    let client = connect(&url, &by_password, "tls-test", false).await.expect("user and password over TLS");
    round_trip(&client).await;
    // JetStream over the same connection, as the services use it.
    let js = async_nats::jetstream::new(client.clone());
    let bucket = js
        .create_key_value(async_nats::jetstream::kv::Config { bucket: "tls_check".into(), ..Default::default() })
        .await
        .expect("a KV bucket over TLS");
    bucket.put("k", "v".into()).await.expect("a KV put over TLS");

    let by_nkey = NatsAuth { nats_nkey_seed: Some(user.seed().unwrap()), ..tls.clone() };
    assert!(by_nkey.problems().is_empty(), "{:?}", by_nkey.problems());
    round_trip(&connect(&url, &by_nkey, "tls-test", false).await.expect("NKey over TLS")).await;
    // A patient connect (what a service does at start) connects the same way.
    round_trip(&connect(&url, &by_nkey, "tls-test", true).await.expect("patient NKey over TLS")).await;

    // Refusals come at once, also to a patient connect, and say what was refused.
    let wrong = NatsAuth { nats_password: Some("wrong".into()), ..by_password.clone() };
    let started = Instant::now();
    let text = refusal(connect(&url, &wrong, "tls-test", true).await);
    assert!(text.contains("authorization violation") && !text.contains("wrong"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10), "a refusal took {:?}", started.elapsed());
    let stranger = NatsAuth { nats_nkey_seed: Some(nkeys::KeyPair::new_user().seed().unwrap()), ..tls.clone() };
    refusal(connect(&url, &stranger, "tls-test", true).await);
    let untrusted = NatsAuth { nats_tls_ca_file: Some(pki.other_ca.clone()), ..by_password.clone() };
    let text = refusal(connect(&url, &untrusted, "tls-test", true).await);
    assert!(text.contains("TLS"), "{text}");

    // The gateway binary stops at start with the same reason, before it listens.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard-gateway"))
        .env_clear()
        .env("SWITCHYARD_NATS_URL", &url)
        .env("SWITCHYARD_NATS_USER", "app")
        .env("SWITCHYARD_NATS_PASSWORD", "not-the-password")
        .env("SWITCHYARD_NATS_TLS_CA_FILE", &pki.ca)
        .env("SWITCHYARD_ADMIN_TOKEN", "0123456789abcdef0123")
        .env("SWITCHYARD_LISTEN", "127.0.0.1:0")
        .env("SWITCHYARD_LOG_FORMAT", "json")
        .output()
        .expect("run the gateway");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the gateway started with a wrong password");
    assert!(stderr.contains("refused the connection") && stderr.contains("authorization violation"), "{stderr}");
    assert!(!stderr.contains("not-the-password"), "the password was printed: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_with_a_token_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(&dir.path().join("pki")).unwrap();
    let (_server, port) = start_nats(
        dir.path(),
        "nats-mtls",
        &format!(
            "tls {{\n  cert_file: {}\n  key_file: {}\n  ca_file: {}\n  verify: true\n}}\nauthorization {{ token: \
             \"t0ken-value\" }}\n",
            nats_conf_path(&pki.server_cert),
            nats_conf_path(&pki.server_key),
            nats_conf_path(&pki.ca),
        ),
    );
    let url = format!("nats://127.0.0.1:{port}");
    let auth = NatsAuth {
        nats_token: Some("t0ken-value".into()),
        nats_tls_ca_file: Some(pki.ca.clone()),
        nats_tls_cert_file: Some(pki.client_cert.clone()),
        nats_tls_key_file: Some(pki.client_key.clone()),
        ..NatsAuth::default()
    };
    assert!(auth.problems().is_empty(), "{:?}", auth.problems());
    assert!(auth.tls_required());
    round_trip(&connect(&url, &auth, "mtls-test", false).await.expect("a token and a client certificate")).await;

    let no_certificate = NatsAuth { nats_tls_cert_file: None, nats_tls_key_file: None, ..auth.clone() };
    assert!(connect(&url, &no_certificate, "mtls-test", false).await.is_err(), "connected without a certificate");
    let wrong_token = NatsAuth { nats_token: Some("other".into()), ..auth.clone() };
    let text = refusal(connect(&url, &wrong_token, "mtls-test", true).await);
    assert!(text.contains("authorization violation"), "{text}");
    // Two ways to authenticate at once, or half a key pair, are configuration problems.
    let both = NatsAuth { nats_user: Some("a".into()), nats_password: Some("b".into()), ..auth.clone() };
    assert!(both.problems().iter().any(|p| p.to_string().contains("one way to authenticate")));
    let half = NatsAuth { nats_tls_key_file: None, ..auth.clone() };
    assert!(half.problems().iter().any(|p| p.to_string().contains("go together")));
}

/// A JWT signed by `issuer`, as nats-server reads them.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({
        "jti": format!("J{now}{name}"),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&signature))
}

fn creds_file(path: &Path, jwt: &str, seed: &str) -> PathBuf {
    std::fs::write(
        path,
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY \
             SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ),
    )
    .unwrap();
    path.to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_in_operator_mode_with_a_creds_file() {
    let dir = tempfile::tempdir().unwrap();
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt =
        nats_jwt(&operator, &operator.public_key(), "test-operator", json!({"type": "operator", "version": 2}));
    let unlimited = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
                           "conn": -1, "leaf": -1});
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "test-account",
        json!({"limits": unlimited, "default_permissions": {"pub": {}, "sub": {}}, "type": "account", "version": 2}),
    );
    let user_claims =
        json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2});
    let user_jwt = nats_jwt(&account, &user.public_key(), "test-user", user_claims.clone());
    let (_server, port) = start_nats(
        dir.path(),
        "nats-operator",
        &format!(
            "operator: {operator_jwt}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {account_jwt}\n}}\n",
            account.public_key()
        ),
    );
    let url = format!("nats://127.0.0.1:{port}");
    let creds = creds_file(&dir.path().join("user.creds"), &user_jwt, &user.seed().unwrap());
    let auth = NatsAuth { nats_creds_file: Some(creds), ..NatsAuth::default() };
    assert!(auth.problems().is_empty(), "{:?}", auth.problems());
    round_trip(&connect(&url, &auth, "creds-test", false).await.expect("a .creds file")).await;

    // A user signed by an account the server does not know is refused.
    let stranger_account = nkeys::KeyPair::new_account();
    let stranger = nkeys::KeyPair::new_user();
    let stranger_jwt = nats_jwt(&stranger_account, &stranger.public_key(), "stranger", user_claims);
    let creds = creds_file(&dir.path().join("stranger.creds"), &stranger_jwt, &stranger.seed().unwrap());
    let refused = NatsAuth { nats_creds_file: Some(creds), ..NatsAuth::default() };
    refusal(connect(&url, &refused, "creds-test", true).await);
    // A missing file is a configuration problem before any connection.
    let missing = NatsAuth { nats_creds_file: Some(dir.path().join("missing.creds")), ..NatsAuth::default() };
    assert!(missing.problems().iter().any(|p| p.to_string().contains("missing.creds")));
}

/// A redis-server that speaks only TLS, verifies client certificates, and knows one ACL user (`app`); the default
/// user is off.
fn start_redis(dir: &Path, pki: &TestPki) -> (ManagedChild, u16) {
    let port = free_port().unwrap();
    let config = dir.join("redis.conf");
    std::fs::write(
        &config,
        format!(
            "port 0\ntls-port {port}\nbind 127.0.0.1\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients yes\nsave \"\"\nappendonly no\ndir {}\nuser default off\n\
             user app on >redis-app-pw ~* &* +@all\n",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca.display(),
            dir.display(),
        ),
    )
    .unwrap();
    let mut cmd = command(binary("SWITCHYARD_TEST_REDIS_SERVER"), nix::sys::signal::Signal::SIGKILL);
    cmd.arg(&config);
    let child = ManagedChild::spawn("redis-tls", cmd, &dir.join("redis.log"), Duration::from_secs(5))
        .expect("start redis-server");
    wait_for_port(port, Duration::from_secs(20)).expect("redis-server listens");
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_keeps_its_tokens_in_redis_over_tls_as_an_acl_user() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::generate(&dir.path().join("pki")).unwrap();
    let (_redis, port) = start_redis(dir.path(), &pki);
    let secured = |config: &mut switchyard_gateway::GatewayConfig| {
        config.redis_url = format!("rediss://127.0.0.1:{port}");
        config.redis_username = Some("app".into());
        config.redis_password = Some("redis-app-pw".into());
        config.redis_tls_ca_file = Some(pki.ca.clone());
        config.redis_tls_cert_file = Some(pki.client_cert.clone());
        config.redis_tls_key_file = Some(pki.client_key.clone());
    };

    // Opaque tokens are stored in and read from Redis: a token issued and used proves the connection works.
    let fleet = support::Fleet::start_with(1, 1, secured).await;
    let http = reqwest::Client::new();
    let ready: serde_json::Value =
        http.get(format!("{}/readyz", fleet.gateways[0])).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["redis"], true, "{ready}");
    let tenant = fleet.create_tenant().await;
    let token = fleet.token(&tenant, "alice").await;
    let alice = fleet.connect(0, &token, switchyard_client::Format::Json).await;
    alice.join("tls-room", None).await.expect("alice joins over a gateway on TLS Redis");
    let _ = alice.close().await;
    fleet.stop().await;

    // Refusals stop the gateway at start with the reason: a wrong password, a server it does not trust.
    let base = || {
        let mut config = switchyard_gateway::GatewayConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            nats_url: support::nats_url(),
            nats_replicas: support::nats_replicas(),
            admin_token: "0123456789abcdef0123".into(),
            ..Default::default()
        };
        secured(&mut config);
        config
    };
    let wrong_password = switchyard_gateway::GatewayConfig { redis_password: Some("not-it".into()), ..base() };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let error = match switchyard_gateway::bind(wrong_password, shutdown.clone()).await {
        Ok(_) => panic!("a gateway started with a wrong Redis password"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("refused the connection") && !error.contains("not-it"), "{error}");
    let untrusted = switchyard_gateway::GatewayConfig { redis_tls_ca_file: Some(pki.other_ca.clone()), ..base() };
    let error = match switchyard_gateway::bind(untrusted, shutdown.clone()).await {
        Ok(_) => panic!("a gateway trusted a Redis server signed by another CA"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("refused the connection"), "{error}");
    shutdown.cancel();

    // TLS files with a plain URL are a configuration problem.
    let plain = switchyard_gateway::GatewayConfig { redis_url: format!("redis://127.0.0.1:{port}"), ..base() };
    use switchyard_service::config::Settings as _;
    assert!(plain.problems().iter().any(|p| p.to_string().contains("rediss://")));
}
