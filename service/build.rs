//! Stamps the build with the git commit it was built from (`SWITCHYARD_GIT_COMMIT`, read by `VERSION`): the value
//! of `GIT_COMMIT` when set (image builds without a checkout pass it as a build argument), else `git rev-parse`,
//! else `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (output.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=GIT_COMMIT");
    let commit = match std::env::var("GIT_COMMIT").ok().filter(|c| !c.trim().is_empty()) {
        Some(commit) => commit.trim().to_owned(),
        None => {
            // Rebuilt when HEAD moves: the HEAD file, the branch it names and the packed refs.
            for path in ["HEAD", "packed-refs"] {
                if let Some(file) = git(&["rev-parse", "--git-path", path]) {
                    println!("cargo:rerun-if-changed={file}");
                }
            }
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
                if let Some(file) = git(&["rev-parse", "--git-path", &branch]) {
                    println!("cargo:rerun-if-changed={file}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into())
        }
    };
    println!("cargo:rustc-env=SWITCHYARD_GIT_COMMIT={commit}");
}
