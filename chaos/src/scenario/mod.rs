//! The scenarios, by name, and the frame most of them share: start a fleet, run counted traffic, inject a fault,
//! let it recover, judge the traffic.
//!
//! Sizes and durations come in two variants: short (what `cargo xtask test` runs) and full. Recovery bounds are the
//! design brief's where it gives one (a dead router shard's shards serve again within 10 s) and the suite's own
//! elsewhere; `docs/chaos.md` lists them.

mod cluster;
mod edge;
mod faults;
mod hostile;

use crate::fleet::{Fleet, Shape};
use crate::report::Row;
use crate::traffic::{Spec, Traffic};
use crate::Config;
use anyhow::Result;
use std::time::Duration;

/// Every scenario, in the order they run.
pub const NAMES: &[&str] = &[
    "gateway-kill",
    "router-kill",
    "router-stop",
    "persistor-kill",
    "nats-restart",
    "nats-leader-kill",
    "nats-kv-leader-kill",
    "nats-node-pause",
    "nats-rolling-restart",
    "nats-partition",
    "redis-stop",
    "cassandra-stop",
    "cassandra-node-kill",
    "slow-reader",
    "mass-drop",
    "flood",
    "idle-sockets",
    "hostile-clients",
];

pub async fn run(name: &str, config: &Config) -> Result<Row> {
    match name {
        "gateway-kill" => faults::gateway_kill(config).await,
        "router-kill" => faults::router_kill(config).await,
        "router-stop" => faults::router_stop(config).await,
        "persistor-kill" => faults::persistor_kill(config).await,
        "nats-restart" => faults::nats_restart(config).await,
        "nats-leader-kill" => cluster::nats_leader_kill(config).await,
        "nats-kv-leader-kill" => cluster::nats_kv_leader_kill(config).await,
        "nats-node-pause" => cluster::nats_node_pause(config).await,
        "nats-rolling-restart" => cluster::nats_rolling_restart(config).await,
        "nats-partition" => cluster::nats_partition(config).await,
        "redis-stop" => faults::redis_stop(config).await,
        "cassandra-stop" => faults::cassandra_stop(config).await,
        "cassandra-node-kill" => faults::cassandra_node_kill(config).await,
        "slow-reader" => edge::slow_reader(config).await,
        "mass-drop" => edge::mass_drop(config).await,
        "flood" => edge::flood(config).await,
        "idle-sockets" => edge::idle_sockets(config).await,
        "hostile-clients" => hostile::hostile_clients(config).await,
        other => anyhow::bail!("no scenario {other:?}"),
    }
}

/// The scenarios the short variants leave out: they need more than one machine's CI run can give (a Cassandra
/// cluster of three JVMs beside the shared one).
pub const FULL_ONLY: &[&str] = &["cassandra-node-kill"];

/// `short` in the short variant, `full` otherwise.
fn pick<T>(config: &Config, short: T, full: T) -> T {
    if config.short {
        short
    } else {
        full
    }
}

/// Traffic before the fault, so "before" latencies and the recovery have something to compare with.
const WARM_UP: Duration = Duration::from_secs(3);
/// Traffic after the fault healed, so late deliveries and resumes are exercised under load.
const COOL_DOWN: Duration = Duration::from_secs(3);

/// Whether the well-behaved clients' latency must stay as it was while the fault lasts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Latency {
    /// The fault stops some traffic for a while (a killed process): latency rises until recovery.
    MayRise,
    /// The fault must not touch other clients: p99 during it at most twice that before it, plus `LATENCY_SLACK_MS`.
    Kept,
}

/// Slack on top of twice the p99 before the fault (debug builds on two cores are noisy).
const LATENCY_SLACK_MS: u64 = 100;

/// The common frame: a fleet of `shape`, a tenant without message caps, traffic of `spec`, then `fault` (which
/// injects, waits for the fault's duration and heals it), then the judgement. The fleet's logs are kept when the
/// scenario fails (or always, with `--keep-logs`).
async fn with_traffic(
    config: &Config,
    mut row: Row,
    shape: Shape,
    spec: Spec,
    latency: Latency,
    fault: impl AsyncFnOnce(&mut Fleet, &Traffic, &mut Row) -> Result<()>,
) -> Result<Row> {
    let mut fleet = Fleet::start(config, shape).await?;
    let result = async {
        let tenant = fleet.create_tenant(no_caps()).await?;
        let traffic = Traffic::start(&fleet.ws_url(), &tenant, spec).await?;
        tokio::time::sleep(WARM_UP).await;
        fault(&mut fleet, &traffic, &mut row).await?;
        tokio::time::sleep(COOL_DOWN).await;
        let outcome = traffic.finish(&fleet.ws_url()).await?;
        row.judge(&outcome);
        if latency == Latency::Kept {
            let (before, after) = (outcome.p99_before_ms, outcome.p99_after_ms);
            row.check(
                after <= 2 * before + LATENCY_SLACK_MS,
                format!("others' p99 went from {before} ms before the fault to {after} ms during it"),
            );
        }
        if let Some(crash) = fleet.crashed() {
            row.fail(format!("a process crashed: {crash}"));
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    if let Err(error) = result {
        row.fail(format!("{error:#}"));
    }
    for panic in fleet.panics() {
        row.fail(format!("a process panicked: {panic}"));
    }
    if let Some(logs) = fleet.stop(config.keep_logs || !row.passed()) {
        row.details.push(format!("logs in {}", logs.display()));
    }
    Ok(row)
}

/// Tenant limits high enough that the fleet-wide rate never refuses the suite's traffic.
fn no_caps() -> serde_json::Value {
    serde_json::json!({"msgs_per_sec": 1_000_000u32, "msgs_burst": 1_000_000u32})
}

/// Wait until `done()` or `limit`; whether it became true.
async fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}
