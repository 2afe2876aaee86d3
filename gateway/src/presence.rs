//! The gateway's presence reporter: counts this gateway's sessions per user, tells the user's presence owner (a
//! router shard) when a user's first local session opens or last one closes, and sends every owner a snapshot of
//! this gateway's users every few seconds, so owners rebuild after failover and expire gateways that died.
//!
//! It does not decide who is online fleet-wide; router shards do.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use switchyard_protocol::internal::{PresenceResync, PresenceSnapshot, UserCommand, UserRequest, INTERNAL_VERSION};
use switchyard_protocol::shard::shard_of_user;
use switchyard_protocol::{codec, subjects, ProjectId, ShardId, UserId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How often snapshots are sent; owners expire a gateway after three missed ones.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_secs(5);
/// How soon a shard whose owner missed a change gets a snapshot.
const RETRY_INTERVAL: Duration = Duration::from_millis(250);

/// A session opened (`true`) or closed (`false`).
pub struct SessionChange {
    pub tenant: ProjectId,
    pub user: UserId,
    pub opened: bool,
}

/// The reporter's handle; sessions send it their opens and closes.
#[derive(Clone)]
pub struct PresenceReporter {
    changes: mpsc::Sender<SessionChange>,
}

impl PresenceReporter {
    /// Start the reporter task.
    pub fn start(nats: async_nats::Client, gateway: String, shard_count: u16, shutdown: CancellationToken) -> Self {
        let (changes, receiver) = mpsc::channel(4096);
        tokio::spawn(run(nats, gateway, shard_count, receiver, shutdown));
        PresenceReporter { changes }
    }

    pub async fn opened(&self, tenant: &ProjectId, user: &UserId) {
        let change = SessionChange { tenant: tenant.clone(), user: user.clone(), opened: true };
        let _ = self.changes.send(change).await;
    }

    pub async fn closed(&self, tenant: &ProjectId, user: &UserId) {
        let change = SessionChange { tenant: tenant.clone(), user: user.clone(), opened: false };
        let _ = self.changes.send(change).await;
    }
}

async fn run(
    nats: async_nats::Client,
    gateway: String,
    shard_count: u16,
    mut changes: mpsc::Receiver<SessionChange>,
    shutdown: CancellationToken,
) {
    // Local sessions per user.
    let mut sessions: HashMap<(ProjectId, UserId), u32> = HashMap::new();
    let mut snapshots = tokio::time::interval(SNAPSHOT_INTERVAL);
    // Shards whose owner did not acknowledge a change: they get a snapshot soon, which carries the whole truth.
    let (unacknowledged_tx, mut unacknowledged) = mpsc::channel::<ShardId>(1024);
    let mut retry = tokio::time::interval(RETRY_INTERVAL);
    let mut to_resend: BTreeSet<ShardId> = BTreeSet::new();
    let mut resyncs = match nats.subscribe(subjects::PRESENCE_RESYNC).await {
        Ok(subscription) => Some(subscription),
        Err(error) => {
            tracing::warn!(%error, "cannot subscribe to presence resync requests; relying on periodic snapshots");
            None
        }
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            change = changes.recv() => {
                let Some(change) = change else { break };
                let key = (change.tenant, change.user);
                let count = sessions.entry(key.clone()).or_default();
                let announce = if change.opened {
                    *count += 1;
                    *count == 1
                } else {
                    *count = count.saturating_sub(1);
                    *count == 0
                };
                if *count == 0 {
                    sessions.remove(&key);
                }
                if announce {
                    let shard = shard_of_user(&key.0, &key.1, shard_count);
                    let request = UserRequest {
                        v: INTERNAL_VERSION,
                        tenant: key.0,
                        user: key.1,
                        command: UserCommand::SessionsChanged { gateway: gateway.clone(), online: change.opened },
                    };
                    if let Ok(payload) = codec::encode(&request) {
                        let (nats, unacknowledged_tx) = (nats.clone(), unacknowledged_tx.clone());
                        tokio::spawn(async move {
                            let asked = tokio::time::timeout(RETRY_INTERVAL * 4, nats.request(subjects::user_command(shard), payload));
                            if !matches!(asked.await, Ok(Ok(_))) {
                                let _ = unacknowledged_tx.send(shard).await;
                            }
                        });
                    }
                }
            }
            Some(shard) = unacknowledged.recv() => {
                to_resend.insert(shard);
            }
            Some(message) = next_resync(&mut resyncs) => {
                if let Ok(resync) = codec::decode::<PresenceResync>(&message.payload) {
                    to_resend.insert(resync.shard);
                }
            }
            _ = retry.tick(), if !to_resend.is_empty() => {
                let shards = std::mem::take(&mut to_resend);
                send_snapshots(&nats, &gateway, shard_count, &sessions, Some(&shards)).await;
            }
            _ = snapshots.tick() => {
                send_snapshots(&nats, &gateway, shard_count, &sessions, None).await;
            }
        }
    }
}

async fn next_resync(resyncs: &mut Option<async_nats::Subscriber>) -> Option<async_nats::Message> {
    match resyncs {
        Some(subscription) => futures::StreamExt::next(subscription).await,
        None => std::future::pending().await,
    }
}

/// Send snapshots of this gateway's users: to every shard that has some, and to each of `also` even when empty.
async fn send_snapshots(
    nats: &async_nats::Client,
    gateway: &str,
    shard_count: u16,
    sessions: &HashMap<(ProjectId, UserId), u32>,
    only: Option<&BTreeSet<ShardId>>,
) {
    let mut by_shard: BTreeMap<ShardId, Vec<(ProjectId, UserId)>> = BTreeMap::new();
    if let Some(shards) = only {
        for shard in shards {
            by_shard.insert(*shard, Vec::new());
        }
    }
    for (tenant, user) in sessions.keys() {
        let shard = shard_of_user(tenant, user, shard_count);
        if only.is_none_or(|shards| shards.contains(&shard)) {
            by_shard.entry(shard).or_default().push((tenant.clone(), user.clone()));
        }
    }
    for (shard, users) in by_shard {
        let snapshot = PresenceSnapshot { v: INTERNAL_VERSION, gateway: gateway.to_owned(), users };
        if let Ok(payload) = codec::encode(&snapshot) {
            let _ = nats.publish(subjects::presence_snapshot(shard), payload).await;
        }
    }
}
