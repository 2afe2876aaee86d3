//! The persistor's configuration: one typed struct, read from an optional TOML file and then from one
//! `SWITCHYARD_<KEY>` environment variable per key (`switchyard_service::config`), validated before anything starts.
//!
//! This module does not open the store.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The largest replication factor a created keyspace may ask for (a copy on each of this many nodes).
const CQL_REPLICATION_FACTOR_MAX: u32 = 9;

/// Everything a persistor needs to start.
#[derive(Clone, Serialize, Deserialize)]
// Unknown keys are refused by the loader (`switchyard_service::config`), which serde cannot do with a flattened
// field.
#[serde(default)]
pub struct PersistorConfig {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// How to authenticate to NATS and secure the connection (`nats_user`, `nats_tls_ca_file`, ...).
    #[serde(flatten)]
    pub nats_auth: switchyard_service::nats::NatsAuth,
    /// OpenTelemetry traces (`otlp_endpoint`, `otlp_sample_ratio`); off unless an endpoint is set.
    #[serde(flatten)]
    pub traces: switchyard_service::trace::TraceSettings,
    /// Replicas of the schema-migration lock bucket when a persistor creates it (3 on a NATS cluster, 1 for one
    /// server). The dead-letter stream takes the events stream's replicas.
    pub nats_replicas: usize,
    /// `embedded:<path of the redb file>` or `cql:<host:port>[,<host:port>...]`.
    pub store: String,
    /// Keyspace of the CQL store.
    pub cql_keyspace: String,
    /// Replication factor used when the CQL keyspace is created.
    pub cql_replication_factor: u32,
    /// CQL user (PasswordAuthenticator), with `cql_password`.
    pub cql_username: Option<String>,
    /// Password of `cql_username`. A secret.
    pub cql_password: Option<String>,
    /// Connect to every CQL node over TLS. Implied by any of the TLS files; without `cql_tls_ca_file` the system's
    /// roots are trusted.
    pub cql_tls: bool,
    /// PEM bundle of the CAs that sign the nodes' certificates.
    pub cql_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM, with `cql_tls_key_file`), for clusters that verify clients.
    pub cql_tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub cql_tls_key_file: Option<PathBuf>,
    /// Consistency level of every CQL read and write: `local_quorum` (the default), `quorum`, `each_quorum`,
    /// `all`, `one` or `local_one`. Below a quorum an acked write may be missing from a history read until repair.
    pub cql_consistency: String,
    /// At start, bring the CQL schema to this release's version (`true`), or refuse to start when it is behind
    /// (`false`, the default: run `switchyard-persistor migrate` once per upgrade instead, so many persistors
    /// starting together never race on schema changes).
    pub cql_migrate_on_start: bool,
    /// Most events written in one store batch.
    pub batch_max: usize,
    /// Most batches being written at once.
    pub batches_in_flight: usize,
    /// How long JetStream waits for an ack before redelivering an event, in milliseconds.
    pub ack_wait_ms: u64,
    /// Most events delivered and not yet acked over all persistors.
    pub max_ack_pending: i64,
    /// Deliveries after which an event the store still rejects goes to the dead-letter stream.
    pub max_deliver: u32,
    /// Delays before the next attempt at a rejected event, in milliseconds (the last repeats).
    pub redelivery_backoff_ms: Vec<u64>,
    /// Longest pause between two write attempts while the store is unavailable, in milliseconds.
    pub outage_retry_max_ms: u64,
    /// How long a history request waits for this persistor to catch up to the room's last seq.
    pub history_catch_up_ms: u64,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; port 0 picks a free port.
    pub metrics_addr: SocketAddr,
}

