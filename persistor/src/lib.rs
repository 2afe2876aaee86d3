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
mod telemetry;

pub use config::{PersistorConfig, StoreChoice};

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use store::cql::{CqlConfig, CqlStore, MigrationOutcome, SchemaPolicy};
use store::embedded::EmbeddedStore;
use store::{AuthoredMessages, HistoryPage, HistoryQuery, HistoryStore, RoomHead, StoreError};
use switchyard_protocol::internal::RoomEvent;
use switchyard_protocol::{subjects, ProjectId, RoomId, UserId};
use tokio_util::sync::CancellationToken;

/// Why a persistor could not run.
#[derive(Debug, thiserror::Error)]
pub enum PersistorError {
    /// NATS could not be reached (or its URL is unusable).
    #[error(transparent)]
    NatsConnect(#[from] switchyard_service::nats::ConnectError),
    /// A NATS stream, consumer, subscription or lock could not be opened or taken; `what` names it.
    #[error("NATS: {what}: {source}")]
    Nats {
        /// What was being opened or taken.
        what: &'static str,
        #[source]
        source: store::BoxError,
    },
    /// The schema-migration lock bucket could neither be opened nor created.
    #[error("NATS: {0}")]
    LockBucket(#[source] switchyard_service::nats::EnsureKvError),
    /// Another migration held the schema lock for longer than a migration takes.
    #[error("NATS: another migration held the schema lock for too long")]
    MigrationLockHeld,
    /// The history store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The metrics listener could not start.
    #[error(transparent)]
    Metrics(#[from] switchyard_service::ops::OpsError),
}

impl PersistorError {
    /// Wrap the error of a NATS call that failed while opening `what`.
    fn nats<E: Into<store::BoxError>>(what: &'static str) -> impl FnOnce(E) -> PersistorError {
        move |error| PersistorError::Nats { what, source: error.into() }
    }
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
            StoreChoice::Cql(_) => AnyStore::Cql(connect_cql(cql_config(config)?).await?),
        })
    }
}

/// How long a starting persistor keeps trying to reach its CQL store.
const STORE_START_RETRY: Duration = Duration::from_secs(60);

