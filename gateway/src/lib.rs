//! The gateway: Switchyard's HTTP and WebSocket edge. Stateless: every session lives in its own task, commands go
//! to router shards over NATS, live events arrive on per-room NATS subjects, tokens live in Redis and tenants in a
//! NATS KV bucket.
//!
//! Start one with [`bind`] and [`BoundGateway::serve`], or [`run`]. A gateway sequences nothing and stores no
//! history; losing one loses no acknowledged message.
//!
//! Draining: when the shutdown token fires (SIGTERM), the gateway keeps its listener open but answers `/readyz`
//! and new upgrades with 503; every session finishes the op it has in flight (its `ok` is written), refuses the
//! rest with `unavailable`, says `bye` with a `reconnect_after_ms` spread over `drain_reconnect_window_ms`, and
//! closes with 1001. Once every session is gone (or `drain_grace_ms` is nearly up) the listener closes, the
//! background tasks stop and `serve` returns, within `drain_grace_ms` of the signal.

pub mod auth;
pub mod config;
pub mod http;
pub mod jwt;
pub mod limits;
pub mod moderation;
pub mod outbound;
pub mod presence;
pub mod presend;
pub mod resume;
pub mod revocation;
pub mod rooms;
pub mod serve;
pub mod sockets;
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
use std::sync::OnceLock;
use std::time::Duration;
use switchyard_protocol::subjects;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What the gateway keeps of its drain grace for closing the listener and flushing NATS after the sessions.
const DRAIN_TAIL: Duration = Duration::from_secs(1);

