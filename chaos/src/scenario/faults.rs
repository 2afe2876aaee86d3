//! Faults of whole processes and dependencies under counted traffic: SIGKILL of a gateway, a router shard and a
//! persistor; SIGSTOP of a router shard past its lease; a NATS restart; Redis down; Cassandra paused; one node of a
//! three-node Cassandra cluster killed.
//!
//! Each injects, waits, heals, and leaves the judging to the common frame (`with_traffic`).

use super::{pick, wait_until, with_traffic, Latency};
use crate::fleet::{CqlStore, Shape};
use crate::procs::Paused;
use crate::report::Row;
use crate::traffic::Spec;
use crate::Config;
use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

/// The design brief's bound: a dead router shard's shards serve again within 10 s.
const ROUTER_RECOVERY: Duration = Duration::from_secs(10);
/// The suite's bound for the clients of a killed gateway to be back (reconnected elsewhere and resumed).
const GATEWAY_RECOVERY: Duration = Duration::from_secs(30);
/// The suite's bound for traffic to flow again after NATS is back.
const NATS_RECOVERY: Duration = Duration::from_secs(30);
/// Outages of Redis and of the store must not interrupt live delivery for longer than this.
const UNINTERRUPTED: Duration = Duration::from_secs(5);

fn spec(config: &Config) -> Spec {
    Spec { rooms: pick(config, 8, 20), receivers: pick(config, 80, 400), senders_per_room: 1, rate_per_sender: 5.0 }
}

pub async fn gateway_kill(config: &Config) -> Result<Row> {
    let receivers = pick(config, 200, 1_000);
    let mut row = Row::new("gateway-kill", format!("SIGKILL the gateway of {receivers} receivers"));
    row.bound = Some(GATEWAY_RECOVERY);
    let spec = Spec { rooms: pick(config, 10, 20), receivers, senders_per_room: 1, rate_per_sender: 4.0 };
    // Every client starts on gateway 0 (the balancer knows only it), so the kill takes all of them.
    let shape = Shape { gateways: 1, ..Shape::default() };
    with_traffic(config, row, shape, spec, Latency::MayRise, async |fleet, traffic, row| {
        let other = fleet.add_gateway().await?;
        fleet.wait_ready(&fleet.gateways[other].http(), Duration::from_secs(60)).await?;
        fleet.balancer.set_backends(fleet.gateways.iter().map(|g| g.port).collect());
        let at = traffic.inject();
        fleet.gateways[0].proc.kill();
        let back = wait_until(Duration::from_secs(60), || traffic.reconnected_since(at) == receivers).await;
        row.details.push(format!("all_reconnected_s={:.1}", at.elapsed().as_secs_f64()));
        row.check(back, format!("only {} of {receivers} receivers reconnected", traffic.reconnected_since(at)));
        Ok(())
    })
    .await
}

pub async fn router_kill(config: &Config) -> Result<Row> {
    let mut row = Row::new("router-kill", "SIGKILL one of two router shards");
    row.bound = Some(ROUTER_RECOVERY);
    with_traffic(config, row, Shape::default(), spec(config), Latency::MayRise, async |fleet, traffic, _row| {
        traffic.inject();
        fleet.routers[0].kill();
        tokio::time::sleep(ROUTER_RECOVERY + Duration::from_secs(2)).await;
        Ok(())
    })
    .await
}

pub async fn router_stop(config: &Config) -> Result<Row> {
    let pause = pick(config, Duration::from_secs(15), Duration::from_secs(30));
    let mut row = Row::new("router-stop", format!("SIGSTOP a router shard {}s, then SIGCONT", pause.as_secs()));
    row.bound = Some(ROUTER_RECOVERY);
    with_traffic(config, row, Shape::default(), spec(config), Latency::MayRise, async |fleet, traffic, _row| {
        traffic.inject();
        fleet.routers[0].signal(Signal::SIGSTOP)?;
        tokio::time::sleep(pause).await;
        fleet.routers[0].signal(Signal::SIGCONT)?;
        Ok(())
    })
    .await
}

pub async fn persistor_kill(config: &Config) -> Result<Row> {
    let row = Row::new("persistor-kill", "SIGKILL one of two persistors, start a new one 3s later");
    with_traffic(config, row, Shape::default(), spec(config), Latency::MayRise, async |fleet, traffic, _row| {
        traffic.inject();
        fleet.persistors[0].kill();
        tokio::time::sleep(Duration::from_secs(3)).await;
        fleet.add_persistor()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(())
    })
    .await
}

