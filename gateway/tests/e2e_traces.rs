//! One `send` yields one trace across the three services: a gateway, a router shard and a persistor, each its own
//! process (so each is its own service in the trace), export their spans over OTLP to a real Jaeger that this test
//! starts (`SWITCHYARD_TEST_JAEGER`, built by `cargo xtask deps`), and the test reads the trace back from Jaeger's
//! query API: the gateway's op, the router shard's command and its append, and the persistor's write, each the
//! child of the one before, linked through `traceparent` in NATS headers.
//!
//! The router shard and persistor binaries are the ones `cargo test --workspace` builds beside the gateway's.

mod support;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use switchyard_testkit::process::{command, free_ports, ManagedChild};

/// A binary built beside the gateway's.
fn sibling_binary(name: &str) -> PathBuf {
    let gateway = PathBuf::from(env!("CARGO_BIN_EXE_switchyard-gateway"));
    let path = gateway.with_file_name(name);
    assert!(path.exists(), "{} is missing: build the workspace (`cargo xtask test` does)", path.display());
    path
}

/// Jaeger with an OTLP/HTTP receiver and its query API on ports of this test, traces in memory.
fn start_jaeger(dir: &Path) -> (ManagedChild, u16, u16) {
    let ports = free_ports(3).unwrap();
    let (otlp, query, query_grpc) = (ports[0], ports[1], ports[2]);
    let config = dir.join("jaeger.yaml");
    std::fs::write(
        &config,
        format!(
            "service:\n  extensions: [jaeger_storage, jaeger_query]\n  pipelines:\n    traces:\n      receivers: \
             [otlp]\n      processors: [batch]\n      exporters: [jaeger_storage_exporter]\n  telemetry:\n    \
             metrics:\n      level: none\nextensions:\n  jaeger_query:\n    storage:\n      traces: memstore\n    \
             http:\n      endpoint: 127.0.0.1:{query}\n    grpc:\n      endpoint: 127.0.0.1:{query_grpc}\n  \
             jaeger_storage:\n    backends:\n      memstore:\n        memory:\n          max_traces: \
             10000\nreceivers:\n  otlp:\n    protocols:\n      http:\n        endpoint: \
             127.0.0.1:{otlp}\nprocessors:\n  batch:\n    timeout: 100ms\nexporters:\n  jaeger_storage_exporter:\n    \
             trace_storage: memstore\n"
        ),
    )
    .unwrap();
    let binary = std::env::var_os("SWITCHYARD_TEST_JAEGER")
        .map(PathBuf::from)
        .expect("SWITCHYARD_TEST_JAEGER is not set: run the tests with `cargo xtask test`");
    let mut cmd = command(binary, nix::sys::signal::Signal::SIGKILL);
    cmd.arg("--config").arg(&config);
    let log = dir.join("jaeger.log");
    let mut child = ManagedChild::spawn("jaeger", cmd, &log, Duration::from_secs(5)).expect("start jaeger");
    // Its traces live in memory only: nothing to wait for at the end.
    child.stop_with_sigkill();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("Everything is ready") {
        assert!(
            Instant::now() < deadline,
            "jaeger did not start:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, otlp, query)
}

/// A service binary with traces on, every trace kept, spans sent every 200 ms.
fn service(binary: &Path, name: &str, dir: &Path, otlp: u16, env: &[(&str, String)]) -> ManagedChild {
    let mut cmd = command(binary, nix::sys::signal::Signal::SIGTERM);
    cmd.env_clear()
        .env("SWITCHYARD_NATS_URL", support::nats_url())
        .env("SWITCHYARD_NATS_REPLICAS", support::nats_replicas().to_string())
        .env("SWITCHYARD_OTLP_ENDPOINT", format!("http://127.0.0.1:{otlp}"))
        .env("SWITCHYARD_OTLP_SAMPLE_RATIO", "1")
        .env("SWITCHYARD_LOG_FORMAT", "json")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("RUST_LOG", "info");
    for (key, value) in env {
        cmd.env(key, value);
    }
    ManagedChild::spawn(name, cmd, &dir.join(format!("{name}.log")), Duration::from_secs(10)).expect("start service")
}

/// The spans of one trace, by id: (operation, service, parent span id, tags).
struct Span {
    operation: String,
    service: String,
    parent: Option<String>,
    tags: Value,
}

fn spans_of(trace: &Value) -> Vec<(String, Span)> {
    let processes = &trace["processes"];
    trace["spans"]
        .as_array()
        .map(|spans| {
            spans
                .iter()
                .map(|span| {
                    let parent = span["references"].as_array().and_then(|refs| {
                        refs.iter()
                            .find(|r| r["refType"] == "CHILD_OF")
                            .and_then(|r| r["spanID"].as_str())
                            .map(String::from)
                    });
                    let process = span["processID"].as_str().unwrap_or_default();
                    (
                        span["spanID"].as_str().unwrap_or_default().to_owned(),
                        Span {
                            operation: span["operationName"].as_str().unwrap_or_default().to_owned(),
                            service: processes[process]["serviceName"].as_str().unwrap_or_default().to_owned(),
                            parent,
                            tags: span["tags"].clone(),
                        },
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// POST a JSON body with a bearer token; the answer's JSON.
async fn post_json(http: &reqwest::Client, url: &str, bearer: &str, body: Value) -> Value {
    http.post(url).bearer_auth(bearer).json(&body).send().await.unwrap().json().await.unwrap()
}

fn tag<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.tags.as_array()?.iter().find(|t| t["key"] == key).map(|t| &t["value"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_send_is_one_trace_across_the_three_services() {
    let dir = tempfile::tempdir().unwrap();
    let (_jaeger, otlp, query) = start_jaeger(dir.path());
    let admin_token = "trace-test-admin-token-0123456789".to_owned();
    let gateway_port = free_ports(1).unwrap()[0];
    let router_id = format!("trace-router-{}", std::process::id());
    let mut router = service(
        &sibling_binary("switchyard-router-shard"),
        "router",
        dir.path(),
        otlp,
        &[("SWITCHYARD_ROUTER_ID", router_id), ("SWITCHYARD_METRICS_ADDR", "127.0.0.1:0".into())],
    );
    let mut persistor = service(
        &sibling_binary("switchyard-persistor"),
        "persistor",
        dir.path(),
        otlp,
        &[
            ("SWITCHYARD_STORE", format!("embedded:{}", dir.path().join("history.redb").display())),
            ("SWITCHYARD_METRICS_ADDR", "127.0.0.1:0".into()),
        ],
    );
    let mut gateway = service(
        Path::new(env!("CARGO_BIN_EXE_switchyard-gateway")),
        "gateway",
        dir.path(),
        otlp,
        &[
            ("SWITCHYARD_LISTEN", format!("127.0.0.1:{gateway_port}")),
            ("SWITCHYARD_REDIS_URL", support::redis_url()),
            ("SWITCHYARD_ADMIN_TOKEN", admin_token.clone()),
            ("SWITCHYARD_TENANT_MSGS_PER_SEC", "0".into()),
        ],
    );
    let base = format!("http://127.0.0.1:{gateway_port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(Instant::now() < deadline, "the gateway is not ready:\n{}", gateway.tail(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let tenant = post_json(&http, &format!("{base}/v1/admin/tenants"), &admin_token, json!({"name": "traces"})).await;
    let api_key = tenant["api_key"].as_str().expect("api key").to_owned();
    let token =
        post_json(&http, &format!("{base}/v1/tokens"), &api_key, json!({"user_id": "tracy", "ttl_secs": 600})).await;
    let token = token["token"].as_str().expect("token").to_owned();
    let ws = format!("ws://127.0.0.1:{gateway_port}/v1/ws");
    let options = switchyard_client::ConnectOptions::new(ws, switchyard_client::Auth::Header(token));
    let client = switchyard_client::Client::connect(options).await.expect("connect");
    client.join("traced-room", None).await.expect("join (the router shard may take a moment to claim its shards)");
    let sent = client.send("traced-room", "follow me").await.expect("send");

    // The trace of the send, with the spans of all three services.
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let url =
            format!("http://127.0.0.1:{query}/api/traces?service=switchyard-gateway&operation=gateway%20op&limit=50");
        let found: Value = http.get(url).send().await.unwrap().json().await.unwrap_or(Value::Null);
        let traces = found["data"].as_array().cloned().unwrap_or_default();
        let complete = traces.iter().map(spans_of).find(|spans| {
            let of = |op: &str| spans.iter().any(|(_, s)| s.operation == op);
            let sends = spans.iter().any(|(_, s)| s.operation == "gateway op" && tag(s, "op") == Some(&json!("send")));
            sends && of("router command") && of("events stream append") && of("persist event")
        });
        if let Some(spans) = complete {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "no complete trace of the send in Jaeger after 30 s; found {} traces:\n{found:#}\nrouter:\n{}\npersistor:\n{}",
            traces.len(),
            router.tail(20),
            persistor.tail(20)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let by_id: std::collections::HashMap<&str, &Span> = spans.iter().map(|(id, s)| (id.as_str(), s)).collect();
    let find = |op: &str| spans.iter().find(|(_, s)| s.operation == op).map(|(id, s)| (id.as_str(), s)).unwrap();
    let (gateway_id, gateway_span) = find("gateway op");
    let (command_id, command) = find("router command");
    let (append_id, append) = find("events stream append");
    let (_, persist) = find("persist event");
    assert_eq!(gateway_span.service, "switchyard-gateway");
    assert_eq!(command.service, "switchyard-router-shard");
    assert_eq!(append.service, "switchyard-router-shard");
    assert_eq!(persist.service, "switchyard-persistor");
    // Each is the child of the one before, across the process boundaries.
    assert_eq!(command.parent.as_deref(), Some(gateway_id), "the router shard's command follows the gateway's op");
    assert_eq!(append.parent.as_deref(), Some(command_id), "the append is part of the command");
    assert_eq!(persist.parent.as_deref(), Some(append_id), "the persistor's write follows the append");
    assert_eq!(tag(command, "op"), Some(&json!("send")));
    let seq = tag(append, "seq").map(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())));
    assert_eq!(seq, Some(Some(sent.seq)), "the append of the send's seq: {:?}", append.tags);
    assert!(by_id.len() >= 4);

    let _ = client.close().await;
    for child in [&mut gateway, &mut router, &mut persistor] {
        child.stop();
    }
}
