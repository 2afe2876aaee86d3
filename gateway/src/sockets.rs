//! Fleet-wide socket quotas: live sockets per tenant and per user, counted across every gateway in Redis.
//!
//! Each gateway is the only writer of its own counts. It keeps the truth in memory (its live sockets per tenant and
//! per user) and copies the counts that changed into Redis, one hash per tenant and per user with a field per
//! gateway, from a single task; a write that fails is written again, so no lost increment or decrement makes a
//! count drift. A gateway holds a lease in the `sy:gateways` sorted set that it renews every few seconds; the
//! fields of a gateway whose lease ran out (it was killed, or cut off from Redis) no longer count and are deleted
//! by the next check that meets them. Hashes expire unless rewritten, and each gateway rewrites all of its counts
//! well before that.
//!
//! A new socket is admitted when the other gateways' live counts plus this gateway's own (the new socket included)
//! stay within the quota. Sockets opening at the same moment on different gateways can pass a quota by a few.
//! When Redis does not answer, sockets are admitted unchecked (fail open, as the tenant message rate does) and
//! counted once Redis is back. This module does not authenticate and does not close sockets when a quota is
//! lowered: the quotas apply to new sockets.

use crate::Gateway;
use fred::prelude::*;
use fred::types::scripts::Script;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_protocol::{redis_keys, ProjectId, UserId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long a gateway's counts stay valid without a renewal of its lease.
const LEASE: Duration = Duration::from_secs(15);
/// How often the lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How long a count hash lives without being rewritten.
const COUNT_TTL: Duration = Duration::from_secs(3600);
/// How often a gateway rewrites all of its counts, so none expires while its sockets are open.
const REWRITE_ALL_EVERY: Duration = Duration::from_secs(1200);
/// How long an admission waits for Redis before the socket is admitted unchecked.
const CHECK_TIMEOUT: Duration = Duration::from_millis(200);
/// Counts written by one script call.
const WRITE_BATCH: usize = 256;
/// How long the last write at shutdown may take.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Would one more socket fit? KEYS: the gateways set, the tenant's hash, the user's hash. ARGV: this gateway's id,
/// its tenant and user counts with the new socket, the tenant and user quotas (-1: none). Returns 0 (fits), 1 (the
/// tenant is at its quota) or 2 (the user is). Deletes the fields of gateways whose lease ran out.
const ADMIT: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function others(key)
  local total = 0
  local fields = redis.call('HGETALL', key)
  for i = 1, #fields, 2 do
    if fields[i] ~= ARGV[1] then
      local lease = redis.call('ZSCORE', KEYS[1], fields[i])
      if lease and tonumber(lease) > now then
        total = total + tonumber(fields[i + 1])
      else
        redis.call('HDEL', key, fields[i])
      end
    end
  end
  return total
end
local tenant_max = tonumber(ARGV[4])
local user_max = tonumber(ARGV[5])
local tenant = others(KEYS[2]) + tonumber(ARGV[2])
local user = others(KEYS[3]) + tonumber(ARGV[3])
if tenant_max >= 0 and tenant > tenant_max then return 1 end
if user_max >= 0 and user > user_max then return 2 end
return 0
"#;

/// Write this gateway's counts. KEYS: the hashes. ARGV: the gateway's id, the hashes' ttl (ms), then one count per
/// key (0 deletes the gateway's field).
const WRITE: &str = r#"
for i, key in ipairs(KEYS) do
  local count = tonumber(ARGV[i + 2])
  if count > 0 then
    redis.call('HSET', key, ARGV[1], count)
    redis.call('PEXPIRE', key, ARGV[2])
  else
    redis.call('HDEL', key, ARGV[1])
  end
end
return #KEYS
"#;

/// Renew this gateway's lease. KEYS: the gateways set. ARGV: the gateway's id, the lease (ms). Returns 1 when the
/// lease had run out (or never existed): the gateway's counts may have been deleted and must be written again.
/// Leases that ended an hour ago are dropped.
const RENEW: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local previous = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 3600000)
if previous and tonumber(previous) > now then return 0 end
return 1
"#;

/// A count of one tenant or one user, as it is keyed in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Counted {
    Tenant(ProjectId),
    User(ProjectId, UserId),
}

impl Counted {
    fn key(&self) -> String {
        match self {
            Counted::Tenant(tenant) => redis_keys::tenant_sockets(tenant),
            Counted::User(tenant, user) => redis_keys::user_sockets(tenant, user),
        }
    }
}

/// This gateway's live sockets, the truth its Redis counts are copied from.
#[derive(Default)]
struct Local {
    counts: HashMap<Counted, u32>,
    /// Counts changed since they were last written to Redis.
    dirty: HashSet<Counted>,
}

