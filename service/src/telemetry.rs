//! The process-wide Prometheus recorder: installed once (on first use) and shared by every service started in the
//! process (tests start several), with histogram buckets chosen by the metric's unit suffix.
//!
//! This module defines no metric; each module records its own with the `metrics` macros. Names carry their unit
//! (`_seconds`, `_frames`, `_events`, `_total`, ...) and labels are bounded sets (op, code, reason, subprotocol,
//! outcome): never a tenant, user, room or token.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Panics the hook of [`count_panics`] has seen, readable without the recorder (tests fail on any increase).
static PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many panics [`count_panics`]'s hook has seen in this process.
pub fn panics_seen() -> u64 {
    PANICS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Count every panic in `switchyard_panics_total` and log it as an error (with its location) before the default hook
/// prints it. A panic is always a bug: a task that panics takes whatever it was doing with it, even though the
/// process goes on. Installed once per process, by [`crate::init_logging`].
pub fn count_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            metrics::counter!("switchyard_panics_total").increment(1);
            let location = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
            tracing::error!(%location, "panicked");
            default(info);
        }));
    });
}

/// Buckets of latency histograms (`*_seconds`): 0.5 ms to 10 s.
pub const SECONDS_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Buckets of queue-depth histograms (`*_frames`): powers of two up to the default outbound queue bound.
pub const FRAMES_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
/// Buckets of count histograms (`*_events`, e.g. batch sizes).
pub const EVENTS_BUCKETS: &[f64] =
    &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];

/// How often histogram samples are folded into their buckets between scrapes, so memory stays bounded when
/// nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The process's Prometheus handle, installing the recorder on first use.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            // Shown from the start, so an alert can fire on its first increase.
            metrics::counter!("switchyard_panics_total").absolute(0);
            let upkeep = handle.clone();
            // A thread rather than a task: the recorder outlives any one runtime (tests start several).
            let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            });
            if let Err(error) = spawned {
                tracing::warn!(%error, "cannot start the metrics upkeep thread; histograms are folded at scrapes only");
            }
            handle
        })
        .clone()
}

fn builder() -> PrometheusBuilder {
    let mut builder = PrometheusBuilder::new();
    for (suffix, buckets) in [("_seconds", SECONDS_BUCKETS), ("_frames", FRAMES_BUCKETS), ("_events", EVENTS_BUCKETS)] {
        builder = match builder.set_buckets_for_metric(Matcher::Suffix(suffix.into()), buckets) {
            Ok(builder) => builder,
            // Only an empty bucket list is refused, and these are constants.
            Err(error) => unreachable!("bucket constants for {suffix} are invalid: {error}"),
        };
    }
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_render_with_buckets() {
        let handle = prometheus();
        metrics::histogram!("switchyard_test_latency_seconds").record(0.003);
        metrics::histogram!("switchyard_test_depth_frames").record(5.0);
        let text = handle.render();
        assert!(text.contains("switchyard_test_latency_seconds_bucket{le=\"0.005\"} 1"), "{text}");
        assert!(text.contains("switchyard_test_depth_frames_bucket{le=\"8\"} 1"), "{text}");
    }

    #[test]
    fn panics_in_other_threads_are_counted() {
        let handle = prometheus();
        count_panics();
        let panics = || {
            let text = handle.render();
            text.lines()
                .find_map(|l| l.strip_prefix("switchyard_panics_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no switchyard_panics_total in {text}"))
        };
        let before = panics();
        let joined = std::thread::spawn(|| panic!("a panic the hook must count")).join();
        assert!(joined.is_err());
        assert_eq!(panics(), before + 1);
    }
}
