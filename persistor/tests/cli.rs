//! The persistor binary's command line: `--version`, `--help` with `migrate`, and the configuration commands,
//! run as a process with an environment of the test's own. Needs no outside service.

use std::process::{Command, Output};

fn persistor(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard-persistor"))
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run switchyard-persistor")
}

#[test]
fn version_help_and_configuration_commands() {
    let version = persistor(&["--version"], &[]);
    let out = String::from_utf8_lossy(&version.stdout);
    assert!(out.starts_with("switchyard-persistor ") && out.contains("(commit "), "{out}");
    let help = persistor(&["--help"], &[]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("migrate"));

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("persistor.toml");
    std::fs::write(&file, "stroe = \"cql:127.0.0.1:9042\"\nmax_deliver = 0\n").unwrap();
    let checked = persistor(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(checked.status.code(), Some(2));
    let err = String::from_utf8_lossy(&checked.stderr);
    assert!(err.contains("unknown key stroe") && err.contains("did you mean store?"), "{err}");
    assert!(err.contains("max_deliver: must be positive"), "{err}");
    // The same problems stop `migrate` before it connects to anything.
    let migrate = persistor(&["migrate", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(migrate.status.code(), Some(2));

    let printed = persistor(&["print-config"], &[("SWITCHYARD_REDELIVERY_BACKOFF_MS", "100,200")]);
    assert_eq!(printed.status.code(), Some(0), "{}", String::from_utf8_lossy(&printed.stderr));
    assert!(String::from_utf8_lossy(&printed.stdout).contains("redelivery_backoff_ms = [100, 200]"));
}