impl Local {
    fn change(&mut self, counted: Counted, up: bool) -> u32 {
        let count = self.counts.entry(counted.clone()).or_default();
        *count = if up { count.saturating_add(1) } else { count.saturating_sub(1) };
        let now = *count;
        if now == 0 {
            self.counts.remove(&counted);
        }
        self.dirty.insert(counted);
        now
    }
}

/// The quotas a new socket is checked against; `None`: unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketLimits {
    pub per_tenant: Option<u32>,
    pub per_user: Option<u32>,
}

/// Why a socket was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverQuota {
    Tenant,
    User,
}

impl OverQuota {
    pub fn reason(self) -> &'static str {
        match self {
            OverQuota::Tenant => "the project's connection limit is reached",
            OverQuota::User => "the user's connection limit is reached",
        }
    }
}

/// The fleet-wide socket counts of this gateway.
pub struct SocketQuota {
    redis: fred::clients::Client,
    /// This gateway's field in every count hash, and its member in the gateways set.
    gateway_id: Arc<str>,
    admit: Script,
    write: Script,
    renew: Script,
    local: Mutex<Local>,
    /// Wakes the writer when a count changed.
    changed: Notify,
}

/// A socket counted against its tenant's and user's quotas; uncounted when dropped.
pub struct SocketSlot {
    quota: Arc<SocketQuota>,
    tenant: ProjectId,
    user: UserId,
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        let mut local = self.quota.lock();
        local.change(Counted::Tenant(self.tenant.clone()), false);
        local.change(Counted::User(self.tenant.clone(), self.user.clone()), false);
        drop(local);
        self.quota.changed.notify_one();
    }
}

