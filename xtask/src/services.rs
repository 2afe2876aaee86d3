//! Starting and stopping the external servers (nats-server, redis-server, Cassandra) as child processes on free
//! ports (the processes and a cluster node's NATS configuration come from `switchyard_testkit`), readiness checks
//! for each, and `cargo xtask services`, which keeps a throw-away set running in the
//! foreground for tests run by hand. Installs nothing (see deps.rs) and runs no tests (see test.rs).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::cql;
use crate::deps::{self, CassandraDist, Tools};
use crate::proc::{self, ManagedChild};
use crate::util::{free_ports, repo_root, say, secs, tail};
use switchyard_testkit::nats::{self, ClusterConfig, NodeConfig, NodePorts};
use switchyard_testkit::tls::TestPki;

/// How long Cassandra may take to serve CQL (it shares two cores with a cargo build in `test`).
pub const CASSANDRA_READY_TIMEOUT: Duration = Duration::from_secs(300);
const QUICK_READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Nats {
    pub child: ManagedChild,
    pub port: u16,
    pub monitor_port: u16,
}

impl Nats {
    /// Starts `nats-server` with JetStream storing in `store_dir`; does not wait for it.
    pub fn start(tools: &Tools, store_dir: &Path, log: &Path) -> Result<Self> {
        std::fs::create_dir_all(store_dir)?;
        let ports = free_ports(2)?;
        let (port, monitor_port) = (ports[0], ports[1]);
        let mut cmd = proc::command(&tools.nats_server);
        cmd.arg("-js").arg("-sd").arg(store_dir).args([
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            &monitor_port.to_string(),
        ]);
        let child = ManagedChild::spawn("nats-server", cmd, log, Duration::from_secs(10))?;
        Ok(Self { child, port, monitor_port })
    }

    /// Ready when the monitoring port's `/healthz` answers 200 (JetStream is current on this node).
    pub fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.monitor_port));
        wait_until(&mut self.child, timeout, || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
            let mut answer = String::new();
            s.read_to_string(&mut answer)?;
            if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
                Ok(())
            } else {
                bail!("/healthz answered {:?}", answer.lines().last().unwrap_or(""))
            }
        })
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Ready when a client connection gets the server's INFO line announcing JetStream.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_until(&mut self.child, timeout, || {
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            if line.starts_with("INFO ") && line.contains("\"jetstream\":true") {
                Ok(())
            } else {
                bail!("unexpected greeting {line:?}")
            }
        })
    }
}

/// Nodes of the NATS cluster `test`, `services --cluster` and `up --cluster` start, and the replicas its streams and
/// buckets get.
pub use switchyard_testkit::nats::CLUSTER_NODES;

/// A NATS cluster on loopback: every node has its own client, route and monitoring port and its own store
/// directory, and routes to the others. Each node is started from a config file kept beside its store.
pub struct NatsCluster {
    pub nodes: Vec<Nats>,
}

