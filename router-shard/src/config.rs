//! The router shard's configuration: one typed struct, read from an optional TOML file and then from
//! `SWITCHYARD_*` environment variables, validated before anything starts.
//!
//! This module does not connect to anything.

use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

/// Everything a router shard needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
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
    /// `stream_replicas` is its older name.
    #[serde(alias = "stream_replicas")]
    pub nats_replicas: usize,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
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

pub use switchyard_service::ConfigError;

impl RouterConfig {
    /// Load from `SWITCHYARD_CONFIG` (a TOML file) if set, then apply environment overrides, then validate.
    pub fn load() -> Result<Self, ConfigError> {
        let mut config: RouterConfig = switchyard_service::from_file()?;
        config.apply_env(|name| std::env::var(name).ok())?;
        if config.router_id.is_empty() {
            config.router_id = format!("router-{}", switchyard_protocol::ids::random_base62(8));
        }
        config.validate()?;
        Ok(config)
    }

    /// Override fields from environment variables, read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn num<T: std::str::FromStr>(name: &'static str, value: String) -> Result<T, ConfigError> {
            switchyard_service::parse_env(name, &value)
        }
        if let Some(v) = get("SWITCHYARD_NATS_URL") {
            self.nats_url = v;
        }
        if let Some(v) = get("SWITCHYARD_ROUTER_ID") {
            self.router_id = v;
        }
        if let Some(v) = get("SWITCHYARD_SHARD_COUNT") {
            self.shard_count = num("SWITCHYARD_SHARD_COUNT", v)?;
        }
        if let Some(v) = get("SWITCHYARD_LEASE_TTL_MS") {
            self.lease_ttl_ms = num("SWITCHYARD_LEASE_TTL_MS", v)?;
        }
        if let Some(v) = get("SWITCHYARD_LEASE_TICK_MS") {
            self.lease_tick_ms = num("SWITCHYARD_LEASE_TICK_MS", v)?;
        }
        if let Some(v) = get("SWITCHYARD_METRICS_ADDR") {
            self.metrics_addr = num("SWITCHYARD_METRICS_ADDR", v)?;
        }
        if let Some(v) = get("SWITCHYARD_STREAM_MAX_AGE_SECS") {
            self.stream_max_age_secs = num("SWITCHYARD_STREAM_MAX_AGE_SECS", v)?;
        }
        if let Some(v) = get("SWITCHYARD_STREAM_DUPLICATE_WINDOW_SECS") {
            self.stream_duplicate_window_secs = num("SWITCHYARD_STREAM_DUPLICATE_WINDOW_SECS", v)?;
        }
        if let Some(v) = get("SWITCHYARD_STREAM_MAX_BYTES") {
            self.stream_max_bytes = num("SWITCHYARD_STREAM_MAX_BYTES", v)?;
        }
        // The older name first, so that the newer one wins when both are set.
        if let Some(v) = get("SWITCHYARD_STREAM_REPLICAS") {
            self.nats_replicas = num("SWITCHYARD_STREAM_REPLICAS", v)?;
        }
        if let Some(v) = get("SWITCHYARD_NATS_REPLICAS") {
            self.nats_replicas = num("SWITCHYARD_NATS_REPLICAS", v)?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !switchyard_protocol::subjects::valid_router_id(&self.router_id) {
            return Err(ConfigError::Invalid {
                name: "router_id",
                message: format!("{:?} must match [A-Za-z0-9_-]{{1,64}}", self.router_id),
            });
        }
        if self.shard_count == 0 || self.shard_count > 4096 {
            return Err(ConfigError::Invalid { name: "shard_count", message: "must be 1..=4096".into() });
        }
        if self.lease_tick_ms == 0 || self.lease_ttl_ms < 3 * self.lease_tick_ms {
            return Err(ConfigError::Invalid {
                name: "lease_ttl_ms",
                message: "must be at least three lease ticks, and the tick must be positive".into(),
            });
        }
        switchyard_service::nats::check_replicas("nats_replicas", self.nats_replicas)?;
        switchyard_service::nats::server_addrs(&self.nats_url)?;
        if self.stream_max_age_secs == 0 {
            return Err(ConfigError::Invalid { name: "stream_max_age_secs", message: "must be positive".into() });
        }
        if self.stream_max_bytes > i64::MAX as u64 {
            return Err(ConfigError::Invalid {
                name: "stream_max_bytes",
                message: "is beyond what JetStream holds".into(),
            });
        }
        if self.stream_duplicate_window_secs == 0 {
            return Err(ConfigError::Invalid {
                name: "stream_duplicate_window_secs",
                message: "must be positive".into(),
            });
        }
        if self.stream_max_age_secs < self.stream_duplicate_window_secs {
            return Err(ConfigError::Invalid {
                name: "stream_max_age_secs",
                message: format!(
                    "{} s is shorter than the duplicate window ({} s, stream_duplicate_window_secs); JetStream \
                     refuses a stream that forgets events before their duplicates",
                    self.stream_max_age_secs, self.stream_duplicate_window_secs
                ),
            });
        }
        if self.nats_url.trim().is_empty() {
            return Err(ConfigError::Invalid { name: "nats_url", message: "must not be empty".into() });
        }
        switchyard_service::ops::validate_metrics_addr(self.metrics_addr)?;
        Ok(())
    }

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

    #[test]
    fn env_overrides_and_validation() {
        let mut config = RouterConfig { router_id: "r1".into(), ..RouterConfig::default() };
        config
            .apply_env(|name| match name {
                "SWITCHYARD_SHARD_COUNT" => Some("8".into()),
                "SWITCHYARD_METRICS_ADDR" => Some("0.0.0.0:9100".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.shard_count, 8);
        assert_eq!(config.metrics_addr.port(), 9100);
        config.validate().unwrap();
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
        let err = config.apply_env(|_| Some("x".into())).unwrap_err();
        assert!(err.to_string().contains("SWITCHYARD_"), "{err}");
    }
}
