//! Authentication of WebSocket clients: a token (from the `Authorization` header, the `token` query parameter or a
//! first `auth` frame) becomes an `Identity`, or a clear refusal. Two kinds of token are accepted: opaque `sytok_`
//! tokens (looked up in Redis) and JWTs signed with the tenant's key (verified here, see `jwt`).
//!
//! This module does not authorise ops (router shards check membership and roles) and never admits a token it could
//! not verify: when Redis is down an opaque token is refused with `unavailable`. A JWT needs no Redis; only its
//! revocation check falls back to the gateway's local revocation cache then (see `docs/protocol.md`).

use crate::error::ApiError;
use crate::jwt;
use crate::Gateway;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use switchyard_protocol::ids::opaque_token;
use switchyard_protocol::{ErrorCode, ProjectId, UserId};

/// Longest token accepted, in bytes; longer ones are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// How long a JWT's revocation check may wait for Redis before the local revocation cache alone decides.
const REVOCATION_CHECK_TIMEOUT: Duration = Duration::from_millis(300);

/// Who a session acts as.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub tenant: ProjectId,
    pub user: UserId,
    /// Room ids, or prefixes ending in `*`, the token lets the user join even when private.
    pub grants: Vec<String>,
    /// The credential the session was admitted with, so it can be revoked.
    pub credential: Credential,
}

/// The credential behind an identity. Holds an id derived from the token, never the token.
#[derive(Clone, PartialEq)]
pub struct Credential {
    /// `t:<sha256 of an opaque token>`, `j:<jti>` for a JWT with a `jti`, or `s:<sha256 of the JWT's signed part>`.
    pub id: String,
    /// When the credential expires, unix milliseconds.
    pub expires_at_ms: u64,
    /// When verification began: a revocation taken after this instant also closes the session.
    pub verified_at: Instant,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Token ids are derived from secrets; keep even those out of debug output.
        f.debug_struct("Credential")
            .field("kind", &self.id.get(..1).unwrap_or(""))
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

pub(crate) fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The id under which an opaque token is stored and revoked.
pub fn opaque_token_id(token: &str) -> String {
    format!("t:{}", sha256_hex(token))
}

/// Turn a presented token into an identity. Refusals are counted in `switchyard_gateway_auth_failures_total` by
/// reason.
pub async fn authenticate(gw: &Gateway, token: &str) -> Result<Identity, ApiError> {
    match verify_token(gw, token).await {
        Ok(identity) => {
            metrics::counter!("switchyard_gateway_authentications_total").increment(1);
            Ok(identity)
        }
        Err((reason, error)) => {
            let reason = if error.code == ErrorCode::Unavailable { "unavailable" } else { reason };
            crate::telemetry::auth_failure(reason);
            Err(error)
        }
    }
}

/// A refusal and its reason for the failure counter.
type Refusal = (&'static str, ApiError);

fn because<T>(reason: &'static str, result: Result<T, ApiError>) -> Result<T, Refusal> {
    result.map_err(|error| (reason, error))
}

async fn verify_token(gw: &Gateway, token: &str) -> Result<Identity, Refusal> {
    let verified_at = Instant::now();
    let token = token.trim();
    if token.is_empty() {
        return Err(("missing", ApiError::unauthorized("a token is required")));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(("malformed", ApiError::unauthorized("token is too long")));
    }
    if opaque_token::is_well_formed(token) {
        authenticate_opaque(gw, token, verified_at).await
    } else if jwt::looks_like_jwt(token) {
        authenticate_jwt(gw, token, verified_at).await
    } else {
        Err(("malformed", ApiError::unauthorized("token is neither a sytok_ token nor a JWT")))
    }
}

async fn authenticate_opaque(gw: &Gateway, token: &str, verified_at: Instant) -> Result<Identity, Refusal> {
    let grant = because("unknown_token", gw.tokens.resolve(token).await)?
        .ok_or_else(|| ("unknown_token", ApiError::unauthorized("token is unknown, expired or revoked")))?;
    require_enabled_tenant(gw, &grant.project_id).await?;
    Ok(Identity {
        tenant: grant.project_id,
        user: grant.user_id,
        grants: Vec::new(),
        credential: Credential { id: opaque_token_id(token), expires_at_ms: grant.expires_at_ms, verified_at },
    })
}

async fn authenticate_jwt(gw: &Gateway, token: &str, verified_at: Instant) -> Result<Identity, Refusal> {
    // The tenant (and so the key) is found from the unverified `pid`; the signature check below then proves it.
    let project_id = because("malformed", jwt::unverified_project(token))?;
    let tenant = require_enabled_tenant(gw, &project_id).await?;
    let key = tenant
        .jwt
        .as_ref()
        .ok_or_else(|| ("no_jwt_key", ApiError::unauthorized("this project accepts no JWTs (no key configured)")))?;
    let claims = because("invalid_jwt", jwt::verify(token, key, &project_id, true))?;
    let id = jwt::credential_id(token, claims.jti.as_deref());
    let legacy = jwt::legacy_credential_id(token, claims.jti.as_deref());
    if is_revoked(gw, &project_id, &id).await
        || match &legacy {
            Some(legacy) => is_revoked(gw, &project_id, legacy).await,
            None => false,
        }
    {
        return Err(("revoked", ApiError::unauthorized("token is revoked")));
    }
    Ok(Identity {
        tenant: project_id,
        user: claims.sub,
        grants: claims.rooms,
        credential: Credential { id, expires_at_ms: claims.exp.saturating_mul(1000), verified_at },
    })
}

/// Has this JWT been revoked? The local cache (fed by the revocation broadcast) always answers; Redis answers for
/// revocations taken before this gateway started. When Redis is unreachable the local cache alone decides: JWT
/// connects keep working through a Redis outage, at the cost of missing revocations this gateway never heard of.
async fn is_revoked(gw: &Gateway, tenant: &ProjectId, id: &str) -> bool {
    if gw.sessions.is_token_revoked(tenant, id) {
        return true;
    }
    if !gw.tokens.is_connected() {
        metrics::counter!("switchyard_gateway_revocation_checks_skipped_total").increment(1);
        return false;
    }
    match tokio::time::timeout(REVOCATION_CHECK_TIMEOUT, gw.tokens.is_revoked(tenant, id)).await {
        Ok(Ok(revoked)) => revoked,
        Ok(Err(_)) | Err(_) => {
            metrics::counter!("switchyard_gateway_revocation_checks_skipped_total").increment(1);
            false
        }
    }
}

/// The tenant's cached entry, refused when it is unknown (401) or disabled (403).
async fn require_enabled_tenant(
    gw: &Gateway,
    project_id: &ProjectId,
) -> Result<std::sync::Arc<crate::tenants::TenantEntry>, Refusal> {
    let tenant = because("unknown_project", gw.tenants.lookup(project_id).await)?
        .ok_or_else(|| ("unknown_project", ApiError::unauthorized("unknown project")))?;
    if tenant.record.disabled {
        return Err(("tenant_disabled", ApiError::new(ErrorCode::Forbidden, "tenant is disabled")));
    }
    Ok(tenant)
}

/// The token in an `Authorization: Bearer ...` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}
