//! `/metrics` of every service after real traffic: a gateway, a router shard and a persistor (in-process, on real
//! NATS and Redis) each serve Prometheus text on their own endpoint, and the series the operations guide lists
//! move: open sockets by subprotocol, frames by op, deliveries, outbound queue depth, closes by code (a client
//! that stops reading is closed as a slow consumer), auth failures by reason, NATS request and JetStream
//! publish-ack latency histograms, owned shards and handoffs, events written.
//!
//! The services share the test process and so one recorder; each endpoint is still scraped and checked for the
//! series of its own service. This file does not test the drain (`e2e_drain.rs` does).

mod support;

use futures::StreamExt;
use std::time::Duration;
use support::Fleet;
use switchyard_client::{ClientOp, Format, Reply};

/// One scrape: `(series name, labels text, value)` per sample line, and the text itself.
struct Scrape(Vec<(String, String, f64)>, String);

impl Scrape {
    async fn of(http: &reqwest::Client, base: &str) -> Scrape {
        let response = http.get(format!("{base}/metrics")).send().await.expect("scrape /metrics");
        assert_eq!(response.status(), 200, "GET {base}/metrics");
        let text = response.text().await.expect("metrics body");
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
            samples.push((name.to_owned(), labels.to_owned(), value));
        }
        Scrape(samples, text)
    }

    /// Every series has its HELP text, and the process metrics and build info every service serves are there.
    fn assert_described(&self, base: &str) {
        let text = &self.1;
        let typed: Vec<&str> =
            text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
        assert!(typed.len() > 5, "{base}: {text}");
        for name in typed {
            let help = text.lines().find_map(|l| l.strip_prefix(&format!("# HELP {name} ")));
            assert!(help.is_some_and(|h| h.len() > 10), "{base}: {name} has no HELP text");
        }
        for name in ["process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"] {
            assert!(self.value(name, &[]) > 0.0, "{base}: {name} missing or zero");
        }
        assert_eq!(self.value("switchyard_build_info", &[]), 1.0, "{base}: build info");
    }

    /// The sum of `name` over the samples carrying every one of `labels` (`key="value"`); `None` if no sample.
    fn sum(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let matching: Vec<f64> = self
            .0
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|want| l.split(',').any(|have| have == *want)))
            .map(|(_, _, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    fn value(&self, name: &str, labels: &[&str]) -> f64 {
        self.sum(name, labels).unwrap_or(0.0)
    }
}

/// Assert that a series exists in `after` and grew by at least `by` since `before`.
fn moved(before: &Scrape, after: &Scrape, name: &str, labels: &[&str], by: f64) {
    let now = after.sum(name, labels).unwrap_or_else(|| panic!("no series {name}{labels:?} on this endpoint"));
    let was = before.value(name, labels);
    assert!(now - was >= by, "{name}{labels:?} went from {was} to {now}, expected a rise of at least {by}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_serves_the_metrics_that_matter_and_they_move() {
    let fleet = Fleet::start_with(1, 1, |config| {
        config.ops_per_sec = 10_000;
        config.ops_burst = 10_000;
        // Small outbound queues, so a client that stops reading is closed as a slow consumer quickly.
        config.outbound_queue_frames = 16;
        config.outbound_queue_bytes = 64 * 1024;
    })
    .await;
    let http = reqwest::Client::new();
    let gateway = fleet.gateways[0].clone();
    let router = fleet.router_metrics[0].clone();
    let persistor = fleet.persistor_metrics.clone();
    for base in [&router, &persistor] {
        let health = http.get(format!("{base}/healthz")).send().await.expect("healthz");
        assert_eq!(health.status(), 200, "{base}/healthz");
    }
    // Readiness follows the NATS connection, which the services make right after binding.
    for base in [&router, &persistor] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = http.get(format!("{base}/readyz")).send().await.expect("readyz").status();
            if status == 200 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{base}/readyz still {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let before =
        (Scrape::of(&http, &gateway).await, Scrape::of(&http, &router).await, Scrape::of(&http, &persistor).await);

    let tenant = fleet.create_tenant().await;
    let alice = fleet.connect(0, &fleet.token(&tenant, "alice").await, Format::Json).await;
    let bob = fleet.connect(0, &fleet.token(&tenant, "bob").await, Format::MsgPack).await;
    alice.join("metrics", None).await.expect("alice joins");
    bob.join("metrics", None).await.expect("bob joins");
    // A client that reads nothing after its hello: its socket and then its outbound queue fill, and the gateway
    // closes it with 4009.
    let carol_token = fleet.token(&tenant, "carol").await;
    let (stalled, _) = {
        let url = format!("{}?token={carol_token}", fleet.ws_url(0));
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        // A small receive buffer, so the gateway's writes block after a little data.
        socket.set_recv_buffer_size(4096).expect("receive buffer");
        let addr = fleet.gateways[0].trim_start_matches("http://").parse().expect("gateway address");
        let stream = socket.connect(addr).await.expect("connect");
        let (mut ws, response) = tokio_tungstenite::client_async(url, stream).await.expect("upgrade");
        assert_eq!(response.status(), 101);
        let _hello = ws.next().await.expect("hello").expect("hello frame");
        let join = r#"{"op":"join","room":"metrics","rid":1}"#;
        futures::SinkExt::send(&mut ws, tokio_tungstenite::tungstenite::Message::Text(join.into()))
            .await
            .expect("join");
        let ok = ws.next().await.expect("join reply").expect("join frame");
        assert!(ok.to_string().contains("\"ok\""), "stalled client join: {ok}");
        (ws, ())
    };

    // Traffic: large messages until the stalled socket and its queue are full (the kernel's socket buffers grow to a
    // few MiB first), then a history read (a persistor request).
    let body = "x".repeat(16_000);
    let slow_closes = |scrape: &Scrape| scrape.value("switchyard_gateway_slow_consumer_closes_total", &[]);
    let mut sent = 0usize;
    let mut next_check = 20;
    while sent < 1_000 {
        let op = ClientOp::Send {
            room: switchyard_protocol::RoomId::parse("metrics").unwrap(),
            body: body.clone(),
            attrs: None,
            reply_to: None,
            cmid: Some(format!("m{sent}")),
        };
        match alice.request(op).await.expect("send") {
            Reply::Ok(_) => sent += 1,
            other => panic!("send refused: {other:?}"),
        }
        if sent == next_check {
            next_check += 20;
            if slow_closes(&Scrape::of(&http, &gateway).await) > slow_closes(&before.0) {
                break;
            }
        }
    }
    assert!((20..1_000).contains(&sent), "the stalled client was not closed after {sent} messages");
    let sent = sent as f64;
    let history = ClientOp::History {
        room: switchyard_protocol::RoomId::parse("metrics").unwrap(),
        before: None,
        after: None,
        limit: Some(10),
        thread: None,
    };
    assert!(matches!(bob.request(history).await.expect("history"), Reply::Ok(_)));
    // An authentication failure with a token nobody issued.
    let refused = fleet.try_connect(0, switchyard_client::Auth::Header(format!("sytok_{}", "0".repeat(32))));
    assert!(refused.await.is_err(), "an unknown token was admitted");
    // Wait until the persistor has written everything and the stalled client was cut off.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let gateway_now = Scrape::of(&http, &gateway).await;
        let persistor_now = Scrape::of(&http, &persistor).await;
        let written = persistor_now.value("switchyard_persistor_events_written_total", &[])
            - before.2.value("switchyard_persistor_events_written_total", &[]);
        let slow = gateway_now.value("switchyard_gateway_slow_consumer_closes_total", &[])
            - before.0.value("switchyard_gateway_slow_consumer_closes_total", &[]);
        if written >= sent && slow >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "after 30 s: {written} events written, {slow} slow-consumer closes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let during = Scrape::of(&http, &gateway).await;
    assert!(during.value("switchyard_gateway_open_sockets", &["subprotocol=\"json\""]) >= 1.0);
    assert!(during.value("switchyard_gateway_open_sockets", &["subprotocol=\"msgpack\""]) >= 1.0);
    let _ = bob.close().await;
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let after =
        (Scrape::of(&http, &gateway).await, Scrape::of(&http, &router).await, Scrape::of(&http, &persistor).await);
    let (g0, g1) = (&before.0, &after.0);
    moved(g0, g1, "switchyard_gateway_frames_received_total", &["op=\"send\""], sent);
    moved(g0, g1, "switchyard_gateway_frames_received_total", &["op=\"join\""], 3.0);
    moved(g0, g1, "switchyard_gateway_frames_received_total", &["op=\"history\""], 1.0);
    moved(g0, g1, "switchyard_gateway_frames_sent_total", &["op=\"hello\""], 3.0);
    moved(g0, g1, "switchyard_gateway_frames_sent_total", &["op=\"ok\""], sent + 3.0);
    moved(g0, g1, "switchyard_gateway_frames_sent_total", &["op=\"msg\""], 2.0 * sent);
    moved(g0, g1, "switchyard_gateway_deliveries_total", &[], 2.0 * sent);
    moved(g0, g1, "switchyard_gateway_outbound_queue_depth_frames_count", &[], 2.0);
    assert!(g1.sum("switchyard_gateway_outbound_queue_depth_frames_bucket", &["le=\"1024\""]).is_some());
    moved(g0, g1, "switchyard_gateway_slow_consumer_closes_total", &[], 1.0);
    moved(g0, g1, "switchyard_gateway_closes_total", &["code=\"4009\""], 1.0);
    moved(g0, g1, "switchyard_gateway_closes_total", &["code=\"client\""], 1.0);
    moved(g0, g1, "switchyard_gateway_auth_failures_total", &["reason=\"unknown_token\""], 1.0);
    moved(g0, g1, "switchyard_gateway_authentications_total", &[], 3.0);
    moved(
        g0,
        g1,
        "switchyard_gateway_nats_request_duration_seconds_count",
        &["target=\"router\"", "outcome=\"ok\""],
        sent + 3.0,
    );
    moved(
        g0,
        g1,
        "switchyard_gateway_nats_request_duration_seconds_count",
        &["target=\"persistor\"", "outcome=\"ok\""],
        1.0,
    );
    assert!(
        g1.sum("switchyard_gateway_nats_request_duration_seconds_bucket", &["target=\"router\"", "le=\"10\""])
            .is_some(),
        "the NATS request latency is a histogram with buckets"
    );
    moved(g0, g1, "switchyard_gateway_http_requests_total", &["status=\"2xx\""], 1.0);
    // Sockets that closed are no longer counted.
    assert!(
        g1.value("switchyard_gateway_open_sockets", &["subprotocol=\"msgpack\""])
            < during.value("switchyard_gateway_open_sockets", &["subprotocol=\"msgpack\""]),
        "bob's closed socket is still counted"
    );

    for (scrape, base) in [(&after.0, &gateway), (&after.1, &router), (&after.2, &persistor)] {
        scrape.assert_described(base);
    }

    let (r0, r1) = (&before.1, &after.1);
    assert_eq!(r1.value("switchyard_router_owned_shards", &[]), 64.0, "one router shard owns every shard");
    assert!(r1.value("switchyard_router_shard_handoffs_total", &["direction=\"acquired\""]) >= 64.0);
    moved(r0, r1, "switchyard_router_events_appended_total", &[], sent + 3.0);
    moved(r0, r1, "switchyard_router_publish_ack_duration_seconds_count", &["outcome=\"ok\""], sent + 3.0);
    assert!(r1.sum("switchyard_router_publish_ack_duration_seconds_bucket", &["le=\"0.5\""]).is_some());

    let (p0, p1) = (&before.2, &after.2);
    moved(p0, p1, "switchyard_persistor_events_written_total", &[], sent + 3.0);
    // Recorded by the ingest loop where it has them; checked when present.
    for (name, min) in [
        ("switchyard_persistor_batch_size_events_count", 1.0),
        ("switchyard_persistor_write_duration_seconds_count", 1.0),
    ] {
        if p1.sum(name, &[]).is_some() {
            moved(p0, p1, name, &[], min);
        }
    }
    let _ = alice.close().await;
    fleet.stop().await;
}
