//! Faults of a three-node NATS cluster under counted traffic, with every stream and bucket at three replicas:
//! SIGKILL of the node leading the events stream, SIGKILL of the node leading the leases and rooms buckets, a node
//! paused (SIGSTOP) and resumed, a rolling restart of all three nodes, and a partition that cuts one node off
//! from the other two.
//!
//! Each injects, waits, heals, and leaves the judging to the common frame (`with_traffic`): every ack counted end
//! to end, per-room seqs gap-free, and the time until every receiver has a message sent after the fault. It does not
//! cut the services off from NATS (the other scenarios do).

use super::{pick, wait_until, with_traffic, Latency};
use crate::fleet::{Fleet, Shape};
use crate::procs::Paused;
use crate::report::Row;
use crate::traffic::{Spec, Traffic};
use crate::Config;
use anyhow::{Context, Result};
use std::time::{Duration, Instant};
use switchyard_protocol::subjects;

/// The bound for every room to be served again after one NATS node died: a JetStream election of the streams it
/// led (raft timeouts of a few seconds) overlaps with the wait of the appends that were in flight to it (the
/// router shard's JetStream requests give up after 5 s: the publish ack, then the re-read of the room's tail), and
/// the gateway retries the command within its 10 s. Measured: 13–15 s.
const NODE_LOSS_RECOVERY: Duration = Duration::from_secs(20);
/// The same for a node that freezes without closing its connections: its clients first have to notice (three
/// unanswered pings, 2 s apart) before they move to another node. Measured: 20 s with a 12 s pause.
const FROZEN_NODE_RECOVERY: Duration = Duration::from_secs(30);
/// The bound for every room to be served again while one node is cut off from the other two (its clients stay
/// connected to it): the two elect new leaders for what it led, as after a node loss, and the services on the cut
/// node leave it once JetStream has stopped answering there (`switchyard_service::nats` watches for that).
const PARTITION_RECOVERY: Duration = Duration::from_secs(30);
/// How long a node may take to rejoin the cluster and be current again.
const REJOIN: Duration = Duration::from_secs(60);

fn spec(config: &Config) -> Spec {
    Spec { rooms: pick(config, 8, 20), receivers: pick(config, 80, 400), senders_per_room: 1, rate_per_sender: 5.0 }
}

fn cluster() -> Shape {
    Shape { nats_nodes: 3, ..Shape::default() }
}

/// How long traffic keeps running after acks flow again: the sends that were stuck on the dead leader take up to
/// about 10 s, and every room must get a message sent after the fault before the traffic is judged.
const AFTER_RECOVERY: Duration = Duration::from_secs(6);

/// Wait until more than a few acks arrive after `at` (at most `limit`), then `AFTER_RECOVERY`; records how long
/// the acks took.
async fn acks_resume(traffic: &Traffic, at: Instant, limit: Duration, row: &mut Row) {
    let acked = traffic.acked();
    let flowing = wait_until(limit, || traffic.acked() > acked + 10).await;
    row.details.push(format!("acks_again_after_s={:.1}", at.elapsed().as_secs_f64()));
    row.check(flowing, format!("no acks within {limit:?} of the fault"));
    tokio::time::sleep(AFTER_RECOVERY).await;
}

/// Start a stopped node again and wait until it is current.
async fn rejoin(fleet: &mut Fleet, node: usize) -> Result<()> {
    fleet.nats.restart_node(node).await?;
    fleet.nats_healthy(node, REJOIN).await
}

/// SIGKILL `node`, start it again 5 s later, and wait for acks to flow.
async fn kill_and_rejoin(fleet: &mut Fleet, traffic: &Traffic, node: usize, row: &mut Row) -> Result<()> {
    let at = traffic.inject();
    fleet.nats.kill_node(node);
    tokio::time::sleep(Duration::from_secs(5)).await;
    rejoin(fleet, node).await?;
    acks_resume(traffic, at, NODE_LOSS_RECOVERY, row).await;
    Ok(())
}

pub async fn nats_leader_kill(config: &Config) -> Result<Row> {
    let mut row =
        Row::new("nats-leader-kill", "SIGKILL the NATS node leading the events stream (of 3, R3), restart it 5s later");
    row.bound = Some(NODE_LOSS_RECOVERY);
    with_traffic(config, row, cluster(), spec(config), Latency::MayRise, async |fleet, traffic, row| {
        let leader = fleet.nats_leader(subjects::EVENTS_STREAM).await?;
        row.details.push(format!("killed=n{leader}"));
        kill_and_rejoin(fleet, traffic, leader, row).await?;
        let now = fleet.nats_leader(subjects::EVENTS_STREAM).await?;
        row.details.push(format!("events_leader_after=n{now}"));
        Ok(())
    })
    .await
}