/// Connect to the CQL store (and migrate it, when configured to), again and again while it answers `unavailable`
/// and `STORE_START_RETRY` has not passed: a cluster whose node just died answers its first requests with timeouts until
/// the others notice. Any other error (a schema that needs `migrate`, corrupt data) is returned at once.
async fn connect_cql(config: CqlConfig) -> Result<CqlStore, StoreError> {
    let deadline = tokio::time::Instant::now() + STORE_START_RETRY;
    loop {
        match CqlStore::connect_with(config.clone()).await {
            Err(StoreError::Unavailable(error)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(%error, "the history store is not available yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            result => return result,
        }
    }
}

/// The CQL store's settings from the persistor's configuration.
fn cql_config(config: &PersistorConfig) -> Result<CqlConfig, PersistorError> {
    let StoreChoice::Cql(nodes) = config.store_choice()? else {
        return Err(PersistorError::Config(config::ConfigError::Invalid {
            name: "store",
            message: "migrate needs a cql: store (the embedded store needs no migration)".into(),
        }));
    };
    let mut cql = CqlConfig::new(&nodes, &config.cql_keyspace);
    cql.replication = store::cql::Replication::Simple { replication_factor: config.cql_replication_factor };
    cql.schema = if config.cql_migrate_on_start { SchemaPolicy::Migrate } else { SchemaPolicy::Require };
    cql.consistency = config.cql_consistency()?;
    cql.credentials = match (&config.cql_username, &config.cql_password) {
        (Some(username), Some(password)) => {
            Some(store::cql::CqlCredentials { username: username.clone(), password: password.clone() })
        }
        _ => None,
    };
    cql.tls = config.cql_tls_files();
    Ok(cql)
}

/// How long a migration lock lives if its holder dies without releasing it.
const MIGRATION_LOCK_TTL: Duration = Duration::from_secs(120);

/// `switchyard-persistor migrate`: create or upgrade the CQL schema to this release's version. Idempotent.
///
/// Several persistors may run it at once (every pod of a rollout does, as an init container): a lock in NATS KV
/// lets one migrate while the others wait, then find the schema current. Concurrent DDL on Apache Cassandra can
/// leave nodes disagreeing on a table's id, so it is never run concurrently.
pub async fn migrate(config: &PersistorConfig) -> Result<MigrationOutcome, PersistorError> {
    let cql = cql_config(config)?;
    let nats =
        switchyard_service::nats::connect(&config.nats_url, &config.nats_auth, "switchyard-persistor migrate", false)
            .await?;
    let js = async_nats::jetstream::new(nats.clone());
    let bucket = async_nats::jetstream::kv::Config {
        bucket: subjects::LOCKS_BUCKET.to_owned(),
        history: 1,
        max_age: MIGRATION_LOCK_TTL,
        num_replicas: config.nats_replicas,
        ..Default::default()
    };
    let locks = switchyard_service::nats::ensure_kv(&js, bucket).await.map_err(PersistorError::LockBucket)?;
    let holder = format!("migrate-{}", switchyard_protocol::ids::random_base62(12));
    let deadline = tokio::time::Instant::now() + MIGRATION_LOCK_TTL * 3;
    loop {
        match locks.create(subjects::SCHEMA_MIGRATION_LOCK, holder.clone().into()).await {
            Ok(_) => break,
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                if tokio::time::Instant::now() > deadline {
                    return Err(PersistorError::MigrationLockHeld);
                }
                tracing::info!("another persistor is migrating the schema; waiting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            // On a NATS cluster a bucket just created, or one whose leader is being elected, answers for a few
            // seconds with errors that pass: wait for it as for another migration.
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(PersistorError::nats("schema migration lock")(e))
            }
            Err(error) => {
                tracing::info!(%error, "the schema migration lock cannot be taken yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    let outcome = CqlStore::migrate(&cql).await;
    if let Err(error) = locks.purge(subjects::SCHEMA_MIGRATION_LOCK).await {
        tracing::warn!(%error, "cannot release the schema migration lock; it expires on its own");
    }
    let _ = nats.flush().await;
    Ok(outcome?)
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

    async fn head(&self, tenant: &ProjectId, room: &RoomId) -> Result<RoomHead, StoreError> {
        match self {
            AnyStore::Embedded(store) => store.head(tenant, room).await,
            AnyStore::Cql(store) => store.head(tenant, room).await,
        }
    }
    async fn thread(&self, query: &HistoryQuery, parent: u64) -> Result<HistoryPage, StoreError> {
        match self {
            AnyStore::Embedded(store) => store.thread(query, parent).await,
            AnyStore::Cql(store) => store.thread(query, parent).await,
        }
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        match self {
            AnyStore::Embedded(store) => store.sweep().await,
            AnyStore::Cql(store) => store.sweep().await,
        }
    }

    async fn authored_rooms(
        &self,
        tenant: &ProjectId,
        user: &UserId,
        after: Option<&RoomId>,
        limit: u32,
    ) -> Result<(Vec<RoomId>, Option<RoomId>), StoreError> {
        match self {
            AnyStore::Embedded(store) => store.authored_rooms(tenant, user, after, limit).await,
            AnyStore::Cql(store) => store.authored_rooms(tenant, user, after, limit).await,
        }
    }

    async fn authored_messages(
        &self,
        tenant: &ProjectId,
        user: &UserId,
        after: Option<(&RoomId, u64)>,
        limit: u32,
    ) -> Result<AuthoredMessages, StoreError> {
        match self {
            AnyStore::Embedded(store) => store.authored_messages(tenant, user, after, limit).await,
            AnyStore::Cql(store) => store.authored_messages(tenant, user, after, limit).await,
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
    switchyard_service::telemetry::describe(telemetry::METRICS);
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
    let nats =
        switchyard_service::nats::connect(&config.nats_url, &config.nats_auth, "switchyard-persistor", true).await?;
    let _ = connected.set(nats.clone());
    switchyard_service::nats::spawn_cluster_watch(&nats, &config.nats_url, &shutdown);
    let js = async_nats::jetstream::new(nats.clone());
    let responder = tokio::spawn(history::serve(
        nats.clone(),
        store.clone(),
        Duration::from_millis(config.history_catch_up_ms),
        shutdown.clone(),
    ));
    let sweeper = tokio::spawn(sweep_expired(store.clone(), shutdown.clone()));
    let settings = config.ingest()?;
    let result = match ingest::open_consumer(&js, &settings, &shutdown).await? {
        Some(consumer) => ingest::run(js.clone(), consumer, &*store, &settings, shutdown.clone()).await,
        None => Ok(()),
    };
    shutdown.cancel();
    let _ = sweeper.await;
    match responder.await {
        Ok(Err(error)) => tracing::warn!(%error, "history responder failed"),
        Err(error) => tracing::warn!(%error, "history responder panicked"),
        Ok(Ok(())) => {}
    }
    let _ = nats.flush().await;
    result
}

/// How often expired messages are swept out of the store.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// Sweep expired messages out of the store until `shutdown`: a bounded batch at a time, again at once while
/// batches come back full.
async fn sweep_expired<S: HistoryStore>(store: Arc<S>, shutdown: CancellationToken) {
    loop {
        let pause = match store.sweep().await {
            Ok(0) => SWEEP_EVERY,
            Ok(swept) => {
                metrics::counter!("switchyard_persistor_expired_swept_total").increment(swept);
                Duration::from_millis(10)
            }
            Err(error) => {
                tracing::warn!(%error, "cannot sweep expired messages");
                SWEEP_EVERY
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn migrate_never_shows_the_nats_credentials() {
        // Nothing listens on port 1: the connect fails, and its error names the server without its password.
        let config = PersistorConfig {
            nats_url: "nats://operator:s3cret-pw@127.0.0.1:1".into(),
            store: "cql:127.0.0.1:1".into(),
            ..PersistorConfig::default()
        };
        let error = migrate(&config).await.expect_err("nothing to connect to").to_string();
        assert!(error.contains("127.0.0.1:1"), "{error}");
        assert!(!error.contains("s3cret-pw") && !error.contains("operator"), "{error}");
    }
}
