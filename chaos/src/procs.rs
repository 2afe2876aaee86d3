//! The processes a scenario starts and hurts: a child with its log file that is resumed and killed when dropped
//! (also when the suite fails; `switchyard_testkit::process::ManagedChild`, started by [`spawn`]), and the suite's
//! own `nats-server` (its node configuration from `switchyard_testkit::nats`) and `redis-server`, which it can stop
//! and start again on the same port and data folder.
//!
//! A cluster's nodes reach each other through links a scenario can cut (a partition).
//!
//! It does not start the Switchyard services (`fleet` does) and it never touches a process it did not start,
//! except Cassandra, which it only pauses and resumes by pid (and, of a Cassandra cluster of its own, kills a node).

use crate::balancer::Balancer;
use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use switchyard_testkit::nats::{self, ClusterConfig, NodeConfig, NodePorts};

pub use switchyard_testkit::process::{free_port, ManagedChild as Proc};

/// Wait until something accepts TCP connections on `port` (the blocking wait of `switchyard_testkit`, off the
/// runtime's threads).
pub async fn wait_for_port(port: u16, limit: Duration) -> Result<()> {
    tokio::task::spawn_blocking(move || switchyard_testkit::process::wait_for_port(port, limit))
        .await
        .context("waiting for a port")?
}

/// Start `command` with its output in `log`. Where `setpriv` can, the child gets SIGKILL when this process dies,
/// so a killed suite leaves nothing behind; dropping it resumes it (in case it was paused) and kills it, so a
/// failed scenario leaves nothing behind either.
pub fn spawn(name: &str, command: Command, log: &Path) -> Result<Proc> {
    let command = switchyard_testkit::process::with_parent_death_signal(command, Signal::SIGKILL);
    let mut proc = Proc::spawn(name, command, log, Duration::from_secs(5))?;
    proc.stop_with_sigkill();
    Ok(proc)
}

/// One node of the suite's NATS: its ports, its config file (store folder and, in a cluster, routes) and process.
struct NatsNode {
    ports: NodePorts,
    config: PathBuf,
    starts: usize,
    proc: Option<Proc>,
}

/// The suite's own NATS with JetStream: one `nats-server`, or a cluster of nodes on loopback that route to each
/// other. Every node restarts on the same ports and store folder, and can be killed, paused, restarted or cut off
/// from the others alone.
///
/// In a cluster each node reaches each other node only through a link of its own (a one-backend balancer), so a
/// partition is cutting links. Nodes advertise a route address that resets every connection: the routes a node
/// learns by gossip could otherwise bypass the links.
pub struct OwnNats {
    binary: PathBuf,
    log_dir: PathBuf,
    nodes: Vec<NatsNode>,
    /// `(from, to, link)`: the route from node `from` to node `to` goes through `link`.
    links: Vec<(usize, usize, Balancer)>,
    /// The address every node advertises to the others; it resets every connection.
    _nowhere: Option<Balancer>,
}

/// How long a node may take to accept connections after it starts.
const NATS_START: Duration = Duration::from_secs(20);

impl OwnNats {
    /// Start `nodes` nodes (1: a single server; more: a cluster named `chaos`) with their stores under `dir`.
    pub async fn start(binary: &Path, dir: &Path, nodes: usize) -> Result<OwnNats> {
        let ports = NodePorts::free(nodes)?;
        let mut links = Vec::new();
        let nowhere = if nodes > 1 { Some(Balancer::start(Vec::new()).await?) } else { None };
        for from in 0..nodes {
            for (to, node) in ports.iter().enumerate().filter(|(to, _)| *to != from) {
                links.push((from, to, Balancer::start(vec![node.route]).await?));
            }
        }
        let mut own =
            OwnNats { binary: binary.to_owned(), log_dir: dir.to_owned(), nodes: Vec::new(), links, _nowhere: None };
        for (i, node_ports) in ports.into_iter().enumerate() {
            let mut config = NodeConfig::new(i, node_ports, dir.join(format!("nats-store-{i}")));
            if let Some(nowhere) = &nowhere {
                let routes = own.links.iter().filter(|(from, _, _)| *from == i).map(|(_, _, link)| link.port).collect();
                config.cluster = Some(ClusterConfig { name: "chaos".into(), routes, advertise: Some(nowhere.port) });
            }
            let path = dir.join(format!("nats-{i}.conf"));
            std::fs::write(&path, config.render()).with_context(|| format!("writing {}", path.display()))?;
            own.nodes.push(NatsNode { ports: node_ports, config: path, starts: 0, proc: None });
        }
        own._nowhere = nowhere;
        own.restart().await?;
        Ok(own)
    }

