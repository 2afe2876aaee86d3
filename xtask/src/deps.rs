//! `cargo xtask deps`: finds or installs the external servers (nats-server, redis-server, Apache Cassandra with a
//! Java runtime), idempotently, caching downloads under `<repo>/.deps`. Starts no server.
//!
//! - nats-server: `go install` of a pinned version into `.deps/bin` (Go caches in `.deps/go`).
//! - Jaeger (the trace receiver of the trace test): `go get -tool` of a pinned version in a module of its own
//!   (`.deps/jaeger-module`), installed into `.deps/bin`; Go's own caches of the machine are used, so a rebuild on
//!   the same machine only links.
//! - redis-server: taken from PATH; installed with apt-get when missing and running as root.
//! - Cassandra: `cassandra-all` and its runtime dependencies copied from Maven Central into `.deps/cassandra/lib`
//!   (Maven's repository in `.deps/m2`); run later with the machine's Java 17.
//! - For the JavaScript client's tests and the demo page's browser test ([`ensure_js`]): Node.js (apt-get `nodejs`
//!   and `npm` when missing), the npm packages of `clients/js/package-lock.json` (`npm ci` into the git-ignored
//!   `clients/js/node_modules`, npm's cache in `.deps/npm`), and Debian's `chromium` with an emoji font (apt-get
//!   when missing).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::proc;
use crate::util::{is_executable, is_root, repo_root, say, secs, tail, which};

pub const NATS_VERSION: &str = "v2.15.3";
pub const JAEGER_VERSION: &str = "v1.75.0";
pub const CASSANDRA_VERSION: &str = "5.0.9";
const MAVEN_DEPENDENCY_PLUGIN: &str = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1";

/// Where each installed tool is.
#[derive(Debug, Clone)]
pub struct Tools {
    pub nats_server: PathBuf,
    pub redis_server: PathBuf,
    /// Jaeger all-in-one (OTLP receiver and query API), for the trace test.
    pub jaeger: PathBuf,
    pub cassandra: Option<CassandraDist>,
}

/// A runnable Cassandra: the Java launcher and the folder of jars for the classpath.
#[derive(Debug, Clone)]
pub struct CassandraDist {
    pub java: PathBuf,
    pub lib: PathBuf,
}

