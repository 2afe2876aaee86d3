//! Runs the history-store conformance suite against a real CQL server (Cassandra or ScyllaDB) named by
//! `SWITCHYARD_TEST_CQL` (`host:port`), in the keyspace `SWITCHYARD_CQL_KEYSPACE` (default `switchyard_test`).
//!
//! There is no stand-in: without `SWITCHYARD_TEST_CQL` these tests fail and say how to start a server.

use switchyard_persistor::store::conformance;
use switchyard_persistor::store::cql::{CqlConfig, CqlStore, Replication};
use switchyard_persistor::store::{HistoryStore, StoreError};
use switchyard_protocol::{ProjectId, RoomId};

const DEFAULT_KEYSPACE: &str = "switchyard_test";

fn server() -> (Vec<String>, String) {
    let nodes = match std::env::var("SWITCHYARD_TEST_CQL") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect(),
        _ => panic!(
            "SWITCHYARD_TEST_CQL is not set: these tests need a real Cassandra/ScyllaDB server. \
             Run `cargo xtask test` (it starts one and sets SWITCHYARD_TEST_CQL=host:port), \
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
        tally: Default::default(),
        expires_ms: None,
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
        Err(StoreError::SchemaMismatch(message)) => {
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

/// A keyspace as a schema-1 release left it (messages, reactions and progress rows, no bucket index): `migrate`
/// brings it to the current version, and the messages written before, however far apart, are still in history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_migration_indexes_messages_written_before_the_bucket_index() {
    use futures::StreamExt;
    use scylla::client::session_builder::SessionBuilder;
    use switchyard_persistor::store::cql::{MigrationOutcome, SchemaPolicy, SCHEMA_VERSION};
    use switchyard_persistor::store::{HistoryQuery, RoomHead};
    use switchyard_protocol::MessageId;

    let (nodes, _) = server();
    let keyspace = format!("sy_legacy_{}", switchyard_protocol::ids::random_base62(10).to_ascii_lowercase());
    let mut config = CqlConfig::new(&nodes, &keyspace);
    assert_eq!(CqlStore::migrate_to(&config, 1).await.unwrap(), MigrationOutcome { from: 0, to: 1 });

    // Rows in the schema-1 layout, written directly: one room with messages in buckets 0, 1 and 5,000,000 and a
    // reaction, and more single-message rooms than one page of the backfill's partition scan.
    let session = SessionBuilder::new().known_nodes(&nodes).build().await.unwrap();
    let insert = session
        .prepare(format!(
            "INSERT INTO {keyspace}.messages (tenant, room, bucket, seq, id, sender, body, ts_us) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        ))
        .await
        .unwrap();
    let react = session
        .prepare(format!(
            "UPDATE {keyspace}.reactions USING TIMESTAMP ? SET removed = false \
             WHERE tenant = ? AND room = ? AND bucket = ? AND target = ? AND emoji = ? AND reactor = ?"
        ))
        .await
        .unwrap();
    let progress = session
        .prepare(format!(
            "UPDATE {keyspace}.room_progress USING TIMESTAMP ? SET last_seq = ? WHERE tenant = ? AND room = ?"
        ))
        .await
        .unwrap();
    let tenant = ProjectId::generate();
    let ts = |seq: u64| conformance::ts_us_of(seq) as i64;
    let message = |room: &str, seq: u64| {
        let id = MessageId::generate(conformance::ts_us_of(seq) / 1000).to_string();
        let values = (
            tenant.to_string(),
            room.to_owned(),
            (seq / 1000) as i64,
            seq as i64,
            id,
            "alice".to_owned(),
            format!("{room} #{seq}"),
            ts(seq),
            ts(seq),
        );
        let insert = insert.clone();
        let session = &session;
        async move { session.execute_unpaged(&insert, values).await.map(|_| ()) }
    };
    let seqs = [1_u64, 2, 1_500, 5_000_000_000];
    for seq in seqs {
        message("legacy", seq).await.unwrap();
    }
    session
        .execute_unpaged(&react, (ts(5_000_000_001), tenant.to_string(), "legacy", 1_i64, 1_500_i64, "👍", "bob"))
        .await
        .unwrap();
    session
        .execute_unpaged(&progress, (ts(5_000_000_001), 5_000_000_001_i64, tenant.to_string(), "legacy"))
        .await
        .unwrap();
    let others = 1_100;
    futures::stream::iter((0..others).map(|i| message(&format!("other-{i}"), 7)))
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()
        .unwrap();
    for i in 0..others {
        session.execute_unpaged(&progress, (ts(7), 7_i64, tenant.to_string(), format!("other-{i}"))).await.unwrap();
    }

    // This release refuses the old schema until it is migrated.
    config.schema = SchemaPolicy::Require;
    match CqlStore::connect_with(config.clone()).await {
        Err(StoreError::SchemaMismatch(message)) => {
            assert!(message.contains("switchyard-persistor migrate"), "{message}")
        }
        other => panic!("a schema-1 keyspace must be refused, got {other:?}"),
    }
    assert_eq!(CqlStore::migrate(&config).await.unwrap(), MigrationOutcome { from: 1, to: SCHEMA_VERSION });
    let store = CqlStore::connect_with(config.clone()).await.expect("connect to the migrated schema");
    // Every bucket holding messages was indexed, across more than one page of the partition scan.
    let (indexed,) = session
        .query_unpaged(format!("SELECT COUNT(*) FROM {keyspace}.room_buckets"), ())
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .single_row::<(i64,)>()
        .unwrap();
    assert_eq!(indexed, 3 + others as i64, "one index row per bucket holding messages");

    // History finds every message written before the migration, in every direction.
    let room = RoomId::parse("legacy").unwrap();
    let page = |before: Option<u64>, after: Option<u64>, limit: u32| {
        let query = HistoryQuery { tenant: tenant.clone(), room: room.clone(), before, after, limit };
        let store = &store;
        async move { store.history(&query).await.unwrap() }
    };
    let got = |p: &switchyard_persistor::store::HistoryPage| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let latest = page(None, None, 100).await;
    assert_eq!(got(&latest), seqs.to_vec(), "latest page");
    assert!(!latest.more);
    assert_eq!(latest.messages[2].body.as_deref(), Some("legacy #1500"));
    assert_eq!(latest.messages[2].reactions.get("👍").map(Vec::len), Some(1), "the reaction is folded in");
    let forward = page(None, Some(0), 3).await;
    assert_eq!((got(&forward), forward.more), (vec![1, 2, 1_500], true), "forward from the start");
    let backward = page(Some(5_000_000_000), None, 2).await;
    assert_eq!((got(&backward), backward.more), (vec![2, 1_500], true), "backward from the far message");
    let both = page(Some(5_000_000_001), Some(1_500), 10).await;
    assert_eq!((got(&both), both.more), (vec![5_000_000_000], false), "between the last two");
    assert_eq!(
        store.head(&tenant, &room).await.unwrap(),
        RoomHead { last_seq: 5_000_000_001, last_ts_us: conformance::ts_us_of(5_000_000_001) },
        "the head of a room written before the migration"
    );
    for i in [0, others / 2, others - 1] {
        let query = HistoryQuery {
            tenant: tenant.clone(),
            room: RoomId::parse(&format!("other-{i}")).unwrap(),
            before: None,
            after: None,
            limit: 10,
        };
        assert_eq!(got(&store.history(&query).await.unwrap()), vec![7], "room other-{i}");
    }

    // New writes after the migration go on from there.
    conformance::apply_and_history_order(&store).await;
}

/// A keyspace as a schema-2 release left it (no `pinned` column): `migrate` adds the column, a second run finds it
/// there and changes nothing, the messages written before read as not pinned, and pins apply to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_migration_adds_the_pinned_column_to_existing_messages() {
    use scylla::client::session_builder::SessionBuilder;
    use switchyard_persistor::store::cql::{MigrationOutcome, SchemaPolicy, SCHEMA_VERSION};
    use switchyard_persistor::store::HistoryQuery;
    use switchyard_protocol::internal::{EventBody, RoomEvent, INTERNAL_VERSION};
    use switchyard_protocol::{MessageId, UserId};

    let (nodes, _) = server();
    let keyspace = format!("sy_pins_{}", switchyard_protocol::ids::random_base62(10).to_ascii_lowercase());
    let mut config = CqlConfig::new(&nodes, &keyspace);
    assert_eq!(CqlStore::migrate_to(&config, 2).await.unwrap(), MigrationOutcome { from: 0, to: 2 });

    // A message in the schema-2 layout, written directly, with its index and progress rows.
    let session = SessionBuilder::new().known_nodes(&nodes).build().await.unwrap();
    let tenant = ProjectId::generate();
    let ts = conformance::ts_us_of(1) as i64;
    let id = MessageId::generate(conformance::ts_us_of(1) / 1000);
    session
        .query_unpaged(
            format!(
                "INSERT INTO {keyspace}.messages (tenant, room, bucket, seq, id, sender, body, ts_us) \
                 VALUES (?, ?, 0, 1, ?, 'alice', 'before pins', ?) USING TIMESTAMP {ts}"
            ),
            (tenant.to_string(), "old", id.to_string(), ts),
        )
        .await
        .unwrap();
    session
        .query_unpaged(
            format!("INSERT INTO {keyspace}.room_buckets (tenant, room, bucket) VALUES (?, 'old', 0)"),
            (tenant.to_string(),),
        )
        .await
        .unwrap();
    session
        .query_unpaged(
            format!(
                "UPDATE {keyspace}.room_progress USING TIMESTAMP {ts} SET last_seq = 1 WHERE tenant = ? AND room = 'old'"
            ),
            (tenant.to_string(),),
        )
        .await
        .unwrap();

    config.schema = SchemaPolicy::Require;
    match CqlStore::connect_with(config.clone()).await {
        Err(StoreError::SchemaMismatch(message)) => {
            assert!(message.contains("switchyard-persistor migrate"), "{message}")
        }
        other => panic!("a schema-2 keyspace must be refused, got {other:?}"),
    }
    assert_eq!(CqlStore::migrate(&config).await.unwrap(), MigrationOutcome { from: 2, to: SCHEMA_VERSION });
    // A step interrupted after its column was added runs again without failing on the column.
    session
        .query_unpaged(format!("UPDATE {keyspace}.schema_version SET version = 2 WHERE component = 'history'"), ())
        .await
        .unwrap();
    assert_eq!(CqlStore::migrate(&config).await.unwrap(), MigrationOutcome { from: 2, to: SCHEMA_VERSION });
    let store = CqlStore::connect_with(config.clone()).await.expect("connect to the migrated schema");

    let room = RoomId::parse("old").unwrap();
    let query = HistoryQuery { tenant: tenant.clone(), room: room.clone(), before: None, after: None, limit: 10 };
    let page = store.history(&query).await.unwrap();
    assert_eq!(page.messages.len(), 1);
    assert!(!page.messages[0].pinned, "a message stored before the column is not pinned");
    assert_eq!(page.messages[0].body.as_deref(), Some("before pins"));
    let pin = RoomEvent {
        v: INTERNAL_VERSION,
        tenant: tenant.clone(),
        room: room.clone(),
        seq: 2,
        ts_us: conformance::ts_us_of(2),
        tally: Default::default(),
        expires_ms: None,
        body: EventBody::Pin { target: 1, by: UserId::parse("alice").unwrap(), pinned: true },
    };
    store.apply(&[pin]).await.unwrap();
    let page = store.history(&query).await.unwrap();
    assert!(page.messages[0].pinned, "{page:?}");
    conformance::pin_unpin_delete(&store).await;
}

/// A keyspace as a schema-3 release left it (no `thread_replies`, no `authored`), holding a message and a reply
/// written in that layout: `migrate` indexes the reply, so the parent counts it and its thread lists it, and both
/// messages by their author, so an export or an erasure finds them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_migration_indexes_replies_written_before_threads() {
    use scylla::client::session_builder::SessionBuilder;
    use switchyard_persistor::store::cql::{MigrationOutcome, SCHEMA_VERSION};
    use switchyard_persistor::store::HistoryQuery;
    use switchyard_protocol::MessageId;

    let (nodes, _) = server();
    let keyspace = format!("sy_threads_{}", switchyard_protocol::ids::random_base62(10).to_ascii_lowercase());
    let config = CqlConfig::new(&nodes, &keyspace);
    assert_eq!(CqlStore::migrate_to(&config, 3).await.unwrap(), MigrationOutcome { from: 0, to: 3 });
    let session = SessionBuilder::new().known_nodes(&nodes).build().await.unwrap();
    let tenant = ProjectId::generate();
    for (seq, reply_to, body) in [(1_i64, None, "parent"), (2, Some(1_i64), "a reply")] {
        let ts = conformance::ts_us_of(seq as u64) as i64;
        let id = MessageId::generate(conformance::ts_us_of(seq as u64) / 1000);
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {keyspace}.messages (tenant, room, bucket, seq, id, sender, body, reply_to, ts_us) \
                     VALUES (?, 'old', 0, ?, ?, 'alice', ?, ?, ?) USING TIMESTAMP {ts}"
                ),
                (tenant.to_string(), seq, id.to_string(), body, reply_to, ts),
            )
            .await
            .unwrap();
    }
    session
        .query_unpaged(
            format!("INSERT INTO {keyspace}.room_buckets (tenant, room, bucket) VALUES (?, 'old', 0)"),
            (tenant.to_string(),),
        )
        .await
        .unwrap();
    let ts = conformance::ts_us_of(2);
    session
        .query_unpaged(
            format!(
                "UPDATE {keyspace}.room_progress USING TIMESTAMP {ts} SET last_seq = 2 WHERE tenant = ? AND room = 'old'"
            ),
            (tenant.to_string(),),
        )
        .await
        .unwrap();

    assert_eq!(CqlStore::migrate(&config).await.unwrap(), MigrationOutcome { from: 3, to: SCHEMA_VERSION });
    let store = CqlStore::connect_with(config.clone()).await.expect("connect to the migrated schema");
    let query = HistoryQuery {
        tenant: tenant.clone(),
        room: RoomId::parse("old").unwrap(),
        before: None,
        after: None,
        limit: 10,
    };
    let page = store.history(&query).await.unwrap();
    let counts: Vec<(u64, u64)> = page.messages.iter().map(|m| (m.seq, m.reply_count)).collect();
    assert_eq!(counts, [(1, 1), (2, 0)]);
    let thread = store.thread(&query, 1).await.unwrap();
    assert_eq!(thread.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [2]);
    assert_eq!(thread.messages[0].body.as_deref(), Some("a reply"));
    let alice = switchyard_protocol::UserId::parse("alice").unwrap();
    let (rooms, _) = store.authored_rooms(&tenant, &alice, None, 10).await.unwrap();
    assert_eq!(rooms, [RoomId::parse("old").unwrap()]);
    let authored = store.authored_messages(&tenant, &alice, None, 10).await.unwrap();
    let bodies: Vec<_> = authored.messages.iter().map(|(_, m)| m.body.clone().unwrap_or_default()).collect();
    assert_eq!(bodies, ["parent", "a reply"]);
}
