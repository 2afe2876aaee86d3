//! Shard ownership: this router shard's leases in the leases KV bucket. Every tick it announces itself, renews the
//! leases it holds (compare-and-set on the revision), gives up shards beyond its fair share, and claims free shards
//! up to that share, starting or stopping a shard worker for each change.
//!
//! A lease that is not renewed expires with the bucket's `max_age`, so a dead router shard's shards are claimed by
//! others within one TTL plus one tick. Ownership alone never makes an append safe: the room actor's fence on the
//! stream does that. This module does not serve commands.
//!
//! Metrics: `switchyard_router_owned_shards` (leases held now) and `switchyard_router_shard_handoffs_total` by
//! `direction`: `acquired` (claimed), `released` (given back: fair share or shutdown), `lost` (taken over or
//! expired while this process could not renew).

use crate::context::RouterContext;
use crate::shard::serve_shard;
use async_nats::jetstream::kv;
use futures::TryStreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;
use switchyard_protocol::{subjects, ShardId};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why a lease tick stopped early (it is tried again at the next tick).
#[derive(Debug, thiserror::Error)]
enum LeaseError {
    #[error("announce: {0}")]
    Announce(#[source] kv::PutError),
    #[error("list leases: {0}")]
    List(#[source] kv::HistoryError),
    #[error("list leases: {0}")]
    ListNext(#[source] kv::WatcherError),
}

/// A shard this router shard holds.
struct HeldShard {
    /// The lease entry's revision, for the next compare-and-set.
    revision: u64,
    /// When the lease was last renewed; past the TTL the lease is presumed lost.
    renewed_at: Instant,
    /// Stops the shard's worker.
    stop: CancellationToken,
    worker: JoinHandle<()>,
}

/// The lease keeper's state.
pub(crate) struct LeaseKeeper {
    ctx: Arc<RouterContext>,
    /// Shards held now.
    held: BTreeMap<ShardId, HeldShard>,
}

impl LeaseKeeper {
    pub fn new(ctx: Arc<RouterContext>) -> Self {
        LeaseKeeper { ctx, held: BTreeMap::new() }
    }

    /// Keep leases until `shutdown`, then stop every worker and release every lease so others take over at once.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.ctx.config.lease_tick());
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {
                    if let Err(error) = self.tick().await {
                        tracing::warn!(%error, "lease tick failed");
                    }
                }
            }
        }
        let shards: Vec<ShardId> = self.held.keys().copied().collect();
        for shard in shards {
            self.release(shard).await;
        }
        let _ = self.ctx.leases.delete(subjects::router_alive_key(&self.ctx.config.router_id)).await;
    }

    async fn tick(&mut self) -> Result<(), LeaseError> {
        let me = self.ctx.config.router_id.clone();
        self.ctx.leases.put(subjects::router_alive_key(&me), me.clone().into()).await.map_err(LeaseError::Announce)?;
        self.renew().await;

        let keys: Vec<String> = match self.ctx.leases.keys().await {
            Ok(keys) => keys.try_collect().await.map_err(LeaseError::ListNext)?,
            Err(e) => return Err(LeaseError::List(e)),
        };
        let routers = keys.iter().filter(|k| k.starts_with(subjects::ROUTER_ALIVE_PREFIX)).count().max(1);
        let taken: BTreeSet<String> = keys.into_iter().collect();
        let shard_count = self.ctx.config.shard_count;
        let fair_share = usize::from(shard_count).div_ceil(routers);

        // Give back what exceeds the fair share, highest shards first.
        while self.held.len() > fair_share {
            let Some((&shard, _)) = self.held.iter().next_back() else {
                break;
            };
            self.release(shard).await;
        }
        // Claim free shards, starting at a point that depends on our id so routers do not all race for shard 0.
        let start = fnv(&me) % u64::from(shard_count);
        for offset in 0..u64::from(shard_count) {
            if self.held.len() >= fair_share {
                break;
            }
            let shard = ShardId(((start + offset) % u64::from(shard_count)) as u16);
            if self.held.contains_key(&shard) || taken.contains(&subjects::lease_key(shard)) {
                continue;
            }
            match self.ctx.leases.create(subjects::lease_key(shard), me.clone().into()).await {
                Ok(revision) => self.start(shard, revision),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => tracing::warn!(%shard, error = %e, "cannot claim shard"),
            }
        }
        Ok(())
    }

    async fn renew(&mut self) {
        let ttl = self.ctx.config.lease_ttl();
        let me = self.ctx.config.router_id.clone();
        let mut lost = Vec::new();
        for (shard, held) in self.held.iter_mut() {
            match self.ctx.leases.update(subjects::lease_key(*shard), me.clone().into(), held.revision).await {
                Ok(revision) => {
                    held.revision = revision;
                    held.renewed_at = Instant::now();
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(%shard, "lease taken over by another router shard");
                    lost.push(*shard);
                }
                Err(e) => {
                    tracing::warn!(%shard, error = %e, "cannot renew lease");
                    if held.renewed_at.elapsed() >= ttl {
                        lost.push(*shard);
                    }
                }
            }
        }
        for shard in lost {
            if let Some(held) = self.held.remove(&shard) {
                metrics::counter!("switchyard_router_shard_handoffs_total", "direction" => "lost").increment(1);
                metrics::gauge!("switchyard_router_owned_shards").decrement(1.0);
                stop_worker(shard, held).await;
            }
        }
    }

    fn start(&mut self, shard: ShardId, revision: u64) {
        let stop = CancellationToken::new();
        let worker = tokio::spawn(serve_shard(self.ctx.clone(), shard, stop.clone()));
        self.held.insert(shard, HeldShard { revision, renewed_at: Instant::now(), stop, worker });
        metrics::counter!("switchyard_router_shard_handoffs_total", "direction" => "acquired").increment(1);
        // Counted up and down rather than set, so router shards sharing a process (tests) add up.
        metrics::gauge!("switchyard_router_owned_shards").increment(1.0);
    }

    /// Stop serving `shard`, then delete its lease so another router shard can claim it at once.
    async fn release(&mut self, shard: ShardId) {
        if let Some(held) = self.held.remove(&shard) {
            metrics::counter!("switchyard_router_shard_handoffs_total", "direction" => "released").increment(1);
            metrics::gauge!("switchyard_router_owned_shards").decrement(1.0);
            let revision = held.revision;
            stop_worker(shard, held).await;
            if let Err(error) = self.ctx.leases.delete_expect_revision(subjects::lease_key(shard), Some(revision)).await
            {
                tracing::warn!(%shard, %error, "cannot release lease; it will expire");
            }
        }
    }
}

async fn stop_worker(shard: ShardId, held: HeldShard) {
    held.stop.cancel();
    if let Err(error) = held.worker.await {
        tracing::error!(%shard, %error, "shard worker ended abnormally");
    }
}

fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}