/// `cargo xtask deps [--no-cassandra]`
pub fn run(args: &[String]) -> Result<std::process::ExitCode> {
    let mut cassandra = true;
    for a in args {
        match a.as_str() {
            "--no-cassandra" => cassandra = false,
            other => bail!("deps: unknown argument {other:?} (only --no-cassandra is accepted)"),
        }
    }
    let tools = ensure(&repo_root(), cassandra)?;
    let js = ensure_js(&repo_root())?;
    say!("nats-server:  {}", tools.nats_server.display());
    say!("node:         {} (packages in {})", js.node.display(), js.node_modules.display());
    say!("chromium:     {}", js.chromium.display());
    say!("redis-server: {}", tools.redis_server.display());
    say!("jaeger:       {}", tools.jaeger.display());
    if let Some(c) = &tools.cassandra {
        say!("cassandra:    {} (java: {})", c.lib.display(), c.java.display());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Installs whatever is missing and returns where everything is. Cheap when all is installed.
pub fn ensure(root: &Path, with_cassandra: bool) -> Result<Tools> {
    let deps = root.join(".deps");
    std::fs::create_dir_all(&deps).with_context(|| format!("creating {}", deps.display()))?;
    let nats_server = ensure_nats(&deps)?;
    let redis_server = ensure_redis()?;
    let jaeger = ensure_jaeger(&deps)?;
    let cassandra = if with_cassandra { Some(ensure_cassandra(&deps)?) } else { None };
    Ok(Tools { nats_server, redis_server, jaeger, cassandra })
}

fn ensure_nats(deps: &Path) -> Result<PathBuf> {
    let bin = deps.join("bin").join("nats-server");
    if nats_version_ok(&bin) {
        return Ok(bin);
    }
    let go = go()?;
    say!("installing nats-server {NATS_VERSION} with go install (first run only)");
    let started = Instant::now();
    let go_dir = deps.join("go");
    let mut cmd = Command::new(&go);
    cmd.arg("install")
        .arg(format!("github.com/nats-io/nats-server/v2@{NATS_VERSION}"))
        .env("GOBIN", deps.join("bin"))
        .env("GOPATH", go_dir.join("path"))
        .env("GOMODCACHE", go_dir.join("mod"))
        .env("GOCACHE", go_dir.join("cache"))
        .env("GOFLAGS", "-modcacherw")
        .env("CGO_ENABLED", "0");
    proc::run_ok(cmd, "go install nats-server")?;
    if !nats_version_ok(&bin) {
        bail!("go install finished but {} does not report version {NATS_VERSION}", bin.display());
    }
    say!("nats-server installed in {}", secs(started.elapsed()));
    Ok(bin)
}

fn go() -> Result<PathBuf> {
    which("go").or_else(|| Some(PathBuf::from("/usr/local/go/bin/go")).filter(|p| is_executable(p))).context(
        "the Go toolchain (`go`) is not on PATH; it is needed to build nats-server and Jaeger. \
             Install Go 1.24 or newer (https://go.dev/doc/install) and run again",
    )
}

/// Jaeger at [`JAEGER_VERSION`] in `.deps/bin`, built once; a marker file beside it records the version built.
fn ensure_jaeger(deps: &Path) -> Result<PathBuf> {
    let bin = deps.join("bin").join("jaeger");
    let marker = deps.join("bin").join("jaeger.version");
    if is_executable(&bin) && std::fs::read_to_string(&marker).is_ok_and(|v| v.trim() == JAEGER_VERSION) {
        return Ok(bin);
    }
    let go = go()?;
    say!("installing Jaeger {JAEGER_VERSION} with go (first run only; a few minutes)");
    let started = Instant::now();
    let module = deps.join("jaeger-module");
    std::fs::create_dir_all(&module)?;
    std::fs::write(module.join("go.mod"), "module switchyard.local/trace-receiver\n\ngo 1.24\n")?;
    let _ = std::fs::remove_file(module.join("go.sum"));
    let mut get = Command::new(&go);
    get.current_dir(&module).args([
        "get",
        "-tool",
        &format!("github.com/jaegertracing/jaeger/cmd/jaeger@{JAEGER_VERSION}"),
    ]);
    proc::run_ok(get, "go get -tool jaeger")?;
    let mut install = Command::new(&go);
    install.current_dir(&module).args(["install", "tool"]).env("GOBIN", deps.join("bin"));
    proc::run_ok(install, "go install jaeger")?;
    if !is_executable(&bin) {
        bail!("go install finished but {} is missing", bin.display());
    }
    std::fs::write(&marker, JAEGER_VERSION)?;
    say!("Jaeger installed in {}", secs(started.elapsed()));
    Ok(bin)
}

fn nats_version_ok(bin: &Path) -> bool {
    is_executable(bin)
        && Command::new(bin)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map(|o| {
                let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                text.contains(NATS_VERSION)
            })
            .unwrap_or(false)
}

fn find_redis() -> Option<PathBuf> {
    which("redis-server").or_else(|| {
        ["/usr/bin/redis-server", "/usr/sbin/redis-server"].iter().map(PathBuf::from).find(|p| is_executable(p))
    })
}

fn ensure_redis() -> Result<PathBuf> {
    if let Some(p) = find_redis() {
        return Ok(p);
    }
    apt_install(&["redis-server"], "redis-server")?;
    find_redis().context("apt-get installed redis-server, but no redis-server binary was found")
}

/// What the JavaScript tests need.
#[derive(Debug, Clone)]
pub struct JsTools {
    pub node: PathBuf,
    pub node_modules: PathBuf,
    pub chromium: PathBuf,
}

/// Node.js, the client's npm packages and Chromium, installed when missing.
pub fn ensure_js(root: &Path) -> Result<JsTools> {
    let node = match which("node") {
        Some(node) => node,
        None => {
            apt_install(&["nodejs", "npm"], "Node.js (for the JavaScript client's tests)")?;
            which("node").context("apt-get installed nodejs, but no `node` is on PATH")?
        }
    };
    match node_major(&node) {
        Some(major) if major >= MIN_NODE => {}
        found => bail!(
            "{} is Node.js {}; the JavaScript tests need {MIN_NODE} or newer (playwright-core requires it). \
             Install a newer Node.js (e.g. from https://nodejs.org or NodeSource) and run again",
            node.display(),
            found.map_or("of unknown version".to_string(), |v| v.to_string())
        ),
    }
    let node_modules = ensure_npm_packages(root, &node)?;
    let chromium = match find_chromium() {
        Some(c) => c,
        None => {
            // The emoji font makes the reactions in the test's screenshots legible.
            apt_install(&["chromium", "fonts-noto-color-emoji"], "Chromium (for the demo page's browser test)")?;
            find_chromium().context("apt-get installed chromium, but no `chromium` binary was found")?
        }
    };
    Ok(JsTools { node, node_modules, chromium })
}

/// The oldest Node.js the JavaScript tests run on.
const MIN_NODE: u32 = 20;

/// The major version `node --version` reports ("v20.11.1" -> 20).
fn node_major(node: &Path) -> Option<u32> {
    let out = Command::new(node).arg("--version").stdin(Stdio::null()).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().trim_start_matches('v').split('.').next()?.parse().ok()
}

fn find_chromium() -> Option<PathBuf> {
    std::env::var_os("SWITCHYARD_TEST_CHROMIUM")
        .map(PathBuf::from)
        .filter(|p| is_executable(p))
        .or_else(|| which("chromium"))
}

/// `npm ci` in clients/js when its node_modules is missing or older than package-lock.json.
fn ensure_npm_packages(root: &Path, node: &Path) -> Result<PathBuf> {
    let js = root.join("clients").join("js");
    let lock = js.join("package-lock.json");
    let node_modules = js.join("node_modules");
    // npm writes this file last, so its age tells whether the install matches the lock file.
    let installed = node_modules.join(".package-lock.json");
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(done), Some(wanted)) = (modified(&installed), modified(&lock)) {
        if done >= wanted {
            return Ok(node_modules);
        }
    }
    let npm = which("npm")
        .or_else(|| node.parent().map(|dir| dir.join("npm")).filter(|p| is_executable(p)))
        .context("`npm` is not on PATH (it comes with Node.js); install it and run again")?;
    say!("installing the JavaScript client's test packages (npm ci in {})", js.display());
    let started = Instant::now();
    let mut cmd = Command::new(npm);
    cmd.current_dir(&js)
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error", "--cache"])
        .arg(root.join(".deps").join("npm").join("cache"));
    proc::run_ok(cmd, "npm ci (clients/js)")?;
    say!("npm packages installed in {}", secs(started.elapsed()));
    Ok(node_modules)
}

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// Installs Debian packages when running as root; otherwise fails saying what to install.
fn apt_install(packages: &[&str], needed_for: &str) -> Result<()> {
    let list = packages.join(" ");
    if !is_root() || which("apt-get").is_none() {
        bail!(
            "{needed_for} is not installed. Install it and run again, e.g. on Debian/Ubuntu: \
             `sudo apt-get install -y {list}`"
        );
    }
    if !APT_UPDATED.swap(true, Ordering::SeqCst) {
        say!("apt-get update");
        let mut cmd = Command::new("apt-get");
        cmd.args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive");
        proc::run_ok(cmd, "apt-get update")?;
    }
    say!("apt-get install {list}");
    let mut cmd = Command::new("apt-get");
    cmd.args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive");
    proc::run_ok(cmd, &format!("apt-get install {list}"))
}

fn find_java() -> Option<PathBuf> {
    std::env::var_os("JAVA_HOME")
        .map(|h| PathBuf::from(h).join("bin").join("java"))
        .filter(|p| is_executable(p))
        .or_else(|| which("java"))
}

/// The major version `java -version` reports (8 for "1.8.0_x", 17 for "17.0.15").
fn java_major(java: &Path) -> Option<u32> {
    let out = Command::new(java).arg("-version").stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let version = text.split('"').nth(1)?;
    let mut parts = version.split(['.', '-', '+', '_']);
    let first: u32 = parts.next()?.parse().ok()?;
    if first == 1 {
        parts.next()?.parse().ok()
    } else {
        Some(first)
    }
}

fn ensure_cassandra(deps: &Path) -> Result<CassandraDist> {
    let java = match find_java() {
        Some(j) => j,
        None => {
            apt_install(&["openjdk-17-jre-headless"], "Java 17 (to run Cassandra)")?;
            find_java().context("apt-get installed Java 17, but no `java` was found on PATH")?
        }
    };
    match java_major(&java) {
        Some(17) => {}
        Some(v) if v > 17 => say!(
            "warning: {} is Java {v}; Cassandra {CASSANDRA_VERSION} is supported on Java 11 and 17",
            java.display()
        ),
        Some(v) => bail!(
            "{} is Java {v}; Cassandra {CASSANDRA_VERSION} is run here with Java 17: install openjdk-17 \
             (set JAVA_HOME to choose a Java)",
            java.display()
        ),
        None => bail!("cannot tell the version of {} (`java -version` failed)", java.display()),
    }

    let home = deps.join("cassandra");
    let lib = home.join("lib");
    let marker = lib.join(format!(".complete-cassandra-all-{CASSANDRA_VERSION}"));
    if marker.exists() {
        return Ok(CassandraDist { java, lib });
    }

    if which("mvn").is_none() {
        apt_install(&["maven"], "Maven (to fetch Cassandra from Maven Central)")?;
    }
    say!("fetching cassandra-all {CASSANDRA_VERSION} and its dependencies from Maven Central (first run only)");
    let started = Instant::now();
    std::fs::create_dir_all(&home)?;
    // Fetch into a side folder and swap it in, so a running Cassandra never sees a half-filled lib/.
    let partial = home.join("lib.partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).with_context(|| format!("removing the incomplete {}", partial.display()))?;
    }
    let pom = home.join("pom.xml");
    std::fs::write(&pom, pom_xml()).with_context(|| format!("writing {}", pom.display()))?;
    let mut cmd = Command::new("mvn");
    cmd.current_dir(&home)
        .args(["-q", "-B", "-Dstyle.color=never", "-f"])
        .arg(&pom)
        .arg(format!("-Dmaven.repo.local={}", deps.join("m2").display()))
        .arg(format!("{MAVEN_DEPENDENCY_PLUGIN}:copy-dependencies"))
        .arg(format!("-DoutputDirectory={}", partial.display()))
        .arg("-DincludeScope=runtime");
    let log = home.join("mvn.log");
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdout(out.try_clone()?).stderr(out);
    let status = proc::run(cmd, "mvn dependency:copy-dependencies (Cassandra)")?;
    if !status.success() {
        bail!("Maven could not fetch Cassandra ({status}); last lines of {}:\n{}", log.display(), tail(&log, 30));
    }
    let main_jar = partial.join(format!("cassandra-all-{CASSANDRA_VERSION}.jar"));
    if !main_jar.exists() {
        bail!("Maven finished but {} is missing", main_jar.display());
    }
    if lib.exists() {
        std::fs::remove_dir_all(&lib).with_context(|| format!("removing the old {}", lib.display()))?;
    }
    std::fs::rename(&partial, &lib).with_context(|| format!("renaming {} to {}", partial.display(), lib.display()))?;
    std::fs::write(&marker, "")?;
    say!("Cassandra {CASSANDRA_VERSION} fetched in {}", secs(started.elapsed()));
    Ok(CassandraDist { java, lib })
}

fn pom_xml() -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- Generated by `cargo xtask deps`: the runtime classpath of Apache Cassandra {CASSANDRA_VERSION}. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.switchyard.xtask</groupId>
  <artifactId>cassandra-runtime</artifactId>
  <version>{CASSANDRA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.cassandra</groupId>
      <artifactId>cassandra-all</artifactId>
      <version>{CASSANDRA_VERSION}</version>
    </dependency>
  </dependencies>
</project>
"#
    )
}
