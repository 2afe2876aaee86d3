//! The command line: which scenario, against what, with which load, and where to write the report.
//!
//! Parsing only: bounds that protect the machine are checked here, everything else is the scenarios' business.

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use switchyard_protocol::client::Format;

pub const USAGE: &str = "\
usage: switchyard-loadtest <scenario> [--option value ...]
       switchyard-loadtest floor-serve [--listen 127.0.0.1:0]

scenarios (each against the fleet in --fleet, default .dev/fleet.json written by `cargo xtask up`):
  idle     hold --sockets authenticated sockets for --duration-secs; RSS per socket of the gateway
  fanout   --rooms rooms of --members members, --senders-per-room of them sending --rate messages/s in all
           for --duration-secs; then the same against the floor (a bare broadcast server) unless --floor no
  dm       --users users, random pairs, --rate direct messages/s in all, for --duration-secs
  churn    --rate connects/s (and as many closes) around --sockets open sockets, for --duration-secs
  storm    --sockets members of --rooms rooms receive --rate messages/s; every socket is dropped at once and
           reconnects with full-jitter backoff (--max-backoff-ms) and resumes with join {since}
  resume   a room gets --events messages of --body-bytes; one client resumes them all with join {since}, then
           --clients clients at once; time to the last event and the gateway's RSS growth

options:
  --fleet PATH               fleet file (http, ws, admin_token)            [.dev/fleet.json]
  --format json|msgpack      subprotocol                                   [msgpack]
  --duration-secs N          length of the measured phase                  [20]
  --deadline-secs N          hard bound on the whole run                   [duration + 240]
  --sockets N                idle, churn and storm sockets                 [1000]
  --rooms N --members N      fan-out shape                                 [20, 250]
  --senders-per-room N       members of each room that send                [rate per room / 10, at least 1]
  --users N                  dm users                                      [200]
  --rate N                   messages/s (fanout, dm, storm) or connects/s (churn)  [400, 200, 100, 50]
  --sources N                127.0.0.x source addresses to connect from    [1 per 20,000 sockets]
  --connect-concurrency N    connects in flight                            [256]
  --max-backoff-ms N         storm: cap of the reconnect backoff           [5000]
  --events N --body-bytes N  resume: missed events and their body size     [10000, 1000]
  --clients N                resume: clients resuming at once              [50]
  --floor yes|no             fanout: also run against the floor           [yes]
  --gateway-pid PID          the gateway to measure                        [found by its port]
  --json PATH                also write the report as JSON
  --plot PATH                also write the latency percentiles as SVG
";

/// What to do.
#[derive(Debug)]
pub enum Command {
    Run(Box<RunArgs>),
    /// Serve the floor: the bare broadcast server, on `listen`, until stdin closes.
    FloorServe {
        listen: SocketAddr,
    },
    Help,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Idle,
    Fanout,
    Dm,
    Churn,
    Storm,
    Resume,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Fanout => "fanout",
            Scenario::Dm => "dm",
            Scenario::Churn => "churn",
            Scenario::Storm => "storm",
            Scenario::Resume => "resume",
        }
    }
}

/// One run's parameters.
#[derive(Debug, Clone)]
pub struct RunArgs {
    pub scenario: Scenario,
    pub fleet: PathBuf,
    pub format: Format,
    /// The measured phase: holding, sending or churning.
    pub duration: Duration,
    /// The whole run, setup and drain included, ends by then.
    pub deadline: Duration,
    pub sockets: usize,
    pub rooms: usize,
    pub members: usize,
    pub senders_per_room: usize,
    pub users: usize,
    /// Messages per second in all (fanout, dm, storm) or connects per second (churn).
    pub rate: f64,
    pub sources: usize,
    pub connect_concurrency: usize,
    pub max_backoff: Duration,
    /// Resume: events missed, the size of each body, and the clients resuming at once.
    pub events: usize,
    pub body_bytes: usize,
    pub clients: usize,
    pub floor: bool,
    pub gateway_pid: Option<u32>,
    pub json: Option<PathBuf>,
    pub plot: Option<PathBuf>,
}

