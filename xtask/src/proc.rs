//! Running child processes from xtask: the Ctrl-C/SIGTERM/SIGHUP handler, waits that a signal cuts short, the
//! parent-death signal every child gets, and running commands to completion while staying interruptible. The
//! long-running children themselves are `switchyard_testkit::process::ManagedChild` (re-exported here: stopped,
//! SIGTERM then SIGKILL, from Drop guards). Knows nothing about which servers run or how they are configured.
//!
//! Children stay in xtask's process group, so killing that group stops them too. Where util-linux's `setpriv`
//! is present, every child also gets a parent-death signal (SIGTERM), so even a SIGKILLed xtask leaves no server
//! behind. A first signal sets a flag that every wait loop here checks, so guards stop children in order; a
//! second signal SIGKILLs every tracked child and exits at once.

use std::ffi::OsStr;
use std::fmt;
use std::io::{BufRead, BufReader};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use switchyard_testkit::process::{forget_pid, live_pids, program_of, track_pid};

pub use switchyard_testkit::process::{stop_all, ManagedChild};

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

/// The error returned when a wait was cut short by Ctrl-C or SIGTERM.
#[derive(Debug)]
pub struct Interrupted;

impl fmt::Display for Interrupted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

pub fn install_signal_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if SIGNALS.fetch_add(1, Ordering::SeqCst) == 0 {
            eprintln!("\n[xtask] stopping (signal again to kill everything at once)");
        } else {
            eprintln!("\n[xtask] second signal: killing every child now");
            for pid in live_pids() {
                let _ = kill(to_pid(pid), Signal::SIGKILL);
            }
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C/SIGTERM handler")
}

pub fn interrupted() -> bool {
    SIGNALS.load(Ordering::SeqCst) > 0
}

pub fn check_interrupted() -> Result<()> {
    if interrupted() {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// Sleeps for `d`, waking early (with `Interrupted`) on a signal.
pub fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(100)));
    }
}

/// A `Command` for `program` that, where possible, receives SIGTERM when xtask dies.
/// Spawn it from the main thread: the parent-death signal follows the spawning thread.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    switchyard_testkit::process::command(program, Signal::SIGTERM)
}

fn to_pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Runs `cmd` (stdio as configured by the caller, stdin closed) to completion. A signal stops the child and
/// returns `Interrupted`.
pub fn run(cmd: Command, what: &str) -> Result<ExitStatus> {
    run_inner(cmd, what, None).map(|(status, _)| status)
}

/// Runs `cmd` and fails unless it exits with status 0.
pub fn run_ok(cmd: Command, what: &str) -> Result<()> {
    let status = run(cmd, what)?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Like `run`, but passes the child's stdout through line by line and also returns the lines for which `keep`
/// is true.
pub fn run_keeping_lines(cmd: Command, what: &str, keep: fn(&str) -> bool) -> Result<(ExitStatus, Vec<String>)> {
    run_inner(cmd, what, Some(keep))
}

fn run_inner(mut cmd: Command, what: &str, keep: Option<fn(&str) -> bool>) -> Result<(ExitStatus, Vec<String>)> {
    check_interrupted()?;
    cmd.stdin(Stdio::null());
    if keep.is_some() {
        cmd.stdout(Stdio::piped());
    }
    let mut child = cmd.spawn().with_context(|| format!("{what}: cannot start {}", program_of(&cmd)))?;
    let pid = child.id();
    track_pid(pid);
    let reader = match (keep, child.stdout.take()) {
        (Some(keep), Some(stdout)) => Some(std::thread::spawn(move || {
            let mut kept = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                println!("{line}");
                if keep(&line) {
                    kept.push(line);
                }
            }
            kept
        })),
        _ => None,
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                forget_pid(pid);
                return Err(e).with_context(|| format!("{what}: waiting for the child"));
            }
        }
        if interrupted() {
            let _ = kill(to_pid(pid), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            forget_pid(pid);
            return Err(Interrupted.into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    forget_pid(pid);
    let kept = reader.and_then(|r| r.join().ok()).unwrap_or_default();
    Ok((status, kept))
}
