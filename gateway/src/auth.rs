//! Authentication of WebSocket clients: a token (from the `Authorization` header, the `token` query parameter or a
//! first `auth` frame) becomes an `Identity`, or a clear refusal.
//!
//! This module does not authorise ops; router shards check membership and roles.

use crate::error::ApiError;
use crate::Gateway;
use switchyard_protocol::ids::opaque_token;
use switchyard_protocol::{ErrorCode, ProjectId, UserId};

/// Who a session acts as.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub tenant: ProjectId,
    pub user: UserId,
    /// Room ids, or prefixes ending in `*`, the token lets the user join even when private.
    pub grants: Vec<String>,
}

/// Turn a presented token into an identity.
pub async fn authenticate(gw: &Gateway, token: &str) -> Result<Identity, ApiError> {
    let token = token.trim();
    if !opaque_token::is_well_formed(token) {
        return Err(ApiError::unauthorized("token is not a valid sytok_ token"));
    }
    let grant = gw.tokens.resolve(token).await?.ok_or_else(|| ApiError::unauthorized("token is unknown or expired"))?;
    if !gw.tenants.is_enabled(&grant.project_id).await? {
        return Err(ApiError::new(ErrorCode::Forbidden, "tenant is disabled"));
    }
    Ok(Identity { tenant: grant.project_id, user: grant.user_id, grants: Vec::new() })
}

/// The token in an `Authorization: Bearer ...` header value.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}
