//! The process-wide Prometheus recorder: installed once (on first use) and shared by every service started in the
//! process (tests start several), with histogram buckets chosen by the metric's unit suffix.
//!
//! Each service lists the metrics it records, with their HELP text, in a catalogue of [`MetricSpec`]s that it
//! [`describe`]s at start; the modules record them where they happen with the `metrics` macros. This module's own
//! are those of every process ([`PROCESS_METRICS`]): panics, the build, and CPU, memory and open files, refreshed
//! at each scrape ([`render`]). Names carry their unit (`_seconds`, `_frames`, `_events`, `_total`, ...) and
//! labels are bounded sets (op, code, reason, subprotocol, outcome): never a tenant, user, room or token.

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

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric a service records: its name, kind and the HELP text `/metrics` shows for it.
#[derive(Debug, Clone, Copy)]
pub struct MetricSpec {
    pub name: &'static str,
    pub kind: MetricKind,
    pub help: &'static str,
}

impl MetricSpec {
    pub const fn counter(name: &'static str, help: &'static str) -> MetricSpec {
        MetricSpec { name, kind: MetricKind::Counter, help }
    }
    pub const fn gauge(name: &'static str, help: &'static str) -> MetricSpec {
        MetricSpec { name, kind: MetricKind::Gauge, help }
    }
    pub const fn histogram(name: &'static str, help: &'static str) -> MetricSpec {
        MetricSpec { name, kind: MetricKind::Histogram, help }
    }
}

/// The metrics of every process, whatever its service.
pub const PROCESS_METRICS: &[MetricSpec] = &[
    MetricSpec::counter(
        "switchyard_panics_total",
        "Panics in any thread or task of the process; always a bug, the log line says where.",
    ),
    MetricSpec::gauge(
        "switchyard_build_info",
        "Always 1; its labels say which version and git commit the process runs.",
    ),
    MetricSpec::gauge("process_cpu_seconds_total", "CPU time the process has used, user and system, in seconds."),
    MetricSpec::gauge("process_resident_memory_bytes", "Resident memory of the process, in bytes."),
    MetricSpec::gauge("process_open_fds", "File descriptors the process has open (sockets included)."),
    MetricSpec::gauge("process_max_fds", "The most file descriptors the process may open (its soft limit)."),
];

/// Give each metric of `specs` its HELP text (and its kind) in the process's recorder.
pub fn describe(specs: &[MetricSpec]) {
    let _ = prometheus();
    specs.iter().for_each(describe_one);
}

fn describe_one(spec: &MetricSpec) {
    match spec.kind {
        MetricKind::Counter => metrics::describe_counter!(spec.name, spec.help),
        MetricKind::Gauge => metrics::describe_gauge!(spec.name, spec.help),
        MetricKind::Histogram => metrics::describe_histogram!(spec.name, spec.help),
    }
}

/// The Prometheus text of `handle`, with the process metrics read just before.
pub fn render(handle: &PrometheusHandle) -> String {
    process::refresh();
    handle.render()
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
            metrics::gauge!("switchyard_build_info", "version" => env!("CARGO_PKG_VERSION"), "commit" => crate::GIT_COMMIT)
                .set(1.0);
            for spec in PROCESS_METRICS {
                describe_one(spec);
            }
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

/// The process metrics, read from `/proc/self` (Linux): where a file cannot be read, its gauge keeps its last value.
mod process {
    /// Clock ticks per second of `/proc/self/stat`'s CPU times: `USER_HZ`, 100 on every Linux architecture the
    /// image is built for.
    const TICKS_PER_SECOND: f64 = 100.0;

    pub(super) fn refresh() {
        if let Some(seconds) = cpu_seconds() {
            metrics::gauge!("process_cpu_seconds_total").set(seconds);
        }
        if let Some(bytes) = resident_bytes() {
            metrics::gauge!("process_resident_memory_bytes").set(bytes);
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            // Less the one the listing itself holds open.
            metrics::gauge!("process_open_fds").set(entries.count().saturating_sub(1) as f64);
        }
        if let Some(max) = max_fds() {
            metrics::gauge!("process_max_fds").set(max);
        }
    }

    /// utime + stime: fields 14 and 15 of `/proc/self/stat`, counted after the command name's closing parenthesis
    /// (the name may hold spaces).
    fn cpu_seconds() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let after_name = &stat[stat.rfind(')')? + 1..];
        let mut fields = after_name.split_whitespace().skip(11);
        let user: f64 = fields.next()?.parse().ok()?;
        let system: f64 = fields.next()?.parse().ok()?;
        Some((user + system) / TICKS_PER_SECOND)
    }

    fn resident_bytes() -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib: f64 =
            status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kib * 1024.0)
    }

    fn max_fds() -> Option<f64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..].split_whitespace().next()?.parse().ok()
    }
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
    fn described_metrics_have_help_and_the_process_metrics_are_read() {
        let handle = prometheus();
        describe(&[MetricSpec::counter("switchyard_test_described_total", "A counter of this test.")]);
        metrics::counter!("switchyard_test_described_total").increment(1);
        let text = render(&handle);
        assert!(text.contains("# HELP switchyard_test_described_total A counter of this test."), "{text}");
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        };
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_cpu_seconds_total") >= 0.0);
        assert!(text.contains("# HELP process_cpu_seconds_total"), "{text}");
        let build = text.lines().find(|l| l.starts_with("switchyard_build_info{")).expect("build info");
        assert!(build.contains(&format!("commit=\"{}\"", crate::GIT_COMMIT)) && build.ends_with(" 1"), "{build}");
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
