//! Child processes for tests and scripts: free ports, waiting until a port accepts connections, the parent-death
//! signal, and [`ManagedChild`], a child with its log file that is stopped (SIGTERM then SIGKILL, or SIGKILL at
//! once) when dropped, so a failing test or script leaves no process behind.
//!
//! Every child spawned here is registered in a process-wide list ([`live_pids`]) until it is reaped, so a signal
//! handler can kill them all. It knows nothing about which servers run or how they are configured, installs no
//! signal handler and runs nothing to completion (callers do: `xtask`'s `proc.rs`).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// `n` distinct TCP ports on 127.0.0.1 that were free a moment ago. All listeners are held until every port is
/// chosen, so the ports differ from each other (another process may still take one before it is used, rarely).
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port"))
        .collect::<Result<Vec<_>>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// One free TCP port on 127.0.0.1 (see [`free_ports`]).
pub fn free_port() -> Result<u16> {
    Ok(free_ports(1)?[0])
}

/// Wait (blocking the thread) until something accepts TCP connections on 127.0.0.1:`port`.
pub fn wait_for_port(port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pids of every child spawned here and not reaped yet.
pub fn live_pids() -> Vec<u32> {
    LIVE.lock().map(|l| l.clone()).unwrap_or_default()
}

/// Add a child spawned elsewhere to [`live_pids`] (remove it with [`forget_pid`] once reaped).
pub fn track_pid(pid: u32) {
    if let Ok(mut l) = LIVE.lock() {
        l.push(pid);
    }
}

/// Remove a reaped child from [`live_pids`].
pub fn forget_pid(pid: u32) {
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

/// `command` run as `setpriv --pdeathsig <signal> -- <command>` where util-linux's `setpriv` supports it (it execs,
/// so the pid is the program's), so the child gets `signal` when this process dies; unchanged otherwise. Keeps the
/// command's arguments, environment and working folder, not its stdio (set those afterwards). Spawn it from a
/// thread that lives as long as the child should: the parent-death signal follows the spawning thread.
pub fn with_parent_death_signal(command: Command, signal: Signal) -> Command {
    if !setpriv_has_pdeathsig() {
        return command;
    }
    let name = signal.as_str().trim_start_matches("SIG");
    let mut wrapped = Command::new("setpriv");
    wrapped.args(["--pdeathsig", name, "--"]).arg(command.get_program()).args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

/// The program a command runs, for messages (skips a `setpriv` wrapper).
pub fn program_of(cmd: &Command) -> String {
    let program = cmd.get_program();
    let shown = if program == "setpriv" { cmd.get_args().nth(3).unwrap_or(program) } else { program };
    shown.to_string_lossy().into_owned()
}

/// The last `lines` lines of a log file (reads at most its last 64 KiB), indented for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            if all.is_empty() {
                "    (the log is empty)".to_string()
            } else {
                all[start..].iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
            }
        }
        Err(e) => format!("    (cannot read {}: {e})", path.display()),
    }
}

/// A long-running child whose output goes to a log file; stopped when dropped (also when the caller fails or
/// panics). A stop sends the stop signal (SIGTERM, or SIGKILL after [`ManagedChild::stop_with_sigkill`]) and a
/// SIGCONT (in case it was paused), waits up to the grace period, then SIGKILLs and reaps it.
pub struct ManagedChild {
    name: String,
    child: Child,
    log: PathBuf,
    grace: Duration,
    stop_signal: Signal,
    reaped: Option<ExitStatus>,
    /// A stop or kill was asked for: an exit from now on is not the child's own doing.
    stopping: bool,
}