pub async fn nats_restart(config: &Config) -> Result<Row> {
    let mut row = Row::new("nats-restart", "SIGKILL nats-server, start it again 2s later");
    row.bound = Some(NATS_RECOVERY);
    with_traffic(config, row, Shape::default(), spec(config), Latency::MayRise, async |fleet, traffic, row| {
        let at = traffic.inject();
        fleet.nats.kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
        fleet.nats.restart().await?;
        let acked = traffic.acked();
        let flowing = wait_until(NATS_RECOVERY, || traffic.acked() > acked + 10).await;
        row.details.push(format!("acks_again_after_s={:.1}", at.elapsed().as_secs_f64()));
        row.check(flowing, "no acks after NATS came back".to_owned());
        for gateway in 0..fleet.gateways.len() {
            let ready = fleet.wait_ready(&fleet.gateways[gateway].http(), NATS_RECOVERY).await;
            row.check(ready.is_ok(), format!("gateway {gateway} not ready after NATS came back"));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(())
    })
    .await
}

pub async fn redis_stop(config: &Config) -> Result<Row> {
    let outage = pick(config, Duration::from_secs(10), Duration::from_secs(30));
    let mut row = Row::new("redis-stop", format!("redis-server down {}s", outage.as_secs()));
    row.bound = Some(UNINTERRUPTED);
    with_traffic(config, row, Shape::default(), spec(config), Latency::Kept, async |fleet, traffic, row| {
        traffic.inject();
        fleet.redis.kill();
        tokio::time::sleep(outage / 2).await;
        // A JWT connect needs no Redis: it must be admitted during the outage.
        let tenant_probe = Instant::now();
        let fresh = crate::traffic::connect(&fleet.ws_url(), traffic.token("probe")).await;
        row.check(fresh.is_ok(), format!("a JWT connect failed while Redis was down: {:?}", fresh.as_ref().err()));
        row.details.push(format!("jwt_connect_during_outage_ms={}", tenant_probe.elapsed().as_millis()));
        if let Ok(client) = fresh {
            client.close().await;
        }
        tokio::time::sleep(outage / 2).await;
        fleet.redis.restart().await.context("restarting redis-server")?;
        Ok(())
    })
    .await
}

/// How long traffic runs with one Cassandra node dead.
const CQL_NODE_DOWN: Duration = Duration::from_secs(30);

/// SIGKILL one node of a three-node Cassandra cluster (replication factor 3, LOCAL_QUORUM) under traffic and
/// leave it dead: two replicas of three still make a quorum, so every message is stored and read back.
pub async fn cassandra_node_kill(config: &Config) -> Result<Row> {
    let cluster = config.cql_cluster.clone().context(
        "cassandra-node-kill needs a Cassandra cluster of its own: run it with `cargo xtask chaos` (not --short)",
    )?;
    let mut row = Row::new(
        "cassandra-node-kill",
        format!(
            "SIGKILL the seed of a {}-node Cassandra cluster (RF 3, LOCAL_QUORUM), run {}s without it",
            cluster.pids.len(),
            CQL_NODE_DOWN.as_secs()
        ),
    );
    row.bound = Some(UNINTERRUPTED);
    let store =
        CqlStore { nodes: cluster.nodes.clone(), keyspace: format!("{}_rf3", config.keyspace), replication_factor: 3 };
    let shape = Shape { store: Some(store), ..Shape::default() };
    with_traffic(config, row, shape, spec(config), Latency::Kept, async |_fleet, traffic, row| {
        // The first contact point: every persistor's driver holds its control connection there.
        let victim = cluster.pids[0];
        row.details.push(format!("killed=pid {victim} ({})", cluster.nodes.split(',').next().unwrap_or("")));
        traffic.inject();
        Paused::kill(victim)?;
        tokio::time::sleep(CQL_NODE_DOWN).await;
        Ok(())
    })
    .await
}

pub async fn cassandra_stop(config: &Config) -> Result<Row> {
    let outage = pick(config, Duration::from_secs(10), Duration::from_secs(30));
    let mut row = Row::new("cassandra-stop", format!("Cassandra paused (SIGSTOP) {}s", outage.as_secs()));
    row.bound = Some(UNINTERRUPTED);
    let cql_pid = config.cql_pid;
    with_traffic(config, row, Shape::default(), spec(config), Latency::Kept, async |_fleet, traffic, _row| {
        traffic.inject();
        let paused = Paused::pause(cql_pid)?;
        tokio::time::sleep(outage).await;
        drop(paused);
        Ok(())
    })
    .await
}
