//! The JavaScript side, end to end: the `@switchyard/client` test suite (`node --test clients/js/test/`) and the demo
//! page's browser test (`clients/js/test-browser/`, Playwright driving the machine's Chromium), each against a real
//! in-process fleet (NATS, Redis, router shards, persistor) whose extra gateway serves the demo for a fresh tenant.
//!
//! These tests only start the fleet and the Node process and pass it the URLs in environment variables; every
//! assertion lives in the JavaScript tests. Node, the npm packages and Chromium come from `cargo xtask deps`; when
//! one is missing the test fails and says so.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::Fleet;

/// Longest a Node test run may take before it is killed and the test fails.
const NODE_LIMIT: Duration = Duration::from_secs(240);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn js_dir() -> PathBuf {
    repo_root().join("clients").join("js")
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `node`, or a failure saying how to get it.
fn node() -> PathBuf {
    let node = which("node").unwrap_or_else(|| {
        panic!("`node` (Node.js 20 or newer) is not on PATH; run `cargo xtask deps`, or install it, and run again")
    });
    for package in ["ws", "playwright-core"] {
        let dir = js_dir().join("node_modules").join(package);
        assert!(
            dir.is_dir(),
            "{} is missing: run `cargo xtask deps` (or `npm ci` in clients/js) to install the client's test packages",
            dir.display()
        );
    }
    node
}

/// The Chromium to drive: `SWITCHYARD_TEST_CHROMIUM`, else `chromium` on PATH.
fn chromium() -> PathBuf {
    std::env::var_os("SWITCHYARD_TEST_CHROMIUM").map(PathBuf::from).or_else(|| which("chromium")).unwrap_or_else(|| {
        panic!(
            "Chromium is not installed: run `cargo xtask deps` (it installs Debian's `chromium` as root), or set \
             SWITCHYARD_TEST_CHROMIUM to a Chromium binary"
        )
    })
}

/// Where the browser test leaves its screenshots: `<target>/browser-artifacts`.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    target.join("browser-artifacts")
}

