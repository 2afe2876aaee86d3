//! Runs the history-store conformance suite against a real CQL server (Cassandra or ScyllaDB) named by
//! `SWITCHYARD_CQL` (`host:port`), in the keyspace `SWITCHYARD_CQL_KEYSPACE` (default `switchyard_test`).
//!
//! There is no stand-in: without `SWITCHYARD_CQL` these tests fail and say how to start a server.

use switchyard_persistor::store::conformance;
use switchyard_persistor::store::cql::{CqlConfig, CqlStore, Replication};
use switchyard_persistor::store::{HistoryStore, StoreError};
use switchyard_protocol::{ProjectId, RoomId};

const DEFAULT_KEYSPACE: &str = "switchyard_test";

fn server() -> (Vec<String>, String) {
    let nodes = match std::env::var("SWITCHYARD_CQL") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
        _ => panic!(
            "SWITCHYARD_CQL is not set: these tests need a real Cassandra/ScyllaDB server. \
             Run `cargo xtask test` (it starts one and sets SWITCHYARD_CQL=host:port), \
             or start `cargo xtask services` and export the variables it prints."
        ),
    };
    let keyspace = std::env::var("SWITCHYARD_CQL_KEYSPACE")
        .ok()
        .filter(|k| !k.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_KEYSPACE.to_owned());
    (nodes, keyspace)
}

async fn store() -> CqlStore {
    let (nodes, keyspace) = server();
    match CqlStore::connect(&nodes, &keyspace).await {
        Ok(store) => store,
        Err(e) => panic!("cannot reach the CQL server at {nodes:?} (keyspace {keyspace}): {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_store_conforms() {
    let store = store().await;
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_store_reconnects_to_existing_schema() {
    let (nodes, keyspace) = server();
    let first = store().await;
    conformance::joined_left_advance_last_seq(&first).await;
    // A second connect finds the keyspace and tables in place and sees the same data.
    let mut config = CqlConfig::new(&nodes, &keyspace);
    config.replication = Replication::Simple { replication_factor: 1 };
    let second = CqlStore::connect_with(config).await.unwrap();
    let tenant = ProjectId::generate();
    let room = RoomId::parse("reconnect").unwrap();
    assert_eq!(second.last_seq(&tenant, &room).await.unwrap(), 0);
    conformance::apply_and_history_order(&second).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_store_refuses_bad_config_and_values() {
    let (nodes, _) = server();
    match CqlStore::connect(&nodes, "bad-keyspace; DROP").await {
        Err(StoreError::InvalidQuery(_)) => {}
        other => panic!("a bad keyspace name must be refused, got {other:?}"),
    }
    let store = store().await;
    // A seq beyond what a CQL bigint holds is bad data, refused without touching the server's state.
    let event = switchyard_protocol::internal::RoomEvent {
        v: switchyard_protocol::internal::INTERNAL_VERSION,
        tenant: ProjectId::generate(),
        room: RoomId::parse("huge").unwrap(),
        seq: u64::MAX,
        ts_us: conformance::ts_us_of(1),
        body: switchyard_protocol::internal::EventBody::Joined {
            user: switchyard_protocol::UserId::parse("u").unwrap(),
        },
    };
    match store.apply(&[event]).await {
        Err(StoreError::Rejected(_)) => {}
        other => panic!("seq u64::MAX must be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_store_unreachable_is_unavailable() {
    // Nothing listens on port 1; this is an outage, not corruption. Needs no server, but lives with the CQL tests.
    let mut config = CqlConfig::new(&["127.0.0.1:1".to_owned()], DEFAULT_KEYSPACE);
    config.connect_timeout = std::time::Duration::from_secs(2);
    match CqlStore::connect_with(config).await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("an unreachable cluster must be Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_schema_is_migrated_idempotently_and_required() {
    use switchyard_persistor::store::cql::{MigrationOutcome, SchemaPolicy, SCHEMA_VERSION};
    let (nodes, _) = server();
    let keyspace = format!("sy_migrate_{}", switchyard_protocol::ids::random_base62(10).to_ascii_lowercase());
    let mut config = CqlConfig::new(&nodes, &keyspace);
    config.schema = SchemaPolicy::Require;

    // No schema yet: a persistor that requires it refuses, naming the command that fixes it.
    assert_eq!(CqlStore::schema_version_of(&config).await.unwrap(), 0);
    match CqlStore::connect_with(config.clone()).await {
        Err(StoreError::Unavailable(message)) => {
            assert!(message.contains("switchyard-persistor migrate"), "{message}")
        }
        other => panic!("a missing schema must be refused, got {other:?}"),
    }

    // Migrate from nothing, then again: the second run finds the schema current and changes nothing.
    assert_eq!(CqlStore::migrate(&config).await.unwrap(), MigrationOutcome { from: 0, to: SCHEMA_VERSION });
    assert_eq!(
        CqlStore::migrate(&config).await.unwrap(),
        MigrationOutcome { from: SCHEMA_VERSION, to: SCHEMA_VERSION }
    );
    assert_eq!(CqlStore::schema_version_of(&config).await.unwrap(), SCHEMA_VERSION);

    // Now the same configuration connects and the store works.
    let store = CqlStore::connect_with(config.clone()).await.expect("connect to a current schema");
    conformance::apply_and_history_order(&store).await;
}
