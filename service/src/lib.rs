//! What every Switchyard binary does alike: load its typed configuration (a TOML file named by `SWITCHYARD_CONFIG`,
//! then `SWITCHYARD_*` environment overrides), start logging, and turn SIGINT or SIGTERM into a shutdown token.
//!
//! It knows no service's fields: each binary's config type says which variables it reads and what is valid.

use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

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

/// The configuration file named by `SWITCHYARD_CONFIG`, or the defaults when none is named.
pub fn from_file<T: DeserializeOwned + Default>() -> Result<T, ConfigError> {
    match std::env::var("SWITCHYARD_CONFIG") {
        Ok(path) => {
            let text =
                std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path, source })
        }
        Err(_) => Ok(T::default()),
    }
}

/// Parse one environment value, naming the variable when it does not parse.
pub fn parse_env<T: std::str::FromStr>(name: &'static str, value: &str) -> Result<T, ConfigError> {
    value.trim().parse().map_err(|_| ConfigError::Invalid { name, message: format!("cannot parse {value:?}") })
}

/// Log to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).try_init();
}

/// A token that fires on SIGINT or SIGTERM.
pub fn shutdown_on_signals() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        token.cancel();
    });
    shutdown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_values_name_their_variable() {
        assert_eq!(parse_env::<u16>("SWITCHYARD_X", " 42 ").unwrap(), 42);
        let error = parse_env::<u16>("SWITCHYARD_X", "many").unwrap_err();
        assert!(error.to_string().contains("SWITCHYARD_X"), "{error}");
    }
}
