//! The router shard binary's command line: `--version` and the configuration commands, run as a process with an
//! environment of the test's own. Needs no outside service.

use std::process::{Command, Output};

fn router(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard-router-shard"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run switchyard-router-shard")
}

#[test]
fn version_and_configuration_commands() {
    let version = router(&["--version"], &[]);
    let out = String::from_utf8_lossy(&version.stdout);
    assert!(out.starts_with("switchyard-router-shard ") && out.contains("(commit "), "{out}");

    let checked = router(&["check-config"], &[("SWITCHYARD_LEASE_TTL_MS", "10"), ("SWITCHYARD_ROUTER", "r1")]);
    assert_eq!(checked.status.code(), Some(2));
    let err = String::from_utf8_lossy(&checked.stderr);
    assert!(err.contains("lease_ttl_ms") && err.contains("did you mean SWITCHYARD_ROUTER_ID?"), "{err}");

    let printed = router(&["print-config"], &[("SWITCHYARD_NATS_URL", "nats://u:secret-pw@n1:4222")]);
    assert_eq!(printed.status.code(), Some(0), "{}", String::from_utf8_lossy(&printed.stderr));
    let out = String::from_utf8_lossy(&printed.stdout);
    assert!(!out.contains("secret-pw") && out.contains("n1:4222") && out.contains("router_id = \"router-"), "{out}");
}
