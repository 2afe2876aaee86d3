//! Entry point of `cargo xtask`: parses the command line and dispatches to a command module.
//! Holds no logic of its own.

mod chaos;
mod cql;
mod deploy;
mod deps;
mod fleet;
mod fuzz;
mod licenses;
mod lint;
mod proc;
mod services;
mod test;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  chaos [--release] [--short] [--only a,b] [--keep-logs] [--json FILE] [--list]
                          start the servers, build the services, and run the fault suite (chaos/): kills,
                          pauses, outages, floods and idle sockets under counted traffic; --short runs the
                          variants `test` runs; exits non-zero when a guarantee broke (see docs/chaos.md)
  deploy-check            validate the Helm chart and the k8s/ manifests offline (helm lint and template,
                          kubectl kustomize, kubernetes-validate against Kubernetes 1.30; tools cached in .deps/)
  deps [--no-cassandra]   install nats-server, redis-server and Cassandra (cached in .deps/), and Node.js,
                          the JavaScript client's npm packages and Chromium for its tests
  fuzz [--secs N] [TARGET...]
                          run the fuzz targets in fuzz/ (all, or those named) for N seconds each (default 60);
                          needs the nightly toolchain; installs cargo-fuzz into .deps/ (see docs/fuzzing.md)
  lint                    the source rules the compiler cannot hold: no catch-all arm in a match over
                          ClientOp, ServerEvent, RoomCommand or EventBody (also run by `test`)
  licenses                every third-party crate comes from crates.io under an accepted license (also run
                          by `test`)
  services                start NATS, Redis and Cassandra on free ports, print their addresses as
                          `export` lines, and keep them running until Ctrl-C or SIGTERM
  test [-- <args>]        start the servers, run `cargo test --workspace <args>` against them and the short
                          fault suite, stop them, then run deploy-check and every fuzz target briefly
  up [--release] [--gateways N]
                          start a local fleet (NATS, Redis, gateway, two router shards, persistor)
                          on the embedded store, with the demo chat page; details in .dev/fleet.json,
                          logs in .dev/logs/; --release runs optimised builds (for the load tester);
                          --gateways N starts N gateways on the same NATS and Redis
";

fn main() -> ExitCode {
    if let Err(e) = proc::install_signal_handler() {
        eprintln!("xtask: {e:#}");
        return ExitCode::FAILURE;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    let result = match args.first().map(String::as_str) {
        Some("chaos") => chaos::run(rest),
        Some("deploy-check") => deploy::run(rest),
        Some("deps") => deps::run(rest),
        Some("fuzz") => fuzz::run(rest),
        Some("lint") => lint::run(rest),
        Some("licenses") => licenses::run(rest),
        Some("services") => services::run(rest),
        Some("test") => test::run(rest),
        Some("up") => fleet::run(rest),
        None | Some("help" | "-h" | "--help") => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => {
            eprintln!("xtask: unknown command {other:?}\n\n{USAGE}");
            Ok(ExitCode::from(2))
        }
    };
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<proc::Interrupted>().is_some() => {
            eprintln!("xtask: interrupted; everything it started has been stopped");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
