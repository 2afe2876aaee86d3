//! `cargo xtask fuzz [--secs N] [TARGET...]`: runs the `fuzz/` crate's libFuzzer targets (all of them, or the ones
//! named) for N seconds each, after installing cargo-fuzz into `.deps/cargo-fuzz` when it is missing. Needs the
//! nightly toolchain and says so plainly when it is not installed; it never skips silently.
//!
//! Each target starts from the committed seeds in `fuzz/corpus/<target>/` and the inputs earlier local runs found
//! (`fuzz/corpus-local/<target>/`, git-ignored), writes what it finds to the latter, and uses the dictionary
//! `fuzz/dict/<target>.dict` when there is one. libFuzzer's output goes to `fuzz/artifacts/<target>.log`. A crash leaves its input
//! in `fuzz/artifacts/<target>/` and fails the command. It does not minimise crashes or turn them into tests: see
//! docs/fuzzing.md for that.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::proc;
use crate::util::{cargo, is_executable, say, secs, tail, which};

/// The cargo-fuzz release installed when none is present.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The toolchain cargo-fuzz needs (libFuzzer's instrumentation uses unstable compiler flags).
const TOOLCHAIN: &str = "nightly";
/// Seconds per target when `--secs` is not given.
pub const DEFAULT_SECS: u64 = 60;
/// Seconds per target in `cargo xtask test`: enough to replay the seeds and catch a shallow regression (from about
/// 100 000 to a million runs per target on a 2-core machine); the build takes longer than all the runs together.
pub const CI_SECS: u64 = 5;

/// Every target in `fuzz/fuzz_targets/`, in the order they run.
pub const TARGETS: &[&str] = &[
    "client_frame_json",
    "client_frame_msgpack",
    "ids",
    "internal_messages",
    "tokens",
    "jwt_claims",
    "jwt_key",
    "http_bodies",
];

/// `cargo xtask fuzz [--secs N] [TARGET...]`
pub fn run(args: &[String]) -> Result<ExitCode> {
    let mut seconds = DEFAULT_SECS;
    let mut targets: Vec<&str> = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--secs" => {
                let value = args.next().context("--secs needs a number of seconds")?;
                seconds = value.parse().with_context(|| format!("--secs: {value:?} is not a number of seconds"))?;
            }
            name if TARGETS.contains(&name) => targets.push(TARGETS.iter().find(|t| **t == name).unwrap()),
            other => bail!("fuzz: unknown argument {other:?}; targets are: {}", TARGETS.join(", ")),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    if seconds == 0 {
        bail!("--secs must be at least 1");
    }
    let root = crate::util::repo_root();
    let report = run_targets(&root, &targets, Duration::from_secs(seconds))?;
    Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// What a fuzzing session found.
#[derive(Debug, Default)]
pub struct Report {
    /// Targets that ran their whole time without a finding.
    pub passed: Vec<String>,
    /// Targets that crashed, timed out or ran out of memory (their input is in `fuzz/artifacts/<target>/`).
    pub failed: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failed.is_empty() && !self.passed.is_empty()
    }
}

/// Builds every target, then runs `targets` for `each` apiece. Errors only when fuzzing cannot run at all (no
/// nightly, no cargo-fuzz, the build failed); a crashing target is a failure in the report.
pub fn run_targets(root: &Path, targets: &[&str], each: Duration) -> Result<Report> {
    require_nightly()?;
    let cargo_fuzz = ensure_cargo_fuzz(root)?;
    let started = Instant::now();
    say!("building the fuzz targets with the {TOOLCHAIN} toolchain");
    let mut build = fuzz_command(root, &cargo_fuzz);
    build.arg("build").args(BUILD_FLAGS);
    let built = proc::run(build, "cargo fuzz build")?;
    if !built.success() {
        bail!("building the fuzz targets failed ({built})");
    }
    say!("fuzz targets built in {}", secs(started.elapsed()));

    let mut report = Report::default();
    let artifacts = root.join("fuzz/artifacts");
    std::fs::create_dir_all(&artifacts).with_context(|| format!("creating {}", artifacts.display()))?;
    for target in targets {
        let local = root.join("fuzz/corpus-local").join(target);
        let seeds = root.join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&local).with_context(|| format!("creating {}", local.display()))?;
        if !seeds.is_dir() {
            bail!("{} is missing: every target needs its committed seeds", seeds.display());
        }
        say!("fuzzing {target} for {}s", each.as_secs());
        let mut fuzz = fuzz_command(root, &cargo_fuzz);
        // New inputs go to the first corpus folder; the committed seeds are only read.
        fuzz.arg("run")
            .args(BUILD_FLAGS)
            .arg(target)
            .arg(&local)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", each.as_secs()))
            // An input that takes seconds is a finding too (the defaults would wait 20 minutes).
            .arg("-timeout=10")
            .arg("-print_final_stats=1");
        let dict = root.join("fuzz/dict").join(format!("{target}.dict"));
        if dict.is_file() {
            fuzz.arg(format!("-dict={}", dict.display()));
        }
        // libFuzzer reports every new input; keep that in a log and show only the outcome.
        let log = artifacts.join(format!("{target}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        fuzz.stdout(out.try_clone()?).stderr(out);
        let status = proc::run(fuzz, &format!("cargo fuzz run {target}"))?;
        if status.success() {
            say!("{target}: {}", summary(&log));
            report.passed.push(target.to_string());
        } else {
            say!("{target} FAILED ({status}); the end of {}:\n{}", log.display(), tail(&log, 40));
            say!("the input is in {}; see docs/fuzzing.md", artifacts.join(target).display());
            report.failed.push(target.to_string());
        }
    }
    say!(
        "fuzzing done in {}: {} passed, {} failed{}",
        secs(started.elapsed()),
        report.passed.len(),
        report.failed.len(),
        if report.failed.is_empty() { String::new() } else { format!(" ({})", report.failed.join(", ")) }
    );
    Ok(report)
}

/// One line from libFuzzer's final statistics in `log`: runs, speed, inputs found, coverage.
fn summary(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let stat = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string())).unwrap_or_else(|| "?".to_string())
    };
    let coverage = text
        .lines()
        .rev()
        .find_map(|l| l.split_once(" cov: ").and_then(|(_, rest)| rest.split_whitespace().next()))
        .unwrap_or("?");
    format!(
        "{} runs ({}/s), {} new inputs, {coverage} edges covered, no crash",
        stat("stat::number_of_executed_units:"),
        stat("stat::average_exec_per_sec:"),
        stat("stat::new_units_added:")
    )
}

