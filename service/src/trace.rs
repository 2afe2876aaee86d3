//! OpenTelemetry traces, opt-in: with `otlp_endpoint` set, the spans a service opens under [`TARGET`] are exported
//! over OTLP/HTTP from a background thread, sampled at the trace's root by `otlp_sample_ratio`, and their context
//! travels between services as a W3C `traceparent` in NATS message headers ([`current_headers`], [`follow`]).
//!
//! Off (the default), no layer is interested in [`TARGET`], so those spans are disabled at their call sites and
//! nothing here runs: [`enabled`] is false, no header is written or read. It records no metric and no log line.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The target of every span meant for traces: `tracing::info_span!(target: "switchyard::trace", ...)`. Log output
/// never shows these spans; only the trace exporter does.
pub const TARGET: &str = "switchyard::trace";

/// Whether traces are exported by this process.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether this process exports traces (so callers can skip header work when it does not).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The trace settings of every service; flattened into each service's configuration.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TraceSettings {
    /// OTLP/HTTP endpoint of a trace receiver (an OpenTelemetry Collector, Jaeger), e.g.
    /// `http://otel-collector:4318`; unset (the default) turns tracing off.
    pub otlp_endpoint: Option<String>,
    /// Share of traces kept, 0.0 to 1.0, decided where a trace starts (a gateway) and followed downstream.
    pub otlp_sample_ratio: f64,
}

impl std::fmt::Debug for TraceSettings {
    /// The endpoint without any credentials in it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceSettings")
            .field("otlp_endpoint", &self.otlp_endpoint.as_deref().map(crate::redact_url))
            .field("otlp_sample_ratio", &self.otlp_sample_ratio)
            .finish()
    }
}

impl Default for TraceSettings {
    fn default() -> Self {
        TraceSettings { otlp_endpoint: None, otlp_sample_ratio: 0.1 }
    }
}

impl TraceSettings {
    pub fn problems(&self) -> Vec<crate::ConfigError> {
        let mut checks = crate::config::Checks::default();
        checks.require((0.0..=1.0).contains(&self.otlp_sample_ratio), "otlp_sample_ratio", "must be from 0.0 to 1.0");
        if let Some(endpoint) = &self.otlp_endpoint {
            checks.require(
                endpoint.starts_with("http://") || endpoint.starts_with("https://"),
                "otlp_endpoint",
                format!(
                    "{:?} must be an http:// or https:// URL (OTLP over HTTP, usually port 4318)",
                    crate::redact_url(endpoint)
                ),
            );
        }
        checks.into_problems()
    }

    /// The traces URL: the endpoint with `/v1/traces` unless it names a path of its own.
    fn traces_url(endpoint: &str) -> String {
        let trimmed = endpoint.trim_end_matches('/');
        let has_path = trimmed.split("://").nth(1).is_some_and(|rest| rest.contains('/'));
        if has_path {
            trimmed.to_owned()
        } else {
            format!("{trimmed}/v1/traces")
        }
    }
}

/// Keeps the exporter running; dropping it sends the spans still buffered and stops it.
pub struct TraceGuard {
    provider: SdkTracerProvider,
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(error) = self.provider.shutdown() {
            eprintln!("traces: the exporter did not stop cleanly: {error}");
        }
    }
}

/// Why traces could not be started.
#[derive(Debug, thiserror::Error)]
#[error("traces: cannot build the OTLP exporter for {endpoint}: {source}")]
pub struct TraceError {
    endpoint: String,
    #[source]
    source: opentelemetry_otlp::ExporterBuildError,
}

