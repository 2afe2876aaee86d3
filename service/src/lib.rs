//! What every Switchyard binary does alike: parse its command line (`cli`), load its typed configuration (a TOML
//! file, then `SWITCHYARD_*` environment overrides, `config`), start logging (JSON or human-readable), record metrics into the
//! process-wide Prometheus recorder (`telemetry`), serve `/healthz`, `/readyz` and `/metrics` on an address of its
//! own (`ops`), turn SIGINT or SIGTERM into a shutdown token, and connect to NATS and open or create JetStream buckets (`nats`).
//!
//! It knows no service's fields: each binary's config type says which variables it reads and what is valid.

pub mod cli;
pub mod config;
pub mod nats;
pub mod ops;
pub mod telemetry;
pub mod tls;
pub mod trace;

use std::io::IsTerminal;
use tokio_util::sync::CancellationToken;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config file {path}, line {line}: {message}")]
    Syntax { path: String, line: usize, message: String },
    #[error("invalid value for {name}: {message}")]
    Invalid { name: &'static str, message: String },
    #[error("unknown key {key} in {file}{}", did_you_mean(nearest))]
    UnknownKey { key: String, file: String, nearest: Option<String> },
    #[error("unknown variable {name}{}", did_you_mean(nearest))]
    UnknownVariable { name: String, nearest: Option<String> },
    #[error("invalid value for {key} (from {origin}): {message}")]
    Value { key: String, origin: String, message: String },
}

fn did_you_mean(nearest: &Option<String>) -> String {
    nearest.as_ref().map(|n| format!("; did you mean {n}?")).unwrap_or_default()
}

/// The variable choosing the log format (see [`LogFormat::choose`]).
pub const LOG_FORMAT_VAR: &str = "SWITCHYARD_LOG_FORMAT";

/// The version of this build: the crate version and the git commit it was built from (`unknown` when built outside
/// a git checkout without `GIT_COMMIT` set).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SWITCHYARD_GIT_COMMIT"), ")");
/// The git commit alone.
pub const GIT_COMMIT: &str = env!("SWITCHYARD_GIT_COMMIT");

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, with the fields of every enclosing span (`spans`): for log collectors.
    Json,
    /// Human-readable lines with colours: for a terminal.
    Pretty,
}

impl LogFormat {
    /// `SWITCHYARD_LOG_FORMAT` (`json` or `pretty`); unset: pretty when stdout is a terminal, JSON otherwise (a
    /// container's stdout is not a terminal, so production logs are JSON without configuration).
    pub fn choose(value: Option<&str>, stdout_is_terminal: bool) -> Result<LogFormat, ConfigError> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") => Ok(if stdout_is_terminal { LogFormat::Pretty } else { LogFormat::Json }),
            Some("json") => Ok(LogFormat::Json),
            Some("pretty") | Some("text") => Ok(LogFormat::Pretty),
            Some(other) => Err(ConfigError::Invalid {
                name: "SWITCHYARD_LOG_FORMAT",
                message: format!("{other:?} must be json or pretty"),
            }),
        }
    }
}

/// Log to stdout, filtered by `RUST_LOG` (default `info`), in the format `SWITCHYARD_LOG_FORMAT` chooses (see
/// [`LogFormat::choose`]); no traces. An unknown format is reported and the default used, so logging always starts.
pub fn init_logging() {
    let _ = init_logging_with("switchyard", &trace::TraceSettings::default());
}

/// [`init_logging`], and when `traces` names an OTLP endpoint, traces of `service` (see [`trace`]). Keep the guard
/// for the life of the process: dropping it sends the spans still buffered. A trace exporter that cannot be built
/// is reported and tracing stays off; logging starts either way.
pub fn init_logging_with(service: &'static str, traces: &trace::TraceSettings) -> Option<trace::TraceGuard> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;

    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Spans meant for traces never show in the log.
    let filter = match format!("{}=off", trace::TARGET).parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    let requested = std::env::var(LOG_FORMAT_VAR).ok();
    let terminal = std::io::stdout().is_terminal();
    let (format, problem) = match LogFormat::choose(requested.as_deref(), terminal) {
        Ok(format) => (format, None),
        Err(error) => (LogFormat::choose(None, terminal).unwrap_or(LogFormat::Json), Some(error)),
    };
    let log = match format {
        LogFormat::Json => {
            tracing_subscriber::fmt::layer().json().with_current_span(false).with_span_list(true).boxed()
        }
        LogFormat::Pretty => tracing_subscriber::fmt::layer().with_ansi(terminal).boxed(),
    };
    let (tracer, guard, trace_problem) = match trace::tracer(service, traces) {
        Ok(Some((tracer, guard))) => (Some(tracer), Some(guard), None),
        Ok(None) => (None, None, None),
        Err(error) => (None, None, Some(error)),
    };
    let registry = tracing_subscriber::registry().with(log.with_filter(filter));
    // Without traces no second layer at all: an empty one would make every disabled call site be asked again.
    let _ = match tracer {
        Some(tracer) => registry
            .with(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(
                tracing_subscriber::filter::Targets::new().with_target(trace::TARGET, tracing::Level::TRACE),
            ))
            .try_init(),
        None => registry.try_init(),
    };
    if let Some(error) = problem {
        tracing::warn!(%error, ?format, "using the default log format");
    }
    if let Some(error) = trace_problem {
        tracing::error!(%error, "traces are off");
    }
    if let Some(endpoint) = traces.otlp_endpoint.as_deref().filter(|_| guard.is_some()) {
        tracing::info!(endpoint = %redact_url(endpoint), ratio = traces.otlp_sample_ratio, "exporting traces");
    }
    telemetry::count_panics();
    guard
}

/// A URL with any `user:password@` removed, for logs and errors. Handles comma-separated lists.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}://<redacted>@{}", &one[..scheme_end], &one[at + 1..])
            }
            (None, Some(at)) => format!("<redacted>@{}", &one[at + 1..]),
            _ => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
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
    fn urls_lose_their_credentials() {
        assert_eq!(redact_url("nats://a:b@n1:4222,nats://n2:4222"), "nats://<redacted>@n1:4222,nats://n2:4222");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn log_format_defaults_to_json_off_a_terminal() {
        assert_eq!(LogFormat::choose(None, false).unwrap(), LogFormat::Json);
        assert_eq!(LogFormat::choose(None, true).unwrap(), LogFormat::Pretty);
        assert_eq!(LogFormat::choose(Some("JSON"), true).unwrap(), LogFormat::Json);
        assert_eq!(LogFormat::choose(Some("pretty"), false).unwrap(), LogFormat::Pretty);
        let error = LogFormat::choose(Some("xml"), false).unwrap_err();
        assert!(error.to_string().contains("SWITCHYARD_LOG_FORMAT"), "{error}");
    }
}
