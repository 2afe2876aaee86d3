//! Abuse limits beyond a single op: the per-tenant fleet-wide message rate (a token bucket in Redis, updated
//! atomically by a Lua script on Redis's clock, shared by every gateway), and the per-connection abuse counter that
//! closes a socket with 4008 when it keeps running into its rate limit.
//!
//! The fleet-wide rate fails OPEN: when Redis is down or slow, messages are not counted (and a metric says so). Only
//! this check and the socket quotas (`sockets`) fail open; authentication never does. The per-connection token bucket itself lives in
//! the session.

use crate::Gateway;
use fred::prelude::*;
use fred::types::scripts::Script;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_protocol::client::{ClientOp, ServerFrame};
use switchyard_protocol::{ErrorCode, ProjectId};

/// How long a rate check may wait for Redis before the message is let through.
const RATE_CHECK_TIMEOUT: Duration = Duration::from_millis(100);

/// A token bucket per key: ARGV rate (tokens/s) and burst. Returns {allowed (1/0), retry_after_ms}.
const TAKE: &str = r#"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate / 1000)
end
local allowed = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(math.max(now, at)))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
"#;

/// After a rate check failed, checks are skipped (messages let through) this long, while one probe at a time asks
/// Redis whether it is back: a Redis outage costs one check's timeout, not one per message.
const SKIP_AFTER_FAILURE: Duration = Duration::from_secs(2);

/// The fleet-wide per-tenant message rate.
#[derive(Clone)]
pub struct TenantRateLimiter {
    redis: fred::clients::Client,
    take: Arc<Script>,
    /// Checks are skipped until then (set when one failed); `None` while Redis answers.
    skip_until: Arc<std::sync::Mutex<Option<Instant>>>,
    /// A probe of Redis is running.
    probing: Arc<std::sync::atomic::AtomicBool>,
}

impl TenantRateLimiter {
    pub fn new(redis: fred::clients::Client) -> Self {
        TenantRateLimiter {
            redis,
            take: Arc::new(Script::from_lua(TAKE)),
            skip_until: Arc::default(),
            probing: Arc::default(),
        }
    }

    /// Whether checks are being skipped after a failure; starts a probe when none runs.
    fn skipping(&self) -> bool {
        let skip_until = self.skip_until.lock().unwrap_or_else(|p| p.into_inner());
        match *skip_until {
            Some(until) if Instant::now() < until => {}
            _ => return false,
        }
        drop(skip_until);
        if !self.probing.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let limiter = self.clone();
            tokio::spawn(async move {
                let answered = tokio::time::timeout(RATE_CHECK_TIMEOUT, limiter.redis.ping::<String>(None)).await;
                let mut skip_until = limiter.skip_until.lock().unwrap_or_else(|p| p.into_inner());
                *skip_until = match answered {
                    Ok(Ok(_)) => None,
                    _ => Some(Instant::now() + SKIP_AFTER_FAILURE),
                };
                drop(skip_until);
                limiter.probing.store(false, std::sync::atomic::Ordering::Release);
            });
        }
        true
    }

    fn failed(&self) {
        tracing::warn!(
            skip_ms = SKIP_AFTER_FAILURE.as_millis() as u64,
            "tenant rate check failed; letting messages through unchecked until Redis answers"
        );
        *self.skip_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + SKIP_AFTER_FAILURE);
    }

    /// Take one message from the tenant's bucket: `Err(retry_after)` when the tenant is over its rate. Fails open.
    pub async fn take(&self, tenant: &ProjectId, per_sec: u32, burst: u32) -> Result<(), Duration> {
        if !self.redis.is_connected() || self.skipping() {
            metrics::counter!("switchyard_gateway_tenant_rate_unchecked_total").increment(1);
            return Ok(());
        }
        let call = self.take.evalsha_with_reload::<Vec<i64>, _, _>(
            &self.redis,
            vec![switchyard_protocol::redis_keys::tenant_rate(tenant)],
            vec![per_sec.to_string(), burst.max(1).to_string()],
        );
        match tokio::time::timeout(RATE_CHECK_TIMEOUT, call).await {
            Ok(Ok(result)) if result.first() == Some(&0) => {
                let wait = result.get(1).copied().unwrap_or(1).max(1) as u64;
                Err(Duration::from_millis(wait))
            }
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) | Err(_) => {
                self.failed();
                metrics::counter!("switchyard_gateway_tenant_rate_unchecked_total").increment(1);
                Ok(())
            }
        }
    }
}

