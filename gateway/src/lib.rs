//! The gateway: Switchyard's HTTP and WebSocket edge. Stateless: every session lives in its own task, commands go
//! to router shards over NATS, live events arrive on per-room NATS subjects, tokens live in Redis and tenants in a
//! NATS KV bucket.
//!
//! Start one with [`bind`] and [`BoundGateway::serve`], or [`run`]. A gateway sequences nothing and stores no
//! history; losing one loses no acknowledged message.

pub mod auth;
pub mod config;
pub mod error;
pub mod http;
pub mod jwt;
pub mod limits;
pub mod presence;
pub mod resume;
pub mod revocation;
pub mod serve;
pub mod telemetry;
pub mod tenants;
pub mod tokens;
pub mod upstream;
pub mod ws;

pub use config::GatewayConfig;

use async_nats::jetstream::{self, kv};
use fred::prelude::*;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::subjects;
use tokio_util::sync::CancellationToken;

/// Why a gateway could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error("Redis: {0}")]
    Redis(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// What every request handler and session shares.
pub struct Gateway {
    pub config: GatewayConfig,
    /// Core NATS: commands, history requests, live events.
    pub nats: async_nats::Client,
    pub tenants: tenants::TenantDirectory,
    pub tokens: tokens::TokenStore,
    /// This gateway's live sessions, for revocation and connection caps.
    pub sessions: Arc<revocation::SessionRegistry>,
    /// The fleet-wide per-tenant message rate.
    pub tenant_rate: limits::TenantRateLimiter,
    pub hub: Arc<ws::hub::Hub>,
    /// Reports this gateway's users to their presence owners.
    pub presence: presence::PresenceReporter,
    /// JetStream, for reading the events stream on resume.
    js: jetstream::Context,
    /// The events stream, opened on first use (router shards create it).
    events: tokio::sync::OnceCell<jetstream::stream::Stream>,
    /// Fires when the gateway stops: sessions close with 1001.
    pub shutdown: CancellationToken,
    /// Set once shutdown begins: `/readyz` answers 503 and new upgrades are refused.
    draining: AtomicBool,
    metrics: PrometheusHandle,
}

impl Gateway {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || self.shutdown.is_cancelled()
    }

    /// The events stream.
    pub async fn events_stream(&self) -> Result<jetstream::stream::Stream, String> {
        self.events
            .get_or_try_init(|| async { self.js.get_stream(subjects::EVENTS_STREAM).await.map_err(|e| e.to_string()) })
            .await
            .cloned()
    }
}

/// A gateway whose listener is bound (so its address is known) but which does not serve yet.
pub struct BoundGateway {
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
}

/// Connect to NATS and Redis and bind the listener.
pub async fn bind(config: GatewayConfig, shutdown: CancellationToken) -> Result<BoundGateway, GatewayError> {
    let nats = async_nats::ConnectOptions::new()
        .name("switchyard-gateway")
        .retry_on_initial_connect()
        .connect(config.nats_url.as_str())
        .await
        .map_err(|e| GatewayError::Nats(format!("connect to {}: {e}", config::redact_url(&config.nats_url))))?;
    let js = jetstream::new(nats.clone());
    let tenants_kv = ensure_kv(&js, subjects::TENANTS_BUCKET).await?;

    let redis_config = Config::from_url(&config.redis_url).map_err(|e| GatewayError::Redis(e.to_string()))?;
    let redis = Builder::from_config(redis_config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.max_command_attempts = 2;
        })
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(2))
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()
        .map_err(|e| GatewayError::Redis(e.to_string()))?;
    // Connect in the background: without Redis the gateway still serves existing sockets and reports not ready.
    let _connection = redis.connect();
    if tokio::time::timeout(Duration::from_secs(5), redis.wait_for_connect()).await.is_err() {
        tracing::warn!(url = %config::redact_url(&config.redis_url), "Redis not reachable yet; opaque tokens fail until it is");
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| GatewayError::Listen { addr: config.listen, source })?;
    let sessions = revocation::SessionRegistry::new();
    // Revocations and tenant changes are heard before the first request is served.
    revocation::listen(nats.clone(), sessions.clone(), shutdown.clone())
        .await
        .map_err(|e| GatewayError::Nats(format!("subscribe to revocations: {e}")))?;
    let tenants = tenants::TenantDirectory::new(tenants_kv);
    tenants.spawn_watch(sessions.clone(), shutdown.clone());
    let gateway_id = format!("gw-{}", switchyard_protocol::ids::random_base62(10));
    let gateway = Arc::new(Gateway {
        hub: ws::hub::Hub::new(nats.clone()),
        presence: presence::PresenceReporter::start(nats.clone(), gateway_id, config.shard_count, shutdown.clone()),
        js,
        events: tokio::sync::OnceCell::new(),
        tenants,
        tenant_rate: limits::TenantRateLimiter::new(redis.clone()),
        tokens: tokens::TokenStore::new(redis),
        sessions,
        nats,
        config,
        shutdown,
        draining: AtomicBool::new(false),
        metrics: telemetry::prometheus(),
    });
    Ok(BoundGateway { listener, gateway })
}

impl BoundGateway {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.gateway.config.listen)
    }

    /// Serve until the shutdown token fires; then stop accepting, close sessions with 1001 and return.
    pub async fn serve(self) -> Result<(), GatewayError> {
        let gateway = self.gateway.clone();
        tracing::info!(addr = %self.local_addr(), "gateway listening");
        let app = http::router(gateway.clone());
        let shutdown = gateway.shutdown.clone();
        let result = serve::serve(self.listener, app, gateway.config.header_read_timeout(), shutdown).await;
        gateway.draining.store(true, Ordering::Relaxed);
        let _ = gateway.nats.flush().await;
        result.map_err(GatewayError::Serve)
    }
}

/// Bind and serve until `shutdown` fires.
pub async fn run(config: GatewayConfig, shutdown: CancellationToken) -> Result<(), GatewayError> {
    bind(config, shutdown).await?.serve().await
}

async fn ensure_kv(js: &jetstream::Context, bucket: &str) -> Result<kv::Store, GatewayError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let config = kv::Config { bucket: bucket.to_owned(), history: 1, ..Default::default() };
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(create_error) => js
            .get_key_value(bucket)
            .await
            .map_err(|e| GatewayError::Nats(format!("KV bucket {bucket}: {create_error}; then {e}"))),
    }
}
