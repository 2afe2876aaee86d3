//! `cargo xtask up`: a local fleet on the embedded store (NATS with JetStream in .dev/nats, Redis in .dev/redis,
//! one gateway, two router shards, one persistor), a demo tenant and a client token, until Ctrl-C. The gateway
//! serves the demo chat page for the demo tenant (it is restarted with `SWITCHYARD_DEMO_PROJECT_ID` once the tenant
//! exists), so the printed URL opens a chat in a browser.
//! Logs go to .dev/logs/<name>.log; connection details to .dev/fleet.json. Does not start Cassandra or run tests.
//!
//! `--cluster` runs NATS as a three-node cluster (in .dev/nats-cluster) with every stream and bucket at three
//! replicas, as in production; `--sync-always` adds `sync_interval: always` to its nodes.
//!
//! `--gateways N` starts N gateways on one NATS and Redis (for benchmarks that need more sockets than one process
//! may open); the extra ones are `gateway-2` … `gateway-N`, with their details in .dev/fleet-2.json … .

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::deps;
use crate::proc::{self, ManagedChild};
use crate::services::{Nats, NatsCluster, Redis, CLUSTER_NODES};
use crate::util::{cargo, free_port, random_hex, repo_root, say, secs, tail, target_dir};

const PACKAGES: [&str; 3] = ["switchyard-gateway", "switchyard-router-shard", "switchyard-persistor"];
const SHARD_COUNT: &str = "64";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Most gateways `--gateways` starts.
const MAX_GATEWAYS: usize = 8;

/// What `up` was asked for.
struct UpArgs {
    /// Optimised binaries, for benchmarks.
    release: bool,
    gateways: usize,
    /// NATS as a three-node cluster.
    cluster: bool,
    /// Its nodes fsync every write (`sync_interval: always`).
    sync_always: bool,
}

fn parse_args(args: &[String]) -> Result<UpArgs> {
    let mut up = UpArgs { release: false, gateways: 1, cluster: false, sync_always: false };
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--release" => up.release = true,
            "--cluster" => up.cluster = true,
            "--sync-always" => up.sync_always = true,
            "--gateways" => {
                let value = rest.next().context("--gateways takes a number")?;
                up.gateways =
                    value.parse().ok().filter(|n| (1..=MAX_GATEWAYS).contains(n)).with_context(|| {
                        format!("--gateways takes a number from 1 to {MAX_GATEWAYS}, not {value:?}")
                    })?;
            }
            other => {
                bail!("up: unknown argument {other:?} (it takes --release, --cluster, --sync-always and --gateways N)")
            }
        }
    }
    if up.sync_always && !up.cluster {
        bail!("up: --sync-always needs --cluster");
    }
    Ok(up)
}

/// The file with the details of gateway `n` (1 is the demo gateway of .dev/fleet.json).
fn fleet_file(dev: &Path, n: usize) -> PathBuf {
    if n == 1 {
        dev.join("fleet.json")
    } else {
        dev.join(format!("fleet-{n}.json"))
    }
}

