//! The persistor: a durable JetStream consumer that writes every sequenced room event into the history store, and
//! a responder that serves history pages from that store.
//!
//! Start it with [`run`] (or [`bind_with_store`], which binds the metrics listener so tests learn its address). It
//! serves `/healthz`, `/readyz` and `/metrics` on `metrics_addr`. It never sequences or publishes room events, and
//! it acknowledges an event only after the store has it, so a crash at any moment loses nothing.

pub mod config;
pub mod history;
pub mod ingest;
pub mod store;

pub use config::{PersistorConfig, StoreChoice};

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use store::cql::{CqlConfig, CqlStore};
use store::embedded::EmbeddedStore;
use store::{HistoryPage, HistoryQuery, HistoryStore, StoreError};
use switchyard_protocol::internal::RoomEvent;
use switchyard_protocol::{ProjectId, RoomId};
use tokio_util::sync::CancellationToken;

/// Why a persistor could not run.
#[derive(Debug, thiserror::Error)]
pub enum PersistorError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Metrics(#[from] switchyard_service::ops::OpsError),
}

/// The store the configuration chose.
pub enum AnyStore {
    Embedded(EmbeddedStore),
    Cql(CqlStore),
}

impl AnyStore {
    pub async fn open(config: &PersistorConfig) -> Result<Self, PersistorError> {
        Ok(match config.store_choice()? {
            StoreChoice::Embedded(path) => AnyStore::Embedded(EmbeddedStore::open(&path)?),
            StoreChoice::Cql(nodes) => {
                let mut cql = CqlConfig::new(&nodes, &config.cql_keyspace);
                cql.replication = store::cql::Replication::Simple { replication_factor: config.cql_replication_factor };
                AnyStore::Cql(CqlStore::connect_with(cql).await?)
            }
        })
    }
}

impl HistoryStore for AnyStore {
    async fn apply(&self, events: &[RoomEvent]) -> Result<(), StoreError> {
        match self {
            AnyStore::Embedded(store) => store.apply(events).await,
            AnyStore::Cql(store) => store.apply(events).await,
        }
    }

    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        match self {
            AnyStore::Embedded(store) => store.history(query).await,
            AnyStore::Cql(store) => store.history(query).await,
        }
    }

    async fn last_seq(&self, tenant: &ProjectId, room: &RoomId) -> Result<u64, StoreError> {
        match self {
            AnyStore::Embedded(store) => store.last_seq(tenant, room).await,
            AnyStore::Cql(store) => store.last_seq(tenant, room).await,
        }
    }
}

/// Run a persistor on the configured store until `shutdown` fires.
pub async fn run(config: PersistorConfig, shutdown: CancellationToken) -> Result<(), PersistorError> {
    let store = Arc::new(AnyStore::open(&config).await?);
    run_with_store(config, store, shutdown).await
}

/// Run a persistor on a store the caller opened (tests use this to inspect the same store).
pub async fn run_with_store<S: HistoryStore>(
    config: PersistorConfig,
    store: Arc<S>,
    shutdown: CancellationToken,
) -> Result<(), PersistorError> {
    bind_with_store(config, store, shutdown).await?.serve().await
}

/// A persistor whose metrics listener is bound, not connected to NATS yet.
pub struct BoundPersistor<S> {
    config: PersistorConfig,
    store: Arc<S>,
    ops: switchyard_service::ops::OpsListener,
    nats: Arc<OnceLock<async_nats::Client>>,
    shutdown: CancellationToken,
}

/// Bind the metrics listener. `/readyz` answers 200 once connected to NATS, and 503 again once stopping.
pub async fn bind_with_store<S: HistoryStore>(
    config: PersistorConfig,
    store: Arc<S>,
    shutdown: CancellationToken,
) -> Result<BoundPersistor<S>, PersistorError> {
    let nats: Arc<OnceLock<async_nats::Client>> = Arc::new(OnceLock::new());
    let ready = {
        let (nats, shutdown) = (nats.clone(), shutdown.clone());
        Arc::new(move || {
            !shutdown.is_cancelled()
                && nats.get().is_some_and(|c| c.connection_state() == async_nats::connection::State::Connected)
        })
    };
    let ops = switchyard_service::ops::OpsListener::bind(config.metrics_addr, ready).await?;
    Ok(BoundPersistor { config, store, ops, nats, shutdown })
}

impl<S: HistoryStore> BoundPersistor<S> {
    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.ops.local_addr()
    }

    /// Consume and serve history until the shutdown token fires.
    pub async fn serve(self) -> Result<(), PersistorError> {
        let stop_ops = CancellationToken::new();
        let ops = self.ops.spawn(stop_ops.clone());
        let result = consume(self.config, self.store, self.nats, self.shutdown).await;
        stop_ops.cancel();
        let _ = ops.await;
        result
    }
}

async fn consume<S: HistoryStore>(
    config: PersistorConfig,
    store: Arc<S>,
    connected: Arc<OnceLock<async_nats::Client>>,
    shutdown: CancellationToken,
) -> Result<(), PersistorError> {
    let nats = async_nats::ConnectOptions::new()
        .name("switchyard-persistor")
        .retry_on_initial_connect()
        .connect(config.nats_url.as_str())
        .await
        .map_err(|e| {
            PersistorError::Nats(format!("connect to {}: {e}", switchyard_service::redact_url(&config.nats_url)))
        })?;
    let _ = connected.set(nats.clone());
    let js = async_nats::jetstream::new(nats.clone());
    let responder = tokio::spawn(history::serve(
        nats.clone(),
        store.clone(),
        Duration::from_millis(config.history_catch_up_ms),
        shutdown.clone(),
    ));
    let result = match ingest::open_consumer(&js, &shutdown).await? {
        Some(consumer) => ingest::run(nats.clone(), consumer, &*store, config.batch_max, shutdown.clone()).await,
        None => Ok(()),
    };
    shutdown.cancel();
    match responder.await {
        Ok(Err(error)) => tracing::warn!(%error, "history responder failed"),
        Err(error) => tracing::warn!(%error, "history responder panicked"),
        Ok(Ok(())) => {}
    }
    let _ = nats.flush().await;
    result
}
