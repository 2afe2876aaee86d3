//! The command line every Switchyard binary shares: `--config FILE`, `--help`, `--version` (with the git commit)
//! and the configuration commands `check-config`, `print-config` and `default-config`.
//!
//! It starts no service: a binary's `main` runs its service when no command is given, and adds commands of its
//! own (the persistor's `migrate`) next to these.

use crate::config::{self, ConfigProblems, Settings, Sources};
use std::path::PathBuf;

/// The exit code of a configuration that cannot be used: the operator's mistake to fix, not a crash to debug.
pub const INVALID_CONFIG_EXIT: i32 = 2;

/// Where the configuration comes from.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// The configuration file (TOML); without it, the file `SWITCHYARD_CONFIG` names, if any. Every key can also
    /// be set by its variable `SWITCHYARD_<KEY>` (upper case), which wins over the file.
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
}

/// The commands that look at the configuration and exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check the configuration (file and environment) and print every problem; exit code 0 when it is valid, 2
    /// when it is not.
    CheckConfig,
    /// Print the effective configuration (defaults, file, then environment) as TOML, secrets redacted; exit code 2
    /// (after printing) when it is not valid.
    PrintConfig,
    /// Print the default configuration as TOML.
    DefaultConfig,
}

impl ConfigArgs {
    /// The file and the process's environment.
    pub fn sources(&self) -> Sources {
        Sources::from_process(self.config.clone())
    }

    /// The configuration; when it cannot be used, every problem on standard error, each naming the binary, and
    /// exit code 2.
    pub fn load_or_exit<T: Settings>(&self, binary: &str) -> T {
        match config::load::<T>(&self.sources()) {
            Ok(config) => config,
            Err(problems) => {
                report(binary, &problems);
                std::process::exit(INVALID_CONFIG_EXIT);
            }
        }
    }
}

impl ConfigCommand {
    /// Run the command against `T`'s configuration; returns the process's exit code.
    pub fn run<T: Settings>(self, args: &ConfigArgs, binary: &str) -> i32 {
        match self {
            ConfigCommand::CheckConfig => match config::load::<T>(&args.sources()) {
                Ok(_) => {
                    println!("{binary}: the configuration is valid");
                    0
                }
                Err(problems) => {
                    report(binary, &problems);
                    INVALID_CONFIG_EXIT
                }
            },
            ConfigCommand::PrintConfig => match config::load_unchecked::<T>(&args.sources()) {
                Ok(mut loaded) => {
                    loaded.complete();
                    print!("{}", config::to_toml(&loaded));
                    let problems = loaded.problems();
                    if problems.is_empty() {
                        0
                    } else {
                        report(binary, &ConfigProblems(problems));
                        INVALID_CONFIG_EXIT
                    }
                }
                Err(problems) => {
                    report(binary, &problems);
                    INVALID_CONFIG_EXIT
                }
            },
            ConfigCommand::DefaultConfig => {
                print!("{}", config::to_toml(&T::default()));
                0
            }
        }
    }
}

fn report(binary: &str, problems: &ConfigProblems) {
    for problem in &problems.0 {
        eprintln!("{binary}: invalid configuration: {problem}");
    }
}