/// `cargo xtask up`
pub fn run(args: &[String]) -> Result<ExitCode> {
    let UpArgs { release, gateways, cluster, sync_always } = parse_args(args)?;
    let started = Instant::now();
    let root = repo_root();
    let dev = root.join(".dev");
    let logs = dev.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let _pid_file = PidFile::acquire(&dev.join("fleet.pid"))?;
    let fleet_json = dev.join("fleet.json");
    for n in 1..=MAX_GATEWAYS {
        let _ = std::fs::remove_file(fleet_file(&dev, n));
    }

    let tools = deps::ensure(&root, false)?;
    let mut nats = if cluster {
        NatsCluster::start(&tools, &dev.join("nats-cluster"), &logs, CLUSTER_NODES, sync_always)?
    } else {
        NatsCluster::single(Nats::start(&tools, &dev.join("nats"), &logs.join("nats.log"))?)
    };
    let mut redis = Redis::start(&tools, &dev.join("redis"), &logs.join("redis.log"), true)?;

    say!("building the services");
    let mut build = proc::command(cargo());
    build.current_dir(&root).args(["build", "--bins"]);
    if release {
        build.arg("--release");
    }
    for p in PACKAGES {
        build.args(["-p", p]);
    }
    proc::run_ok(build, "building the services (cargo build --bins)")?;
    let bin_dir = target_dir(&root)?.join(if release { "release" } else { "debug" });

    nats.wait_ready(Duration::from_secs(30))?;
    let replicas = nats.replicas().to_string();
    redis.wait_ready(Duration::from_secs(30))?;

    let listen = format!("127.0.0.1:{}", free_port()?);
    let http = format!("http://{listen}");
    let admin_token = random_hex(24)?;
    let store = format!("embedded:{}", dev.join("history.redb").display());

    let spawn = |name: &str, binary: &str, env: &[(&str, &str)]| -> Result<ManagedChild> {
        let path = bin_dir.join(binary);
        if !path.exists() {
            bail!("{} is missing after the build", path.display());
        }
        let mut cmd = proc::command(&path);
        cmd.current_dir(&root).env("SWITCHYARD_NATS_URL", nats.url()).env("SWITCHYARD_NATS_REPLICAS", &replicas);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // The logs are files: no terminal colour codes in them, and readable lines rather than the JSON a
        // process writes by default when its output is not a terminal.
        cmd.env("NO_COLOR", "1");
        if std::env::var_os("SWITCHYARD_LOG_FORMAT").is_none() {
            cmd.env("SWITCHYARD_LOG_FORMAT", "pretty");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        ManagedChild::spawn(name, cmd, &logs.join(format!("{name}.log")), Duration::from_secs(10))
    };
    // Stopped in reverse order of this list, before Redis and NATS.
    // Router shards and the persistor serve /metrics on ports of their own.
    let metrics: Vec<String> = (0..3).map(|_| free_port().map(|p| format!("127.0.0.1:{p}"))).collect::<Result<_>>()?;
    let mut fleet = Fleet(vec![
        spawn(
            "router-1",
            "switchyard-router-shard",
            &[
                ("SWITCHYARD_ROUTER_ID", "router-1"),
                ("SWITCHYARD_SHARD_COUNT", SHARD_COUNT),
                ("SWITCHYARD_METRICS_ADDR", metrics[0].as_str()),
            ],
        )?,
        spawn(
            "router-2",
            "switchyard-router-shard",
            &[
                ("SWITCHYARD_ROUTER_ID", "router-2"),
                ("SWITCHYARD_SHARD_COUNT", SHARD_COUNT),
                ("SWITCHYARD_METRICS_ADDR", metrics[1].as_str()),
            ],
        )?,
        spawn(
            "persistor",
            "switchyard-persistor",
            &[("SWITCHYARD_STORE", store.as_str()), ("SWITCHYARD_METRICS_ADDR", metrics[2].as_str())],
        )?,
        spawn(
            "gateway",
            "switchyard-gateway",
            &[
                ("SWITCHYARD_LISTEN", listen.as_str()),
                ("SWITCHYARD_SHARD_COUNT", SHARD_COUNT),
                ("SWITCHYARD_REDIS_URL", redis.url().as_str()),
                ("SWITCHYARD_ADMIN_TOKEN", admin_token.as_str()),
            ],
        )?,
    ]);

    let agent = http_agent();
    fleet.wait_ready(&agent, &format!("{http}/readyz"))?;

    let tenant = post_json(&agent, &format!("{http}/v1/admin/tenants"), &admin_token, &json!({"name": "demo"}))
        .context("creating the demo tenant")?;
    let project_id = field(&tenant, "project_id")?;
    let api_key = field(&tenant, "api_key")?;

    // The demo page needs the tenant's id in the gateway's configuration, and the tenant exists only now.
    say!("restarting the gateway with the demo chat page for the demo tenant");
    if let Some(mut plain) = fleet.0.pop() {
        proc::stop_all([&mut plain]);
    }
    fleet.0.push(spawn(
        "gateway",
        "switchyard-gateway",
        &[
            ("SWITCHYARD_LISTEN", listen.as_str()),
            ("SWITCHYARD_SHARD_COUNT", SHARD_COUNT),
            ("SWITCHYARD_REDIS_URL", redis.url().as_str()),
            ("SWITCHYARD_ADMIN_TOKEN", admin_token.as_str()),
            ("SWITCHYARD_DEMO_PROJECT_ID", project_id.as_str()),
        ],
    )?);
    fleet.wait_ready(&agent, &format!("{http}/readyz"))?;
    let token_reply =
        post_json(&agent, &format!("{http}/v1/tokens"), &api_key, &json!({"user_id": "demo", "ttl_secs": 86400}))
            .context("issuing a token for user demo")?;
    let token = field(&token_reply, "token")?;

    // More gateways on the same NATS and Redis, without the demo page.
    let mut extra = Vec::new();
    for n in 2..=gateways {
        let listen = format!("127.0.0.1:{}", free_port()?);
        fleet.0.push(spawn(
            &format!("gateway-{n}"),
            "switchyard-gateway",
            &[
                ("SWITCHYARD_LISTEN", listen.as_str()),
                ("SWITCHYARD_SHARD_COUNT", SHARD_COUNT),
                ("SWITCHYARD_REDIS_URL", redis.url().as_str()),
                ("SWITCHYARD_ADMIN_TOKEN", admin_token.as_str()),
            ],
        )?);
        fleet.wait_ready(&agent, &format!("http://{listen}/readyz"))?;
        extra.push(listen);
    }

    let ws = format!("ws://{listen}/v1/ws");
    let demo = format!("{http}/");
    let write_details = |path: &Path, listen: &str| -> Result<()> {
        let (http, ws) = (format!("http://{listen}"), format!("ws://{listen}/v1/ws"));
        let demo = format!("{http}/");
        // Written by hand to keep the keys in this order.
        let details = [
            ("demo", &demo),
            ("http", &http),
            ("ws", &ws),
            ("admin_token", &admin_token),
            ("project_id", &project_id),
            ("api_key", &api_key),
            ("token", &token),
        ]
        .iter()
        .map(|(k, v)| format!("  {:?}: {}", k, Value::from(v.as_str())))
        .collect::<Vec<_>>()
        .join(",\n");
        std::fs::write(path, format!("{{\n{details}\n}}\n")).with_context(|| format!("writing {}", path.display()))
    };
    write_details(&fleet_json, &listen)?;
    for (i, listen) in extra.iter().enumerate() {
        write_details(&fleet_file(&dev, i + 2), listen)?;
    }

    println!();
    println!("Switchyard fleet is up ({}):", secs(started.elapsed()));
    println!("  Demo chat    {demo}   (open it in two tabs; anyone can sign in as anyone: local use only)");
    println!("  WebSocket    {ws}");
    println!("  HTTP         {http}");
    println!("  admin token  {admin_token}");
    println!("  project id   {project_id}");
    println!("  api key      {api_key}");
    println!("  token        {token}   (user demo, 24 h)");
    println!("  metrics      {http}/metrics (gateway)");
    for (i, listen) in extra.iter().enumerate() {
        let n = i + 2;
        println!("  gateway-{n}    ws://{listen}/v1/ws   (details in {})", fleet_file(&dev, n).display());
    }
    println!("               http://{}/metrics, http://{}/metrics (router shards)", metrics[0], metrics[1]);
    println!("               http://{}/metrics (persistor)", metrics[2]);
    println!("  NATS         {}   Redis {}", nats.url(), redis.url());
    println!("  details in {}, logs in {}", fleet_json.display(), logs.display());
    println!("Ctrl-C stops the fleet.");
    let _ = std::io::stdout().flush();

    let mut reported: Vec<String> = Vec::new();
    while !proc::interrupted() {
        let servers = std::iter::once(&mut redis.child).chain(nats.nodes.iter_mut().map(|node| &mut node.child));
        for c in fleet.0.iter_mut().chain(servers) {
            if let Some(status) = c.exit_status() {
                if !reported.iter().any(|n| n == c.name()) {
                    say!(
                        "{} (pid {}) exited ({status}); last lines of {}:\n{}",
                        c.name(),
                        c.pid(),
                        c.log().display(),
                        tail(c.log(), 20)
                    );
                    reported.push(c.name().to_string());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    say!("stopping the fleet");
    fleet.stop();
    proc::stop_all([&mut redis.child]);
    nats.stop();
    for n in 1..=gateways {
        let _ = std::fs::remove_file(fleet_file(&dev, n));
    }
    say!("fleet stopped");
    Ok(ExitCode::SUCCESS)
}

/// The service processes; stopped together, newest first, when dropped.
struct Fleet(Vec<ManagedChild>);

impl Fleet {
    fn stop(&mut self) {
        proc::stop_all(self.0.iter_mut().rev());
    }

    /// Polls `url` until it answers 200, failing early (with log tails) if a service exits.
    fn wait_ready(&mut self, agent: &ureq::Agent, url: &str) -> Result<()> {
        let start = Instant::now();
        loop {
            proc::check_interrupted()?;
            let exited = self
                .0
                .iter_mut()
                .find_map(|c| c.exit_status().map(|s| format!("{} exited during start-up ({s})", c.name())));
            if let Some(exited) = exited {
                bail!("{exited}.\n{}", self.log_tails());
            }
            let last = match agent.get(url).call() {
                Ok(resp) if resp.status().as_u16() == 200 => {
                    say!("gateway ready after {}", secs(start.elapsed()));
                    return Ok(());
                }
                Ok(resp) => format!("HTTP {}", resp.status()),
                Err(e) => e.to_string(),
            };
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "GET {url} did not answer 200 within {}s (last: {last}).\n{}",
                    READY_TIMEOUT.as_secs(),
                    self.log_tails()
                );
            }
            proc::sleep(Duration::from_millis(250))?;
        }
    }

    fn log_tails(&self) -> String {
        self.0
            .iter()
            .map(|c| format!("last lines of {}:\n{}", c.log().display(), tail(c.log(), 20)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
    }
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// POSTs `body` with a bearer token; expects 201 and a JSON object.
fn post_json(agent: &ureq::Agent, url: &str, bearer: &str, body: &Value) -> Result<Value> {
    let mut resp = agent
        .post(url)
        .header("Authorization", &format!("Bearer {bearer}"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if status != 201 {
        bail!("POST {url} answered {status} (expected 201): {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("POST {url} answered 201 with a body that is not JSON: {text}"))
}

fn field(v: &Value, name: &str) -> Result<String> {
    v.get(name)
        .and_then(Value::as_str)
        .map(str::to_string)
        .with_context(|| format!("the reply has no string field {name:?}: {v}"))
}

/// `.dev/fleet.pid`: held while a fleet runs, so a second `up` refuses to start.
struct PidFile(PathBuf);

impl PidFile {
    fn acquire(path: &Path) -> Result<Self> {
        let me = std::process::id();
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut f) => {
                    write!(f, "{me}")?;
                    return Ok(Self(path.to_path_buf()));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(path).unwrap_or_default();
                    let owner = owner.trim();
                    if is_live_xtask(owner) {
                        bail!(
                            "a fleet is already running (xtask pid {owner}, details in {}). \
                             Stop it first: Ctrl-C in its terminal, or `kill {owner}`",
                            path.with_file_name("fleet.json").display()
                        );
                    }
                    std::fs::remove_file(path).with_context(|| format!("removing the stale {}", path.display()))?;
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        }
        bail!("could not take {} (another `up` is starting?)", path.display())
    }
}

fn is_live_xtask(pid: &str) -> bool {
    !pid.is_empty()
        && pid.chars().all(|c| c.is_ascii_digit())
        && std::fs::read(Path::new("/proc").join(pid).join("cmdline"))
            .map(|cmd| String::from_utf8_lossy(&cmd).contains("xtask"))
            .unwrap_or(false)
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours =
            std::fs::read_to_string(&self.0).map(|s| s.trim() == std::process::id().to_string()).unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn up_takes_release_and_a_bounded_gateway_count() {
        let up = parse_args(&args("")).unwrap();
        assert_eq!((up.release, up.gateways), (false, 1));
        let up = parse_args(&args("--gateways 6 --release")).unwrap();
        assert_eq!((up.release, up.gateways), (true, 6));
        for bad in ["--gateways", "--gateways 0", "--gateways 9", "--gateways six", "--fast"] {
            assert!(parse_args(&args(bad)).is_err(), "{bad}");
        }
        assert_eq!(fleet_file(Path::new(".dev"), 1), Path::new(".dev/fleet.json"));
        assert_eq!(fleet_file(Path::new(".dev"), 3), Path::new(".dev/fleet-3.json"));
    }
}
