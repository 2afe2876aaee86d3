//! One scenario's fleet: its own NATS (one server or a cluster) and Redis, router shards, persistors (on the shared Cassandra, in the
//! suite's keyspace) and gateways, each a process of the real binaries, with a TCP balancer in front of the
//! gateways as a load balancer would be. Also the admin calls a scenario needs: a tenant with an HS256 key (so
//! tokens are signed here and connects keep working while Redis is down), its limits, and reading `/metrics`.
//!
//! It does not inject faults (scenarios do, through the handles here) and it does not judge deliveries
//! (`traffic` does).

use crate::balancer::Balancer;
use crate::procs::{free_port, spawn, wait_for_port, OwnNats, OwnRedis, Proc};
use crate::Config;
use anyhow::{bail, Context, Result};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Virtual shards of every fleet the suite starts (fewer than production's 64: faster lease balancing).
const SHARD_COUNT: &str = "16";

/// How a scenario wants its fleet.
#[derive(Debug, Clone)]
pub struct Shape {
    pub gateways: usize,
    pub routers: usize,
    pub persistors: usize,
    /// Lines added to every gateway's TOML configuration.
    pub gateway_toml: String,
    /// NATS nodes: 1, or a cluster (every stream and bucket then gets three replicas).
    pub nats_nodes: usize,
    /// Where the persistors store: the shared Cassandra and the run's keyspace when `None`.
    pub store: Option<CqlStore>,
}

/// A CQL store other than the shared one.
#[derive(Debug, Clone)]
pub struct CqlStore {
    /// Contact points, `host:port`, comma-separated.
    pub nodes: String,
    pub keyspace: String,
    /// Replication factor of the keyspace the persistors create.
    pub replication_factor: u32,
}

impl Default for Shape {
    fn default() -> Shape {
        Shape { gateways: 2, routers: 2, persistors: 2, gateway_toml: String::new(), nats_nodes: 1, store: None }
    }
}

/// A gateway process and the port it listens on.
pub struct Gateway {
    pub port: u16,
    pub proc: Proc,
}

impl Gateway {
    pub fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub nats: OwnNats,
    pub redis: OwnRedis,
    pub routers: Vec<Proc>,
    pub persistors: Vec<Proc>,
    /// The log of each persistor, by index into `persistors`: where it says the address of its `/readyz`.
    persistor_logs: Vec<PathBuf>,
    pub gateways: Vec<Gateway>,
    /// Clients connect here; it forwards each connection to a gateway that accepts it.
    pub balancer: Balancer,
    admin_token: String,
    config: Config,
    shape: Shape,
    http: reqwest::Client,
    spawned: usize,
}

impl Fleet {
    pub async fn start(config: &Config, shape: Shape) -> Result<Fleet> {
        let dir = tempfile::Builder::new().prefix("switchyard-chaos-").tempdir()?;
        let nats = OwnNats::start(&config.nats_server, dir.path(), shape.nats_nodes).await?;
        let redis = OwnRedis::start(&config.redis_server, dir.path()).await?;
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        // A cluster serves JetStream once it has elected its meta leader.
        for node in 0..nats.nodes() {
            nats.wait_healthy(&http, node, Duration::from_secs(30)).await?;
        }
        let mut fleet = Fleet {
            dir,
            nats,
            redis,
            routers: Vec::new(),
            persistors: Vec::new(),
            persistor_logs: Vec::new(),
            gateways: Vec::new(),
            balancer: Balancer::start(Vec::new()).await?,
            admin_token: hex::encode(rand::random::<[u8; 16]>()),
            config: config.clone(),
            shape: shape.clone(),
            http,
            spawned: 0,
        };
        for _ in 0..shape.routers {
            fleet.add_router()?;
        }
        for _ in 0..shape.persistors {
            fleet.add_persistor()?;
        }
        for _ in 0..shape.gateways {
            fleet.add_gateway().await?;
        }
        fleet.balancer.set_backends(fleet.gateways.iter().map(|g| g.port).collect());
        for gateway in &fleet.gateways {
            fleet.wait_ready(&gateway.http(), Duration::from_secs(60)).await?;
        }
        // A persistor is ready once its store is open (and migrated) and NATS connected: a fault injected before
        // that would hit its start-up, not the running fleet the scenario means to test.
        for log in &fleet.persistor_logs {
            let deadline = Instant::now() + Duration::from_secs(90);
            let addr = ops_addr_in_log(log, deadline, fleet.dir.path()).await?;
            fleet.wait_ready(&format!("http://{addr}"), deadline.saturating_duration_since(Instant::now())).await?;
        }
        Ok(fleet)
    }

    fn command(&mut self, binary: &str) -> (Command, String) {
        self.spawned += 1;
        let mut command = Command::new(self.config.bin_dir.join(binary));
        command
            .env_remove("SWITCHYARD_CONFIG")
            .env("SWITCHYARD_NATS_URL", self.nats.url())
            .env("SWITCHYARD_NATS_REPLICAS", self.nats.replicas().to_string())
            .env("SWITCHYARD_LOG_FORMAT", "json")
            .env("RUST_LOG", "info");
        (command, format!("{}-{}", binary.trim_start_matches("switchyard-"), self.spawned))
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    pub fn add_router(&mut self) -> Result<usize> {
        let (mut command, name) = self.command("switchyard-router-shard");
        command
            .env("SWITCHYARD_ROUTER_ID", &name)
            .env("SWITCHYARD_SHARD_COUNT", SHARD_COUNT)
            .env("SWITCHYARD_METRICS_ADDR", "127.0.0.1:0");
        let proc = spawn(&name, command, &self.log(&name))?;
        self.routers.push(proc);
        Ok(self.routers.len() - 1)
    }

    pub fn add_persistor(&mut self) -> Result<usize> {
        let (mut command, name) = self.command("switchyard-persistor");
        let store = self.shape.store.clone().unwrap_or_else(|| CqlStore {
            nodes: self.config.cql_node.clone(),
            keyspace: self.config.keyspace.clone(),
            replication_factor: 1,
        });
        command
            .env("SWITCHYARD_STORE", format!("cql:{}", store.nodes))
            .env("SWITCHYARD_CQL_KEYSPACE", &store.keyspace)
            .env("SWITCHYARD_CQL_REPLICATION_FACTOR", store.replication_factor.to_string())
            .env("SWITCHYARD_CQL_MIGRATE_ON_START", "true")
            // A port of its own choosing, read back from its log: a port picked here and bound there later can be
            // taken meanwhile by any other process of the machine.
            .env("SWITCHYARD_METRICS_ADDR", "127.0.0.1:0");
        let log = self.log(&name);
        let proc = spawn(&name, command, &log)?;
        self.persistors.push(proc);
        self.persistor_logs.push(log);
        Ok(self.persistors.len() - 1)
    }

    /// Start one more gateway (not yet behind the balancer: `balance_all` does that); its index.
    pub async fn add_gateway(&mut self) -> Result<usize> {
        let port = free_port()?;
        self.start_gateway_on(port).await?;
        Ok(self.gateways.len() - 1)
    }

    /// Start a gateway on `port` (again, after it was killed) and wait until it listens.
    async fn start_gateway_on(&mut self, port: u16) -> Result<()> {
        let (mut command, name) = self.command("switchyard-gateway");
        let toml = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&toml, &self.shape.gateway_toml)?;
        command
            .env("SWITCHYARD_CONFIG", &toml)
            .env("SWITCHYARD_LISTEN", format!("127.0.0.1:{port}"))
            .env("SWITCHYARD_SHARD_COUNT", SHARD_COUNT)
            .env("SWITCHYARD_REDIS_URL", self.redis.url())
            .env("SWITCHYARD_ADMIN_TOKEN", &self.admin_token);
        let proc = spawn(&name, command, &self.log(&name))?;
        self.gateways.push(Gateway { port, proc });
        wait_for_port(port, Duration::from_secs(30)).await
    }

    /// Wait until `{http}/readyz` answers 200.
    pub async fn wait_ready(&self, http: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(response) = self.http.get(format!("{http}/readyz")).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{http}/readyz is not ready after {limit:?}; logs in {}", self.dir.path().display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The NATS node that leads `stream` (a stream, or `KV_<bucket>` for a KV bucket).
    pub async fn nats_leader(&self, stream: &str) -> Result<usize> {
        self.nats.leader_of(&self.http, stream).await
    }

    /// The leader of `stream` as NATS node `node` sees it (a node cut off may see another than the rest).
    pub async fn nats_leader_seen_by(&self, stream: &str, node: usize) -> Result<usize> {
        self.nats
            .leader_seen_by(&self.http, stream, node)
            .await?
            .with_context(|| format!("n{node} names no leader of {stream}"))
    }

    /// Wait until a NATS node says JetStream is current on it.
    pub async fn nats_healthy(&self, node: usize, limit: Duration) -> Result<()> {
        self.nats.wait_healthy(&self.http, node, limit).await
    }

    /// The clients' WebSocket URL: the balancer.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v1/ws", self.balancer.port)
    }

    /// The WebSocket URL of one gateway, bypassing the balancer.
    pub fn gateway_ws_url(&self, gateway: usize) -> String {
        format!("ws://127.0.0.1:{}/v1/ws", self.gateways[gateway].port)
    }

    /// A tenant with an HS256 key and no fleet-wide message cap unless `limits` says otherwise.
    pub async fn create_tenant(&self, limits: Value) -> Result<Tenant> {
        let http = self.gateways[0].http();
        let created =
            self.admin(self.http.post(format!("{http}/v1/admin/tenants")).json(&json!({"name": "chaos"}))).await?;
        let created: Value = created.json().await?;
        let project_id = created["project_id"].as_str().context("no project_id in the created tenant")?.to_owned();
        let secret = hex::encode(rand::random::<[u8; 32]>());
        let jwt = json!({"alg": "HS256", "secret": secret});
        self.admin(self.http.put(format!("{http}/v1/admin/tenants/{project_id}/jwt")).json(&jwt)).await?;
        self.admin(self.http.put(format!("{http}/v1/admin/tenants/{project_id}/limits")).json(&limits)).await?;
        // Every gateway learns tenants through a KV watch; give the others a moment to see this one.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(Tenant { project_id, key: EncodingKey::from_secret(secret.as_bytes()) })
    }

    async fn admin(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request.bearer_auth(&self.admin_token).send().await?;
        if !response.status().is_success() {
            let status = response.status();
            bail!("admin API answered {status}: {}", response.text().await.unwrap_or_default());
        }
        Ok(response)
    }

    /// The sum of every sample of `metric` (all label sets) on one gateway's `/metrics`.
    pub async fn gateway_metric(&self, gateway: usize, metric: &str) -> Result<f64> {
        let text = self.http.get(format!("{}/metrics", self.gateways[gateway].http())).send().await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Resident memory of a gateway process, in bytes, from /proc.
    pub fn gateway_rss(&self, gateway: usize) -> Result<u64> {
        let pid = self.gateways[gateway].proc.live_pid().context("gateway is not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("no VmRSS in /proc/<pid>/status")?;
        Ok(kib * 1024)
    }

    /// SIGKILL a gateway, then start a new one on the same port (as a restarted pod behind the same service).
    pub async fn replace_gateway(&mut self, gateway: usize) -> Result<()> {
        let old = self.gateways.remove(gateway);
        let port = old.port;
        drop(old);
        self.start_gateway_on(port).await?;
        let new = self.gateways.pop().context("the new gateway")?;
        self.gateways.insert(gateway, new);
        self.wait_ready(&self.gateways[gateway].http(), Duration::from_secs(60)).await
    }

    /// A process that exited by itself (not one a scenario killed): the first found, with its log's tail.
    pub fn crashed(&mut self) -> Option<String> {
        let procs = self
            .routers
            .iter_mut()
            .chain(self.persistors.iter_mut())
            .chain(self.gateways.iter_mut().map(|g| &mut g.proc));
        for proc in procs {
            if let Some(status) = proc.exited_by_itself() {
                return Some(format!("{} exited ({status}):\n{}", proc.name(), proc.tail(20)));
            }
        }
        None
    }

    /// A line for every service process whose log shows a panic (`name: line`). A panic is a bug even when the
    /// process lived on and the scenario's checks passed.
    pub fn panics(&self) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(self.dir.path()).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let service = ["gateway-", "router-shard-", "persistor-"].iter().any(|p| name.starts_with(p));
            if !service {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Some(line) = text.lines().find(|l| l.contains("panicked at")) {
                found.push(format!("{name}: {line}"));
            }
        }
        found
    }

    /// Stop everything; services first (gracefully, so router shards hand back leases and persistors finish their
    /// batches), then Redis and NATS. When `keep_logs` is set the folder is kept and its path returned.
    pub fn stop(mut self, keep_logs: bool) -> Option<PathBuf> {
        for gateway in &mut self.gateways {
            gateway.proc.stop_gracefully(Duration::from_secs(5));
        }
        for proc in self.routers.iter_mut().chain(self.persistors.iter_mut()) {
            proc.stop_gracefully(Duration::from_secs(5));
        }
        self.balancer.stop();
        self.redis.kill();
        self.nats.kill();
        keep_logs.then(|| self.dir.keep())
    }
}

/// A scenario's tenant and the key its tokens are signed with.
#[derive(Clone)]
pub struct Tenant {
    pub project_id: String,
    key: EncodingKey,
}

impl Tenant {
    /// A JWT for `user`, valid for two hours.
    pub fn token(&self, user: &str) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let claims = json!({"sub": user, "pid": self.project_id, "exp": now + 7200});
        jsonwebtoken::encode(&Header::default(), &claims, &self.key).expect("HS256 signing does not fail")
    }

    /// A JWT of any claims signed with this tenant's key (for tokens that must be refused: another tenant's `pid`,
    /// a bad `sub`, an expired `exp`).
    pub fn sign(&self, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::default(), claims, &self.key).expect("HS256 signing does not fail")
    }
}

/// The address a process's ops listener (`/healthz`, `/readyz`, `/metrics`) says it serves on, in its JSON log,
/// waiting for the line until `deadline`.
async fn ops_addr_in_log(log: &std::path::Path, deadline: Instant, dir: &std::path::Path) -> Result<String> {
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let serving = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| line["fields"]["message"] == "serving /healthz, /readyz and /metrics");
        if let Some(addr) = serving.as_ref().and_then(|line| line["fields"]["addr"].as_str()) {
            return Ok(addr.to_owned());
        }
        if Instant::now() > deadline {
            bail!("{} names no ops address in time; logs in {}", log.display(), dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
