//! The persistor's configuration: one typed struct, read from an optional TOML file (`SWITCHYARD_CONFIG`) and then
//! from `SWITCHYARD_*` environment variables, validated before anything starts.
//!
//! This module does not open the store.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything a persistor needs to start.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PersistorConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// `embedded:<path of the redb file>` or `cql:<host:port>[,<host:port>...]`.
    pub store: String,
    /// Keyspace of the CQL store.
    pub cql_keyspace: String,
    /// Replication factor used when the CQL keyspace is created.
    pub cql_replication_factor: u32,
    /// Most events written in one store batch.
    pub batch_max: usize,
    /// How long a history request waits for this persistor to catch up to the room's last seq.
    pub history_catch_up_ms: u64,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; port 0 picks a free port.
    pub metrics_addr: SocketAddr,
}

impl Default for PersistorConfig {
    fn default() -> Self {
        PersistorConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            store: "embedded:switchyard-history.redb".into(),
            cql_keyspace: "switchyard".into(),
            cql_replication_factor: 1,
            batch_max: 512,
            history_catch_up_ms: 2_000,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9091)),
        }
    }
}

/// Which backend the persistor writes to.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreChoice {
    Embedded(PathBuf),
    Cql(Vec<String>),
}

pub use switchyard_service::ConfigError;

impl PersistorConfig {
    /// Load from `SWITCHYARD_CONFIG` (a TOML file) if set, then apply environment overrides, then validate.
    pub fn load() -> Result<Self, ConfigError> {
        let mut config: PersistorConfig = switchyard_service::from_file()?;
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Override fields from environment variables, read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("SWITCHYARD_NATS_URL") {
            self.nats_url = v;
        }
        if let Some(v) = get("SWITCHYARD_STORE") {
            self.store = v;
        }
        if let Some(v) = get("SWITCHYARD_CQL_KEYSPACE") {
            self.cql_keyspace = v;
        }
        if let Some(v) = get("SWITCHYARD_BATCH_MAX") {
            self.batch_max = switchyard_service::parse_env("SWITCHYARD_BATCH_MAX", &v)?;
        }
        if let Some(v) = get("SWITCHYARD_METRICS_ADDR") {
            self.metrics_addr = switchyard_service::parse_env("SWITCHYARD_METRICS_ADDR", &v)?;
        }
        Ok(())
    }

    /// Check every field: the store choice (see [`Self::store_choice`]) and the metrics address.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store_choice()?;
        switchyard_service::ops::validate_metrics_addr(self.metrics_addr)
    }

    /// The configured store, validated.
    pub fn store_choice(&self) -> Result<StoreChoice, ConfigError> {
        if self.batch_max == 0 {
            return Err(ConfigError::Invalid { name: "batch_max", message: "must be positive".into() });
        }
        let invalid = |message: &str| ConfigError::Invalid { name: "store", message: message.to_owned() };
        match self.store.split_once(':') {
            Some(("embedded", path)) if !path.is_empty() => Ok(StoreChoice::Embedded(PathBuf::from(path))),
            Some(("cql", nodes)) => {
                let nodes: Vec<String> =
                    nodes.split(',').map(str::trim).filter(|n| !n.is_empty()).map(String::from).collect();
                if nodes.is_empty() {
                    return Err(invalid("cql: needs at least one host:port"));
                }
                Ok(StoreChoice::Cql(nodes))
            }
            _ => Err(invalid(&format!("{:?} must be embedded:<path> or cql:<host:port>[,...]", self.store))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_choices() {
        let mut config =
            PersistorConfig { store: "cql:127.0.0.1:9042, 127.0.0.2:9042".into(), ..PersistorConfig::default() };
        assert_eq!(
            config.store_choice().unwrap(),
            StoreChoice::Cql(vec!["127.0.0.1:9042".into(), "127.0.0.2:9042".into()])
        );
        config.store = "embedded:/tmp/x.redb".into();
        assert_eq!(config.store_choice().unwrap(), StoreChoice::Embedded("/tmp/x.redb".into()));
        for bad in ["", "cql:", "embedded:", "mongo:x"] {
            config.store = bad.into();
            assert!(config.store_choice().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metrics_address_from_env_and_validated() {
        let mut config = PersistorConfig::default();
        config.validate().unwrap();
        config.apply_env(|name| (name == "SWITCHYARD_METRICS_ADDR").then(|| "0.0.0.0:9191".into())).unwrap();
        assert_eq!(config.metrics_addr.port(), 9191);
        config.validate().unwrap();
        assert!(config.apply_env(|name| (name == "SWITCHYARD_METRICS_ADDR").then(|| "nowhere".into())).is_err());
        config.metrics_addr = "0.0.0.0:80".parse().unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("metrics_addr"));
    }
}
