//! The operations listener of services without an HTTP API of their own (router shards, persistors): `/healthz`
//! (200 while the process runs), `/readyz` (200 while the service says it is ready, else 503) and `/metrics`
//! (Prometheus text from the process-wide recorder), on their own address.
//!
//! It serves nothing else and holds no state but the readiness check it was given; the gateway serves the same
//! three paths on its public port instead.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Says whether the service is ready for work (connected, not stopping).
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {source}")]
pub struct OpsError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Check a configured metrics address: port 0 (a free port, for tests) or an unprivileged port.
pub fn validate_metrics_addr(addr: SocketAddr) -> Result<(), crate::ConfigError> {
    if addr.port() != 0 && addr.port() < 1024 {
        return Err(crate::ConfigError::Invalid {
            name: "metrics_addr",
            message: format!("{addr}: use port 0 or a port from 1024 up (the services run unprivileged)"),
        });
    }
    Ok(())
}

/// A bound operations listener, not serving yet.
pub struct OpsListener {
    listener: tokio::net::TcpListener,
    state: Arc<OpsState>,
}

struct OpsState {
    ready: ReadyCheck,
    metrics: PrometheusHandle,
}

impl OpsListener {
    /// Bind `addr` (port 0 picks a free port) and install the metrics recorder if nothing did yet.
    pub async fn bind(addr: SocketAddr, ready: ReadyCheck) -> Result<OpsListener, OpsError> {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| OpsError { addr, source })?;
        let state = Arc::new(OpsState { ready, metrics: crate::telemetry::prometheus() });
        Ok(OpsListener { listener, state })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Serve in a task of its own until `stop` fires.
    pub fn spawn(self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let addr = self.local_addr();
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(self.state);
        tokio::spawn(async move {
            tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
            let served = axum::serve(self.listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
            if let Err(error) = served {
                tracing::warn!(%addr, %error, "metrics listener failed");
            }
        })
    }
}

async fn readyz(State(state): State<Arc<OpsState>>) -> Response {
    if (state.ready)() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

async fn metrics(State(state): State<Arc<OpsState>>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        crate::telemetry::render(&state.metrics),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() {
        let ready = Arc::new(AtomicBool::new(false));
        let check = ready.clone();
        let ops = OpsListener::bind("127.0.0.1:0".parse().unwrap(), Arc::new(move || check.load(Ordering::Relaxed)))
            .await
            .unwrap();
        let base = format!("http://{}", ops.local_addr());
        let stop = CancellationToken::new();
        let task = ops.spawn(stop.clone());
        metrics::counter!("switchyard_test_ops_total").increment(3);
        let http = reqwest::Client::new();
        let status = |path: &'static str| {
            let (http, base) = (http.clone(), base.clone());
            async move { http.get(format!("{base}{path}")).send().await.unwrap().status().as_u16() }
        };
        assert_eq!(status("/healthz").await, 200);
        assert_eq!(status("/readyz").await, 503);
        ready.store(true, Ordering::Relaxed);
        assert_eq!(status("/readyz").await, 200);
        let text = http.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(text.contains("switchyard_test_ops_total 3"), "{text}");
        stop.cancel();
        task.await.unwrap();
    }
}