impl SocketQuota {
    pub fn new(redis: fred::clients::Client, gateway_id: &str) -> Arc<Self> {
        Arc::new(SocketQuota {
            redis,
            gateway_id: gateway_id.into(),
            admit: Script::from_lua(ADMIT),
            write: Script::from_lua(WRITE),
            renew: Script::from_lua(RENEW),
            local: Mutex::default(),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Count a new socket of `user`, unless it would pass one of `limits` across the fleet.
    pub async fn admit(
        self: &Arc<Self>,
        tenant: &ProjectId,
        user: &UserId,
        limits: SocketLimits,
    ) -> Result<SocketSlot, OverQuota> {
        // Counted here first, so sockets opening at once on this gateway each see the others.
        let (tenant_count, user_count) = {
            let mut local = self.lock();
            (
                local.change(Counted::Tenant(tenant.clone()), true),
                local.change(Counted::User(tenant.clone(), user.clone()), true),
            )
        };
        let slot = SocketSlot { quota: self.clone(), tenant: tenant.clone(), user: user.clone() };
        if limits.per_tenant.is_none() && limits.per_user.is_none() {
            self.changed.notify_one();
            return Ok(slot);
        }
        let limit = |max: Option<u32>| max.map_or(-1, i64::from).to_string();
        let call = self.admit.evalsha_with_reload::<i64, _, _>(
            &self.redis,
            vec![
                redis_keys::GATEWAYS.to_owned(),
                redis_keys::tenant_sockets(tenant),
                redis_keys::user_sockets(tenant, user),
            ],
            vec![
                self.gateway_id.to_string(),
                tenant_count.to_string(),
                user_count.to_string(),
                limit(limits.per_tenant),
                limit(limits.per_user),
            ],
        );
        let verdict = if self.redis.is_connected() {
            tokio::time::timeout(CHECK_TIMEOUT, call).await
        } else {
            Ok(Err(fred::error::Error::new(fred::error::ErrorKind::IO, "not connected")))
        };
        match verdict {
            Ok(Ok(0)) => {}
            Ok(Ok(over)) => {
                metrics::counter!("switchyard_gateway_socket_quota_refused_total").increment(1);
                // Dropping the slot uncounts the socket.
                return Err(if over == 1 { OverQuota::Tenant } else { OverQuota::User });
            }
            Ok(Err(error)) => {
                tracing::warn!(error = %error, "socket quota not checked: Redis failed");
                metrics::counter!("switchyard_gateway_socket_quota_unchecked_total").increment(1);
            }
            Err(_) => {
                tracing::warn!("socket quota not checked: Redis did not answer in time");
                metrics::counter!("switchyard_gateway_socket_quota_unchecked_total").increment(1);
            }
        }
        self.changed.notify_one();
        Ok(slot)
    }

    /// Copy the changed counts (or all of them) to Redis. On failure they stay marked for the next attempt.
    async fn write_counts(&self, all: bool) -> Result<(), fred::error::Error> {
        let batch: Vec<(Counted, u32)> = {
            let mut local = self.lock();
            let mut chosen: HashSet<Counted> = local.dirty.drain().collect();
            if all {
                chosen.extend(local.counts.keys().cloned());
            }
            chosen
                .into_iter()
                .map(|counted| (counted.clone(), local.counts.get(&counted).copied().unwrap_or(0)))
                .collect()
        };
        for (at, chunk) in batch.chunks(WRITE_BATCH).enumerate() {
            let keys: Vec<String> = chunk.iter().map(|(counted, _)| counted.key()).collect();
            let mut args = vec![self.gateway_id.to_string(), COUNT_TTL.as_millis().to_string()];
            args.extend(chunk.iter().map(|(_, count)| count.to_string()));
            if let Err(error) = self.write.evalsha_with_reload::<i64, _, _>(&self.redis, keys, args).await {
                // Written again on the next attempt, with the counts of then.
                let mut local = self.lock();
                local.dirty.extend(batch[at * WRITE_BATCH..].iter().map(|(counted, _)| counted.clone()));
                return Err(error);
            }
        }
        Ok(())
    }

    /// Renew the lease; `true` when it had run out, so every count must be written again.
    async fn renew_lease(&self) -> Result<bool, fred::error::Error> {
        let lapsed: i64 = self
            .renew
            .evalsha_with_reload(
                &self.redis,
                vec![redis_keys::GATEWAYS.to_owned()],
                vec![self.gateway_id.to_string(), LEASE.as_millis().to_string()],
            )
            .await?;
        Ok(lapsed == 1)
    }

    /// Write counts as they change and renew the lease until `stopped`; then write the last counts (none, once
    /// every session closed) and give the lease up.
    pub fn spawn_writer(self: &Arc<Self>, stopped: CancellationToken) -> tokio::task::JoinHandle<()> {
        let quota = self.clone();
        tokio::spawn(async move {
            let mut renew = tokio::time::interval(RENEW_EVERY);
            renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut rewrite_all = tokio::time::interval(REWRITE_ALL_EVERY);
            rewrite_all.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            rewrite_all.tick().await;
            let mut failing = false;
            loop {
                let all = tokio::select! {
                    _ = stopped.cancelled() => break,
                    _ = quota.changed.notified() => false,
                    _ = rewrite_all.tick() => true,
                    _ = renew.tick() => match quota.renew_lease().await {
                        Ok(lapsed) => lapsed,
                        Err(error) => {
                            if !failing {
                                tracing::warn!(%error, "cannot renew the socket-count lease in Redis");
                            }
                            failing = true;
                            continue;
                        }
                    },
                };
                match quota.write_counts(all).await {
                    Ok(()) => failing = false,
                    Err(error) => {
                        if !failing {
                            tracing::warn!(%error, "cannot write socket counts to Redis; retrying");
                        }
                        failing = true;
                        // Retried with the next renewal, not in a tight loop.
                        tokio::select! {
                            _ = stopped.cancelled() => break,
                            _ = renew.tick() => {}
                        }
                        quota.changed.notify_one();
                    }
                }
            }
            let last = async {
                let _ = quota.write_counts(false).await;
                let _: Result<i64, _> = quota.redis.zrem(redis_keys::GATEWAYS, quota.gateway_id.to_string()).await;
            };
            let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, last).await;
        })
    }
}

/// The socket quotas of a tenant: its own limits, else the gateway's defaults.
pub fn limits(gw: &Gateway, tenant: &ProjectId) -> SocketLimits {
    let own = gw.tenants.cached(tenant).map(|entry| entry.record.limits.clone());
    SocketLimits {
        per_tenant: own.as_ref().and_then(|l| l.max_connections).or(gw.config.max_connections_per_tenant),
        per_user: own.as_ref().and_then(|l| l.max_connections_per_user).or(gw.config.max_connections_per_user),
    }
}

/// Count a socket of an authenticated user against the fleet-wide quotas of its tenant and user.
pub async fn admit(gw: &Gateway, tenant: &ProjectId, user: &UserId) -> Result<SocketSlot, OverQuota> {
    gw.sockets.admit(tenant, user, limits(gw, tenant)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_counts_go_up_and_down_and_mark_what_changed() {
        let tenant = ProjectId::parse("pj_00000000000000000000").unwrap();
        let user = UserId::parse("u").unwrap();
        let mut local = Local::default();
        assert_eq!(local.change(Counted::User(tenant.clone(), user.clone()), true), 1);
        assert_eq!(local.change(Counted::User(tenant.clone(), user.clone()), true), 2);
        assert_eq!(local.change(Counted::User(tenant.clone(), user.clone()), false), 1);
        assert_eq!(local.change(Counted::User(tenant.clone(), user.clone()), false), 0);
        assert!(local.counts.is_empty(), "a count of zero is dropped");
        assert!(local.dirty.contains(&Counted::User(tenant.clone(), user)), "a dropped count is still written");
        assert_eq!(local.change(Counted::Tenant(tenant), false), 0, "never below zero");
    }
}
