//! Switchyard's fault suite. Each scenario starts a fleet of real processes (gateways behind a TCP balancer,
//! router shards, persistors on the shared Cassandra) on NATS and Redis of its own, runs traffic whose every ack
//! is counted, injects one fault (kill, pause, outage, flood, a client that stops reading, sockets that never
//! speak), and judges: nothing acked lost or duplicated, order kept, recovery inside its bound.
//!
//! `cargo xtask chaos` installs and starts the servers, builds the binaries and runs this; `cargo xtask test`
//! runs the short variants. Nothing here is part of a deployment, and all traffic stays on 127.0.0.1.

pub mod balancer;
pub mod fleet;
pub mod hostile;
pub mod procs;
pub mod report;
pub mod scenario;
pub mod traffic;

use anyhow::{bail, Context, Result};
use report::Row;
use std::path::PathBuf;
use std::time::Instant;

/// Where the suite finds its parts; read from the environment `cargo xtask chaos` sets.
#[derive(Debug, Clone)]
pub struct Config {
    /// Folder with the `switchyard-gateway`, `switchyard-router-shard` and `switchyard-persistor` binaries.
    pub bin_dir: PathBuf,
    pub nats_server: PathBuf,
    pub redis_server: PathBuf,
    /// A Cassandra contact point, `host:port`.
    pub cql_node: String,
    /// The Cassandra process, paused by the store-outage scenario.
    pub cql_pid: i32,
    /// The keyspace every persistor of the run writes to.
    pub keyspace: String,
    /// Short variants (for CI) instead of the full sizes and durations.
    pub short: bool,
    /// Run only these scenarios (all when empty).
    pub only: Vec<String>,
    /// Keep every fleet's logs, not only those of failed scenarios.
    pub keep_logs: bool,
    /// Run only this seed of `hostile-clients` (its replay).
    pub seed: Option<u64>,
    /// A Cassandra cluster of its own for `cassandra-node-kill`, when `cargo xtask chaos` started one.
    pub cql_cluster: Option<CqlCluster>,
}

/// A Cassandra cluster the suite may kill a node of: its contact points and each node's pid, in the same order.
#[derive(Debug, Clone)]
pub struct CqlCluster {
    /// `host:port` of every node, comma-separated.
    pub nodes: String,
    pub pids: Vec<i32>,
}

impl Config {
    /// From `SWITCHYARD_CHAOS_BIN_DIR`, `SWITCHYARD_CHAOS_NATS_SERVER`, `SWITCHYARD_CHAOS_REDIS_SERVER`,
    /// `SWITCHYARD_TEST_CQL` and `SWITCHYARD_TEST_CQL_PID`; the Cassandra cluster from `SWITCHYARD_CHAOS_CQL_CLUSTER` and
    /// `SWITCHYARD_CHAOS_CQL_CLUSTER_PIDS` when they are set.
    pub fn from_env(short: bool, only: Vec<String>, keep_logs: bool, seed: Option<u64>) -> Result<Config> {
        let var = |name: &str| {
            std::env::var(name).with_context(|| format!("{name} is not set: run the suite with `cargo xtask chaos`"))
        };
        let config = Config {
            bin_dir: var("SWITCHYARD_CHAOS_BIN_DIR")?.into(),
            nats_server: var("SWITCHYARD_CHAOS_NATS_SERVER")?.into(),
            redis_server: var("SWITCHYARD_CHAOS_REDIS_SERVER")?.into(),
            cql_node: var("SWITCHYARD_TEST_CQL")?,
            cql_pid: var("SWITCHYARD_TEST_CQL_PID")?.parse().context("SWITCHYARD_TEST_CQL_PID is not a pid")?,
            keyspace: format!("chaos_{}", hex::encode(rand::random::<[u8; 4]>())),
            short,
            only,
            keep_logs,
            seed,
            cql_cluster: cql_cluster_from_env()?,
        };
        for binary in ["switchyard-gateway", "switchyard-router-shard", "switchyard-persistor"] {
            if !config.bin_dir.join(binary).is_file() {
                bail!("{} is missing from {}", binary, config.bin_dir.display());
            }
        }
        if let Some(unknown) = config.only.iter().find(|o| !scenario::NAMES.contains(&o.as_str())) {
            bail!("no scenario {unknown:?}; there are: {}", scenario::NAMES.join(", "));
        }
        Ok(config)
    }
}

fn cql_cluster_from_env() -> Result<Option<CqlCluster>> {
    let (Ok(nodes), Ok(pids)) =
        (std::env::var("SWITCHYARD_CHAOS_CQL_CLUSTER"), std::env::var("SWITCHYARD_CHAOS_CQL_CLUSTER_PIDS"))
    else {
        return Ok(None);
    };
    let pids = pids
        .split(',')
        .map(|p| {
            // 0 and negative numbers name process groups to `kill`, never one node.
            match p.trim().parse::<i32>() {
                Ok(pid) if pid > 1 => Ok(pid),
                _ => bail!("SWITCHYARD_CHAOS_CQL_CLUSTER_PIDS: {p:?} is not a pid"),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    if pids.len() != nodes.split(',').count() {
        bail!("SWITCHYARD_CHAOS_CQL_CLUSTER and SWITCHYARD_CHAOS_CQL_CLUSTER_PIDS name different numbers of nodes");
    }
    Ok(Some(CqlCluster { nodes, pids }))
}

/// Run the chosen scenarios one after the other; a scenario that could not run at all is a failed row. The short
/// variants leave out the scenarios that only run full-size (`scenario::FULL_ONLY`) unless `--only` names them.
pub async fn run(config: &Config) -> Vec<Row> {
    let mut rows = Vec::new();
    for name in scenario::NAMES {
        let named = config.only.iter().any(|o| o == name);
        if (!config.only.is_empty() && !named) || (config.short && !named && scenario::FULL_ONLY.contains(name)) {
            continue;
        }
        println!("chaos: {name} ...");
        let started = Instant::now();
        let mut row = match scenario::run(name, config).await {
            Ok(row) => row,
            Err(error) => {
                let mut row = Row::new(name, "(did not run)");
                row.fail(format!("{error:#}"));
                row
            }
        };
        row.took = started.elapsed();
        println!(
            "chaos: {name} {} in {:.0}s{}",
            if row.passed() { "passed" } else { "FAILED" },
            row.took.as_secs_f64(),
            row.failures.iter().map(|f| format!("\n  broken: {f}")).collect::<String>()
        );
        rows.push(row);
    }
    rows
}