/// The tracer of `service` exporting to `settings.otlp_endpoint`, or `None` when tracing is off.
pub(crate) fn tracer(
    service: &'static str,
    settings: &TraceSettings,
) -> Result<Option<(opentelemetry_sdk::trace::Tracer, TraceGuard)>, TraceError> {
    let Some(endpoint) = &settings.otlp_endpoint else {
        return Ok(None);
    };
    use opentelemetry_otlp::WithExportConfig as _;
    let url = TraceSettings::traces_url(endpoint);
    let shown = crate::redact_url(&url);
    // The exporter's blocking HTTP client runs its own thread; it is built on a plain thread, since building (and
    // later dropping) it inside the async runtime is not allowed.
    let built = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_endpoint(url.clone())
                    .with_timeout(std::time::Duration::from_secs(5))
                    .build()
            })
            .join()
    });
    let exporter = match built {
        Ok(result) => result.map_err(|source| TraceError { endpoint: shown.clone(), source })?,
        Err(_) => {
            return Err(TraceError {
                endpoint: shown,
                source: opentelemetry_otlp::ExporterBuildError::InternalFailure("the builder thread failed".into()),
            })
        }
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(settings.otlp_sample_ratio))))
        .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(service).build())
        .build();
    let tracer = provider.tracer(service);
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some((tracer, TraceGuard { provider })))
}

/// The W3C trace-context propagator (`traceparent`, `tracestate`).
fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

/// NATS headers carrying the current span's trace context; `None` when tracing is off or no span is current.
pub fn current_headers() -> Option<async_nats::HeaderMap> {
    if !enabled() {
        return None;
    }
    let context = tracing::Span::current().context();
    let mut headers = async_nats::HeaderMap::new();
    propagator().inject_context(&context, &mut HeaderInjector(&mut headers));
    headers.get("traceparent").is_some().then_some(headers)
}

/// Add the current span's trace context to `headers` (when tracing is on).
pub fn inject_current(headers: &mut async_nats::HeaderMap) {
    if enabled() {
        let context = tracing::Span::current().context();
        propagator().inject_context(&context, &mut HeaderInjector(headers));
    }
}

/// The longest `traceparent` kept (version 00 is exactly 55 bytes; later versions may add fields).
const MAX_TRACEPARENT: usize = 128;
/// The longest `tracestate` kept (the W3C limit is 32 entries of at most 256 bytes; receivers may truncate at 512).
const MAX_TRACESTATE: usize = 512;

/// The trace headers of `headers` worth keeping for later, or `None` (tracing off, no `traceparent`, or one too long
/// to be one); a `tracestate` too long is dropped.
pub fn carried(headers: Option<&async_nats::HeaderMap>) -> Option<async_nats::HeaderMap> {
    let headers = headers.filter(|_| enabled())?;
    let traceparent = headers.get("traceparent").filter(|v| v.as_str().len() <= MAX_TRACEPARENT)?;
    let mut kept = async_nats::HeaderMap::new();
    kept.insert("traceparent", traceparent.clone());
    if let Some(state) = headers.get("tracestate").filter(|v| v.as_str().len() <= MAX_TRACESTATE) {
        kept.insert("tracestate", state.clone());
    }
    Some(kept)
}

/// Make `span` a child of the trace context in `headers`, when they carry one; returns `span`.
pub fn follow(span: tracing::Span, headers: Option<&async_nats::HeaderMap>) -> tracing::Span {
    if let Some(headers) = carried(headers) {
        let context = propagator().extract(&HeaderExtractor(&headers));
        let _ = span.set_parent(context);
    }
    span
}

struct HeaderInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        ["traceparent", "tracestate"].into_iter().filter(|key| self.0.get(*key).is_some()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_url_gets_its_path_unless_it_has_one() {
        assert_eq!(TraceSettings::traces_url("http://collector:4318"), "http://collector:4318/v1/traces");
        assert_eq!(TraceSettings::traces_url("http://collector:4318/"), "http://collector:4318/v1/traces");
        assert_eq!(TraceSettings::traces_url("https://x.example/otlp/v1/traces"), "https://x.example/otlp/v1/traces");
    }

    #[test]
    fn settings_are_checked() {
        assert!(TraceSettings::default().problems().is_empty());
        let bad = TraceSettings { otlp_endpoint: Some("collector:4317".into()), otlp_sample_ratio: 1.5 };
        assert_eq!(bad.problems().len(), 2);
    }

    #[test]
    fn nothing_is_carried_while_tracing_is_off() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert!(!enabled());
        assert!(carried(Some(&headers)).is_none());
        assert!(current_headers().is_none());
    }
}