/// A child process that is killed when dropped, so a failing test never leaves Node or Chromium behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Run `node --test <files>` in clients/js with `env`, print its output, and fail when it fails or overruns.
async fn run_node_tests(files: &[&str], env: &[(&str, String)], log_name: &str) {
    let node = node();
    let log_path = std::env::temp_dir().join(format!("switchyard-{log_name}-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path).expect("create the Node log");
    let mut command = Command::new(node);
    command
        .current_dir(js_dir())
        .arg("--test")
        .arg("--test-reporter=spec")
        // A test that hangs fails after two minutes; leaked handles do not keep the run alive once all finished.
        .arg("--test-timeout=120000")
        .arg("--test-force-exit")
        .args(files)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = Guard(command.spawn().expect("start node"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for node") {
            break Some(status);
        }
        if started.elapsed() > NODE_LIMIT {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(child);
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    println!("{output}");
    match status {
        Some(status) => assert!(status.success(), "node --test {files:?} failed ({status}); its output is above"),
        None => panic!("node --test {files:?} did not finish within {NODE_LIMIT:?}; its output is above"),
    }
}

/// A fleet with two plain gateways and one more that serves the demo for a fresh tenant, with a short heartbeat
/// so the clients' heartbeat handling is exercised within the test. Returns the fleet, the tenant's API key and
/// the demo gateway's index.
async fn demo_fleet() -> (Fleet, String, usize) {
    let adjust = |config: &mut switchyard_gateway::GatewayConfig| config.heartbeat_ms = 1_000;
    let mut fleet = Fleet::start_with(1, 2, adjust).await;
    let tenant = fleet.create_tenant().await;
    let project = tenant.project_id.clone();
    let demo = fleet
        .add_gateway(move |config| {
            config.heartbeat_ms = 1_000;
            config.demo_project_id = Some(project.clone());
        })
        .await;
    (fleet, tenant.api_key, demo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_javascript_client_suite_passes_against_a_real_fleet() {
    let (fleet, api_key, demo) = demo_fleet().await;
    let env = [
        ("SWITCHYARD_TEST_HTTP", fleet.gateways[demo].clone()),
        ("SWITCHYARD_TEST_WS", fleet.ws_url(demo)),
        ("SWITCHYARD_TEST_WS_OTHER", fleet.ws_url(0)),
        ("SWITCHYARD_TEST_API_KEY", api_key),
    ];
    run_node_tests(&["test/"], &env, "js-client").await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_users_chat_in_the_demo_page_and_one_resumes_after_going_offline() {
    let chromium = chromium();
    let (fleet, api_key, demo) = demo_fleet().await;
    let artifacts = artifacts_dir();
    std::fs::create_dir_all(&artifacts).expect("create the artifacts folder");
    let env = [
        ("SWITCHYARD_TEST_HTTP", fleet.gateways[demo].clone()),
        ("SWITCHYARD_TEST_API_KEY", api_key),
        ("SWITCHYARD_TEST_CHROMIUM", chromium.display().to_string()),
        ("SWITCHYARD_TEST_ARTIFACTS", artifacts.display().to_string()),
    ];
    run_node_tests(&["test-browser/"], &env, "browser").await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_is_off_unless_configured_and_validates_its_input() {
    let (mut fleet, _api_key, demo) = demo_fleet().await;
    let http = fleet.http.clone();
    // A plain gateway serves neither the page nor the session endpoint.
    let page = http.get(format!("{}/", fleet.gateways[0])).send().await.expect("GET /");
    assert_eq!(page.status(), 404);
    let session = http
        .post(format!("{}/demo/v1/session", fleet.gateways[0]))
        .json(&serde_json::json!({"user_id": "alice"}))
        .send()
        .await
        .expect("POST session");
    assert_eq!(session.status(), 404);

    // The demo gateway serves the page, its assets (with a content security policy) and tokens.
    let page = http.get(format!("{}/", fleet.gateways[demo])).send().await.expect("GET /");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"].to_str().unwrap().contains("script-src 'self'"));
    assert!(page.text().await.unwrap().contains("/demo/app.js"));
    for asset in ["/demo/app.js", "/demo/style.css", "/demo/switchyard-client.js"] {
        let response = http.get(format!("{}{asset}", fleet.gateways[demo])).send().await.expect("GET asset");
        assert_eq!(response.status(), 200, "{asset}");
    }
    let post = |body: &'static str| {
        http.post(format!("{}/demo/v1/session", fleet.gateways[demo]))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let ok = post(r#"{"user_id": "alice"}"#).await.expect("session");
    assert_eq!(ok.status(), 201);
    let body: serde_json::Value = ok.json().await.unwrap();
    let token = body["token"].as_str().expect("token").to_owned();
    assert_eq!(body["user"], "alice");
    let client = fleet.connect(demo, &token, switchyard_client::Format::Json).await;
    assert_eq!(client.hello().user.as_str(), "alice");
    drop(client);
    for bad in [r#"{"user_id": "no spaces"}"#, r#"{"user_id": ""}"#, r#"{"user": "alice"}"#, "not json", "{}"] {
        let response = post(bad).await.expect("session");
        assert_eq!(response.status(), 400, "{bad}");
        let error: serde_json::Value = response.json().await.unwrap();
        assert_eq!(error["code"], "bad_request", "{bad}");
    }

    // A demo gateway whose tenant does not exist says so rather than issuing tokens.
    let missing = fleet.add_gateway(|config| config.demo_project_id = Some("pj_aaaaaaaaaaaaaaaaaaaa".into())).await;
    let response = http
        .post(format!("{}/demo/v1/session", fleet.gateways[missing]))
        .json(&serde_json::json!({"user_id": "alice"}))
        .send()
        .await
        .expect("session");
    assert_eq!(response.status(), 503);
    fleet.stop().await;
}
