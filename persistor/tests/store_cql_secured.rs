//! The CQL store on a Cassandra node that asks every client for TLS with a certificate of the test CA and for a
//! password (PasswordAuthenticator): `cargo xtask test` starts it beside the plain node and names it in
//! `SWITCHYARD_TEST_CQL_SECURED` (`host:port`), its certificates in `SWITCHYARD_TEST_CQL_SECURED_PKI` (a folder
//! with `TestPki`'s files; the user is the node's default superuser).
//!
//! With the right credentials and certificates the store migrates, writes and reads; a wrong password, a missing
//! client certificate or an untrusted node is refused at once with the reason, and the persistor binary exits at
//! start with it.

use std::path::PathBuf;
use std::time::{Duration, Instant};
use switchyard_persistor::store::cql::{CqlConfig, CqlCredentials, CqlStore, Replication};
use switchyard_persistor::store::{conformance, StoreError};
use switchyard_service::tls::TlsFiles;

const KEYSPACE: &str = "switchyard_secured_test";

fn env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests with `cargo xtask test`"))
}

fn pki(file: &str) -> PathBuf {
    PathBuf::from(env("SWITCHYARD_TEST_CQL_SECURED_PKI")).join(file)
}

fn secured_config(password: &str, tls: TlsFiles) -> CqlConfig {
    let mut config = CqlConfig::new(&[env("SWITCHYARD_TEST_CQL_SECURED")], KEYSPACE);
    config.replication = Replication::Simple { replication_factor: 1 };
    config.connect_timeout = Duration::from_secs(5);
    config.credentials = Some(CqlCredentials { username: "cassandra".into(), password: password.into() });
    config.tls = Some(tls);
    config
}

fn client_tls() -> TlsFiles {
    TlsFiles { ca_file: Some(pki("ca.pem")), cert_file: Some(pki("client.pem")), key_file: Some(pki("client-key.pem")) }
}

fn refused(result: Result<CqlStore, StoreError>, what: &str) -> String {
    match result {
        Ok(_) => panic!("{what}: connected although the node should refuse"),
        Err(error) => {
            let text = error.to_string();
            assert!(matches!(error, StoreError::InvalidQuery(_)), "{what}: not a refusal: {text}");
            assert!(text.contains("refused the connection"), "{what}: {text}");
            text
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cql_store_over_tls_with_a_password() {
    // The node's roles may still be settling right after its start: retry the right credentials for a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    let store = loop {
        match CqlStore::connect_with(secured_config("cassandra", client_tls())).await {
            Ok(store) => break store,
            Err(error) if Instant::now() < deadline => {
                eprintln!("secured node not ready yet: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => panic!("cannot use the secured CQL node: {error}"),
        }
    };
    conformance::apply_and_history_order(&store).await;

    let started = Instant::now();
    let text = refused(CqlStore::connect_with(secured_config("wrong-password", client_tls())).await, "password");
    assert!(!text.contains("wrong-password"), "the password was shown: {text}");
    assert!(started.elapsed() < Duration::from_secs(15), "a refusal took {:?}", started.elapsed());
    let no_certificate = TlsFiles { cert_file: None, key_file: None, ..client_tls() };
    assert!(
        CqlStore::connect_with(secured_config("cassandra", no_certificate)).await.is_err(),
        "connected without a client certificate"
    );
    let untrusted = TlsFiles { ca_file: Some(pki("other-ca.pem")), ..client_tls() };
    refused(CqlStore::connect_with(secured_config("cassandra", untrusted)).await, "untrusted CA");
    let mut plain = secured_config("cassandra", client_tls());
    plain.tls = None;
    assert!(CqlStore::connect_with(plain).await.is_err(), "connected without TLS");
}

#[test]
fn the_persistor_stops_at_start_on_a_refused_password() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard-persistor"))
        .env_clear()
        .env("SWITCHYARD_NATS_URL", env("SWITCHYARD_TEST_NATS_URL"))
        .env("SWITCHYARD_STORE", format!("cql:{}", env("SWITCHYARD_TEST_CQL_SECURED")))
        .env("SWITCHYARD_CQL_KEYSPACE", KEYSPACE)
        .env("SWITCHYARD_CQL_MIGRATE_ON_START", "true")
        .env("SWITCHYARD_CQL_USERNAME", "cassandra")
        .env("SWITCHYARD_CQL_PASSWORD", "not-the-password")
        .env("SWITCHYARD_CQL_TLS_CA_FILE", pki("ca.pem"))
        .env("SWITCHYARD_CQL_TLS_CERT_FILE", pki("client.pem"))
        .env("SWITCHYARD_CQL_TLS_KEY_FILE", pki("client-key.pem"))
        .env("SWITCHYARD_METRICS_ADDR", "127.0.0.1:0")
        .env("SWITCHYARD_LOG_FORMAT", "json")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the persistor");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the persistor") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the persistor kept running with a wrong CQL password");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = child.wait_with_output().expect("persistor output");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(!status.success(), "{text}");
    assert!(text.contains("refused the connection") && !text.contains("not-the-password"), "{text}");
}
