//! `switchyard-chaos [--short] [--only a,b] [--seed N] [--keep-logs] [--json FILE]`: run the fault scenarios, print
//! the table, exit non-zero when any guarantee broke. Started by `cargo xtask chaos`, which provides the servers.
//! `--seed N` replays one seed of `hostile-clients` (and, without `--only`, runs only that scenario).

use anyhow::{bail, Context, Result};
use std::process::ExitCode;

#[tokio::main]
async fn main() -> Result<ExitCode> {
    let (mut short, mut only, mut keep_logs, mut json, mut seed) = (false, Vec::new(), false, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--short" => short = true,
            "--keep-logs" => keep_logs = true,
            "--only" => only = args.next().context("--only needs a list")?.split(',').map(str::to_owned).collect(),
            "--json" => json = Some(args.next().context("--json needs a file")?),
            "--seed" => {
                let n = args.next().context("--seed needs a number")?;
                seed = Some(n.parse::<u64>().with_context(|| format!("--seed {n:?} is not a u64"))?);
            }
            "--list" => {
                println!("{}", switchyard_chaos::scenario::NAMES.join("\n"));
                return Ok(ExitCode::SUCCESS);
            }
            other => {
                bail!("unknown argument {other:?} (--short, --only a,b, --seed N, --keep-logs, --json FILE, --list)")
            }
        }
    }
    if seed.is_some() && only.is_empty() {
        only = vec!["hostile-clients".to_owned()];
    }
    let config = switchyard_chaos::Config::from_env(short, only, keep_logs, seed)?;
    switchyard_chaos::procs::raise_fd_limit()?;
    let rows = switchyard_chaos::run(&config).await;
    println!("\n{}", switchyard_chaos::report::table(&rows));
    if let Some(path) = json {
        let lines: Vec<String> = rows.iter().map(|r| switchyard_chaos::report::json(r).to_string()).collect();
        std::fs::write(&path, lines.join("\n") + "\n").with_context(|| format!("writing {path}"))?;
    }
    let failed = rows.iter().filter(|r| !r.passed()).count();
    println!("chaos: {} scenarios, {} passed, {failed} failed", rows.len(), rows.len() - failed);
    Ok(if failed == 0 && !rows.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
