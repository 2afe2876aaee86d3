//! `hostile-clients`: the seeded hostile-client fuzzer (`crate::hostile`) against one fleet of real processes,
//! seed after seed, each seed on fresh tenants; a seed's violations fail the row with the command that replays it.
//!
//! It injects no process fault: it is the clients that are hostile. Short variant: a fixed list of seeds and one
//! random seed (printed); full: seeds until ten minutes have passed; `--seed N`: that seed only.

use crate::fleet::{Fleet, Shape};
use crate::hostile::{self, gen};
use crate::report::Row;
use crate::Config;
use anyhow::Result;
use std::time::{Duration, Instant};

/// The seeds every run starts with (the short variant: these and one random seed).
/// 230850806076757 once caught a direct message lost to a session of its recipient whose first `join` of the
/// conversation was answered before the message reached it.
const FIXED_SEEDS: &[u64] = &[1, 2, 3, 230850806076757];
/// The full variant drives seeds until this much time has passed.
const FULL_FOR: Duration = Duration::from_secs(10 * 60);
/// Violations of one seed printed in the row (all of them go to a file in the kept logs).
const SHOWN_PER_SEED: usize = 12;

/// How many times a router shard's log says another took one of its leases. None is expected without a fault:
/// takeovers mean a process (or the whole machine) stalled for a lease TTL, which explains `unavailable` answers.
fn lease_takeovers(fleet: &Fleet) -> usize {
    std::fs::read_dir(fleet.dir.path())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("router-shard-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default().matches("lease taken over").count())
        .sum()
}

/// The command that replays `seed`.
pub fn replay(seed: u64) -> String {
    format!("cargo xtask chaos --only hostile-clients --seed {seed}")
}

pub async fn hostile_clients(config: &Config) -> Result<Row> {
    let sockets = gen::plan(0).sockets.len();
    let variant = match (config.seed, config.short) {
        (Some(seed), _) => format!("seed {seed}"),
        (None, true) => format!("{} seeds", FIXED_SEEDS.len() + 1),
        (None, false) => format!("seeds for {} min", FULL_FOR.as_secs() / 60),
    };
    let mut row = Row::new(
        "hostile-clients",
        format!("hostile frames from {sockets} sockets of {} tenants, {variant}", gen::TENANTS),
    );
    let mut fleet = Fleet::start(config, Shape::default()).await?;
    let result = drive(config, &mut fleet, &mut row).await;
    if let Err(error) = result {
        row.fail(format!("{error:#}"));
    }
    if let Some(logs) = fleet.stop(config.keep_logs || !row.passed()) {
        row.details.push(format!("logs in {}", logs.display()));
    }
    Ok(row)
}

async fn drive(config: &Config, fleet: &mut Fleet, row: &mut Row) -> Result<()> {
    let started = Instant::now();
    let mut seeds: Vec<u64> = match config.seed {
        Some(seed) => vec![seed],
        None => FIXED_SEEDS.to_vec(),
    };
    if config.seed.is_none() && config.short {
        let random = rand::random::<u64>() >> 16;
        println!("chaos: hostile-clients: random seed {random} (replay: {})", replay(random));
        seeds.push(random);
    }
    let mut panics_before = fleet.panics().len();
    let mut known: std::collections::BTreeMap<&'static str, usize> = Default::default();
    let mut driven = Duration::ZERO;
    let mut i = 0;
    loop {
        let seed = match seeds.get(i) {
            Some(seed) => *seed,
            None if config.seed.is_none() && !config.short && started.elapsed() < FULL_FOR => {
                let random = rand::random::<u64>() >> 16;
                seeds.push(random);
                random
            }
            None => break,
        };
        i += 1;
        let takeovers_before = lease_takeovers(fleet);
        let outcome = hostile::run_seed(fleet, seed).await;
        let takeovers = lease_takeovers(fleet) - takeovers_before;
        let mut violations = match &outcome {
            Ok(o) => o.violations.clone(),
            Err(error) => vec![format!("the seed could not run: {error:#}")],
        };
        let panics = fleet.panics();
        for panic in panics.iter().skip(panics_before) {
            violations.push(format!("a process panicked: {panic}"));
        }
        panics_before = panics.len();
        let crashed = fleet.crashed();
        if let Some(crash) = &crashed {
            violations.push(format!("a process exited: {crash}"));
        }
        if let Ok(o) = &outcome {
            driven += Duration::from_millis(gen::PLAN_MS);
            row.sent += o.stats.sent;
            row.acked += o.stats.ok;
            row.delivered += o.stats.events;
            row.duplicated += o.stats.duplicated;
            let codes: Vec<String> = o.stats.codes.iter().map(|(c, k)| format!("{c}={k}")).collect();
            let line = format!(
                "seed {seed}: {} frames, {} ok, err {{{}}}, {} events, {} violations, {:.0}s{}",
                o.stats.sent,
                o.stats.ok,
                codes.join(" "),
                o.stats.events,
                violations.len(),
                o.took.as_secs_f64(),
                if takeovers > 0 {
                    format!(", {takeovers} router-shard lease takeovers (a stalled process or machine: no fault was injected)")
                } else {
                    String::new()
                }
            );
            println!("chaos: hostile-clients: {line}");
            row.details.push(line);
            for (bug, count) in &o.stats.known_bugs {
                *known.entry(*bug).or_default() += count;
            }
        }
        if !violations.is_empty() {
            let file = fleet.dir.path().join(format!("hostile-seed-{seed}.txt"));
            let _ = std::fs::write(&file, violations.join("\n") + "\n");
            if let Some(dump) = outcome.as_ref().ok().and_then(|o| o.dump.as_ref()) {
                let _ = std::fs::write(fleet.dir.path().join(format!("hostile-seed-{seed}-frames.txt")), dump);
            }
            for v in violations.iter().take(SHOWN_PER_SEED) {
                row.fail(format!("seed {seed}: {v}"));
            }
            if violations.len() > SHOWN_PER_SEED {
                row.fail(format!(
                    "seed {seed}: ... and {} more (all in {})",
                    violations.len() - SHOWN_PER_SEED,
                    file.display()
                ));
            }
            row.fail(format!("seed {seed}: replay with `{}`", replay(seed)));
        }
        if crashed.is_some() {
            break;
        }
    }
    row.details.push(format!("seeds={}", seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(",")));
    row.details.push(format!("driven_s={}", driven.as_secs()));
    for (bug, count) in known {
        let what = gen::KNOWN_BUGS.iter().find(|(name, _)| *name == bug).map(|(_, what)| *what).unwrap_or("");
        row.details.push(format!("known product bug {bug} seen {count} times ({what})"));
    }
    Ok(())
}
