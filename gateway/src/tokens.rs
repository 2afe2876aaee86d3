//! Opaque client tokens (`sytok_...`), kept in Redis with their expiry as the key's TTL.
//!
//! This module issues and resolves tokens; it does not decide who may have one (the tenant API does) and does not
//! verify JWTs. When Redis is down, resolving fails with `unavailable`: a token is never admitted unchecked.

use crate::error::ApiError;
use fred::prelude::*;
use serde::{Deserialize, Serialize};
use switchyard_protocol::ids::opaque_token;
use switchyard_protocol::{ProjectId, UserId};

/// What an opaque token grants, as stored in Redis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenGrant {
    pub project_id: ProjectId,
    pub user_id: UserId,
    /// Unix milliseconds.
    pub expires_at_ms: u64,
}

/// Issues and resolves opaque tokens.
#[derive(Clone)]
pub struct TokenStore {
    redis: fred::clients::Client,
}

fn redis_key(token: &str) -> String {
    format!("sy:tok:{token}")
}

impl TokenStore {
    pub fn new(redis: fred::clients::Client) -> Self {
        TokenStore { redis }
    }

    /// Issue a token for `user_id` living `ttl_secs`.
    pub async fn issue(&self, grant: &TokenGrant, ttl_secs: u64) -> Result<String, ApiError> {
        let token = opaque_token::generate();
        let value = serde_json::to_string(grant).map_err(|e| ApiError::unavailable(e.to_string()))?;
        self.redis
            .set::<(), _, _>(redis_key(&token), value, Some(Expiration::EX(ttl_secs as i64)), None, false)
            .await
            .map_err(|e| ApiError::unavailable(format!("token store unavailable: {e}")))?;
        Ok(token)
    }

    /// The grant of a live token; `None` for an unknown, expired or malformed token.
    pub async fn resolve(&self, token: &str) -> Result<Option<TokenGrant>, ApiError> {
        if !opaque_token::is_well_formed(token) {
            return Ok(None);
        }
        let value: Option<String> = self
            .redis
            .get(redis_key(token))
            .await
            .map_err(|e| ApiError::unavailable(format!("token store unavailable: {e}")))?;
        Ok(value.and_then(|text| serde_json::from_str(&text).ok()))
    }

    /// Is Redis reachable right now?
    pub fn is_connected(&self) -> bool {
        self.redis.is_connected()
    }
}