impl NatsCluster {
    /// Starts `nodes` nodes with their stores under `dir` and their logs in `log_dir` as `nats-<i>.log`; does not
    /// wait for them. `sync_always` makes every node fsync each write before acking it (`sync_interval: always`)
    /// instead of every 2 minutes.
    pub fn start(tools: &Tools, dir: &Path, log_dir: &Path, nodes: usize, sync_always: bool) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ports = NodePorts::free(nodes)?;
        let routes: Vec<u16> = ports.iter().map(|p| p.route).collect();
        let sync = if sync_always { "  sync_interval: always\n" } else { "" };
        let mut started = Vec::with_capacity(nodes);
        for (i, node_ports) in ports.into_iter().enumerate() {
            let store = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&store)?;
            let mut config = NodeConfig::new(i, node_ports, store);
            config.jetstream_extra = format!("  max_memory_store: 1GB\n  max_file_store: 20GB\n{sync}");
            config.cluster =
                Some(ClusterConfig { name: "switchyard-test".into(), routes: routes.clone(), advertise: None });
            let config_path = dir.join(format!("n{i}.conf"));
            std::fs::write(&config_path, config.render())?;
            let log = log_dir.join(format!("nats-{i}.log"));
            let child = spawn_from_config(tools, &config_path, &log)?;
            started.push(Nats { child, port: node_ports.client, monitor_port: node_ports.monitor });
        }
        Ok(Self { nodes: started })
    }

    /// One nats-server seen as a cluster of one node.
    pub fn single(nats: Nats) -> Self {
        Self { nodes: vec![nats] }
    }

    /// The replicas the services give their streams and buckets on it.
    pub fn replicas(&self) -> usize {
        nats::replicas(self.nodes.len())
    }

    /// Every node's client URL, comma-separated, as services take it.
    pub fn url(&self) -> String {
        self.nodes.iter().map(Nats::url).collect::<Vec<_>>().join(",")
    }

    /// Ready when every node serves clients with JetStream and its `/healthz` says JetStream is current (the
    /// cluster has a meta leader).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        for node in &mut self.nodes {
            node.wait_ready(timeout)?;
            node.wait_healthy(timeout)?;
        }
        Ok(())
    }

    pub fn ensure_running(&mut self) -> Result<()> {
        self.nodes.iter_mut().try_for_each(|node| node.child.ensure_running())
    }

    pub fn stop(&mut self) {
        proc::stop_all(self.nodes.iter_mut().map(|node| &mut node.child));
    }
}

fn spawn_from_config(tools: &Tools, config: &Path, log: &Path) -> Result<ManagedChild> {
    let mut cmd = proc::command(&tools.nats_server);
    cmd.arg("-c").arg(config);
    ManagedChild::spawn("nats-server", cmd, log, Duration::from_secs(10))
}

pub struct Redis {
    pub child: ManagedChild,
    pub port: u16,
}

impl Redis {
    /// Starts `redis-server` with its files in `dir`; `persist` keeps an append-only file there.
    pub fn start(tools: &Tools, dir: &Path, log: &Path, persist: bool) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_ports(1)?[0];
        let mut cmd = proc::command(&tools.redis_server);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", if persist { "yes" } else { "no" }])
            .arg("--dir")
            .arg(dir);
        let child = ManagedChild::spawn("redis-server", cmd, log, Duration::from_secs(10))?;
        Ok(Self { child, port })
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Ready when PING answers PONG.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        wait_until(&mut self.child, timeout, || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"PING\r\n")?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf)?;
            let reply = String::from_utf8_lossy(&buf[..n]);
            if reply.starts_with("+PONG") {
                Ok(())
            } else {
                bail!("PING answered {reply:?}")
            }
        })
    }
}

pub struct Cassandra {
    pub child: ManagedChild,
    /// The loopback address it listens on (127.0.0.1 for the single node, one each in a cluster).
    pub address: [u8; 4],
    pub native_port: u16,
    pub dir: PathBuf,
    started: Instant,
}

impl Cassandra {
    /// Writes a single-node configuration into `dir` (data, logs and all) and starts Cassandra in the foreground
    /// of a child JVM; does not wait for it.
    pub fn start(dist: &CassandraDist, dir: &Path) -> Result<Self> {
        Self::start_single(dist, dir, None)
    }

    /// One node on 127.0.0.1, on free ports.
    fn start_single(dist: &CassandraDist, dir: &Path, secured: Option<SecuredCql>) -> Result<Self> {
        let ports = free_ports(2)?;
        let node = CassandraNode {
            address: [127, 0, 0, 1],
            native_port: ports[0],
            storage_port: ports[1],
            index: 0,
            of: 1,
            secured,
        };
        Self::start_node(dist, dir, &node)
    }

