//! Authentication of WebSocket clients: a token (from the `Authorization` header, the `token` query parameter or a
//! first `auth` frame) becomes an `Identity`, or a clear refusal. Two kinds of token are accepted: opaque `sytok_`
//! tokens (looked up in Redis) and JWTs signed with the tenant's key (verified here, see `jwt`).
//!
//! This module does not authorise ops (router shards check membership and roles) and never admits a token it could
//! not verify: when Redis is down an opaque token is refused with `unavailable`. A JWT needs no Redis; only its
//! revocation check falls back to the gateway's local revocation cache then (see `docs/protocol.md`).

use crate::jwt::{self, JwtError};
use crate::tenants::TenantError;
use crate::tokens::TokenError;
use crate::Gateway;
use sha2::{Digest, Sha256};
use std::time::{Duration, Instant};
use switchyard_protocol::ids::opaque_token;
use switchyard_protocol::{ProjectId, UserId};

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

/// Why a token was refused. Only `TokenStore` and an outage of the tenants bucket are no verdict on the token
/// (the client may retry); everything else refuses it.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("a token is required")]
    Missing,
    /// The token is longer than `MAX_TOKEN_BYTES`.
    #[error("token is too long")]
    TooLong,
    /// The token is neither an opaque token nor shaped like a JWT.
    #[error("token is neither a sytok_ token nor a JWT")]
    UnknownKind,
    /// The opaque token is not a live token.
    #[error("token is unknown, expired or revoked")]
    UnknownToken,
    /// The token store could not be asked about an opaque token.
    #[error(transparent)]
    TokenStore(#[from] TokenError),
    /// The token's tenant could not be read.
    #[error(transparent)]
    Tenant(#[from] TenantError),
    /// The token names no known project.
    #[error("unknown project")]
    UnknownProject,
    /// The token's tenant is disabled.
    #[error("tenant is disabled")]
    TenantDisabled,
    /// The JWT's unverified payload names no project.
    #[error(transparent)]
    MalformedJwt(JwtError),
    /// The JWT's project has no JWT key configured.
    #[error("this project accepts no JWTs (no key configured)")]
    NoJwtKey,
    /// The JWT does not verify with the project's key, or its claims are refused.
    #[error(transparent)]
    InvalidJwt(JwtError),
    /// The JWT was revoked.
    #[error("token is revoked")]
    Revoked,
    /// The user is banned from the tenant.
    #[error("the user is banned")]
    Banned,
}

impl AuthError {
    /// Is this an outage (of the token store or the tenants bucket) rather than a verdict on the token?
    pub fn is_unavailable(&self) -> bool {
        match self {
            AuthError::TokenStore(_) => true,
            AuthError::Tenant(error) => error.is_unavailable(),
            AuthError::Missing
            | AuthError::TooLong
            | AuthError::UnknownKind
            | AuthError::UnknownToken
            | AuthError::UnknownProject
            | AuthError::TenantDisabled
            | AuthError::MalformedJwt(_)
            | AuthError::NoJwtKey
            | AuthError::InvalidJwt(_)
            | AuthError::Revoked
            | AuthError::Banned => false,
        }
    }

    /// The reason label of `switchyard_gateway_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        if self.is_unavailable() {
            return "unavailable";
        }
        match self {
            AuthError::Missing => "missing",
            AuthError::TooLong | AuthError::UnknownKind | AuthError::MalformedJwt(_) => "malformed",
            AuthError::UnknownToken | AuthError::TokenStore(_) => "unknown_token",
            AuthError::UnknownProject | AuthError::Tenant(_) => "unknown_project",
            AuthError::TenantDisabled => "tenant_disabled",
            AuthError::NoJwtKey => "no_jwt_key",
            AuthError::InvalidJwt(_) => "invalid_jwt",
            AuthError::Revoked => "revoked",
            AuthError::Banned => "banned",
        }
    }
}