impl Default for PersistorConfig {
    fn default() -> Self {
        PersistorConfig {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_auth: Default::default(),
            traces: Default::default(),
            nats_replicas: 1,
            store: "embedded:switchyard-history.redb".into(),
            cql_keyspace: "switchyard".into(),
            cql_replication_factor: 1,
            cql_username: None,
            cql_password: None,
            cql_tls: false,
            cql_tls_ca_file: None,
            cql_tls_cert_file: None,
            cql_tls_key_file: None,
            cql_consistency: "local_quorum".into(),
            cql_migrate_on_start: false,
            batch_max: 512,
            batches_in_flight: 4,
            ack_wait_ms: 30_000,
            max_ack_pending: 20_000,
            max_deliver: 5,
            redelivery_backoff_ms: vec![1_000, 5_000, 15_000],
            outage_retry_max_ms: 5_000,
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

use switchyard_service::config::{Checks, Settings};

impl std::fmt::Debug for PersistorConfig {
    /// Secrets and URL credentials never show.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        switchyard_service::config::fmt_redacted(self, "PersistorConfig", f)
    }
}

impl Settings for PersistorConfig {
    const URL_KEYS: &'static [&'static str] = &["nats_url", "otlp_endpoint"];

    /// Every field: the store choice (see [`PersistorConfig::store_choice`]), the ingest settings (see
    /// [`PersistorConfig::ingest`]) and the metrics address.
    fn problems(&self) -> Vec<ConfigError> {
        let mut checks = Checks::default();
        checks.check(self.store_choice());
        checks.check(self.cql_consistency());
        checks.require(
            (1..=CQL_REPLICATION_FACTOR_MAX).contains(&self.cql_replication_factor),
            "cql_replication_factor",
            format!("must be 1..={CQL_REPLICATION_FACTOR_MAX}"),
        );
        checks.check(self.ingest());
        checks.check(switchyard_service::nats::check_replicas("nats_replicas", self.nats_replicas));
        checks.check(switchyard_service::nats::server_addrs(&self.nats_url));
        checks.check(switchyard_service::ops::validate_metrics_addr(self.metrics_addr));
        checks.require(
            self.cql_username.is_some() == self.cql_password.is_some(),
            "cql_password",
            "cql_username and cql_password go together",
        );
        if let Some(files) = self.cql_tls_files() {
            checks.extend(files.problems(["cql_tls_ca_file", "cql_tls_cert_file", "cql_tls_key_file"]));
        }
        checks.extend(self.nats_auth.problems());
        checks.extend(self.traces.problems());
        checks.into_problems()
    }
}

impl PersistorConfig {
    /// The CQL TLS files when TLS is on (`cql_tls` or any file named), else `None`.
    pub fn cql_tls_files(&self) -> Option<switchyard_service::tls::TlsFiles> {
        let files = switchyard_service::tls::TlsFiles {
            ca_file: self.cql_tls_ca_file.clone(),
            cert_file: self.cql_tls_cert_file.clone(),
            key_file: self.cql_tls_key_file.clone(),
        };
        (self.cql_tls || files != switchyard_service::tls::TlsFiles::default()).then_some(files)
    }

    /// The ingest settings, validated.
    pub fn ingest(&self) -> Result<crate::ingest::IngestSettings, ConfigError> {
        let invalid = |name: &'static str, message: &str| ConfigError::Invalid { name, message: message.to_owned() };
        if self.batches_in_flight == 0 {
            return Err(invalid("batches_in_flight", "must be positive"));
        }
        if self.ack_wait_ms < 1_000 {
            return Err(invalid("ack_wait_ms", "must be at least 1000"));
        }
        if self.max_ack_pending < self.batch_max as i64 {
            return Err(invalid("max_ack_pending", "must be at least batch_max"));
        }
        if self.max_deliver == 0 {
            return Err(invalid("max_deliver", "must be positive"));
        }
        if self.redelivery_backoff_ms.is_empty() || self.redelivery_backoff_ms.contains(&0) {
            return Err(invalid("redelivery_backoff_ms", "needs at least one positive delay"));
        }
        // Progress acks go out once per retry, so a retry must come well within the ack wait.
        if self.outage_retry_max_ms == 0 || self.outage_retry_max_ms * 2 > self.ack_wait_ms {
            return Err(invalid("outage_retry_max_ms", "must be positive and at most half of ack_wait_ms"));
        }
        Ok(crate::ingest::IngestSettings {
            batch_max: self.batch_max,
            batches_in_flight: self.batches_in_flight,
            ack_wait: Duration::from_millis(self.ack_wait_ms),
            max_ack_pending: self.max_ack_pending,
            max_deliver: self.max_deliver,
            backoff: self.redelivery_backoff_ms.iter().map(|ms| Duration::from_millis(*ms)).collect(),
            outage_retry_max: Duration::from_millis(self.outage_retry_max_ms),
        })
    }