/// Most sockets one run may open; the machine's file limit is checked again at start.
pub const MAX_SOCKETS: usize = 200_000;
/// Most messages one run may offer.
pub const MAX_MESSAGES: f64 = 10_000_000.0;

pub fn parse(args: Vec<String>) -> Result<Command> {
    let Some(first) = args.first() else { return Ok(Command::Help) };
    let scenario = match first.as_str() {
        "-h" | "--help" | "help" => return Ok(Command::Help),
        "floor-serve" => {
            let mut listen: SocketAddr = "127.0.0.1:0".parse()?;
            for pair in args[1..].chunks(2) {
                match pair {
                    [name, value] if name == "--listen" => listen = value.parse().context("--listen")?,
                    _ => bail!("floor-serve takes only --listen ADDRESS"),
                }
            }
            if !listen.ip().is_loopback() {
                bail!("the floor listens on loopback only, not {listen}");
            }
            return Ok(Command::FloorServe { listen });
        }
        "idle" => Scenario::Idle,
        "fanout" => Scenario::Fanout,
        "dm" => Scenario::Dm,
        "churn" => Scenario::Churn,
        "storm" => Scenario::Storm,
        "resume" => Scenario::Resume,
        other => bail!("unknown scenario {other:?}\n\n{USAGE}"),
    };
    let mut run = RunArgs {
        scenario,
        fleet: ".dev/fleet.json".into(),
        format: Format::MsgPack,
        duration: Duration::from_secs(20),
        deadline: Duration::ZERO,
        sockets: 1000,
        rooms: 20,
        members: 250,
        senders_per_room: 0,
        users: 200,
        rate: match scenario {
            Scenario::Fanout => 400.0,
            Scenario::Dm => 200.0,
            Scenario::Storm => 100.0,
            Scenario::Churn => 50.0,
            Scenario::Idle | Scenario::Resume => 0.0,
        },
        sources: 0,
        connect_concurrency: 256,
        max_backoff: Duration::from_millis(5000),
        events: 10_000,
        body_bytes: 1_000,
        clients: 50,
        floor: true,
        gateway_pid: None,
        json: None,
        plot: None,
    };
    if args[1..].iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Command::Help);
    }
    let mut deadline = None;
    for pair in args[1..].chunks(2) {
        let [name, value] = pair else { bail!("option {:?} needs a value\n\n{USAGE}", pair[0]) };
        let number = || -> Result<u64> { value.parse().with_context(|| format!("{name} takes a whole number")) };
        match name.as_str() {
            "--fleet" => run.fleet = value.into(),
            "--format" => {
                run.format = match value.as_str() {
                    "json" => Format::Json,
                    "msgpack" => Format::MsgPack,
                    other => bail!("--format json|msgpack, not {other:?}"),
                }
            }
            "--duration-secs" => run.duration = Duration::from_secs(number()?),
            "--deadline-secs" => deadline = Some(Duration::from_secs(number()?)),
            "--sockets" => run.sockets = number()? as usize,
            "--rooms" => run.rooms = number()? as usize,
            "--members" => run.members = number()? as usize,
            "--senders-per-room" => run.senders_per_room = number()? as usize,
            "--users" => run.users = number()? as usize,
            "--rate" => run.rate = value.parse().with_context(|| format!("{name} takes a number"))?,
            "--sources" => run.sources = number()? as usize,
            "--connect-concurrency" => run.connect_concurrency = number()? as usize,
            "--max-backoff-ms" => run.max_backoff = Duration::from_millis(number()?),
            "--events" => run.events = number()? as usize,
            "--body-bytes" => run.body_bytes = number()? as usize,
            "--clients" => run.clients = number()? as usize,
            "--floor" => {
                run.floor = match value.as_str() {
                    "yes" => true,
                    "no" => false,
                    other => bail!("--floor yes|no, not {other:?}"),
                }
            }
            "--gateway-pid" => run.gateway_pid = Some(number()? as u32),
            "--json" => run.json = Some(value.into()),
            "--plot" => run.plot = Some(value.into()),
            other => bail!("unknown option {other:?}\n\n{USAGE}"),
        }
    }
    if run.duration.is_zero() || run.duration > Duration::from_secs(3600) {
        bail!("--duration-secs must be between 1 and 3600");
    }
    run.deadline = deadline.unwrap_or(run.duration + Duration::from_secs(240));
    if run.deadline < run.duration {
        bail!("--deadline-secs must be at least --duration-secs");
    }
    let sockets = match scenario {
        Scenario::Fanout => run.rooms * run.members,
        Scenario::Dm => run.users,
        Scenario::Resume => run.clients + 2,
        _ => run.sockets,
    };
    if scenario == Scenario::Resume
        && (!(1..=100_000).contains(&run.events) || !(1..=60_000).contains(&run.body_bytes) || run.clients > 10_000)
    {
        bail!("resume takes 1..=100000 --events of 1..=60000 --body-bytes and at most 10000 --clients");
    }
    if sockets == 0 || sockets > MAX_SOCKETS {
        bail!("a run opens between 1 and {MAX_SOCKETS} sockets, not {sockets}");
    }
    if run.rate < 0.0 || !run.rate.is_finite() || run.rate * run.duration.as_secs_f64() > MAX_MESSAGES {
        bail!("a run offers at most {MAX_MESSAGES} messages (rate x duration)");
    }
    if matches!(scenario, Scenario::Fanout | Scenario::Dm | Scenario::Storm | Scenario::Churn) && run.rate <= 0.0 {
        bail!("--rate must be positive for {}", scenario.name());
    }
    if scenario == Scenario::Fanout {
        if run.members < 2 {
            bail!("--members must be at least 2");
        }
        if run.senders_per_room == 0 {
            run.senders_per_room = ((run.rate / run.rooms as f64 / 10.0).ceil() as usize).max(1);
        }
        if run.senders_per_room > run.members {
            bail!("--senders-per-room cannot exceed --members");
        }
    }
    if scenario == Scenario::Storm && run.rooms == 0 {
        bail!("--rooms must be positive");
    }
    if scenario == Scenario::Dm && run.users < 2 {
        bail!("--users must be at least 2");
    }
    if run.sources == 0 {
        run.sources = sockets.div_ceil(20_000).max(1);
    }
    if run.sources > 250 || run.connect_concurrency == 0 {
        bail!("--sources must be 1..=250 and --connect-concurrency positive");
    }
    Ok(Command::Run(Box::new(run)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn help_after_a_scenario_is_help() {
        assert!(matches!(parse(args("fanout --help")), Ok(Command::Help)));
        assert!(matches!(parse(args("idle --sockets 10 -h")), Ok(Command::Help)));
    }

    #[test]
    fn defaults_and_bounds() {
        let Command::Run(run) = parse(args("fanout --rate 1000 --rooms 10")).unwrap() else { panic!() };
        assert_eq!((run.rooms, run.members, run.senders_per_room), (10, 250, 10));
        assert_eq!(run.sources, 1);
        assert!(parse(args("fanout --senders-per-room 300")).is_err());
        assert!(parse(args("idle --sockets 0")).is_err());
        assert!(parse(args("idle --sockets 300000")).is_err());
        assert!(parse(args("dm --rate 1000000 --duration-secs 100")).is_err());
        assert!(parse(args("floor-serve --listen 10.0.0.1:80")).is_err());
        assert!(parse(args("fanout --rooms")).is_err());
        assert!(parse(args("bogus")).is_err());
        let Command::Run(run) = parse(args("idle --sockets 50000")).unwrap() else { panic!() };
        assert_eq!(run.sources, 3);
    }
}