    /// A single node that asks every client for TLS with a certificate of the test CA and for a password
    /// (PasswordAuthenticator, the default superuser `cassandra`/`cassandra`), its certificates generated into
    /// `dir/pki`; does not wait for it.
    pub fn start_secured(dist: &CassandraDist, dir: &Path) -> Result<(Self, TestPki)> {
        let pki = TestPki::generate(&dir.join("pki"))?;
        // Cassandra's PEM keystore holds the private key and the certificate in one file.
        let keystore = dir.join("pki").join("server-keystore.pem");
        std::fs::write(
            &keystore,
            format!("{}{}", std::fs::read_to_string(&pki.server_key)?, std::fs::read_to_string(&pki.server_cert)?),
        )?;
        let secured = SecuredCql { keystore, truststore: pki.ca.clone() };
        Ok((Self::start_single(dist, dir, Some(secured))?, pki))
    }

    fn start_node(dist: &CassandraDist, dir: &Path, node: &CassandraNode) -> Result<Self> {
        for sub in ["data", "commitlog", "saved_caches", "hints", "cdc_raw", "logs", "triggers"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let yaml = dir.join("cassandra.yaml");
        std::fs::write(&yaml, cassandra_yaml(dir, node))?;
        let logback = dir.join("logback.xml");
        std::fs::write(&logback, LOGBACK_XML)?;

        let mut cmd = proc::command(&dist.java);
        cmd.current_dir(dir).args(jvm_args(dist, dir, &yaml, &logback)?);
        let child = ManagedChild::spawn("cassandra", cmd, &dir.join("cassandra.log"), Duration::from_secs(20))?;
        Ok(Self {
            child,
            address: node.address,
            native_port: node.native_port,
            dir: dir.to_path_buf(),
            started: Instant::now(),
        })
    }

    pub fn addr(&self) -> String {
        SocketAddr::from((self.address, self.native_port)).to_string()
    }

    /// Ready when a CQL connection completes STARTUP and reads `system.local`. Returns the release version.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<String> {
        let addr = SocketAddr::from((self.address, self.native_port));
        let mut version = String::new();
        wait_until(&mut self.child, timeout, || {
            version = cql::probe(addr, Duration::from_secs(5))?;
            Ok(())
        })?;
        say!("Cassandra {version} serves CQL on {} ({} after its start)", self.addr(), secs(self.started.elapsed()));
        Ok(version)
    }

    /// Ready when its log holds every line of `lines` (for a node the plain probe cannot reach: TLS, passwords).
    fn wait_for_log(&mut self, lines: &[&str], timeout: Duration) -> Result<()> {
        let log = self.child.log().to_path_buf();
        wait_until(&mut self.child, timeout, || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let missing: Vec<&&str> = lines.iter().filter(|line| !text.contains(**line)).collect();
            ensure!(missing.is_empty(), "the log does not say {missing:?} yet");
            Ok(())
        })?;
        say!(
            "Cassandra with TLS and passwords serves CQL on {} ({} after its start)",
            self.addr(),
            secs(self.started.elapsed())
        );
        Ok(())
    }

    /// Wait until the node counts `peers` other nodes in its ring.
    fn wait_for_peers(&mut self, peers: usize, timeout: Duration) -> Result<()> {
        let addr = SocketAddr::from((self.address, self.native_port));
        wait_until(&mut self.child, timeout, || {
            let known = cql::peers(addr, Duration::from_secs(5))?;
            ensure!(known >= peers, "{addr} knows {known} of {peers} peers");
            Ok(())
        })
    }
}