    /// The configured store, validated.
    /// The CQL consistency level `cql_consistency` names.
    pub fn cql_consistency(&self) -> Result<scylla::statement::Consistency, ConfigError> {
        use scylla::statement::Consistency;
        Ok(match self.cql_consistency.trim().to_ascii_lowercase().as_str() {
            "local_quorum" => Consistency::LocalQuorum,
            "quorum" => Consistency::Quorum,
            "each_quorum" => Consistency::EachQuorum,
            "all" => Consistency::All,
            "one" => Consistency::One,
            "local_one" => Consistency::LocalOne,
            _ => {
                return Err(ConfigError::Invalid {
                    name: "cql_consistency",
                    message: "must be local_quorum, quorum, each_quorum, all, one or local_one".into(),
                })
            }
        })
    }

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
    use switchyard_service::config::{load_unchecked, ConfigProblems, Sources};

    /// The defaults with `pairs` applied as environment variables, not validated.
    fn from_env(pairs: &[(&str, &str)]) -> Result<PersistorConfig, ConfigProblems> {
        load_unchecked(&Sources {
            env: pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Sources::default()
        })
    }

    #[test]
    fn every_key_is_set_by_its_variable() {
        switchyard_service::config::assert_every_key_is_set_by_env::<PersistorConfig>();
    }

    #[test]
    fn the_cql_consistency_is_local_quorum_unless_set() {
        use scylla::statement::Consistency;
        let mut config = PersistorConfig::default();
        assert_eq!(config.cql_consistency().unwrap(), Consistency::LocalQuorum);
        let config_quorum = from_env(&[("SWITCHYARD_CQL_CONSISTENCY", "QUORUM")]).unwrap();
        assert_eq!(config_quorum.cql_consistency().unwrap(), Consistency::Quorum);
        config.cql_consistency = "two".into();
        assert!(config.validate().is_err());
    }

    #[test]
    fn the_replication_factor_comes_from_the_environment_and_is_bounded() {
        let mut config = from_env(&[("SWITCHYARD_CQL_REPLICATION_FACTOR", "3")]).unwrap();
        assert_eq!(config.cql_replication_factor, 3);
        assert!(config.validate().is_ok());
        for refused in [0, 10, u32::MAX] {
            config.cql_replication_factor = refused;
            assert!(config.validate().is_err(), "{refused}");
        }
        assert!(from_env(&[("SWITCHYARD_CQL_REPLICATION_FACTOR", "-1")]).is_err());
    }

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
        config.ingest().unwrap();
        let config = from_env(&[
            ("SWITCHYARD_REDELIVERY_BACKOFF_MS", "100, 2000"),
            ("SWITCHYARD_MAX_DELIVER", "3"),
            ("SWITCHYARD_CQL_MIGRATE_ON_START", "true"),
        ])
        .unwrap();
        let settings = config.ingest().unwrap();
        assert_eq!(settings.backoff, vec![Duration::from_millis(100), Duration::from_secs(2)]);
        assert_eq!(settings.max_deliver, 3);
        assert!(config.cql_migrate_on_start);
        assert!(from_env(&[("SWITCHYARD_REDELIVERY_BACKOFF_MS", "1,x")]).is_err());
        for bad in [
            PersistorConfig { max_deliver: 0, ..PersistorConfig::default() },
            PersistorConfig { redelivery_backoff_ms: vec![], ..PersistorConfig::default() },
            PersistorConfig { outage_retry_max_ms: 20_000, ..PersistorConfig::default() },
            PersistorConfig { batches_in_flight: 0, ..PersistorConfig::default() },
        ] {
            assert!(bad.ingest().is_err(), "{bad:?}");
        }
        let mut config = config;
        for bad in ["", "cql:", "embedded:", "mongo:x"] {
            config.store = bad.into();
            assert!(config.store_choice().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metrics_address_from_env_and_validated() {
        PersistorConfig::default().validate().unwrap();
        let mut config = from_env(&[("SWITCHYARD_METRICS_ADDR", "0.0.0.0:9191")]).unwrap();
        assert_eq!(config.metrics_addr.port(), 9191);
        config.validate().unwrap();
        assert!(from_env(&[("SWITCHYARD_METRICS_ADDR", "nowhere")]).is_err());
        config.metrics_addr = "0.0.0.0:80".parse().unwrap();
        assert!(config.validate().unwrap_err().to_string().contains("metrics_addr"));
    }
}
