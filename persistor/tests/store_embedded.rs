//! Runs the history-store conformance suite against the embedded (redb) store in a temporary directory.
//!
//! It does not test the CQL store; `store_cql.rs` does.

use switchyard_persistor::store::conformance;
use switchyard_persistor::store::embedded::EmbeddedStore;
use switchyard_persistor::store::HistoryStore;
use switchyard_protocol::{ProjectId, RoomId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested").join("h.redb");
    let tenant = ProjectId::generate();
    let room = RoomId::parse("persisted").unwrap();
    {
        let store = EmbeddedStore::open(&path).unwrap();
        conformance::apply_and_history_order(&store).await;
        let event = switchyard_protocol::internal::RoomEvent {
            v: switchyard_protocol::internal::INTERNAL_VERSION,
            tenant: tenant.clone(),
            room: room.clone(),
            seq: 7,
            ts_us: conformance::ts_us_of(7),
            tally: Default::default(),
            expires_ms: None,
            body: switchyard_protocol::internal::EventBody::Joined {
                user: switchyard_protocol::UserId::parse("u").unwrap(),
            },
        };
        store.apply(&[event]).await.unwrap();
    }
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.last_seq(&tenant, &room).await.unwrap(), 7);
    // The reopened file still passes the suite alongside the old data.
    conformance::run_all(&store).await;
}