/// Polls `probe` every 250 ms until it succeeds, the child exits, a signal arrives or `timeout` passes.
fn wait_until(child: &mut ManagedChild, timeout: Duration, mut probe: impl FnMut() -> Result<()>) -> Result<()> {
    let start = Instant::now();
    loop {
        proc::check_interrupted()?;
        child.ensure_running()?;
        let err = match probe() {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if start.elapsed() > timeout {
            bail!(
                "{} (pid {}) was not ready within {}s (last probe: {err:#}); last lines of {}:\n{}",
                child.name(),
                child.pid(),
                timeout.as_secs(),
                child.log().display(),
                tail(child.log(), 40)
            );
        }
        proc::sleep(Duration::from_millis(250))?;
    }
}

/// Where one Cassandra node listens and which share of the ring it owns: node `index` of `of`, all on the same
/// ports, each on its own loopback address (127.0.0.1, .2, ...), the first being the seed.
struct CassandraNode {
    address: [u8; 4],
    native_port: u16,
    storage_port: u16,
    index: usize,
    of: usize,
    /// TLS and passwords asked of every client, or none.
    secured: Option<SecuredCql>,
}

/// The PEM files of a node that asks its clients for TLS (with a verified client certificate) and a password.
struct SecuredCql {
    /// The node's private key and certificate, in one file.
    keystore: PathBuf,
    /// The CA its clients' certificates must be signed by.
    truststore: PathBuf,
}

/// Tokens per node.
const NUM_TOKENS: i128 = 16;

/// Node `index`'s 16 tokens of `of` nodes', spread evenly over Murmur3's range and interleaved with the others',
/// so a fresh cluster needs neither token allocation nor bootstrap.
fn initial_tokens(index: usize, of: usize) -> String {
    let all = NUM_TOKENS * of as i128;
    let span = 1i128 << 64;
    (0..NUM_TOKENS)
        .map(|i| (i128::from(i64::MIN) + (i * of as i128 + index as i128) * (span / all)).to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A Cassandra cluster of its own on loopback (for the fault suite's node-loss scenario): node 1 on 127.0.0.1 is
/// the seed and starts first, the others join it.
pub struct CassandraCluster {
    pub nodes: Vec<Cassandra>,
}

impl CassandraCluster {
    /// Start `of` nodes under `dir` and wait until each serves CQL.
    pub fn start(dist: &CassandraDist, dir: &Path, of: usize) -> Result<Self> {
        let ports = free_ports(2)?;
        let mut cluster = CassandraCluster { nodes: Vec::new() };
        for index in 0..of {
            let node = CassandraNode {
                address: [127, 0, 0, 1 + index as u8],
                native_port: ports[0],
                storage_port: ports[1],
                index,
                of,
                secured: None,
            };
            let mut started = Cassandra::start_node(dist, &dir.join(format!("node-{}", index + 1)), &node)?;
            started.child.stop_with_sigkill();
            cluster.nodes.push(started);
            // The seed first; the others may then join together.
            if index == 0 {
                cluster.nodes[0].wait_ready(CASSANDRA_READY_TIMEOUT)?;
            }
        }
        for node in &mut cluster.nodes[1..] {
            node.wait_ready(CASSANDRA_READY_TIMEOUT)?;
        }
        // Serving CQL is not being in the ring: a keyspace created before every node knows the others' tokens is
        // replicated over fewer nodes than its factor says.
        for node in &mut cluster.nodes {
            node.wait_for_peers(of - 1, CASSANDRA_READY_TIMEOUT)?;
        }
        Ok(cluster)
    }

    /// Every node's `host:port`, comma-separated.
    pub fn addrs(&self) -> String {
        self.nodes.iter().map(Cassandra::addr).collect::<Vec<_>>().join(",")
    }

    /// Every node's pid, comma-separated.
    pub fn pids(&self) -> String {
        self.nodes.iter().map(|n| n.child.pid().to_string()).collect::<Vec<_>>().join(",")
    }

    pub fn stop(&mut self) {
        proc::stop_all(self.nodes.iter_mut().map(|n| &mut n.child));
    }
}

impl Drop for CassandraCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn cassandra_yaml(dir: &Path, node: &CassandraNode) -> String {
    let d = dir.display();
    let tokens = initial_tokens(node.index, node.of);
    let address = std::net::Ipv4Addr::from(node.address);
    let (native_port, storage_port, index, of) = (node.native_port, node.storage_port, node.index + 1, node.of);
    let mut y = String::new();
    let _ = write!(
        y,
        r#"# Generated by xtask for one throw-away run (node {index} of {of}).
cluster_name: switchyard-test
num_tokens: {NUM_TOKENS}
initial_token: "{tokens}"
auto_bootstrap: false
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "127.0.0.1:{storage_port}"
listen_address: {address}
rpc_address: {address}
storage_port: {storage_port}
native_transport_port: {native_port}
start_native_transport: true
data_file_directories:
  - {d}/data
commitlog_directory: {d}/commitlog
saved_caches_directory: {d}/saved_caches
hints_directory: {d}/hints
cdc_raw_directory: {d}/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
endpoint_snitch: SimpleSnitch
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
auto_snapshot: false
snapshot_before_compaction: false
hinted_handoff_enabled: false
"#
    );
    if let Some(secured) = &node.secured {
        y = y.replace("authenticator: AllowAllAuthenticator", "authenticator: PasswordAuthenticator");
        let _ = write!(
            y,
            r#"client_encryption_options:
  enabled: true
  optional: false
  require_client_auth: true
  keystore: {}
  truststore: {}
  ssl_context_factory:
    class_name: org.apache.cassandra.security.PEMBasedSslContextFactory
"#,
            secured.keystore.display(),
            secured.truststore.display()
        );
    }
    y
}

const LOGBACK_XML: &str = r#"<configuration>
  <appender name="STDOUT" class="ch.qos.logback.core.ConsoleAppender">
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="STDOUT"/></root>
</configuration>
"#;

/// The JVM command line `bin/cassandra` would build for Java 17 (from conf/jvm-server.options and
/// conf/jvm17-server.options), with a 1 GiB heap, JMX off and single-node start-up shortcuts.
fn jvm_args(dist: &CassandraDist, dir: &Path, yaml: &Path, logback: &Path) -> Result<Vec<String>> {
    let jamm = std::fs::read_dir(&dist.lib)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("jamm-") && n.ends_with(".jar")))
        .with_context(|| format!("no jamm jar in {}", dist.lib.display()))?;
    let mut a: Vec<String> = [
        "-Xms1G",
        "-Xmx1G",
        "-Xss256k",
        "-XX:+UseG1GC",
        "-XX:+ParallelRefProcEnabled",
        "-XX:MaxTenuringThreshold=1",
        "-XX:G1HeapRegionSize=16m",
        "-XX:G1RSetUpdatingPauseTimePercent=5",
        "-XX:MaxGCPauseMillis=300",
        "-XX:InitiatingHeapOccupancyPercent=70",
        "-XX:+UseThreadPriorities",
        "-XX:+UseTLAB",
        "-XX:+ResizeTLAB",
        "-XX:+PerfDisableSharedMem",
        "-XX:+ExitOnOutOfMemoryError",
        "-ea",
        "-da:net.openhft...",
        "-Djava.net.preferIPv4Stack=true",
        "-Djdk.attach.allowAttachSelf=true",
        "--add-exports",
        "java.base/jdk.internal.misc=ALL-UNNAMED",
        "--add-exports",
        "java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED",
        "--add-exports",
        "java.rmi/sun.rmi.registry=ALL-UNNAMED",
        "--add-exports",
        "java.rmi/sun.rmi.server=ALL-UNNAMED",
        "--add-exports",
        "java.sql/java.sql=ALL-UNNAMED",
        "--add-exports",
        "java.base/java.lang.ref=ALL-UNNAMED",
        "--add-exports",
        "jdk.unsupported/sun.misc=ALL-UNNAMED",
        "--add-exports",
        "jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED",
        "--add-exports",
        "jdk.attach/sun.tools.attach=ALL-UNNAMED",
        "--add-opens",
        "java.base/java.lang.module=ALL-UNNAMED",
        "--add-opens",
        "java.base/jdk.internal.loader=ALL-UNNAMED",
        "--add-opens",
        "java.base/jdk.internal.ref=ALL-UNNAMED",
        "--add-opens",
        "java.base/jdk.internal.reflect=ALL-UNNAMED",
        "--add-opens",
        "java.base/jdk.internal.math=ALL-UNNAMED",
        "--add-opens",
        "java.base/jdk.internal.module=ALL-UNNAMED",
        "--add-opens",
        "java.base/jdk.internal.util.jar=ALL-UNNAMED",
        "--add-opens",
        "jdk.management/com.sun.management.internal=ALL-UNNAMED",
        "--add-opens",
        "java.base/sun.nio.ch=ALL-UNNAMED",
        "--add-opens",
        "java.base/java.io=ALL-UNNAMED",
        "--add-opens",
        "java.base/java.lang.reflect=ALL-UNNAMED",
        "--add-opens",
        "jdk.compiler/com.sun.tools.javac=ALL-UNNAMED",
        "--add-opens",
        "java.base/java.lang=ALL-UNNAMED",
        "--add-opens",
        "java.base/java.util=ALL-UNNAMED",
        "-Dio.netty.tryReflectionSetAccessible=true",
        "-Dio.netty.allocator.useCacheForAllThreads=true",
        "-Dio.netty.allocator.maxOrder=11",
        "-Dcassandra-foreground=yes",
        "-Dcassandra.skip_wait_for_gossip_to_settle=0",
        "-Dcassandra.ring_delay_ms=100",
        "-Dcassandra.load_ring_state=false",
        // A node with PasswordAuthenticator creates its default superuser at once rather than after 10 s.
        "-Dcassandra.superuser_setup_delay_ms=0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("-javaagent:{}", jamm.display()));
    a.push(format!("-Dcassandra.config=file://{}", yaml.display()));
    a.push(format!("-Dcassandra.storagedir={}", dir.display()));
    a.push(format!("-Dcassandra.logdir={}", dir.join("logs").display()));
    a.push(format!("-Dcassandra.triggers_dir={}", dir.join("triggers").display()));
    a.push(format!("-Dlogback.configurationFile=file://{}", logback.display()));
    a.push(format!("-Djava.io.tmpdir={}", dir.display()));
    a.push("-cp".to_string());
    a.push(format!("{}/*", dist.lib.display()));
    a.push("org.apache.cassandra.service.CassandraDaemon".to_string());
    Ok(a)
}

const RUN_DIR_PREFIX: &str = "switchyard-services-";
const OWNER_FILE: &str = "xtask.pid";

/// Removes run folders left by an xtask that was SIGKILLed (its servers died with it, its folder stayed).
fn remove_stale_run_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_run_dir = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(RUN_DIR_PREFIX));
        let owner = std::fs::read_to_string(path.join(OWNER_FILE)).ok();
        let owner_alive = owner.as_deref().map(str::trim).is_some_and(|pid| Path::new("/proc").join(pid).exists());
        if is_run_dir && owner.is_some() && !owner_alive {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// The throw-away servers `test` and `services` run: all data in one temporary folder, removed at the end.
pub struct TestServices {
    pub cassandra: Cassandra,
    pub nats: Nats,
    pub redis: Redis,
    /// A three-node NATS cluster beside the single node, once `start_cluster` started it.
    pub cluster: Option<NatsCluster>,
    /// The server binaries, for tests that start a server configured their own way (TLS, credentials).
    binaries: Vec<(&'static str, String)>,
    /// A second Cassandra that asks for TLS with client certificates and a password, and its certificates.
    pub secured_cassandra: (Cassandra, TestPki),
    dir: Option<tempfile::TempDir>,
}

impl TestServices {
    /// Starts Cassandra first (the slowest), then NATS and Redis; does not wait for readiness.
    pub fn start(tools: &Tools) -> Result<Self> {
        let dist = tools.cassandra.as_ref().context("Cassandra is not installed (run `cargo xtask deps`)")?;
        remove_stale_run_dirs();
        let dir = tempfile::Builder::new()
            .prefix(RUN_DIR_PREFIX)
            .tempdir()
            .context("creating a temporary folder for the servers")?;
        std::fs::write(dir.path().join(OWNER_FILE), std::process::id().to_string())?;
        let mut cassandra = Cassandra::start(dist, &dir.path().join("cassandra"))?;
        // Its data is thrown away: a graceful drain would only cost seconds.
        cassandra.child.stop_with_sigkill();
        let mut secured_cassandra = Cassandra::start_secured(dist, &dir.path().join("cassandra-secured"))?;
        secured_cassandra.0.child.stop_with_sigkill();
        let nats = Nats::start(tools, &dir.path().join("nats"), &dir.path().join("nats.log"))?;
        let redis = Redis::start(tools, &dir.path().join("redis"), &dir.path().join("redis.log"), false)?;
        say!(
            "started cassandra (pid {}), nats-server (pid {}), redis-server (pid {}); logs in {}",
            cassandra.child.pid(),
            nats.child.pid(),
            redis.child.pid(),
            dir.path().display()
        );
        let binaries = vec![
            ("SWITCHYARD_TEST_NATS_SERVER", tools.nats_server.display().to_string()),
            ("SWITCHYARD_TEST_REDIS_SERVER", tools.redis_server.display().to_string()),
            ("SWITCHYARD_TEST_JAEGER", tools.jaeger.display().to_string()),
        ];
        Ok(Self { cassandra, nats, redis, cluster: None, binaries, secured_cassandra, dir: Some(dir) })
    }

    /// Start a three-node NATS cluster beside the single node (its stores and logs in the same temporary folder)
    /// and wait until it is ready.
    pub fn start_cluster(&mut self, tools: &Tools, sync_always: bool) -> Result<()> {
        let dir = self.dir.as_ref().context("the servers were stopped")?.path().to_path_buf();
        let mut cluster = NatsCluster::start(tools, &dir.join("nats-cluster"), &dir, CLUSTER_NODES, sync_always)?;
        let pids: Vec<String> = cluster.nodes.iter().map(|n| n.child.pid().to_string()).collect();
        say!("started a {CLUSTER_NODES}-node NATS cluster (pids {})", pids.join(", "));
        cluster.wait_ready(QUICK_READY_TIMEOUT)?;
        self.cluster = Some(cluster);
        Ok(())
    }

    /// The variables tests read to find the servers, with NATS being the cluster and every stream and bucket
    /// created with three replicas; `None` before `start_cluster`.
    pub fn cluster_env(&self) -> Option<Vec<(&'static str, String)>> {
        let cluster = self.cluster.as_ref()?;
        let mut env = self.env();
        for (name, value) in &mut env {
            if *name == "SWITCHYARD_TEST_NATS_URL" {
                *value = cluster.url();
            }
        }
        env.push(("SWITCHYARD_TEST_NATS_REPLICAS", CLUSTER_NODES.to_string()));
        Some(env)
    }

    /// Waits for all three; if Cassandra fails to come up, restarts it once with fresh ports and data.
    pub fn wait_ready(&mut self, tools: &Tools) -> Result<()> {
        self.nats.wait_ready(QUICK_READY_TIMEOUT)?;
        self.redis.wait_ready(QUICK_READY_TIMEOUT)?;
        if let Err(e) = self.cassandra.wait_ready(CASSANDRA_READY_TIMEOUT) {
            if e.downcast_ref::<proc::Interrupted>().is_some() {
                return Err(e);
            }
            say!("Cassandra did not start: {e:#}");
            say!("retrying Cassandra once with fresh ports and data");
            self.cassandra.child.stop();
            let dist = tools.cassandra.as_ref().context("Cassandra is not installed")?;
            let dir = self.cassandra.dir.with_file_name("cassandra-retry");
            self.cassandra = Cassandra::start(dist, &dir)?;
            self.cassandra.child.stop_with_sigkill();
            self.cassandra.wait_ready(CASSANDRA_READY_TIMEOUT)?;
        }
        self.secured_cassandra.0.wait_for_log(
            &["Starting listening for CQL clients", "Created default superuser role"],
            CASSANDRA_READY_TIMEOUT,
        )?;
        Ok(())
    }

    /// The temporary folder the servers keep their data and logs in.
    pub fn dir(&self) -> Result<PathBuf> {
        Ok(self.dir.as_ref().context("the servers were stopped")?.path().to_path_buf())
    }

    /// Err (with a log tail) if any server has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        self.cassandra.child.ensure_running()?;
        self.secured_cassandra.0.child.ensure_running()?;
        self.nats.child.ensure_running()?;
        if let Some(cluster) = &mut self.cluster {
            cluster.ensure_running()?;
        }
        self.redis.child.ensure_running()
    }

    /// The variables tests read to find the servers.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SWITCHYARD_TEST_NATS_URL", self.nats.url()),
            ("SWITCHYARD_TEST_REDIS_URL", self.redis.url()),
            ("SWITCHYARD_TEST_CQL", self.cassandra.addr()),
            // The Cassandra process, for tests that pause it (SIGSTOP) to show a store outage changes nothing.
            ("SWITCHYARD_TEST_CQL_PID", self.cassandra.child.pid().to_string()),
            // The node that asks for TLS and a password, and the folder of its certificates (`TestPki`'s names).
            ("SWITCHYARD_TEST_CQL_SECURED", self.secured_cassandra.0.addr()),
            (
                "SWITCHYARD_TEST_CQL_SECURED_PKI",
                self.secured_cassandra.1.ca.parent().map(|d| d.display().to_string()).unwrap_or_default(),
            ),
        ]
        .into_iter()
        .chain(self.binaries.iter().cloned())
        .collect()
    }

    pub fn stop(&mut self) {
        proc::stop_all([
            &mut self.cassandra.child,
            &mut self.secured_cassandra.0.child,
            &mut self.nats.child,
            &mut self.redis.child,
        ]);
        if let Some(cluster) = &mut self.cluster {
            cluster.stop();
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                say!("could not remove {}: {e}", path.display());
            }
        }
    }
}

