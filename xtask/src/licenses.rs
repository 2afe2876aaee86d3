//! `cargo xtask licenses` (also run by `test`): every third-party crate in the dependency graph comes from
//! crates.io and is under a license the project accepts (`ACCEPTED`, all permissive and compatible with the
//! project's Apache-2.0): the license and sources policy a `deny.toml` would hold, checked from `cargo metadata`
//! without a tool to install.
//!
//! Also that the crates published to crates.io package ([`check_publishable`]).
//!
//! It does not check security advisories: that needs the RustSec advisory database, a git repository fetched from
//! outside the package registries (see `docs/operations.md`, "Dependencies").

use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

use crate::util::{repo_root, say};

/// The licenses (SPDX identifiers) a dependency may be under: permissive ones, compatible with Apache-2.0.
const ACCEPTED: &[&str] = &[
    "MIT",
    "MIT-0",
    "Apache-2.0",
    "Apache-2.0 WITH LLVM-exception",
    "BSD-2-Clause",
    "BSD-3-Clause",
    "BSD-1-Clause",
    "ISC",
    "Zlib",
    "Unicode-3.0",
    "Unlicense",
    "CC0-1.0",
    "BSL-1.0",
    "0BSD",
    "CDLA-Permissive-2.0",
];

/// The only registry dependencies may come from; `None` (a path) is a workspace member.
const CRATES_IO: &str = "registry+https://github.com/rust-lang/crates.io-index";

pub fn run(_args: &[String]) -> Result<ExitCode> {
    let problems = check()?;
    for problem in &problems {
        println!("{problem}");
    }
    if problems.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        say!("licenses failed: {} crates outside the policy", problems.len());
        Ok(ExitCode::FAILURE)
    }
}

/// One line per crate outside the policy; empty when all are within it.
pub fn check() -> Result<Vec<String>> {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(repo_root())
        .args(["metadata", "--format-version", "1", "--locked"])
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).context("reading cargo metadata")?;
    let packages = metadata["packages"].as_array().context("cargo metadata without packages")?;
    let mut problems = Vec::new();
    let mut third_party = 0;
    for package in packages {
        let name =
            format!("{} {}", package["name"].as_str().unwrap_or("?"), package["version"].as_str().unwrap_or("?"));
        match package["source"].as_str() {
            None => continue,
            Some(CRATES_IO) => third_party += 1,
            Some(other) => problems.push(format!("{name}: comes from {other}, not crates.io")),
        }
        match package["license"].as_str() {
            Some(expression) if accepted(expression) => {}
            Some(expression) => problems.push(format!("{name}: license {expression:?} is not accepted")),
            None => problems.push(format!("{name}: declares no SPDX license (a license file alone is not checked)")),
        }
    }
    if problems.is_empty() {
        say!("licenses: {third_party} third-party crates, all from crates.io under accepted licenses");
    }
    Ok(problems)
}

/// The crates published to crates.io (the Rust client and the protocol it depends on) package together: their
/// manifests carry what crates.io needs and their workspace dependencies a version, not only a path.
pub fn check_publishable() -> Result<()> {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(repo_root())
        .args(["package", "--locked", "--no-verify", "--allow-dirty", "-p", "switchyard-protocol", "-p"])
        .arg("switchyard-client")
        .output()
        .context("running cargo package")?;
    if !output.status.success() {
        bail!("cargo package failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    say!("publishable: switchyard-protocol and switchyard-client package for crates.io");
    Ok(())
}

/// Whether an SPDX expression can be satisfied by accepted licenses: `OR` needs one side, `AND` both; parentheses
/// group; `/` is the old spelling of `OR`.
fn accepted(expression: &str) -> bool {
    let normalized = expression.replace('/', " OR ").replace('(', " ( ").replace(')', " ) ");
    let tokens: Vec<&str> = normalized.split_whitespace().collect();
    let mut at = 0;
    let value = or_expression(&tokens, &mut at);
    value.unwrap_or(false) && at == tokens.len()
}

fn or_expression(tokens: &[&str], at: &mut usize) -> Option<bool> {
    let mut value = and_expression(tokens, at)?;
    while tokens.get(*at) == Some(&"OR") {
        *at += 1;
        value |= and_expression(tokens, at)?;
    }
    Some(value)
}

fn and_expression(tokens: &[&str], at: &mut usize) -> Option<bool> {
    let mut value = license(tokens, at)?;
    while tokens.get(*at) == Some(&"AND") {
        *at += 1;
        value &= license(tokens, at)?;
    }
    Some(value)
}

fn license(tokens: &[&str], at: &mut usize) -> Option<bool> {
    let token = *tokens.get(*at)?;
    *at += 1;
    if token == "(" {
        let value = or_expression(tokens, at)?;
        (tokens.get(*at) == Some(&")")).then(|| *at += 1)?;
        return Some(value);
    }
    let mut id = token.to_owned();
    if tokens.get(*at) == Some(&"WITH") {
        id = format!("{id} WITH {}", tokens.get(*at + 1)?);
        *at += 2;
    }
    Some(ACCEPTED.contains(&id.as_str()))
}

#[cfg(test)]
mod tests {
    use super::accepted;

    #[test]
    fn spdx_expressions() {
        assert!(accepted("MIT OR Apache-2.0"));
        assert!(accepted("MIT/Apache-2.0"));
        assert!(accepted("(MIT OR Apache-2.0) AND Unicode-3.0"));
        assert!(accepted("Apache-2.0 WITH LLVM-exception OR Apache-2.0 OR MIT"));
        assert!(accepted("MIT OR Apache-2.0 OR LGPL-2.1-or-later"));
        assert!(!accepted("GPL-3.0-only"));
        assert!(!accepted("MIT AND GPL-2.0-only"));
        assert!(!accepted("(MIT"));
        assert!(!accepted(""));
        assert!(accepted(
            "ISC AND (Apache-2.0 OR ISC) AND Apache-2.0 AND MIT AND BSD-3-Clause AND (Apache-2.0 OR ISC OR MIT) AND \
             (Apache-2.0 OR ISC OR MIT-0)"
        ));
    }
}
