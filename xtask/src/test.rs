//! `cargo xtask test`: installs the servers and the JavaScript test tools (Node packages, Chromium), starts NATS,
//! Redis and Cassandra (as `services` does), builds the tests while Cassandra boots, runs `cargo test --workspace` against the servers and always stops them.
//! It does not choose which tests need which server: tests read the `SWITCHYARD_*` variables themselves.
//! Then it runs the chat end-to-end, router-cluster and persistor-durability tests once more against a three-node
//! NATS cluster with every stream and bucket at three replicas (`CLUSTER_TESTS`).
//! While the servers still run it builds and runs the short variants of the fault suite (see `chaos`). Afterwards
//! it runs `deploy-check` (the offline validation of helm/ and k8s/), which needs no server, `lint` (the source
//! rules the compiler cannot hold) and every fuzz target for a few seconds (see `fuzz`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::chaos;
use crate::deploy;
use crate::deps;
use crate::fuzz;
use crate::licenses;
use crate::lint;
use crate::proc;
use crate::services::TestServices;
use crate::util::{cargo, free_disk_gib, repo_root, say, secs};

/// The test targets that run a second time against the NATS cluster: the gateway's chat end-to-end tests, the
/// router-shard cluster tests and the persistor's durability tests.
const CLUSTER_TESTS: [&str; 3] = ["e2e_chat", "cluster", "durability"];