impl Drop for TestServices {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `cargo xtask services [--cluster [--sync-always]]`: start the three servers, print their addresses as `export`
/// lines, stay in the foreground until Ctrl-C or SIGTERM, then stop them. With `--cluster`, NATS is a three-node
/// cluster and the tests create every stream and bucket with three replicas; `--sync-always` makes its nodes fsync
/// every write (for measuring what that costs).
pub fn run(args: &[String]) -> Result<ExitCode> {
    let (mut cluster, mut sync_always) = (false, false);
    for arg in args {
        match arg.as_str() {
            "--cluster" => cluster = true,
            "--sync-always" => sync_always = true,
            a => bail!("services: unknown argument {a:?} (it takes --cluster and --sync-always)"),
        }
    }
    if sync_always && !cluster {
        bail!("services: --sync-always needs --cluster");
    }
    let tools = deps::ensure(&repo_root(), true)?;
    let started = Instant::now();
    let mut services = TestServices::start(&tools)?;
    services.wait_ready(&tools)?;
    if cluster {
        services.start_cluster(&tools, sync_always)?;
    }
    say!(
        "all servers ready in {} (NATS monitoring: http://127.0.0.1:{})",
        secs(started.elapsed()),
        services.nats.monitor_port
    );
    let mut out = std::io::stdout().lock();
    for (k, v) in services.cluster_env().unwrap_or_else(|| services.env()) {
        writeln!(out, "export {k}={v}")?;
    }
    out.flush()?;
    drop(out);
    say!("running; Ctrl-C or SIGTERM stops them");
    while !proc::interrupted() {
        services.ensure_running()?;
        std::thread::sleep(Duration::from_millis(200));
    }
    services.stop();
    say!("servers stopped");
    Ok(ExitCode::SUCCESS)
}
