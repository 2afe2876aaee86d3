//! `cargo xtask chaos`: installs and starts NATS, Redis and Cassandra (as `test` does), builds the three services
//! and the fault suite (`chaos/`), and runs it: every scenario, or the short variants with `--short`. The suite
//! starts its own NATS and Redis per scenario (it restarts and stops them); the Cassandra started here is shared
//! and paused by the store-outage scenario. A full run that includes `cassandra-node-kill` also starts a
//! three-node Cassandra cluster on 127.0.0.1-3 for it (the short variants leave that scenario out).
//!
//! It does not judge anything itself: the suite's exit status is the verdict.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::deps::{self, Tools};
use crate::proc;
use crate::services::{CassandraCluster, TestServices};
use crate::util::{cargo, repo_root, say, secs, target_dir};

/// The packages the suite runs: the services it starts and the suite itself.
const PACKAGES: &[&str] =
    &["switchyard-gateway", "switchyard-router-shard", "switchyard-persistor", "switchyard-chaos"];

/// `cargo xtask chaos [--release] [suite arguments: --short, --only a,b, --keep-logs, --json FILE, --list]`
pub fn run(args: &[String]) -> Result<ExitCode> {
    let release = args.iter().any(|a| a == "--release");
    let suite_args: Vec<String> = args.iter().filter(|a| *a != "--release").cloned().collect();
    let root = repo_root();
    let started = Instant::now();
    let tools = deps::ensure(&root, true)?;
    let mut services = TestServices::start(&tools)?;
    build(&root, release)?;
    services.wait_ready(&tools)?;
    let mut cql_cluster = None;
    if wants_cql_cluster(&suite_args) {
        let dist = tools.cassandra.as_ref().context("Cassandra is not installed")?;
        let started = Instant::now();
        say!("starting a {CQL_CLUSTER_NODES}-node Cassandra cluster on 127.0.0.1-{CQL_CLUSTER_NODES}");
        let cluster = CassandraCluster::start(dist, &services.dir()?.join("cassandra-cluster"), CQL_CLUSTER_NODES)?;
        say!("Cassandra cluster {} (pids {}) ready in {}", cluster.addrs(), cluster.pids(), secs(started.elapsed()));
        cql_cluster = Some(cluster);
    }
    let verdict = run_suite(&root, &tools, &services, cql_cluster.as_ref(), release, &suite_args)?;
    if let Some(mut cluster) = cql_cluster {
        cluster.stop();
    }
    services.stop();
    let passed = verdict.ok();
    say!("chaos {} in {}", if passed { "passed" } else { "failed" }, secs(started.elapsed()));
    Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Nodes of the Cassandra cluster the full run starts.
const CQL_CLUSTER_NODES: usize = 3;

/// The scenario that needs the Cassandra cluster.
const CQL_CLUSTER_SCENARIO: &str = "cassandra-node-kill";

/// Whether the suite's arguments run `CQL_CLUSTER_SCENARIO`: a full run of every scenario, or one that names it.
fn wants_cql_cluster(args: &[String]) -> bool {
    if args.iter().any(|a| a == "--short" || a == "--list") {
        return false;
    }
    match args.iter().position(|a| a == "--only") {
        Some(at) => args.get(at + 1).is_some_and(|names| names.split(',').any(|n| n.trim() == CQL_CLUSTER_SCENARIO)),
        None => true,
    }
}

/// Build the services and the suite.
pub fn build(root: &Path, release: bool) -> Result<()> {
    say!("building the services and the fault suite");
    let mut build = proc::command(cargo());
    build.current_dir(root).args(["build", "--bins"]);
    if release {
        build.arg("--release");
    }
    for p in PACKAGES {
        build.args(["-p", p]);
    }
    proc::run_ok(build, "cargo build (fault suite)")
}

/// How a run of the suite ended.
#[derive(Debug, Default)]
pub struct Verdict {
    pub passed: u64,
    pub failed: u64,
    /// The suite's exit status was success.
    pub success: bool,
    /// The suite's lines about failed scenarios (`chaos: NAME FAILED in ...` and the `  BROKEN: ...` under it),
    /// repeated at the end of a long run where they would otherwise scroll away.
    pub failures: Vec<String>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.success && self.failed == 0
    }
}

/// Run the built suite against `services`.
pub fn run_suite(
    root: &Path,
    tools: &Tools,
    services: &TestServices,
    cql_cluster: Option<&CassandraCluster>,
    release: bool,
    args: &[String],
) -> Result<Verdict> {
    let bin_dir = target_dir(root)?.join(if release { "release" } else { "debug" });
    let mut suite = proc::command(bin_dir.join("switchyard-chaos"));
    suite
        .current_dir(root)
        .args(args)
        .env("SWITCHYARD_CHAOS_BIN_DIR", &bin_dir)
        .env("SWITCHYARD_CHAOS_NATS_SERVER", &tools.nats_server)
        .env("SWITCHYARD_CHAOS_REDIS_SERVER", &tools.redis_server);
    for (k, v) in services.env() {
        suite.env(k, v);
    }
    if let Some(cluster) = cql_cluster {
        suite
            .env("SWITCHYARD_CHAOS_CQL_CLUSTER", cluster.addrs())
            .env("SWITCHYARD_CHAOS_CQL_CLUSTER_PIDS", cluster.pids());
    }
    let (status, lines) =
        proc::run_keeping_lines(suite, "switchyard-chaos", is_verdict_line).context("running the fault suite")?;
    let (totals, failures): (Vec<String>, Vec<String>) =
        lines.into_iter().partition(|l| l.starts_with("chaos: ") && l.contains(" scenarios, "));
    let mut verdict = Verdict { success: status.success(), failures, ..Verdict::default() };
    // `chaos: 11 scenarios, 10 passed, 1 failed`
    if let Some(line) = totals.last() {
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            let n: u64 = pair[0].parse().unwrap_or(0);
            match pair[1].trim_end_matches(',') {
                "passed" => verdict.passed = n,
                "failed" => verdict.failed = n,
                _ => {}
            }
        }
    }
    if !verdict.success && verdict.failed == 0 {
        verdict.failed = 1;
    }
    Ok(verdict)
}

/// The lines of the suite's output that say how it ended: the totals, and each failed scenario with its reasons.
/// The reasons are printed twice (as the scenario ends, and again under the table); only the first are kept.
fn is_verdict_line(line: &str) -> bool {
    (line.starts_with("chaos: ") && (line.contains(" scenarios, ") || line.contains(" FAILED in ")))
        || line.starts_with("  broken: ")
}