    /// Cut `node` off from every other node (its links both ways reset and refuse connections), or join it again.
    /// Its clients stay connected to it.
    pub fn set_cut_off(&self, node: usize, cut: bool) {
        for (_, _, link) in self.links.iter().filter(|(from, to, _)| *from == node || *to == node) {
            link.set_blocked(cut);
        }
    }

    /// Every node's URL, comma-separated, as the services take it.
    pub fn url(&self) -> String {
        nats::cluster_url(self.nodes.iter().map(|node| &node.ports))
    }

    /// Replicas of the streams and buckets the fleet creates on it.
    pub fn replicas(&self) -> usize {
        nats::replicas(self.nodes.len())
    }

    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Start every node that is not running (again), and wait until each accepts connections.
    pub async fn restart(&mut self) -> Result<()> {
        for node in 0..self.nodes.len() {
            if self.nodes[node].proc.is_none() {
                self.restart_node(node).await?;
            }
        }
        Ok(())
    }

    /// Start one node again with its ports and store, and wait until it accepts connections.
    pub async fn restart_node(&mut self, node: usize) -> Result<()> {
        let n = &mut self.nodes[node];
        n.starts += 1;
        let mut command = Command::new(&self.binary);
        command.arg("-c").arg(&n.config);
        let log = self.log_dir.join(format!("nats-{node}-{}.log", n.starts));
        n.proc = Some(spawn("nats-server", command, &log)?);
        wait_for_port(n.ports.client, NATS_START).await
    }

    /// Stop every node the hard way (SIGKILL): JetStream must recover from its store on the next start.
    pub fn kill(&mut self) {
        for node in 0..self.nodes.len() {
            self.kill_node(node);
        }
    }

    pub fn kill_node(&mut self, node: usize) {
        if let Some(mut proc) = self.nodes[node].proc.take() {
            proc.kill();
        }
    }

    /// SIGTERM one node (a graceful shutdown: it hands its leaderships over), SIGKILL after `grace`.
    pub fn terminate_node(&mut self, node: usize, grace: Duration) {
        if let Some(mut proc) = self.nodes[node].proc.take() {
            proc.stop_gracefully(grace);
        }
    }

    pub fn node_pid(&self, node: usize) -> Option<Pid> {
        let pid = self.nodes[node].proc.as_ref().and_then(Proc::live_pid)?;
        Some(Pid::from_raw(i32::try_from(pid).ok()?))
    }

    /// The node that leads `stream` (a stream, or `KV_<bucket>`), asked of every running node in turn.
    pub async fn leader_of(&self, http: &reqwest::Client, stream: &str) -> Result<usize> {
        for node in 0..self.nodes.len() {
            if let Ok(Some(leader)) = self.leader_seen_by(http, stream, node).await {
                return Ok(leader);
            }
        }
        bail!("no running NATS node names a leader of {stream}")
    }

    /// The leader of `stream` that `node` names in its monitoring (`None` when it names none).
    pub async fn leader_seen_by(&self, http: &reqwest::Client, stream: &str, node: usize) -> Result<Option<usize>> {
        let n = &self.nodes[node];
        if n.proc.is_none() {
            bail!("NATS node {node} is not running");
        }
        let url = format!("http://127.0.0.1:{}/jsz?streams=true", n.ports.monitor);
        let jsz: serde_json::Value = http.get(&url).timeout(Duration::from_secs(2)).send().await?.json().await?;
        let streams = jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
        for detail in streams.filter(|d| d["name"] == stream) {
            let leader = detail["cluster"]["leader"].as_str().unwrap_or("");
            if let Some(index) = nats::node_index(leader) {
                if index < self.nodes.len() {
                    return Ok(Some(index));
                }
            }
        }
        Ok(None)
    }

    /// Wait until one node's `/healthz` answers 200 (JetStream is current on it).
    pub async fn wait_healthy(&self, http: &reqwest::Client, node: usize, limit: Duration) -> Result<()> {
        let url = format!("http://127.0.0.1:{}/healthz", self.nodes[node].ports.monitor);
        let deadline = Instant::now() + limit;
        loop {
            let answer = http.get(&url).timeout(Duration::from_secs(2)).send().await;
            if answer.is_ok_and(|a| a.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("NATS node {node} is not healthy after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
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
        self.proc = Some(spawn("redis-server", command, &log)?);
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
    /// SIGKILL a process the suite did not start (a node of its own Cassandra cluster), by pid.
    pub fn kill(pid: i32) -> Result<()> {
        kill(Pid::from_raw(pid), Signal::SIGKILL).with_context(|| format!("killing pid {pid}"))
    }

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
