//! Opaque client tokens (`sytok_...`) in Redis, with their expiry as the key's TTL, and the durable side of
//! revocation: deleting a token, deleting every token of a user, and revocation markers for JWTs (by `jti` or by
//! hash) that live until the token would have expired.
//!
//! Tokens are stored under their SHA-256, never in clear, and each user's token hashes are indexed so they can be
//! revoked together. This module does not decide who may have a token (the tenant API does) and does not verify
//! JWTs. When Redis is down, resolving fails with `unavailable`: a token is never admitted unchecked.

use crate::auth::sha256_hex;
use fred::prelude::*;
use fred::types::scripts::Script;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use switchyard_protocol::ids::opaque_token;
use switchyard_protocol::{limits, ProjectId, UserId};

/// What an opaque token grants, as stored in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenGrant {
    pub project_id: ProjectId,
    pub user_id: UserId,
    /// Unix milliseconds.
    pub expires_at_ms: u64,
}

/// Store the token and index it under its user; the index lives as long as the user's longest-lived token.
const ISSUE: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
if redis.call('TTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
"#;

/// Delete a token if it belongs to the tenant ARGV[1]: its expiry (ms) when deleted, 0 when unknown, -1 when it
/// belongs to another tenant (then it is left alone).
const REVOKE_TOKEN: &str = r#"
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local ok, grant = pcall(cjson.decode, value)
if not ok or grant['project_id'] ~= ARGV[1] then return -1 end
redis.call('DEL', KEYS[1])
return grant['expires_at_ms']
"#;

/// Delete every token in a user's index (ARGV[1] is the token key prefix), then the index; how many there were.
const REVOKE_USER: &str = r#"
local hashes = redis.call('SMEMBERS', KEYS[1])
for _, hash in ipairs(hashes) do
  redis.call('DEL', ARGV[1] .. hash)
end
redis.call('DEL', KEYS[1])
return #hashes
"#;

use switchyard_protocol::redis_keys::{
    revoked as revoked_key, token as token_key, user_ban as user_ban_key, user_tokens as user_index_key, TOKEN_PREFIX,
};

/// Why the token store could not answer. Every case is an outage (`unavailable`): never a verdict on a token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Redis is known to be down; no command was sent.
    #[error("token store unavailable (Redis is not connected); retry later")]
    NotConnected,
    /// A Redis command failed. The message names only the error's kind: its details could quote the command's
    /// arguments.
    #[error("token store unavailable: {:?}", .0.kind())]
    Redis(#[source] fred::error::Error),
    /// The grant could not be encoded for storage.
    #[error("{0}")]
    Encode(#[source] serde_json::Error),
}

/// What revoking an opaque token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// Deleted; it would have expired at this unix ms.
    Deleted { expires_at_ms: u64 },
    /// No such live token in this tenant.
    Unknown,
}

/// Issues, resolves and revokes tokens.
#[derive(Clone)]
pub struct TokenStore {
    redis: fred::clients::Client,
    issue: Arc<Script>,
    revoke_token: Arc<Script>,
    revoke_user: Arc<Script>,
}

impl TokenStore {
    pub fn new(redis: fred::clients::Client) -> Self {
        TokenStore {
            redis,
            issue: Arc::new(Script::from_lua(ISSUE)),
            revoke_token: Arc::new(Script::from_lua(REVOKE_TOKEN)),
            revoke_user: Arc::new(Script::from_lua(REVOKE_USER)),
        }
    }

    /// The Redis client, shared with the fleet-wide rate limiter.
    pub fn redis(&self) -> &fred::clients::Client {
        &self.redis
    }

    /// Issue a token for the grant's user, living `ttl_secs`.
    pub async fn issue(&self, grant: &TokenGrant, ttl_secs: u64) -> Result<String, TokenError> {
        self.ensure_connected()?;
        let token = opaque_token::generate();
        let hash = sha256_hex(&token);
        let value = serde_json::to_string(grant).map_err(TokenError::Encode)?;
        let ttl = ttl_secs.clamp(1, limits::TOKEN_TTL_MAX_SECS) as i64;
        self.issue
            .evalsha_with_reload::<i64, _, _>(
                &self.redis,
                vec![token_key(&hash), user_index_key(&grant.project_id, &grant.user_id)],
                vec![value, ttl.to_string(), hash],
            )
            .await
            .map_err(TokenError::Redis)?;
        Ok(token)
    }

    /// The grant of a live token; `None` for an unknown, expired, revoked or malformed token.
    pub async fn resolve(&self, token: &str) -> Result<Option<TokenGrant>, TokenError> {
        if !opaque_token::is_well_formed(token) {
            return Ok(None);
        }
        self.ensure_connected()?;
        let value: Option<String> = self.redis.get(token_key(&sha256_hex(token))).await.map_err(TokenError::Redis)?;
        Ok(value.and_then(|text| serde_json::from_str(&text).ok()))
    }

    /// Delete `token` if it is a live token of `tenant`.
    pub async fn revoke(&self, tenant: &ProjectId, token: &str) -> Result<Revoked, TokenError> {
        if !opaque_token::is_well_formed(token) {
            return Ok(Revoked::Unknown);
        }
        self.ensure_connected()?;
        let found: i64 = self
            .revoke_token
            .evalsha_with_reload(&self.redis, vec![token_key(&sha256_hex(token))], vec![tenant.to_string()])
            .await
            .map_err(TokenError::Redis)?;
        Ok(match found {
            n if n > 0 => Revoked::Deleted { expires_at_ms: n as u64 },
            _ => Revoked::Unknown,
        })
    }

    /// Delete every opaque token of a user; how many there were.
    pub async fn revoke_user(&self, tenant: &ProjectId, user: &UserId) -> Result<u64, TokenError> {
        self.ensure_connected()?;
        let count: i64 = self
            .revoke_user
            .evalsha_with_reload(&self.redis, vec![user_index_key(tenant, user)], vec![TOKEN_PREFIX.to_owned()])
            .await
            .map_err(TokenError::Redis)?;
        Ok(count.max(0) as u64)
    }

    /// Remember a revoked JWT credential until `until_ms` (unix ms).
    pub async fn mark_revoked(
        &self,
        tenant: &ProjectId,
        credential_id: &str,
        until_ms: u64,
        now_ms: u64,
    ) -> Result<(), TokenError> {
        let Some(ttl_ms) = marker_ttl_ms(until_ms, now_ms) else {
            return Ok(());
        };
        self.ensure_connected()?;
        self.redis
            .set::<(), _, _>(revoked_key(tenant, credential_id), "1", Some(Expiration::PX(ttl_ms)), None, false)
            .await
            .map_err(TokenError::Redis)
    }

    /// Is a JWT credential marked revoked?
    pub async fn is_revoked(&self, tenant: &ProjectId, credential_id: &str) -> Result<bool, TokenError> {
        let count: i64 = self.redis.exists(revoked_key(tenant, credential_id)).await.map_err(TokenError::Redis)?;
        Ok(count > 0)
    }

    /// Ban `user` from the whole tenant until `until_ms` (unix ms; `None`: until lifted). A ban whose end has passed
    /// is no ban: nothing is stored.
    pub async fn ban(
        &self,
        tenant: &ProjectId,
        user: &UserId,
        until_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<(), TokenError> {
        let expiry = match until_ms {
            None => None,
            Some(until_ms) => match marker_ttl_ms(until_ms, now_ms) {
                Some(ttl_ms) => Some(Expiration::PX(ttl_ms)),
                None => return Ok(()),
            },
        };
        self.ensure_connected()?;
        let value = until_ms.unwrap_or(0).to_string();
        self.redis
            .set::<(), _, _>(user_ban_key(tenant, user), value, expiry, None, false)
            .await
            .map_err(TokenError::Redis)
    }

    /// Lift `user`'s ban from the tenant; whether there was one.
    pub async fn unban(&self, tenant: &ProjectId, user: &UserId) -> Result<bool, TokenError> {
        self.ensure_connected()?;
        let removed: i64 = self.redis.del(user_ban_key(tenant, user)).await.map_err(TokenError::Redis)?;
        Ok(removed > 0)
    }

    /// Is `user` banned from the tenant?
    pub async fn is_banned(&self, tenant: &ProjectId, user: &UserId) -> Result<bool, TokenError> {
        self.ensure_connected()?;
        let count: i64 = self.redis.exists(user_ban_key(tenant, user)).await.map_err(TokenError::Redis)?;
        Ok(count > 0)
    }

    /// Is Redis reachable right now?
    pub fn is_connected(&self) -> bool {
        self.redis.is_connected()
    }

    /// Fail fast while Redis is known to be down, rather than queueing the command until it times out.
    fn ensure_connected(&self) -> Result<(), TokenError> {
        if self.redis.is_connected() {
            Ok(())
        } else {
            Err(TokenError::NotConnected)
        }
    }
}

/// Longest expiry given to a revocation marker: about 73 million years, which is forever, and far enough below
/// `i64::MAX` that Redis accepts it (it refuses an expiry that overflows its clock).
const MAX_MARKER_TTL_MS: i64 = i64::MAX / 4;

/// The Redis expiry of a marker kept until `until_ms`, or `None` when that has passed. A JWT's `exp` can be any
/// u64, so the deadline can be centuries away: `as i64` turned those into negative expiries Redis refused.
fn marker_ttl_ms(until_ms: u64, now_ms: u64) -> Option<i64> {
    let ttl_ms = until_ms.saturating_sub(now_ms);
    (ttl_ms > 0).then(|| i64::try_from(ttl_ms).unwrap_or(i64::MAX).min(MAX_MARKER_TTL_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_expiry_is_positive_and_bounded() {
        assert_eq!(marker_ttl_ms(5_000, 1_000), Some(4_000));
        assert_eq!(marker_ttl_ms(1_000, 1_000), None);
        assert_eq!(marker_ttl_ms(1_000, 5_000), None);
        // A JWT with exp near u64::MAX: its deadline saturates at u64::MAX (see jwt::revocation_until_ms).
        assert_eq!(marker_ttl_ms(u64::MAX, 1_700_000_000_000), Some(MAX_MARKER_TTL_MS));
        assert_eq!(marker_ttl_ms(i64::MAX as u64 + 1, 0), Some(MAX_MARKER_TTL_MS));
    }
}
