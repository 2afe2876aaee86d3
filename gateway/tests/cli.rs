//! The gateway binary's command line: `--help`, `--version`, and the configuration commands against files and
//! variables, run as a process with an environment of the test's own. Needs no outside service.

use std::process::{Command, Output};

const TOKEN: &str = "a-very-secret-admin-token";

fn gateway(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard-gateway"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run switchyard-gateway")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn help_and_version() {
    let help = gateway(&["--help"], &[]);
    assert!(help.status.success());
    let out = text(&help.stdout);
    for expected in ["--config <FILE>", "check-config", "print-config", "default-config", "--version"] {
        assert!(out.contains(expected), "{expected} in {out}");
    }
    let version = gateway(&["--version"], &[]);
    assert!(version.status.success());
    let out = text(&version.stdout);
    assert!(out.starts_with(&format!("switchyard-gateway {} (commit ", env!("CARGO_PKG_VERSION"))), "{out}");
    assert!(!out.contains("(commit )"), "{out}");
    let unknown = gateway(&["--no-such-flag"], &[]);
    assert_eq!(unknown.status.code(), Some(2));
}

#[test]
fn check_config_prints_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "listne = \"127.0.0.1:1\"\nshard_count = 0\nheartbeat_ms = \"often\"\n").unwrap();
    let file = file.to_str().unwrap();
    let checked = gateway(&["check-config", "--config", file], &[("SWITCHYARD_NATS_ULR", "nats://x:4222")]);
    assert_eq!(checked.status.code(), Some(2));
    let err = text(&checked.stderr);
    for expected in [
        "unknown key listne in",
        "did you mean listen?",
        "unknown variable SWITCHYARD_NATS_ULR; did you mean SWITCHYARD_NATS_URL?",
        "heartbeat_ms",
        "shard_count: must be 1..=4096",
        "admin_token",
    ] {
        assert!(err.contains(expected), "{expected:?} in {err}");
    }
    assert!(err.lines().all(|line| line.starts_with("switchyard-gateway: invalid configuration: ")), "{err}");

    // SWITCHYARD_CONFIG names the file when --config does not; a good one passes.
    let good = dir.path().join("good.toml");
    std::fs::write(&good, format!("admin_token = \"{TOKEN}\"\nlisten = \"127.0.0.1:0\"\n")).unwrap();
    let checked = gateway(&["check-config"], &[("SWITCHYARD_CONFIG", good.to_str().unwrap())]);
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked.stderr));
    // The variable wins over the file.
    let checked =
        gateway(&["check-config"], &[("SWITCHYARD_CONFIG", good.to_str().unwrap()), ("SWITCHYARD_SHARD_COUNT", "0")]);
    assert_eq!(checked.status.code(), Some(2));

    // A process started with a bad configuration exits 2 before it listens, naming the problem.
    let started = gateway(
        &[],
        &[("SWITCHYARD_ADMIN_TOKEN", TOKEN), ("SWITCHYARD_LISTEN", "127.0.0.1:0"), ("SWITCHYARD_SHARD_CUONT", "8")],
    );
    assert_eq!(started.status.code(), Some(2));
    assert!(text(&started.stderr).contains("did you mean SWITCHYARD_SHARD_COUNT?"), "{}", text(&started.stderr));
}

#[test]
fn print_config_shows_the_effective_values_without_secrets() {
    let printed = gateway(
        &["print-config"],
        &[
            ("SWITCHYARD_ADMIN_TOKEN", TOKEN),
            ("SWITCHYARD_REDIS_URL", "redis://app:redis-password@10.0.0.5:6379"),
            ("SWITCHYARD_NATS_URL", "nats://svc:nats-password@n1:4222,nats://n2:4222"),
            ("SWITCHYARD_OPS_PER_SEC", "33"),
        ],
    );
    assert_eq!(printed.status.code(), Some(0), "{}", text(&printed.stderr));
    let out = text(&printed.stdout);
    for secret in [TOKEN, "redis-password", "nats-password"] {
        assert!(!out.contains(secret), "{secret} printed in {out}");
    }
    for expected in ["ops_per_sec = 33", "admin_token = \"<redacted>\"", "10.0.0.5:6379", "nats://n2:4222"] {
        assert!(out.contains(expected), "{expected:?} in {out}");
    }

    // What default-config prints is a configuration file the gateway reads back.
    let defaults = gateway(&["default-config"], &[]);
    assert!(defaults.status.success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("defaults.toml");
    std::fs::write(&file, &defaults.stdout).unwrap();
    let checked = gateway(&["check-config", "-c", file.to_str().unwrap()], &[("SWITCHYARD_ADMIN_TOKEN", TOKEN)]);
    assert_eq!(checked.status.code(), Some(0), "{}", text(&checked.stderr));
}