/// Why a gateway could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// NATS could not be reached (or its URL is unusable).
    #[error(transparent)]
    NatsConnect(#[from] switchyard_service::nats::ConnectError),
    /// A KV bucket the gateway needs could neither be opened nor created.
    #[error("NATS: {0}")]
    Bucket(#[source] switchyard_service::nats::EnsureKvError),
    /// The subscription to the revocation broadcast could not be made.
    #[error("NATS: subscribe to revocations: {0}")]
    RevocationSubscribe(#[source] async_nats::SubscribeError),
    /// The Redis client could not be configured from `redis_url`.
    #[error("Redis: {0}")]
    Redis(#[source] fred::error::Error),
    /// The Redis TLS settings could not be used.
    #[error("Redis: {0}")]
    RedisTls(#[source] switchyard_service::tls::TlsError),
    /// Redis refused the credentials or the TLS handshake: a configuration mistake, not an outage.
    #[error(
        "Redis: {url} refused the connection: check redis_username, redis_password and the TLS settings: {source}"
    )]
    RedisRefused {
        /// The configured URL, without credentials.
        url: String,
        #[source]
        source: fred::error::Error,
    },
    /// The client for tenants' hooks could not be built.
    #[error("cannot build the client for tenants' hooks: {0}")]
    Outbound(#[source] reqwest::Error),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    /// The HTTP server stopped with an error.
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
    /// This gateway's live sessions, for revocation.
    pub sessions: Arc<revocation::SessionRegistry>,
    /// The fleet-wide socket quotas: this gateway's counts, copied to Redis.
    pub sockets: Arc<sockets::SocketQuota>,
    /// The fleet-wide per-tenant message rate.
    pub tenant_rate: limits::TenantRateLimiter,
    pub hub: Arc<ws::hub::Hub>,
    /// Calls tenants' hooks, refusing addresses the operator did not allow.
    pub outbound: outbound::OutboundClient,
    /// Pre-send hook calls in flight, per tenant.
    pub hook_slots: presend::HookSlots,
    /// Reports this gateway's users to their presence owners.
    pub presence: presence::PresenceReporter,
    /// JetStream, for reading the events stream on resume.
    js: jetstream::Context,
    /// The events stream, opened on first use (router shards create it).
    events: tokio::sync::OnceCell<jetstream::stream::Stream>,
    /// Turns to run a replay (`join {since}`), `resume_concurrency` at once.
    pub replays: Arc<tokio::sync::Semaphore>,
    /// Fires when the gateway starts draining (SIGTERM): sessions finish their op in flight, say `bye` and close
    /// with 1001.
    pub shutdown: CancellationToken,
    /// Fires once the drain is over: the background tasks (revocations, tenant watch, presence) stop.
    stopped: CancellationToken,
    /// Set once shutdown begins: `/readyz` answers 503 and new upgrades are refused.
    draining: AtomicBool,
    /// When sessions must have closed, set when the drain begins.
    drain_deadline: OnceLock<tokio::time::Instant>,
    /// Sockets upgraded without a token that have not authenticated yet (see `ws::upgrade::Unauthenticated`).
    unauthenticated: std::sync::atomic::AtomicUsize,
    /// Every session task, so the drain can wait for them.
    pub session_tasks: TaskTracker,
    metrics: PrometheusHandle,
}

impl Gateway {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || self.shutdown.is_cancelled()
    }

    /// When a draining session must be closed at the latest: the drain grace minus the time the gateway needs to
    /// close its listener afterwards. Set on first use after the drain began.
    pub fn drain_deadline(&self) -> tokio::time::Instant {
        *self.drain_deadline.get_or_init(|| {
            tokio::time::Instant::now() + self.config.drain_grace().saturating_sub(DRAIN_TAIL + DRAIN_TAIL)
        })
    }

    /// The events stream.
    pub async fn events_stream(&self) -> Result<jetstream::stream::Stream, jetstream::context::GetStreamError> {
        self.events.get_or_try_init(|| self.js.get_stream(subjects::EVENTS_STREAM)).await.cloned()
    }
}

/// A gateway whose listener is bound (so its address is known) but which does not serve yet.
pub struct BoundGateway {
    listener: tokio::net::TcpListener,
    gateway: Arc<Gateway>,
    /// Copies the socket counts to Redis; it writes the last ones once the drain is over.
    socket_counts: tokio::task::JoinHandle<()>,
}

/// The Redis client's configuration: `redis_url`, the user and password that override its own, and for a
/// `rediss://` URL the TLS settings (system roots unless `redis_tls_ca_file` names CAs).
fn redis_config(config: &GatewayConfig) -> Result<Config, GatewayError> {
    let mut redis = Config::from_url(&config.redis_url).map_err(GatewayError::Redis)?;
    if let Some(username) = &config.redis_username {
        redis.username = Some(username.clone());
    }
    if let Some(password) = &config.redis_password {
        redis.password = Some(password.clone());
    }
    if redis.tls.is_some() {
        let tls = switchyard_service::tls::client_config(&config.redis_tls_files()).map_err(GatewayError::RedisTls)?;
        redis.tls = Some(fred::types::config::TlsConnector::from(tls).into());
    }
    Ok(redis)
}

/// One connection attempt before the real client starts: credentials or TLS that Redis refuses stop the start
/// with the reason. A Redis that does not answer does not: the gateway starts and reports not ready until it does.
async fn check_redis_credentials(config: &GatewayConfig, redis_config: &Config) -> Result<(), GatewayError> {
    let probe = Builder::from_config(redis_config.clone())
        .with_connection_config(|c| c.connection_timeout = Duration::from_secs(2))
        .build()
        .map_err(GatewayError::Redis)?;
    let attempt = tokio::time::timeout(Duration::from_secs(5), probe.init()).await;
    let refused = match attempt {
        Ok(Ok(_)) => None,
        Ok(Err(error)) => {
            let message = error.details().to_ascii_uppercase();
            // A TLS handshake that fails on a certificate surfaces as an IO error carrying rustls's reason ("invalid
            // peer certificate", "certificate required"); a handshake cut short by a server going away does not.
            let refusal = matches!(error.kind(), fred::error::ErrorKind::Auth | fred::error::ErrorKind::Tls)
                || ["WRONGPASS", "NOAUTH", "NOPERM", "CERTIFICATE"].iter().any(|w| message.contains(w));
            refusal.then_some(error)
        }
        Err(_elapsed) => None,
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), probe.quit()).await;
    match refused {
        Some(source) => Err(GatewayError::RedisRefused { url: config::redact_url(&config.redis_url), source }),
        None => Ok(()),
    }
}

/// Connect to NATS and Redis and bind the listener.
pub async fn bind(config: GatewayConfig, shutdown: CancellationToken) -> Result<BoundGateway, GatewayError> {
    let nats =
        switchyard_service::nats::connect(&config.nats_url, &config.nats_auth, "switchyard-gateway", true).await?;
    switchyard_service::nats::spawn_cluster_watch(&nats, &config.nats_url, &shutdown);
    let js = jetstream::new(nats.clone());
    let tenants_kv = switchyard_service::nats::retry_at_start("the tenants bucket", || {
        ensure_kv(&js, subjects::TENANTS_BUCKET, config.nats_replicas)
    })
    .await?;

    let redis_config = redis_config(&config)?;
    check_redis_credentials(&config, &redis_config).await?;
    let redis = Builder::from_config(redis_config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.max_command_attempts = 2;
        })
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(2))
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .build()
        .map_err(GatewayError::Redis)?;
    // Connect in the background: without Redis the gateway still serves existing sockets and reports not ready.
    let _connection = redis.connect();
    if tokio::time::timeout(Duration::from_secs(5), redis.wait_for_connect()).await.is_err() {
        tracing::warn!(url = %config::redact_url(&config.redis_url), "Redis not reachable yet; opaque tokens fail until it is");
    }

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| GatewayError::Listen { addr: config.listen, source })?;
    let sessions = revocation::SessionRegistry::new();
    // Background tasks run until the drain is over, so sessions still draining keep revocation and presence.
    let stopped = CancellationToken::new();
    // Revocations and tenant changes are heard before the first request is served.
    revocation::listen(nats.clone(), sessions.clone(), stopped.clone())
        .await
        .map_err(GatewayError::RevocationSubscribe)?;
    let tenants = tenants::TenantDirectory::new(tenants_kv);
    tenants.spawn_watch(sessions.clone(), stopped.clone());
    let gateway_id = format!("gw-{}", switchyard_protocol::ids::random_base62(10));
    let outbound = outbound::OutboundClient::new(outbound::AddressPolicy::new(config.hooks_allowed_networks()))
        .map_err(GatewayError::Outbound)?;
    let gateway = Arc::new(Gateway {
        outbound,
        hook_slots: presend::HookSlots::new(config.hooks_concurrency_per_tenant),
        hub: ws::hub::Hub::new(nats.clone()),
        presence: presence::PresenceReporter::start(
            nats.clone(),
            gateway_id.clone(),
            config.shard_count,
            stopped.clone(),
        ),
        js,
        events: tokio::sync::OnceCell::new(),
        replays: Arc::new(tokio::sync::Semaphore::new(config.resume_concurrency)),
        tenants,
        tenant_rate: limits::TenantRateLimiter::new(redis.clone()),
        sockets: sockets::SocketQuota::new(redis.clone(), &gateway_id),
        tokens: tokens::TokenStore::new(redis),
        sessions,
        nats,
        config,
        shutdown,
        stopped,
        draining: AtomicBool::new(false),
        drain_deadline: OnceLock::new(),
        unauthenticated: std::sync::atomic::AtomicUsize::new(0),
        session_tasks: TaskTracker::new(),
        metrics: {
            switchyard_service::telemetry::describe(telemetry::METRICS);
            telemetry::prometheus()
        },
    });
    let socket_counts = gateway.sockets.spawn_writer(gateway.stopped.clone());
    Ok(BoundGateway { listener, gateway, socket_counts })
}