/// Does this op create a room event that counts toward the tenant's message rate?
pub fn counts_as_message(op: &ClientOp) -> bool {
    matches!(
        op,
        ClientOp::Send { .. }
            | ClientOp::Dm { .. }
            | ClientOp::Edit { .. }
            | ClientOp::Delete { .. }
            | ClientOp::React { .. }
            | ClientOp::Pin { .. }
            | ClientOp::Unpin { .. }
    )
}

/// The tenant's message rate and burst: its own limits (burst defaulting to twice its rate), else the gateway's
/// defaults. `None`: unlimited (a rate of 0).
fn tenant_rate(gw: &Gateway, tenant: &ProjectId) -> Option<(u32, u32)> {
    let own = gw.tenants.cached(tenant).map(|e| e.record.limits.clone());
    let (per_sec, burst) = match own.as_ref().and_then(|l| l.msgs_per_sec) {
        Some(per_sec) => (per_sec, own.as_ref().and_then(|l| l.msgs_burst).unwrap_or(per_sec.saturating_mul(2))),
        None => (gw.config.tenant_msgs_per_sec, gw.config.tenant_msgs_burst),
    };
    (per_sec > 0).then_some((per_sec, burst.max(1)))
}

/// Users one session of the tenant may watch: its own quota, else the gateway's default.
pub fn max_watched(gw: &Gateway, tenant: &ProjectId) -> usize {
    gw.tenants
        .cached(tenant)
        .and_then(|entry| entry.record.limits.max_watched_per_session)
        .unwrap_or(gw.config.max_watched_per_session) as usize
}

/// Check one message against the tenant's fleet-wide rate: `Err(retry_after)` when over it.
pub async fn take_tenant_message(gw: &Gateway, tenant: &ProjectId) -> Result<(), Duration> {
    match tenant_rate(gw, tenant) {
        None => Ok(()),
        Some((per_sec, burst)) => {
            let result = gw.tenant_rate.take(tenant, per_sec, burst).await;
            if result.is_err() {
                metrics::counter!("switchyard_gateway_tenant_rate_limited_total").increment(1);
            }
            result
        }
    }
}

/// The `rate_limited` answer to an op that would exceed the tenant's fleet-wide message rate, if it would.
pub async fn tenant_rate_refusal(
    gw: &Gateway,
    tenant: &ProjectId,
    rid: Option<u64>,
    op: &ClientOp,
) -> Option<ServerFrame> {
    if !counts_as_message(op) {
        return None;
    }
    let wait = take_tenant_message(gw, tenant).await.err()?;
    Some(ServerFrame::Err {
        rid,
        code: ErrorCode::RateLimited,
        message: "the project's message rate is exceeded".into(),
        retry_after_ms: Some(wait.as_millis() as u64 + 1),
    })
}

/// Counts a connection's rate-limited ops that ignored the `retry_after_ms` it was given, in a sliding window; too
/// many means abuse (close 4008). A client that waits as told is never counted, however often it meets the limit.
pub struct AbuseCounter {
    hits: VecDeque<Instant>,
    limit: usize,
    window: Duration,
    /// The earliest time the last `rate_limited` answer said to retry at.
    retry_not_before: Option<Instant>,
}

impl AbuseCounter {
    pub fn new(limit: u32, window: Duration) -> Self {
        AbuseCounter { hits: VecDeque::new(), limit: limit.max(1) as usize, window, retry_not_before: None }
    }

    /// Record one rate-limited op, answered with `retry_after`; true when the connection has now ignored its
    /// retry times more than the limit within the window.
    pub fn record(&mut self, retry_after: Duration) -> bool {
        let now = Instant::now();
        let ignored = self.retry_not_before.is_some_and(|at| now < at);
        self.retry_not_before = Some(now + retry_after);
        if !ignored {
            return false;
        }
        while self.hits.front().is_some_and(|at| now.duration_since(*at) > self.window) {
            self.hits.pop_front();
        }
        self.hits.push_back(now);
        self.hits.len() > self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abuse_is_ignoring_retry_after_too_often() {
        let wait = Duration::from_secs(60);
        let mut counter = AbuseCounter::new(3, Duration::from_secs(60));
        // The first refusal is no abuse; each retry before the announced time is.
        assert!(!counter.record(wait));
        assert!(!counter.record(wait));
        assert!(!counter.record(wait));
        assert!(!counter.record(wait));
        assert!(counter.record(wait));

        // A client that waits as told is never counted.
        let mut patient = AbuseCounter::new(1, Duration::from_secs(60));
        for _ in 0..5 {
            assert!(!patient.record(Duration::from_millis(1)));
            std::thread::sleep(Duration::from_millis(3));
        }
    }
}
