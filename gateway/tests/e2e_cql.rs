//! The whole path with the persistor on the real Cassandra that `cargo xtask test` started: messages sent over
//! WebSockets land in CQL exactly once and come back through `history`.

mod support;

use std::time::Duration;
use support::{Fleet, StoreKind};
use switchyard_client::{Format, ServerEvent};
use switchyard_persistor::store::{HistoryQuery, HistoryStore};
use switchyard_protocol::{ProjectId, RoomId};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_reach_cassandra_once_and_come_back_in_history() {
    let fleet = Fleet::start_on(StoreKind::Cql, 1, 2, |_| {}).await;
    let tenant = fleet.create_tenant().await;
    let writer = fleet.connect(0, &fleet.token(&tenant, "writer").await, Format::MsgPack).await;
    let reader = fleet.connect(0, &fleet.token(&tenant, "reader").await, Format::Json).await;
    writer.join("ledger", None).await.expect("join");
    reader.join("ledger", None).await.expect("join");
    let mut sent = Vec::new();
    for n in 0..30 {
        sent.push(writer.send("ledger", format!("entry {n}")).await.expect("send").seq);
    }
    let mut received = Vec::new();
    while received.len() < 30 {
        match reader.next_event_timeout(Duration::from_secs(20)).await {
            Some(ServerEvent::Msg { seq, .. }) => received.push(seq),
            Some(_) => {}
            None => panic!("reader stalled after {} messages", received.len()),
        }
    }
    assert_eq!(received, sent);

    let (page, more) = reader.history("ledger", None, None, Some(100)).await.expect("history");
    assert!(!more);
    assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), sent, "history from Cassandra has every message once");
    assert_eq!(page[7].body.as_deref(), Some("entry 7"));

    let query = HistoryQuery {
        tenant: ProjectId::parse(&tenant.project_id).unwrap(),
        room: RoomId::parse("ledger").unwrap(),
        before: None,
        after: Some(0),
        limit: 100,
    };
    let stored = fleet.store.history(&query).await.expect("read Cassandra directly");
    assert_eq!(stored.messages.len(), 30);
    fleet.stop().await;
}
