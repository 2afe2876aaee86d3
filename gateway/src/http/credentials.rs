//! The tenant backend's credential API (`Authorization: Bearer <api_key>`): mint opaque tokens, revoke a token
//! (opaque or JWT), and revoke every session of a user. Revocations are stored durably where that applies (Redis)
//! and broadcast to every gateway, which close the matching sockets with 4003.
//!
//! A tenant can only ever revoke within its own project: every revocation is scoped by the API key's tenant.

use super::ApiError;
use super::{now_ms, parse_body, tenant_of_request};
use crate::auth::opaque_token_id;
use crate::jwt;
use crate::revocation;
use crate::tokens::{Revoked, TokenGrant};
use crate::Gateway;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use switchyard_protocol::ids::opaque_token;
use switchyard_protocol::internal::RevocationTarget;
use switchyard_protocol::{limits, ErrorCode, UserId};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    user_id: String,
    ttl_secs: Option<u64>,
}

/// The body of `POST /v1/tokens`, checked: the user and the token's lifetime in seconds.
pub fn parse_create_token(body: &[u8]) -> Result<(UserId, u64), ApiError> {
    let request: CreateToken = parse_body(body)?;
    let user_id = UserId::parse(&request.user_id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let ttl_secs = request.ttl_secs.unwrap_or(limits::TOKEN_TTL_DEFAULT_SECS);
    if ttl_secs == 0 || ttl_secs > limits::TOKEN_TTL_MAX_SECS {
        return Err(ApiError::bad_request(format!("ttl_secs must be 1 to {}", limits::TOKEN_TTL_MAX_SECS)));
    }
    Ok((user_id, ttl_secs))
}

pub async fn create_token(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let (user_id, ttl_secs) = parse_create_token(&body)?;
    if gw.tokens.is_banned(&tenant.project_id, &user_id).await? {
        return Err(ApiError::new(ErrorCode::Forbidden, format!("{user_id} is banned")));
    }
    let expires_at_ms = now_ms() + ttl_secs * 1000;
    let grant = TokenGrant { project_id: tenant.project_id, user_id, expires_at_ms };
    let token = gw.tokens.issue(&grant, ttl_secs).await?;
    Ok((StatusCode::CREATED, Json(json!({"token": token, "expires_at": expires_at_ms}))).into_response())
}

/// Broadcast a revocation; a failure is `unavailable` (the caller should retry).
async fn broadcast(
    gw: &Gateway,
    tenant: &switchyard_protocol::ProjectId,
    target: RevocationTarget,
) -> Result<(), ApiError> {
    revocation::broadcast(gw, tenant, target).await.map_err(|e| ApiError::unavailable(e.to_string()))
}

/// `DELETE /v1/tokens/{token}`: an opaque token is deleted from Redis; a JWT (which must verify with the tenant's
/// key, expired or not) is marked revoked by its `jti`, or by its hash when it has none, until it expires. Sockets
/// authenticated with it close with 4003 on every gateway. Revoking an unknown or expired opaque token succeeds
/// (and closes any socket still using it).
pub async fn revoke_token(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(token): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let project_id = tenant.project_id;
    let token = token.trim();
    if opaque_token::is_well_formed(token) {
        let stored = gw.tokens.revoke(&project_id, token).await;
        let until_ms = match stored {
            Ok(Revoked::Deleted { expires_at_ms }) => expires_at_ms,
            _ => now_ms() + limits::TOKEN_TTL_MAX_SECS * 1000,
        };
        // Close live sockets even when Redis could not be reached; then report that the deletion did not happen.
        let target = RevocationTarget::Token { id: opaque_token_id(token), until_ms };
        broadcast(&gw, &project_id, target).await?;
        stored?;
        return Ok(StatusCode::NO_CONTENT);
    }
    if !jwt::looks_like_jwt(token) || token.len() > crate::auth::MAX_TOKEN_BYTES {
        return Err(ApiError::bad_request("not a sytok_ token or a JWT"));
    }
    if jwt::unverified_project(token).ok().as_ref() != Some(&project_id) {
        return Err(ApiError::new(ErrorCode::NotFound, "this JWT does not belong to this project"));
    }
    let key = gw
        .tenants
        .lookup(&project_id)
        .await?
        .and_then(|entry| entry.jwt.clone())
        .ok_or_else(|| ApiError::bad_request("this project has no JWT key configured"))?;
    let claims = jwt::verify(token, &key, &project_id, false)
        .map_err(|e| ApiError::bad_request(format!("cannot revoke: {e}")))?;
    let until_ms = jwt::revocation_until_ms(&claims);
    let ids = std::iter::once(jwt::credential_id(token, claims.jti.as_deref()))
        .chain(jwt::legacy_credential_id(token, claims.jti.as_deref()));
    for id in ids {
        let stored = gw.tokens.mark_revoked(&project_id, &id, until_ms, now_ms()).await;
        broadcast(&gw, &project_id, RevocationTarget::Token { id, until_ms }).await?;
        stored?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/users/{user_id}/sessions`: every socket of the user closes with 4003 on every gateway, and the user's
/// opaque tokens are deleted. (Unexpired JWTs of the user stay valid for new connections: revoke them by `jti`.)
pub async fn revoke_user_sessions(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let user = UserId::parse(&user).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let stored = gw.tokens.revoke_user(&tenant.project_id, &user).await;
    broadcast(&gw, &tenant.project_id, RevocationTarget::User { user }).await?;
    stored?;
    Ok(StatusCode::NO_CONTENT)
}
