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
use std::sync::atomic::{AtomicBool, Ordering};
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
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_millis(400);

/// Would one more socket fit? KEYS: the gateways set, the tenant's hash, the user's hash. ARGV: this gateway's id,
/// its tenant and user counts with the new socket, the tenant and user quotas (-1: none). Returns 0 (fits), 1 (the
/// tenant is at its quota) or 2 (the user is). Deletes the fields of gateways whose lease ran out from the hashes it
/// reads (only those with a quota).
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
if tenant_max >= 0 and others(KEYS[2]) + tonumber(ARGV[2]) > tenant_max then return 1 end
if user_max >= 0 and others(KEYS[3]) + tonumber(ARGV[3]) > user_max then return 2 end
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

/// Most counts waiting to be written while Redis does not answer. Past it a count that fell to zero is not
/// remembered: its stale field in Redis expires with its hash (`COUNT_TTL`) instead.
const MAX_DIRTY: usize = 200_000;

/// This gateway's live sockets, the truth its Redis counts are copied from.
#[derive(Default)]
struct Local {
    /// Admitted sockets.
    counts: HashMap<Counted, u32>,
    /// Sockets whose admission is being checked: this gateway's own checks count them, Redis never sees them.
    pending: HashMap<Counted, u32>,
    /// Counts changed since they were last written to Redis.
    dirty: HashSet<Counted>,
}

fn step(map: &mut HashMap<Counted, u32>, counted: &Counted, up: bool) -> u32 {
    let count = map.entry(counted.clone()).or_default();
    *count = if up { count.saturating_add(1) } else { count.saturating_sub(1) };
    let now = *count;
    if now == 0 {
        map.remove(counted);
    }
    now
}

impl Local {
    /// One admitted socket more or less; the new count.
    fn change(&mut self, counted: Counted, up: bool) -> u32 {
        let now = step(&mut self.counts, &counted, up);
        if now > 0 || self.dirty.len() < MAX_DIRTY {
            self.dirty.insert(counted);
        }
        now
    }

    /// One socket more or less being checked; the admitted and pending count together.
    fn reserve(&mut self, counted: &Counted, up: bool) -> u32 {
        let pending = step(&mut self.pending, counted, up);
        pending.saturating_add(self.counts.get(counted).copied().unwrap_or(0))
    }
}

/// A socket being checked against its quotas; its reservation is given back when dropped (checked, refused, or
/// the upgrade abandoned half-way).
struct Reservation<'a> {
    quota: &'a SocketQuota,
    tenant: Counted,
    user: Counted,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut local = self.quota.lock();
        local.reserve(&self.tenant, false);
        local.reserve(&self.user, false);
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
    /// Admissions are going unchecked (Redis failed); warned once until a check succeeds.
    unchecked: AtomicBool,
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
            unchecked: AtomicBool::new(false),
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
        let reservation = Reservation {
            quota: self,
            tenant: Counted::Tenant(tenant.clone()),
            user: Counted::User(tenant.clone(), user.clone()),
        };
        // Reserved here first, so sockets being checked at once on this gateway each see the others; only admitted
        // ones reach Redis, so a user retrying past a quota never inflates the counts other gateways see.
        let (tenant_count, user_count) = {
            let mut local = self.lock();
            (local.reserve(&reservation.tenant, true), local.reserve(&reservation.user, true))
        };
        if limits.per_tenant.is_some() || limits.per_user.is_some() {
            self.check(tenant, user, tenant_count, user_count, limits).await?;
        }
        {
            let mut local = self.lock();
            local.change(reservation.tenant.clone(), true);
            local.change(reservation.user.clone(), true);
        }
        drop(reservation);
        self.changed.notify_one();
        Ok(SocketSlot { quota: self.clone(), tenant: tenant.clone(), user: user.clone() })
    }

    /// Ask Redis whether the socket fits; fails open when Redis does not answer.
    async fn check(
        &self,
        tenant: &ProjectId,
        user: &UserId,
        tenant_count: u32,
        user_count: u32,
        limits: SocketLimits,
    ) -> Result<(), OverQuota> {
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
        let failure = match verdict {
            Ok(Ok(0)) => None,
            Ok(Ok(over)) => {
                metrics::counter!("switchyard_gateway_socket_quota_refused_total").increment(1);
                return Err(if over == 1 { OverQuota::Tenant } else { OverQuota::User });
            }
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some("Redis did not answer in time".to_owned()),
        };
        match failure {
            Some(error) => {
                metrics::counter!("switchyard_gateway_socket_quota_unchecked_total").increment(1);
                // Once per outage, not once per socket.
                if !self.unchecked.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "socket quotas not checked until Redis answers");
                }
            }
            None => self.unchecked.store(false, Ordering::Relaxed),
        }
        Ok(())
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
            // A renewal failed (or its answer was lost): the lease may have lapsed unheard, so the next renewal
            // that succeeds rewrites every count.
            let mut unsure = false;
            loop {
                let all = tokio::select! {
                    _ = stopped.cancelled() => break,
                    // While Redis fails, changes wait for the next renewal instead of retrying at once.
                    _ = quota.changed.notified(), if !failing => false,
                    _ = rewrite_all.tick() => true,
                    _ = renew.tick() => match quota.renew_lease().await {
                        Ok(lapsed) => std::mem::take(&mut unsure) || lapsed,
                        Err(error) => {
                            if !failing {
                                tracing::warn!(%error, "cannot renew the socket-count lease in Redis");
                            }
                            (failing, unsure) = (true, true);
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
                    }
                }
            }
            // The lease first: one call, so other gateways stop counting this one even if the last write is cut.
            let last = async {
                let _: Result<i64, _> = quota.redis.zrem(redis_keys::GATEWAYS, quota.gateway_id.to_string()).await;
                let _ = quota.write_counts(false).await;
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
        assert_eq!(local.change(Counted::Tenant(tenant.clone()), false), 0, "never below zero");
    }

    #[test]
    fn a_socket_being_checked_counts_here_but_is_never_written() {
        let tenant = Counted::Tenant(ProjectId::parse("pj_00000000000000000000").unwrap());
        let mut local = Local::default();
        local.change(tenant.clone(), true);
        local.dirty.clear();
        assert_eq!(local.reserve(&tenant, true), 2, "one admitted and one being checked");
        assert_eq!(local.reserve(&tenant, true), 3);
        assert!(local.dirty.is_empty(), "a reservation is not written to Redis");
        assert_eq!(local.counts.get(&tenant), Some(&1));
        local.reserve(&tenant, false);
        local.reserve(&tenant, false);
        assert!(local.pending.is_empty());
    }
}
