//! Running a scenario: the shared setup (fleet file, a tenant of the run's own, the gateway's pid, the file
//! limit), the dispatch to each scenario, the report, and the clean-up, all inside the run's deadline.
//!
//! Each scenario module owns its load shape and its checks; none of them starts or stops the fleet.

mod churn;
mod dm;
mod fanout;
mod idle;
mod resume;
mod storm;

use crate::args::{RunArgs, Scenario};
use crate::conn::{self, Dialer};
use crate::measure;
use crate::report::Report;
use crate::target::{Fleet, Tenant};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::time::{Duration, Instant};

/// What every scenario gets.
pub struct Setup {
    pub args: RunArgs,
    pub fleet: Fleet,
    pub tenant: Tenant,
    /// Sockets to the fleet's gateway.
    pub dialer: Dialer,
    /// The gateway's process, for RSS and CPU.
    pub gateway_pid: u32,
    /// A short random id naming this run's rooms and users.
    pub run_id: String,
    /// Send times in bodies are microseconds since this instant.
    pub epoch: Instant,
}

impl Setup {
    /// A token for `user` of the run's tenant.
    pub fn token(&self, user: &str) -> Option<String> {
        self.tenant.token(user).ok()
    }
}

/// Run the scenario, print its report (and write JSON and SVG when asked), and fail if a delivery was lost or
/// duplicated.
pub async fn run(args: RunArgs) -> Result<()> {
    let deadline = args.deadline;
    let fleet = Fleet::from_file(&args.fleet)?;
    let sockets = match args.scenario {
        Scenario::Fanout => args.rooms * args.members,
        Scenario::Dm => args.users,
        Scenario::Churn => args.sockets + (args.rate as usize) * 2,
        Scenario::Resume => args.clients + 2,
        _ => args.sockets,
    };
    // Each socket is a file here; the floor is another process with the same limit.
    let limit = conn::raise_fd_limit(sockets as u64 + 256)?;
    let gateway_pid = match args.gateway_pid {
        Some(pid) => pid,
        None => measure::pid_listening_on(fleet.port()?)?
            .context("no process of this user listens on the fleet's port; is `cargo xtask up` running?")?,
    };
    let http = reqwest::Client::new();
    let run_id = switchyard_protocol::ids::random_base62(6).to_lowercase();
    let tenant = fleet.create_tenant(&http, &run_id).await.context("creating the run's tenant")?;
    let setup = Setup {
        dialer: Dialer::new(&fleet.ws, args.format, args.sources),
        args: args.clone(),
        fleet: fleet.clone(),
        tenant,
        gateway_pid,
        run_id,
        epoch: Instant::now(),
    };
    println!(
        "{} against {} (gateway pid {gateway_pid}, file limit {limit}, {} source address(es)), deadline {}s",
        args.scenario.name(),
        fleet.ws,
        args.sources,
        deadline.as_secs()
    );
    let outcome = tokio::time::timeout(deadline, async {
        match args.scenario {
            Scenario::Idle => idle::run(&setup).await,
            Scenario::Fanout => fanout::run(&setup).await,
            Scenario::Dm => dm::run(&setup).await,
            Scenario::Churn => churn::run(&setup).await,
            Scenario::Storm => storm::run(&setup).await,
            Scenario::Resume => resume::run(&setup).await,
        }
    })
    .await;
    // Clean up whatever happened: the run's tenant and its rooms go.
    if let Err(e) = fleet.delete_tenant(&http, &setup.tenant).await {
        eprintln!("could not delete the run's tenant {}: {e:#}", setup.tenant.project_id);
    }
    let report = match outcome {
        Ok(report) => report?,
        Err(_) => bail!("the run did not finish within its deadline of {}s", deadline.as_secs()),
    };
    report.print();
    if let Some(path) = &args.json {
        report.write_json(path)?;
        println!("  report written to {}", path.display());
    }
    if let Some(path) = &args.plot {
        report.write_svg(path)?;
        println!("  latency plot written to {}", path.display());
    }
    let (lost, duplicated) = (report.get_u64("lost"), report.get_u64("duplicated"));
    if lost > 0 || duplicated > 0 {
        bail!("{lost} deliveries lost and {duplicated} duplicated");
    }
    Ok(())
}

/// The parameters a report repeats, so a JSON file says how it was made.
pub fn params(args: &RunArgs) -> serde_json::Value {
    let mut p = json!({"format": format!("{:?}", args.format).to_lowercase(),
                       "duration_secs": args.duration.as_secs(), "sources": args.sources});
    let extra = match args.scenario {
        Scenario::Idle => json!({"sockets": args.sockets}),
        Scenario::Fanout => json!({"rooms": args.rooms, "members": args.members,
                                   "senders_per_room": args.senders_per_room, "rate": args.rate}),
        Scenario::Dm => json!({"users": args.users, "rate": args.rate}),
        Scenario::Churn => json!({"sockets": args.sockets, "rate": args.rate}),
        Scenario::Storm => json!({"sockets": args.sockets, "rooms": args.rooms, "rate": args.rate,
                                  "max_backoff_ms": args.max_backoff.as_millis() as u64}),
        Scenario::Resume => json!({"events": args.events, "body_bytes": args.body_bytes, "clients": args.clients}),
    };
    if let (Some(p), Some(extra)) = (p.as_object_mut(), extra.as_object()) {
        p.extend(extra.clone());
    }
    p
}

/// Wait until `ready()` holds, checking every 50 ms, for at most `limit`.
pub async fn wait_until(limit: Duration, what: &str, ready: impl Fn() -> bool) -> Result<Duration> {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() > limit {
            bail!("{what} did not happen within {}s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(start.elapsed())
}

/// Cancel `token` after `limit`, unless the returned task is aborted first: the bound on waiting for the last
/// deliveries once sending stopped.
pub fn cancel_after(token: &tokio_util::sync::CancellationToken, limit: Duration) -> tokio::task::JoinHandle<()> {
    let token = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(limit).await;
        token.cancel();
    })
}

/// Gateway RSS in MiB, for a report.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Add per-process CPU seconds to a report and return the CPU seconds of the processes named `server...`.
pub fn record_cpu(
    report: &mut Report,
    label: &str,
    by_process: std::collections::BTreeMap<String, f64>,
    server: &str,
) -> f64 {
    let server_secs = by_process.iter().filter(|(n, _)| n.starts_with(server)).map(|(_, s)| s).sum();
    report.cpu(label, by_process);
    server_secs
}

/// A report with the run's parameters.
pub fn new_report(setup: &Setup) -> Report {
    Report::new(setup.args.scenario.name(), params(&setup.args))
}
