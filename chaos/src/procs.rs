//! The processes a scenario starts and hurts: a child with its log file that is resumed and killed when dropped
//! (also when the suite fails), and the suite's own `nats-server` and `redis-server`, which it can stop and start
//! again on the same port and data folder.
//!
//! It does not start the Switchyard services (`fleet` does) and it never touches a process it did not start,
//! except Cassandra, which it only pauses and resumes by pid.

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; a race with another process is possible but rare).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Wait until something accepts TCP connections on `port`.
pub async fn wait_for_port(port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process with its output in `log`. Dropping it resumes it (in case it was paused) and kills it.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Start `command`; where `setpriv` can, the child gets SIGKILL when this process dies, so a killed suite
    /// leaves nothing behind.
    pub fn spawn(name: &str, command: Command, log: &Path) -> Result<Proc> {
        let mut command = with_parent_death_signal(command);
        let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", command.get_program()))?;
        Ok(Proc { name: name.to_owned(), log: log.to_owned(), child: Some(child) })
    }

    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.pid().with_context(|| format!("{} is not running", self.name))?;
        kill(pid, signal).with_context(|| format!("sending {signal} to {}", self.name))
    }

    /// SIGKILL, and wait until the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it is still running after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `Some(status)` once the process has exited by itself.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last `lines` lines of its log.
    pub fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `setpriv --pdeathsig KILL -- <command>` when `setpriv` supports it (it execs, so the pid is the program's);
/// the command unchanged otherwise.
fn with_parent_death_signal(command: Command) -> Command {
    static HAS_SETPRIV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let has = *HAS_SETPRIV.get_or_init(|| {
        Command::new("setpriv")
            .arg("--help")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("--pdeathsig"))
            .unwrap_or(false)
    });
    if !has {
        return command;
    }
    let mut wrapped = Command::new("setpriv");
    wrapped.args(["--pdeathsig", "KILL", "--"]).arg(command.get_program()).args(command.get_args());
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

/// The suite's own `nats-server` with JetStream, restartable on the same port and store folder.
pub struct OwnNats {
    binary: PathBuf,
    pub port: u16,
    store: PathBuf,
    log_dir: PathBuf,
    starts: usize,
    proc: Option<Proc>,
}

impl OwnNats {
    pub async fn start(binary: &Path, dir: &Path) -> Result<OwnNats> {
        let mut nats = OwnNats {
            binary: binary.to_owned(),
            port: free_port()?,
            store: dir.join("nats-store"),
            log_dir: dir.to_owned(),
            starts: 0,
            proc: None,
        };
        nats.restart().await?;
        Ok(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Start it (again) with the same port and JetStream store, and wait until it accepts connections.
    pub async fn restart(&mut self) -> Result<()> {
        self.starts += 1;
        let mut command = Command::new(&self.binary);
        command.arg("-js").arg("-sd").arg(&self.store).args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        let log = self.log_dir.join(format!("nats-{}.log", self.starts));
        self.proc = Some(Proc::spawn("nats-server", command, &log)?);
        wait_for_port(self.port, Duration::from_secs(20)).await
    }

    /// Stop it the hard way (SIGKILL): JetStream must recover from its store on the next start.
    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }
}

/// The suite's own `redis-server`, restartable on the same port (no persistence: a restart loses every key, as a
/// replaced cache node would).
pub struct OwnRedis {
    binary: PathBuf,
    pub port: u16,
    log_dir: PathBuf,
    starts: usize,
    proc: Option<Proc>,
}

impl OwnRedis {
    pub async fn start(binary: &Path, dir: &Path) -> Result<OwnRedis> {
        let mut redis =
            OwnRedis { binary: binary.to_owned(), port: free_port()?, log_dir: dir.to_owned(), starts: 0, proc: None };
        redis.restart().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn restart(&mut self) -> Result<()> {
        self.starts += 1;
        let mut command = Command::new(&self.binary);
        command.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"]).args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]);
        let log = self.log_dir.join(format!("redis-{}.log", self.starts));
        self.proc = Some(Proc::spawn("redis-server", command, &log)?);
        wait_for_port(self.port, Duration::from_secs(10)).await
    }

    pub fn kill(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill();
        }
    }
}

/// A process the suite did not start but may pause: the test Cassandra, by pid. Dropping it resumes it.
pub struct Paused(pub Pid);

impl Paused {
    pub fn pause(pid: i32) -> Result<Paused> {
        let pid = Pid::from_raw(pid);
        kill(pid, Signal::SIGSTOP).with_context(|| format!("pausing pid {pid}"))?;
        Ok(Paused(pid))
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = kill(self.0, Signal::SIGCONT);
    }
}

/// Raise this process's open-file limit to its hard limit: the big scenarios hold thousands of sockets, twice over
/// through the balancer.
pub fn raise_fd_limit() -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(hard)
}