impl BoundGateway {
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.gateway.config.listen)
    }

    /// Serve until the shutdown token fires; then drain (see the module documentation) and return within
    /// `drain_grace_ms`.
    pub async fn serve(self) -> Result<(), GatewayError> {
        let gateway = self.gateway.clone();
        tracing::info!(addr = %self.local_addr(), "gateway listening");
        let app = http::router(gateway.clone());
        let stop_accepting = CancellationToken::new();
        let mut server = tokio::spawn(serve::serve(
            self.listener,
            app,
            gateway.config.header_read_timeout(),
            stop_accepting.clone(),
        ));
        let early = tokio::select! {
            _ = gateway.shutdown.cancelled() => None,
            result = &mut server => Some(result),
        };
        let result = match early {
            Some(result) => result,
            None => {
                let started = tokio::time::Instant::now();
                let exit_by = started + gateway.config.drain_grace();
                gateway.draining.store(true, Ordering::Relaxed);
                let sessions_by = gateway.drain_deadline();
                tracing::info!(
                    sockets = gateway.session_tasks.len(),
                    grace_ms = gateway.config.drain_grace_ms,
                    reconnect_window_ms = gateway.config.drain_reconnect_window_ms,
                    "draining"
                );
                // Sessions see the shutdown token themselves; wait until they are all gone.
                gateway.session_tasks.close();
                let closed = tokio::time::timeout_at(sessions_by + DRAIN_TAIL, gateway.session_tasks.wait()).await;
                if closed.is_err() {
                    tracing::warn!(left = gateway.session_tasks.len(), "sessions still open at the drain deadline");
                }
                stop_accepting.cancel();
                let result = match tokio::time::timeout_at(exit_by - DRAIN_TAIL / 2, &mut server).await {
                    Ok(result) => result,
                    Err(_) => {
                        server.abort();
                        Ok(Ok(()))
                    }
                };
                tracing::info!(took_ms = started.elapsed().as_millis() as u64, "drained");
                result
            }
        };
        stop_accepting.cancel();
        gateway.draining.store(true, Ordering::Relaxed);
        gateway.stopped.cancel();
        // Both within what the drain kept for its tail.
        let _ = tokio::join!(
            tokio::time::timeout(DRAIN_TAIL / 2, gateway.nats.flush()),
            tokio::time::timeout(DRAIN_TAIL / 2, self.socket_counts),
        );
        match result {
            Ok(served) => served.map_err(GatewayError::Serve),
            Err(join) => Err(GatewayError::Serve(std::io::Error::other(join))),
        }
    }
}

/// Bind and serve until `shutdown` fires.
pub async fn run(config: GatewayConfig, shutdown: CancellationToken) -> Result<(), GatewayError> {
    bind(config, shutdown).await?.serve().await
}

async fn ensure_kv(js: &jetstream::Context, bucket: &str, replicas: usize) -> Result<kv::Store, GatewayError> {
    let config = kv::Config { bucket: bucket.to_owned(), history: 1, num_replicas: replicas, ..Default::default() };
    switchyard_service::nats::ensure_kv(js, config).await.map_err(GatewayError::Bucket)
}