/// Flags shared by build and run, so a run reuses the build. No sanitizer: Switchyard's own code forbids `unsafe`,
/// and without AddressSanitizer's instrumentation the targets build about twice as fast and run several times
/// faster; pass `--sanitizer address` to cargo-fuzz directly for a run over the dependencies' unsafe code.
const BUILD_FLAGS: &[&str] = &["--sanitizer", "none"];

/// `cargo fuzz` under the nightly toolchain, from the repository root, with the installed cargo-fuzz on PATH.
fn fuzz_command(root: &Path, cargo_fuzz: &Path) -> Command {
    let mut cmd = proc::command("rustup");
    cmd.current_dir(root).args(["run", TOOLCHAIN, "cargo", "fuzz"]);
    // xtask runs under the stable cargo, which exported itself; the nested build must use nightly's.
    cmd.env_remove("CARGO").env_remove("RUSTUP_TOOLCHAIN").env_remove("RUSTC").env_remove("RUSTDOC");
    // `cargo run` also exported xtask's own package variables. Some build scripts (ring's) rerun when those change,
    // so leaving them would make every build depend on how xtask was started, and a plain `cargo fuzz` rebuild.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let from_cargo_run =
            ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_", "CARGO_CRATE_"].iter().any(|p| name.starts_with(p))
                || name == "CARGO_PRIMARY_PACKAGE"
                || name == "CARGO_RUSTC_CURRENT_DIR";
        if from_cargo_run {
            cmd.env_remove(name.as_ref());
        }
    }
    let bin = cargo_fuzz.parent().map(Path::to_path_buf).unwrap_or_default();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let joined =
        std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path))).unwrap_or_else(|_| path.clone());
    cmd.env("PATH", joined);
    cmd
}

/// Fails with what to do when rustup or the nightly toolchain is missing.
fn require_nightly() -> Result<()> {
    if which("rustup").is_none() {
        bail!(
            "fuzzing needs rustup and the {TOOLCHAIN} toolchain (libFuzzer builds use unstable compiler flags), and \
             rustup is not on PATH: install it from https://rustup.rs, then `rustup toolchain install {TOOLCHAIN}`"
        );
    }
    let output = Command::new("rustup")
        .args(["run", TOOLCHAIN, "rustc", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdin(Stdio::null())
        .output()
        .context("running rustup")?;
    if !output.status.success() {
        bail!(
            "fuzzing needs the {TOOLCHAIN} toolchain (libFuzzer builds use unstable compiler flags), which is not \
             installed: run `rustup toolchain install {TOOLCHAIN}` (rustup said: {})",
            String::from_utf8_lossy(&output.stderr).lines().next().unwrap_or("").trim()
        );
    }
    say!("using {}", String::from_utf8_lossy(&output.stdout).trim());
    Ok(())
}

/// cargo-fuzz from `.deps/cargo-fuzz/bin`, installed there from crates.io (with its locked dependencies) if missing.
fn ensure_cargo_fuzz(root: &Path) -> Result<PathBuf> {
    let install_root = root.join(".deps/cargo-fuzz");
    let bin = install_root.join("bin/cargo-fuzz");
    if is_executable(&bin) {
        return Ok(bin);
    }
    say!("installing cargo-fuzz {CARGO_FUZZ_VERSION} into {} (first run only)", install_root.display());
    let started = Instant::now();
    let mut install = proc::command(cargo());
    install.args(["install", "cargo-fuzz", "--locked", "--version", CARGO_FUZZ_VERSION, "--root"]).arg(&install_root);
    proc::run_ok(install, "cargo install cargo-fuzz")?;
    if !is_executable(&bin) {
        bail!("cargo install finished but {} is missing", bin.display());
    }
    say!("cargo-fuzz installed in {}", secs(started.elapsed()));
    Ok(bin)
}
