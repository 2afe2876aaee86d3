//! The gateway's configuration: one typed struct, read from an optional TOML file (`SWITCHYARD_CONFIG`) and then
//! from `SWITCHYARD_*` environment variables, validated before anything starts.
//!
//! This module does not connect to anything.

use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;
use switchyard_protocol::limits;

/// Everything a gateway needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where to listen for HTTP and WebSocket; port 0 picks a free port.
    pub listen: SocketAddr,
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// Redis URL, e.g. `redis://127.0.0.1:6379`.
    pub redis_url: String,
    /// Bearer token of the admin API. Required.
    pub admin_token: String,
    /// Number of virtual shards; must match the router shards'.
    pub shard_count: u16,
    /// Largest accepted client frame, in bytes.
    pub max_frame_bytes: usize,
    /// Largest message body, in bytes.
    pub max_body_bytes: usize,
    /// Largest `attrs`, in bytes of JSON.
    pub max_attrs_bytes: usize,
    /// Outbound queue bound per session, in frames and in bytes.
    pub outbound_queue_frames: usize,
    pub outbound_queue_bytes: usize,
    /// Interval of server pings; a client silent for two intervals is closed with 4010.
    pub heartbeat_ms: u64,
    /// How long a socket may stay unauthenticated after the upgrade.
    pub auth_timeout_ms: u64,
    /// How long a command may wait for its router shard, including retries while a shard changes hands.
    pub command_timeout_ms: u64,
    /// Per-connection op rate: sustained ops per second and burst.
    pub ops_per_sec: u32,
    pub ops_burst: u32,
    /// Allowed `Origin` values for WebSocket upgrades; empty allows any.
    pub allowed_origins: Vec<String>,
    /// Most events one `join {since}` replays; a longer gap is answered `resume_gap`.
    pub resume_max_events: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            nats_url: "nats://127.0.0.1:4222".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            admin_token: String::new(),
            shard_count: limits::DEFAULT_SHARD_COUNT,
            max_frame_bytes: limits::MAX_FRAME_BYTES,
            max_body_bytes: limits::MAX_BODY_BYTES,
            max_attrs_bytes: limits::MAX_ATTRS_BYTES,
            outbound_queue_frames: limits::OUTBOUND_QUEUE_FRAMES,
            outbound_queue_bytes: limits::OUTBOUND_QUEUE_BYTES,
            heartbeat_ms: limits::HEARTBEAT_MS,
            auth_timeout_ms: 5_000,
            command_timeout_ms: 10_000,
            ops_per_sec: 20,
            ops_burst: 40,
            allowed_origins: Vec::new(),
            resume_max_events: 10_000,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("invalid value for {name}: {message}")]
    Invalid { name: &'static str, message: String },
}

fn parsed<T: std::str::FromStr>(name: &'static str, value: &str) -> Result<T, ConfigError> {
    value.trim().parse().map_err(|_| ConfigError::Invalid { name, message: format!("cannot parse {value:?}") })
}

impl GatewayConfig {
    /// Load from `SWITCHYARD_CONFIG` (a TOML file) if set, then apply environment overrides, then validate.
    pub fn load() -> Result<Self, ConfigError> {
        let mut config = match std::env::var("SWITCHYARD_CONFIG") {
            Ok(path) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })?
            }
            Err(_) => GatewayConfig::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Override fields from environment variables, read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("SWITCHYARD_LISTEN") {
            self.listen = parsed("SWITCHYARD_LISTEN", &v)?;
        }
        if let Some(v) = get("SWITCHYARD_NATS_URL") {
            self.nats_url = v;
        }
        if let Some(v) = get("SWITCHYARD_REDIS_URL") {
            self.redis_url = v;
        }
        if let Some(v) = get("SWITCHYARD_ADMIN_TOKEN") {
            self.admin_token = v;
        }
        if let Some(v) = get("SWITCHYARD_SHARD_COUNT") {
            self.shard_count = parsed("SWITCHYARD_SHARD_COUNT", &v)?;
        }
        if let Some(v) = get("SWITCHYARD_ALLOWED_ORIGINS") {
            self.allowed_origins = v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |name, message: &str| Err(ConfigError::Invalid { name, message: message.to_owned() });
        if self.admin_token.len() < 16 {
            return invalid("admin_token", "must be set (SWITCHYARD_ADMIN_TOKEN) and at least 16 characters long");
        }
        if self.shard_count == 0 || self.shard_count > 4096 {
            return invalid("shard_count", "must be 1..=4096");
        }
        if self.max_frame_bytes < 1024 || self.max_body_bytes == 0 || self.max_attrs_bytes == 0 {
            return invalid("max_frame_bytes", "frame limit must be at least 1 KiB and body/attrs limits positive");
        }
        if self.outbound_queue_frames == 0 || self.outbound_queue_bytes == 0 {
            return invalid("outbound_queue_frames", "outbound queue bounds must be positive");
        }
        if self.heartbeat_ms < 100 || self.auth_timeout_ms == 0 || self.command_timeout_ms == 0 {
            return invalid("heartbeat_ms", "heartbeat must be at least 100 ms and timeouts positive");
        }
        if self.ops_per_sec == 0 || self.ops_burst == 0 {
            return invalid("ops_per_sec", "op rate and burst must be positive");
        }
        Ok(())
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    pub fn auth_timeout(&self) -> Duration {
        Duration::from_millis(self.auth_timeout_ms)
    }
    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requires_an_admin_token_and_parses_env() {
        let mut config = GatewayConfig::default();
        assert!(config.validate().is_err());
        config
            .apply_env(|name| match name {
                "SWITCHYARD_ADMIN_TOKEN" => Some("0123456789abcdef".into()),
                "SWITCHYARD_LISTEN" => Some("127.0.0.1:0".into()),
                _ => None,
            })
            .unwrap();
        config.validate().unwrap();
        assert_eq!(config.listen.port(), 0);
        assert!(config.apply_env(|n| (n == "SWITCHYARD_LISTEN").then(|| "nope".into())).is_err());
    }
}
