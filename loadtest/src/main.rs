//! `switchyard-loadtest`: the load generator. Scenarios `idle`, `fanout`, `dm`, `churn` and `storm` run against a
//! fleet started by `cargo xtask up`, check every expected delivery (once, in seq order), and report throughput,
//! latency percentiles, CPU by process and the gateway's memory, as a table, JSON and an SVG plot. `floor-serve`
//! is the bare broadcast server the `fanout` scenario measures the fleet against.
//!
//! It only targets loopback addresses, and every run is bounded in sockets, messages and time. It does not start
//! the fleet.

mod args;
mod conn;
mod deliveries;
mod floor;
mod holder;
mod measure;
mod report;
mod scenario;
mod target;

use anyhow::Result;
use args::Command;

fn main() -> Result<()> {
    let command = args::parse(std::env::args().skip(1).collect())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match command {
        Command::Help => {
            print!("{}", args::USAGE);
            Ok(())
        }
        Command::FloorServe { listen } => runtime.block_on(floor::serve(listen)),
        Command::Run(run) => runtime.block_on(scenario::run(*run)),
    }
}
