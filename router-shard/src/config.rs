//! The router shard's configuration: one typed struct, read from an optional TOML file and then from one
//! `SWITCHYARD_<KEY>` environment variable per key (`switchyard_service::config`), validated before anything starts.
//!
//! This module does not connect to anything.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

/// Everything a router shard needs to start.
#[derive(Clone, Serialize, Deserialize)]
// Unknown keys are refused by the loader (`switchyard_service::config`), which serde cannot do with a flattened
// field.
#[serde(default)]
pub struct RouterConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// How to authenticate to NATS and secure the connection (`nats_user`, `nats_tls_ca_file`, ...).
    #[serde(flatten)]
    pub nats_auth: switchyard_service::nats::NatsAuth,
    /// OpenTelemetry traces (`otlp_endpoint`, `otlp_sample_ratio`); off unless an endpoint is set.
    #[serde(flatten)]
    pub traces: switchyard_service::trace::TraceSettings,
    /// This router shard's id, unique in the cluster: `[A-Za-z0-9_-]{1,64}`.
    pub router_id: String,
    /// Number of virtual shards; must be the same on every process of the cluster.
    pub shard_count: u16,
    /// How long a shard lease lives without renewal, in milliseconds.
    pub lease_ttl_ms: u64,
    /// How often leases are renewed and free shards claimed, in milliseconds.
    pub lease_tick_ms: u64,
    /// How long an idle room actor stays in memory, in milliseconds.
    pub room_idle_ms: u64,
    /// Events stream retention, in seconds; bounds how far back `join {since}` reaches. At least the duplicate
    /// window.
    pub stream_max_age_secs: u64,
    /// How long the events stream recognises a repeated `cmid`, in seconds (the stream's duplicate window).
    pub stream_duplicate_window_secs: u64,
    /// Most bytes the events stream may hold when a router shard creates it; 0 for no bound. A full stream
    /// refuses appends (they answer `unavailable`) rather than dropping events the store may not have yet.
    pub stream_max_bytes: u64,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; port 0 picks a free port.
    pub metrics_addr: SocketAddr,
    /// Replicas of the events stream and of the rooms and leases buckets when a router shard creates them (3 on a
    /// NATS cluster, as in production; 1 for one NATS server). An existing stream or bucket keeps its settings.
    pub nats_replicas: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: Default::default(),
            traces: Default::default(),
            router_id: String::new(),
            shard_count: switchyard_protocol::limits::DEFAULT_SHARD_COUNT,
            lease_ttl_ms: 6_000,
            lease_tick_ms: 1_000,
            room_idle_ms: 120_000,
            stream_max_age_secs: 7 * 24 * 3600,
            stream_duplicate_window_secs: switchyard_protocol::subjects::EVENTS_DUPLICATE_WINDOW.as_secs(),
            stream_max_bytes: 0,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9090)),
            nats_replicas: 1,
        }
    }
}

use switchyard_service::config::{Checks, Settings};
pub use switchyard_service::ConfigError;

impl std::fmt::Debug for RouterConfig {
    /// Secrets and URL credentials never show.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        switchyard_service::config::fmt_redacted(self, "RouterConfig", f)
    }
}

