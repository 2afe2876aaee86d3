//! Child processes: spawning them so they die with xtask, stopping them (SIGTERM, then SIGKILL) from Drop guards,
//! running commands to completion while staying interruptible, and the Ctrl-C/SIGTERM/SIGHUP handler.
//! Knows nothing about which servers run or how they are configured.
//!
//! Children stay in xtask's process group, so killing that group stops them too. Where util-linux's `setpriv`
//! is present, every child also gets a parent-death signal (SIGTERM), so even a SIGKILLed xtask leaves no server
//! behind. A first signal sets a flag that every wait loop here checks, so guards stop children in order; a
//! second signal SIGKILLs every tracked child and exits at once.

use std::ffi::OsStr;
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::util::{say, tail};

static SIGNALS: AtomicUsize = AtomicUsize::new(0);
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

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

fn live_pids() -> Vec<u32> {
    LIVE.lock().map(|l| l.clone()).unwrap_or_default()
}

fn track(pid: u32) {
    if let Ok(mut l) = LIVE.lock() {
        l.push(pid);
    }
}

fn untrack(pid: u32) {
    if let Ok(mut l) = LIVE.lock() {
        l.retain(|p| *p != pid);
    }
}

fn to_pid(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

fn setpriv_has_pdeathsig() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        Command::new("setpriv")
            .arg("--help")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("--pdeathsig"))
            .unwrap_or(false)
    })
}

/// A `Command` for `program` that, where possible, receives SIGTERM when xtask dies.
/// Spawn it from the main thread: the parent-death signal follows the spawning thread.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    if setpriv_has_pdeathsig() {
        let mut cmd = Command::new("setpriv");
        cmd.arg("--pdeathsig").arg("TERM").arg("--").arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

/// The program a `command()` runs, for messages (skips the `setpriv` wrapper).
fn program_of(cmd: &Command) -> String {
    let program = cmd.get_program();
    let shown = if program == "setpriv" { cmd.get_args().nth(3).unwrap_or(program) } else { program };
    shown.to_string_lossy().into_owned()
}

/// A long-running child whose output goes to a log file; stopped when dropped.
pub struct ManagedChild {
    name: String,
    child: Child,
    log: PathBuf,
    grace: Duration,
    stop_signal: Signal,
    reaped: Option<ExitStatus>,
}

impl ManagedChild {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log` (truncated first).
    /// `grace` is how long a stop waits after SIGTERM before SIGKILL.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, grace: Duration) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().with_context(|| format!("starting {name} ({})", program_of(&cmd)))?;
        track(child.id());
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            grace,
            stop_signal: Signal::SIGTERM,
            reaped: None,
        })
    }

    /// Stop with SIGKILL instead of SIGTERM: for servers whose data is thrown away anyway.
    pub fn stop_with_sigkill(&mut self) {
        self.stop_signal = Signal::SIGKILL;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The exit status if the child has exited (reaping it), else None.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                untrack(self.child.id());
                self.reaped = Some(status);
            }
        }
        self.reaped
    }

    /// Err, with the log's last lines, if the child has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.exit_status() {
            bail!(
                "{} exited unexpectedly ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 40)
            );
        }
        Ok(())
    }

    /// Sends SIGTERM (or SIGKILL, see `stop_with_sigkill`) if the child still runs. Does not wait.
    pub fn terminate(&mut self) {
        if self.exit_status().is_none() {
            let _ = kill(to_pid(self.child.id()), self.stop_signal);
        }
    }

    /// Waits up to the grace period for the child to exit, then SIGKILLs and reaps it.
    pub fn finish(&mut self) {
        let deadline = Instant::now() + self.grace;
        while self.exit_status().is_none() {
            if Instant::now() >= deadline {
                say!("{} did not stop within {}s of SIGTERM; killing it", self.name, self.grace.as_secs());
                let _ = self.child.kill();
                if let Ok(status) = self.child.wait() {
                    self.reaped = Some(status);
                }
                untrack(self.child.id());
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        self.terminate();
        self.finish();
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops several children together: SIGTERM to all first, then waits for each.
pub fn stop_all<'a>(children: impl IntoIterator<Item = &'a mut ManagedChild>) {
    let mut children: Vec<&mut ManagedChild> = children.into_iter().collect();
    for c in children.iter_mut() {
        c.terminate();
    }
    for c in children.iter_mut() {
        c.finish();
    }
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
    track(pid);
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
                untrack(pid);
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
            untrack(pid);
            return Err(Interrupted.into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    untrack(pid);
    let kept = reader.and_then(|r| r.join().ok()).unwrap_or_default();
    Ok((status, kept))
}