/// `cargo xtask test [-- <cargo test args>]`
pub fn run(args: &[String]) -> Result<ExitCode> {
    let extra: &[String] = match args.first().map(String::as_str) {
        Some("--") => &args[1..],
        _ => args,
    };
    // Arguments for cargo itself (before a second `--`), which the build step also gets.
    let cargo_args: Vec<String> = extra.iter().take_while(|a| *a != "--").cloned().collect();
    let selects_packages = cargo_args
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package") || a.starts_with("-p") || a == "--workspace" || a == "--all");
    let scope: Vec<String> = if selects_packages { Vec::new() } else { vec!["--workspace".to_string()] };

    let root = repo_root();
    // Each phase with its duration and the disk space left after it, so a run that fills the disk shows where.
    let mut timings: Vec<(&str, Duration, Option<f64>)> = Vec::new();
    let total = Instant::now();
    if let Some(gib) = free_disk_gib(&root) {
        say!("{gib:.1} GiB free on the disk at the start");
    }

    let t = Instant::now();
    let tools = deps::ensure(&root, true)?;
    let js = deps::ensure_js(&root)?;
    timings.push(("deps", t.elapsed(), free_disk_gib(&root)));

    let t = Instant::now();
    let mut services = TestServices::start(&tools)?;
    timings.push(("start servers", t.elapsed(), free_disk_gib(&root)));

    let t = Instant::now();
    say!("building the tests while the servers start");
    let mut build = proc::command(cargo());
    build.current_dir(&root).arg("test").args(&scope).arg("--no-run").args(&cargo_args);
    let built = proc::run(build, "cargo test --no-run")?;
    timings.push(("build tests", t.elapsed(), free_disk_gib(&root)));
    if !built.success() {
        say!("building the tests failed ({built}); not running them");
        print_timings(&timings, total.elapsed());
        return Ok(ExitCode::FAILURE);
    }

    let t = Instant::now();
    services.wait_ready(&tools)?;
    timings.push(("wait for servers", t.elapsed(), free_disk_gib(&root)));

    let t = Instant::now();
    let mut test = proc::command(cargo());
    test.current_dir(&root).arg("test").args(&scope).args(extra);
    for (k, v) in services.env() {
        say!("{k}={v}");
        test.env(k, v);
    }
    // The browser test drives the Chromium that deps found (or installed).
    test.env("SWITCHYARD_TEST_CHROMIUM", &js.chromium);
    let (status, results) = proc::run_keeping_lines(test, "cargo test", |l| l.starts_with("test result:"))?;
    timings.push(("run tests", t.elapsed(), free_disk_gib(&root)));

    // A dead server explains failures better than the failures do.
    if !status.success() {
        if let Err(e) = services.ensure_running() {
            say!("a server died during the tests: {e:#}");
        }
    }

    // The same fleet on a replicated NATS; only for a whole-workspace run.
    let t = Instant::now();
    let mut cluster_results = Vec::new();
    let cluster_status = if extra.is_empty() {
        match run_on_cluster(&root, &tools, &mut services, &js.chromium) {
            Ok((status, results)) => {
                cluster_results = results;
                Some(status.success())
            }
            Err(e) if e.downcast_ref::<proc::Interrupted>().is_some() => return Err(e),
            Err(e) => {
                say!("the tests on the NATS cluster could not run: {e:#}");
                Some(false)
            }
        }
    } else {
        None
    };
    timings.push(("tests on cluster", t.elapsed(), free_disk_gib(&root)));

    // The short fault scenarios, on the same servers; only for a whole-workspace run.
    let t = Instant::now();
    let chaos = if extra.is_empty() {
        match chaos::build(&root, false)
            .and_then(|()| chaos::run_suite(&root, &tools, &services, None, false, &["--short".into()]))
        {
            Ok(verdict) => Some(verdict),
            Err(e) if e.downcast_ref::<proc::Interrupted>().is_some() => return Err(e),
            Err(e) => {
                say!("the fault suite could not run: {e:#}");
                Some(chaos::Verdict { failed: 1, ..Default::default() })
            }
        }
    } else {
        say!("not running the fault suite: arguments select part of the tests");
        None
    };
    timings.push(("fault suite", t.elapsed(), free_disk_gib(&root)));

    let t = Instant::now();
    services.stop();
    timings.push(("stop servers", t.elapsed(), free_disk_gib(&root)));

    let t = Instant::now();
    let deployed = match deploy::check(&root) {
        Ok(summary) => summary,
        Err(e) if e.downcast_ref::<proc::Interrupted>().is_some() => return Err(e),
        Err(e) => {
            say!("deploy-check could not run: {e:#}");
            deploy::Summary { failed: 1, ..Default::default() }
        }
    };
    timings.push(("deploy check", t.elapsed(), free_disk_gib(&root)));

    let t = Instant::now();
    let mut linted = match lint::check(&root) {
        Ok(findings) => findings,
        Err(e) => vec![format!("lint could not run: {e:#}")],
    };
    match licenses::check() {
        Ok(problems) => linted.extend(problems),
        Err(e) => linted.push(format!("the license check could not run: {e:#}")),
    }
    if let Err(e) = licenses::check_publishable() {
        linted.push(format!("the Rust client cannot be packaged for crates.io: {e:#}"));
    }
    for finding in &linted {
        say!("lint: {finding}");
    }
    timings.push(("lint", t.elapsed(), free_disk_gib(&root)));

    let t = Instant::now();
    let fuzzed = match fuzz::run_targets(&root, fuzz::TARGETS, Duration::from_secs(fuzz::CI_SECS)) {
        Ok(report) => report,
        Err(e) if e.downcast_ref::<proc::Interrupted>().is_some() => return Err(e),
        Err(e) => {
            say!("fuzzing could not run: {e:#}");
            fuzz::Report { failed: vec!["fuzz build".into()], ..Default::default() }
        }
    };
    timings.push(("fuzz", t.elapsed(), free_disk_gib(&root)));

    print_timings(&timings, total.elapsed());
    let (passed, failed, ignored) = count(&results);
    if status.success() {
        say!("cargo test passed");
    } else {
        say!("cargo test failed ({status})");
    }
    let (cluster_passed, cluster_failed, _) = count(&cluster_results);
    if let Some(ok) = cluster_status {
        say!("tests on the NATS cluster {}", if ok { "passed" } else { "failed" });
    }
    let (passed, failed) =
        (passed + cluster_passed, failed + cluster_failed + u64::from(cluster_status == Some(false)));
    say!("deploy-check {}", if deployed.ok() { "passed" } else { "failed" });
    say!("fuzzing {}", if fuzzed.ok() { "passed" } else { "failed" });
    say!("lint {}", if linted.is_empty() { "passed" } else { "failed" });
    let chaos_ok = chaos.as_ref().is_none_or(chaos::Verdict::ok);
    if chaos.is_some() {
        say!("fault suite {}", if chaos_ok { "passed" } else { "failed" });
        for line in chaos.iter().flat_map(|v| &v.failures) {
            println!("{line}");
        }
    }
    let (chaos_passed, chaos_failed) = chaos.as_ref().map(|v| (v.passed, v.failed)).unwrap_or((0, 0));
    let (passed, failed, ignored) = (passed + deployed.passed, failed + deployed.failed, ignored + deployed.skipped);
    let (passed, failed) = (passed + fuzzed.passed.len() as u64, failed + fuzzed.failed.len() as u64);
    let (passed, failed) = (passed + chaos_passed, failed + chaos_failed);
    let (passed, failed) = if linted.is_empty() { (passed + 1, failed) } else { (passed, failed + 1) };
    println!("Tests: {passed} passed, {failed} failed, {ignored} skipped");
    let all_ok = status.success()
        && cluster_status != Some(false)
        && deployed.ok()
        && fuzzed.ok()
        && chaos_ok
        && linted.is_empty();
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Start the NATS cluster and run `CLUSTER_TESTS` against it; stops the cluster afterwards.
fn run_on_cluster(
    root: &std::path::Path,
    tools: &deps::Tools,
    services: &mut TestServices,
    chromium: &std::path::Path,
) -> Result<(std::process::ExitStatus, Vec<String>)> {
    services.start_cluster(tools, false)?;
    let mut test = proc::command(cargo());
    // The whole workspace with only these targets: the same features as the first run, so nothing is rebuilt.
    test.current_dir(root).args(["test", "--workspace"]);
    for target in CLUSTER_TESTS {
        test.args(["--test", target]);
    }
    for (k, v) in services.cluster_env().unwrap_or_default() {
        say!("on the cluster: {k}={v}");
        test.env(k, v);
    }
    test.env("SWITCHYARD_TEST_CHROMIUM", chromium);
    let ran = proc::run_keeping_lines(test, "cargo test on the NATS cluster", |l| l.starts_with("test result:"));
    if let Some(cluster) = &mut services.cluster {
        cluster.stop();
    }
    services.cluster = None;
    ran
}

fn print_timings(timings: &[(&str, Duration, Option<f64>)], total: Duration) {
    for (phase, d, free) in timings {
        let free = free.map(|gib| format!("{gib:.1} GiB free after")).unwrap_or_default();
        say!("{:<17} {:>8}   {free}", phase, secs(*d));
    }
    say!("{:<17} {:>8}", "total", secs(total));
}

/// Sums libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` lines.
fn count(lines: &[String]) -> (u64, u64, u64) {
    let (mut passed, mut failed, mut ignored) = (0, 0, 0);
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        for pair in words.windows(2) {
            let n: u64 = pair[0].parse().unwrap_or(0);
            match pair[1].trim_end_matches([';', ',']) {
                "passed" => passed += n,
                "failed" => failed += n,
                "ignored" => ignored += n,
                _ => {}
            }
        }
    }
    (passed, failed, ignored)
}

#[cfg(test)]
mod tests {
    use super::count;

    #[test]
    fn counts_libtest_summaries() {
        let lines = vec![
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s".to_string(),
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.2s"
                .to_string(),
        ];
        assert_eq!(count(&lines), (5, 1, 1));
    }
}