/// Turn a presented token into an identity. Refusals are counted in `switchyard_gateway_auth_failures_total` by
/// reason.
pub async fn authenticate(gw: &Gateway, token: &str) -> Result<Identity, AuthError> {
    match verify_token(gw, token).await {
        Ok(identity) => {
            metrics::counter!("switchyard_gateway_authentications_total").increment(1);
            Ok(identity)
        }
        Err(error) => {
            crate::telemetry::auth_failure(error.reason());
            Err(error)
        }
    }
}

async fn verify_token(gw: &Gateway, token: &str) -> Result<Identity, AuthError> {
    let verified_at = Instant::now();
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::TooLong);
    }
    if opaque_token::is_well_formed(token) {
        let identity = authenticate_opaque(gw, token, verified_at).await?;
        require_not_banned(gw, &identity, true).await?;
        Ok(identity)
    } else if jwt::looks_like_jwt(token) {
        let identity = authenticate_jwt(gw, token, verified_at).await?;
        require_not_banned(gw, &identity, false).await?;
        Ok(identity)
    } else {
        Err(AuthError::UnknownKind)
    }
}

/// Refuse a user banned from the tenant. Redis, which holds every ban, decides. An opaque token was just resolved
/// in Redis, so an outage refuses it as unavailable; a JWT is then checked against the bans this gateway heard of
/// (their broadcast), so a JWT connect keeps working through a Redis outage without letting a known ban in.
async fn require_not_banned(gw: &Gateway, identity: &Identity, opaque: bool) -> Result<(), AuthError> {
    let known_here = || match gw.sessions.is_user_banned(&identity.tenant, &identity.user) {
        true => Err(AuthError::Banned),
        false => {
            metrics::counter!("switchyard_gateway_revocation_checks_skipped_total").increment(1);
            Ok(())
        }
    };
    if !opaque && !gw.tokens.is_connected() {
        return known_here();
    }
    match tokio::time::timeout(REVOCATION_CHECK_TIMEOUT, gw.tokens.is_banned(&identity.tenant, &identity.user)).await {
        Ok(Ok(true)) => Err(AuthError::Banned),
        Ok(Ok(false)) => Ok(()),
        Ok(Err(error)) if opaque => Err(error.into()),
        Err(_) if opaque => Err(TokenError::NotConnected.into()),
        Ok(Err(_)) | Err(_) => known_here(),
    }
}

async fn authenticate_opaque(gw: &Gateway, token: &str, verified_at: Instant) -> Result<Identity, AuthError> {
    let grant = gw.tokens.resolve(token).await?.ok_or(AuthError::UnknownToken)?;
    require_enabled_tenant(gw, &grant.project_id).await?;
    Ok(Identity {
        tenant: grant.project_id,
        user: grant.user_id,
        grants: Vec::new(),
        credential: Credential { id: opaque_token_id(token), expires_at_ms: grant.expires_at_ms, verified_at },
    })
}

async fn authenticate_jwt(gw: &Gateway, token: &str, verified_at: Instant) -> Result<Identity, AuthError> {
    // The tenant (and so the key) is found from the unverified `pid`; the signature check below then proves it.
    let project_id = jwt::unverified_project(token).map_err(AuthError::MalformedJwt)?;
    let tenant = require_enabled_tenant(gw, &project_id).await?;
    let key = tenant.jwt.as_ref().ok_or(AuthError::NoJwtKey)?;
    let claims = jwt::verify(token, key, &project_id, true).map_err(AuthError::InvalidJwt)?;
    let id = jwt::credential_id(token, claims.jti.as_deref());
    let legacy = jwt::legacy_credential_id(token, claims.jti.as_deref());
    if is_revoked(gw, &project_id, &id).await
        || match &legacy {
            Some(legacy) => is_revoked(gw, &project_id, legacy).await,
            None => false,
        }
    {
        return Err(AuthError::Revoked);
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
) -> Result<std::sync::Arc<crate::tenants::TenantEntry>, AuthError> {
    let tenant = gw.tenants.lookup(project_id).await?.ok_or(AuthError::UnknownProject)?;
    if tenant.record.disabled {
        return Err(AuthError::TenantDisabled);
    }
    Ok(tenant)
}

/// The token in an `Authorization: Bearer ...` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}