pub async fn nats_kv_leader_kill(config: &Config) -> Result<Row> {
    let mut row = Row::new(
        "nats-kv-leader-kill",
        "SIGKILL the NATS node leading the leases bucket (of 3, R3), restart it 5s later",
    );
    row.bound = Some(NODE_LOSS_RECOVERY);
    with_traffic(config, row, cluster(), spec(config), Latency::MayRise, async |fleet, traffic, row| {
        let leader = fleet.nats_leader(subjects::LEASES_BUCKET_STREAM).await?;
        let rooms = fleet.nats_leader(subjects::ROOMS_BUCKET_STREAM).await?;
        let events = fleet.nats_leader(subjects::EVENTS_STREAM).await?;
        row.details.push(format!("killed=n{leader} (rooms bucket led by n{rooms}, events stream by n{events})"));
        kill_and_rejoin(fleet, traffic, leader, row).await?;
        Ok(())
    })
    .await
}

pub async fn nats_node_pause(config: &Config) -> Result<Row> {
    let pause = pick(config, Duration::from_secs(12), Duration::from_secs(30));
    let mut row = Row::new(
        "nats-node-pause",
        format!("SIGSTOP the NATS node leading the events stream {}s, then SIGCONT", pause.as_secs()),
    );
    row.bound = Some(FROZEN_NODE_RECOVERY);
    with_traffic(config, row, cluster(), spec(config), Latency::MayRise, async |fleet, traffic, row| {
        let leader = fleet.nats_leader(subjects::EVENTS_STREAM).await?;
        let pid = fleet.nats.node_pid(leader).context("the leader is not running")?;
        row.details.push(format!("paused=n{leader}"));
        let at = traffic.inject();
        let paused = Paused::pause(pid.as_raw())?;
        acks_resume(traffic, at, FROZEN_NODE_RECOVERY, row).await;
        tokio::time::sleep(pause.saturating_sub(at.elapsed())).await;
        drop(paused);
        fleet.nats_healthy(leader, REJOIN).await?;
        Ok(())
    })
    .await
}

pub async fn nats_rolling_restart(config: &Config) -> Result<Row> {
    let mut row = Row::new("nats-rolling-restart", "restart the three NATS nodes one after another (SIGTERM)");
    row.bound = Some(NODE_LOSS_RECOVERY);
    with_traffic(config, row, cluster(), spec(config), Latency::MayRise, async |fleet, traffic, row| {
        let at = traffic.inject();
        for node in 0..fleet.nats.nodes() {
            let started = Instant::now();
            fleet.nats.terminate_node(node, Duration::from_secs(10));
            rejoin(fleet, node).await?;
            row.details.push(format!("n{node}_back_s={:.1}", started.elapsed().as_secs_f64()));
            // Its streams catch up before the next node goes.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        acks_resume(traffic, at, NODE_LOSS_RECOVERY, row).await;
        Ok(())
    })
    .await
}

pub async fn nats_partition(config: &Config) -> Result<Row> {
    let cut = pick(config, Duration::from_secs(12), Duration::from_secs(30));
    let mut row = Row::new(
        "nats-partition",
        format!("cut the NATS node leading the events stream off from the other two for {}s", cut.as_secs()),
    );
    row.bound = Some(PARTITION_RECOVERY);
    with_traffic(config, row, cluster(), spec(config), Latency::MayRise, async |fleet, traffic, row| {
        let leader = fleet.nats_leader(subjects::EVENTS_STREAM).await?;
        row.details.push(format!("cut_off=n{leader}"));
        let at = traffic.inject();
        fleet.nats.set_cut_off(leader, true);
        acks_resume(traffic, at, PARTITION_RECOVERY, row).await;
        tokio::time::sleep(cut.saturating_sub(at.elapsed())).await;
        let now = fleet.nats_leader_seen_by(subjects::EVENTS_STREAM, (leader + 1) % fleet.nats.nodes()).await?;
        row.details.push(format!("events_leader_during=n{now}"));
        fleet.nats.set_cut_off(leader, false);
        let healed = Instant::now();
        fleet.nats_healthy(leader, REJOIN).await?;
        row.details.push(format!("rejoined_after_s={:.1}", healed.elapsed().as_secs_f64()));
        Ok(())
    })
    .await
}