impl ManagedChild {
    /// Spawns `cmd` with stdin closed and stdout+stderr written to `log` (truncated first). `grace` is how long a
    /// stop waits after SIGTERM before SIGKILL.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, grace: Duration) -> Result<Self> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().with_context(|| format!("starting {name} ({})", program_of(&cmd)))?;
        track_pid(child.id());
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            grace,
            stop_signal: Signal::SIGTERM,
            reaped: None,
            stopping: false,
        })
    }

    /// Stop with SIGKILL instead of SIGTERM: for servers whose data is thrown away anyway.
    pub fn stop_with_sigkill(&mut self) {
        self.stop_signal = Signal::SIGKILL;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pid (also after it exited).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its pid while it may still run: `None` once it was reaped or asked to stop.
    pub fn live_pid(&self) -> Option<u32> {
        (self.reaped.is_none() && !self.stopping).then(|| self.child.id())
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of its log, indented.
    pub fn tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// The exit status if the child has exited (reaping it), else None.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.reaped.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                forget_pid(self.child.id());
                self.reaped = Some(status);
            }
        }
        self.reaped
    }

    /// The exit status if the child exited by itself, not because it was stopped or killed from here.
    pub fn exited_by_itself(&mut self) -> Option<ExitStatus> {
        if self.stopping {
            return None;
        }
        self.exit_status()
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

    /// Send `signal` (a pause, a resume, a stop) if the child may still run; Err if it exited or was stopped.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.stopping || self.exit_status().is_some() {
            bail!("{} is not running", self.name);
        }
        kill(to_pid(self.child.id()), signal).with_context(|| format!("sending {signal} to {}", self.name))
    }

    /// Sends the stop signal (and SIGCONT, in case it is paused) if the child still runs. Does not wait.
    pub fn terminate(&mut self) {
        self.send_stop(self.stop_signal);
    }

    fn send_stop(&mut self, signal: Signal) {
        self.stopping = true;
        if self.exit_status().is_none() {
            let pid = to_pid(self.child.id());
            let _ = kill(pid, signal);
            let _ = kill(pid, Signal::SIGCONT);
        }
    }

    /// Waits up to the grace period for the child to exit, then SIGKILLs and reaps it.
    pub fn finish(&mut self) {
        self.finish_within(self.grace);
    }

    fn finish_within(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while self.exit_status().is_none() {
            if Instant::now() >= deadline {
                if self.stop_signal != Signal::SIGKILL {
                    eprintln!("{} did not stop within {}s; killing it", self.name, grace.as_secs_f64());
                }
                self.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop it (see the type) and wait until it is gone.
    pub fn stop(&mut self) {
        self.terminate();
        self.finish();
    }

    /// SIGTERM (whatever the stop signal), SIGKILL if it still runs after `grace`; waits until it is gone.
    pub fn stop_gracefully(&mut self, grace: Duration) {
        self.send_stop(Signal::SIGTERM);
        self.finish_within(grace);
    }

    /// SIGKILL (after a SIGCONT, in case it is paused), and wait until it is gone.
    pub fn kill(&mut self) {
        self.stopping = true;
        if self.reaped.is_none() {
            let _ = kill(to_pid(self.child.id()), Signal::SIGCONT);
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.reaped = Some(status);
            }
            forget_pid(self.child.id());
        }
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops several children together: the stop signal to all first, then waits for each.
pub fn stop_all<'a>(children: impl IntoIterator<Item = &'a mut ManagedChild>) {
    let mut children: Vec<&mut ManagedChild> = children.into_iter().collect();
    for c in children.iter_mut() {
        c.terminate();
    }
    for c in children.iter_mut() {
        c.finish();
    }
}

/// A `Command` for `program` that, where possible, receives `signal` when this process dies (see
/// [`with_parent_death_signal`]).
pub fn command(program: impl AsRef<OsStr>, signal: Signal) -> Command {
    with_parent_death_signal(Command::new(program), signal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_differ() {
        let ports = free_ports(8).unwrap();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 8, "{ports:?}");
    }

    #[test]
    fn waiting_for_a_port_sees_a_listener_and_times_out_without_one() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        wait_for_port(port, Duration::from_secs(2)).unwrap();
        drop(listener);
        assert!(wait_for_port(port, Duration::from_millis(100)).is_err());
    }

    #[test]
    fn the_wrapper_keeps_program_arguments_and_environment() {
        let mut plain = Command::new("sleep");
        plain.arg("5").env("A", "1").env_remove("B").current_dir("/");
        let wrapped = with_parent_death_signal(plain, Signal::SIGKILL);
        assert_eq!(program_of(&wrapped), "sleep");
        assert_eq!(wrapped.get_args().last().unwrap(), "5");
        assert_eq!(wrapped.get_current_dir(), Some(Path::new("/")));
        let envs: Vec<_> = wrapped.get_envs().collect();
        assert!(envs.contains(&(OsStr::new("A"), Some(OsStr::new("1")))));
        assert!(envs.contains(&(OsStr::new("B"), None)));
        if wrapped.get_program() == "setpriv" {
            let args: Vec<_> = wrapped.get_args().take(3).collect();
            assert_eq!(args, ["--pdeathsig", "KILL", "--"]);
        }
    }

    #[test]
    fn a_dropped_child_is_stopped_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let mut child =
            ManagedChild::spawn("sleep", sleeper, &dir.path().join("sleep.log"), Duration::from_secs(5)).unwrap();
        let pid = child.pid();
        assert!(live_pids().contains(&pid));
        assert!(child.ensure_running().is_ok());
        child.signal(Signal::SIGSTOP).unwrap();
        drop(child);
        assert!(!live_pids().contains(&pid));
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} is still there");
    }

    #[test]
    fn a_stopped_child_did_not_exit_by_itself() {
        let dir = tempfile::tempdir().unwrap();
        let mut exits = Command::new("sh");
        exits.args(["-c", "echo bye; exit 3"]);
        let mut own = ManagedChild::spawn("sh", exits, &dir.path().join("own.log"), Duration::from_secs(5)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while own.exited_by_itself().is_none() {
            assert!(Instant::now() < deadline, "sh did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(own.exited_by_itself().and_then(|s| s.code()), Some(3));
        assert!(own.ensure_running().unwrap_err().to_string().contains("bye"));
        assert!(own.signal(Signal::SIGTERM).is_err());

        let mut sleeper = Command::new("sleep");
        sleeper.arg("30");
        let mut killed =
            ManagedChild::spawn("sleep", sleeper, &dir.path().join("sleep.log"), Duration::from_secs(5)).unwrap();
        killed.stop_gracefully(Duration::from_secs(5));
        assert!(killed.exit_status().is_some());
        assert_eq!(killed.exited_by_itself(), None);
        assert_eq!(killed.live_pid(), None);
    }
}