impl Settings for RouterConfig {
    const URL_KEYS: &'static [&'static str] = &["nats_url", "otlp_endpoint"];
    const RENAMED: &'static [(&'static str, &'static str)] = &[("stream_replicas", "nats_replicas")];

    /// A router shard started without an id takes a random one.
    fn complete(&mut self) {
        if self.router_id.is_empty() {
            self.router_id = format!("router-{}", switchyard_protocol::ids::random_base62(8));
        }
    }

    fn problems(&self) -> Vec<ConfigError> {
        let mut checks = Checks::default();
        let c = &mut checks;
        c.require(
            switchyard_protocol::subjects::valid_router_id(&self.router_id),
            "router_id",
            format!("{:?} must match [A-Za-z0-9_-]{{1,64}}", self.router_id),
        );
        c.require(self.shard_count != 0 && self.shard_count <= 4096, "shard_count", "must be 1..=4096");
        c.require(
            self.lease_tick_ms != 0 && self.lease_ttl_ms >= 3 * self.lease_tick_ms,
            "lease_ttl_ms",
            "must be at least three lease ticks, and the tick must be positive",
        );
        c.check(switchyard_service::nats::check_replicas("nats_replicas", self.nats_replicas));
        c.require(!self.nats_url.trim().is_empty(), "nats_url", "must not be empty");
        c.check(switchyard_service::nats::server_addrs(&self.nats_url));
        c.require(self.stream_max_age_secs != 0, "stream_max_age_secs", "must be positive");
        c.require(self.stream_max_bytes <= i64::MAX as u64, "stream_max_bytes", "is beyond what JetStream holds");
        c.require(self.stream_duplicate_window_secs != 0, "stream_duplicate_window_secs", "must be positive");
        c.require(
            self.stream_max_age_secs >= self.stream_duplicate_window_secs,
            "stream_max_age_secs",
            format!(
                "{} s is shorter than the duplicate window ({} s, stream_duplicate_window_secs); JetStream refuses a \
                 stream that forgets events before their duplicates",
                self.stream_max_age_secs, self.stream_duplicate_window_secs
            ),
        );
        c.check(switchyard_service::ops::validate_metrics_addr(self.metrics_addr));
        checks.extend(self.nats_auth.problems());
        checks.extend(self.traces.problems());
        checks.into_problems()
    }
}

impl RouterConfig {
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    pub fn lease_tick(&self) -> Duration {
        Duration::from_millis(self.lease_tick_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use switchyard_service::config::{load, Sources};

    #[test]
    fn every_key_is_set_by_its_variable() {
        switchyard_service::config::assert_every_key_is_set_by_env::<RouterConfig>();
    }

    #[test]
    fn env_overrides_and_validation() {
        let sources = Sources {
            env: vec![
                ("SWITCHYARD_SHARD_COUNT".into(), "8".into()),
                ("SWITCHYARD_METRICS_ADDR".into(), "0.0.0.0:9100".into()),
            ],
            ..Sources::default()
        };
        let mut config: RouterConfig = load(&sources).unwrap();
        assert!(config.router_id.starts_with("router-"), "a random id: {}", config.router_id);
        assert_eq!(config.shard_count, 8);
        assert_eq!(config.metrics_addr.port(), 9100);
        config.metrics_addr = "0.0.0.0:22".parse().unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("metrics_addr"));
        config.metrics_addr = "127.0.0.1:0".parse().unwrap();
        config.validate().unwrap();
        config.router_id = "bad.id".into();
        assert!(config.validate().is_err());
        config.router_id = "r1".into();
        config.stream_max_age_secs = 60;
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("stream_max_age_secs") && err.contains("duplicate window") && !err.contains('\n'),
            "{err}"
        );
        config.stream_duplicate_window_secs = 30;
        config.validate().unwrap();
        // The replicas' older name is still read; the current one wins.
        let old = |pairs: &[(&str, &str)]| {
            let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            load::<RouterConfig>(&Sources { env, ..Sources::default() }).unwrap().nats_replicas
        };
        assert_eq!(old(&[("SWITCHYARD_STREAM_REPLICAS", "3")]), 3);
        assert_eq!(old(&[("SWITCHYARD_STREAM_REPLICAS", "3"), ("SWITCHYARD_NATS_REPLICAS", "1")]), 1);
        let sources = Sources { env: vec![("SWITCHYARD_SHARD_COUNT".into(), "x".into())], ..Sources::default() };
        let err = load::<RouterConfig>(&sources).unwrap_err();
        assert!(err.to_string().contains("SWITCHYARD_SHARD_COUNT"), "{err}");
    }
}
