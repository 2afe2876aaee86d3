//! The admin API (`Authorization: Bearer <admin token>`): create, show, configure (JWT key, limits), rotate the API
//! key of, and disable tenants.
//!
//! Handlers check the admin token in constant time, validate input and key material, and leave storage to
//! `tenants`. No secret is ever returned except a freshly generated API key, once.

use super::ApiError;
use super::{now_ms, parse_body};
use crate::auth::bearer;
use crate::jwt;
use crate::revocation;
use crate::Gateway;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use subtle::ConstantTimeEq;
use switchyard_protocol::internal::{JwtKey, RevocationTarget, TenantLimits};
use switchyard_protocol::{limits, ErrorCode, ProjectId};

fn require_admin(gw: &Gateway, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(bearer).unwrap_or("");
    // Compare digests, so neither the content nor the length of the token leaks through timing.
    let presented = crate::auth::sha256_hex(presented);
    let expected = crate::auth::sha256_hex(&gw.config.admin_token);
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("admin token required"))
    }
}

fn parse_project(project_id: &str) -> Result<ProjectId, ApiError> {
    ProjectId::parse(project_id).map_err(|e| ApiError::bad_request(e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTenant {
    name: String,
}

/// The body of `POST /v1/admin/tenants`, checked: the tenant's name, trimmed.
pub fn parse_create_tenant(body: &[u8]) -> Result<String, ApiError> {
    let request: CreateTenant = parse_body(body)?;
    let name = request.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::bad_request("name must be 1 to 200 bytes"));
    }
    Ok(name.to_owned())
}

pub async fn create_tenant(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&gw, &headers)?;
    let name = parse_create_tenant(&body)?;
    let (record, api_key) = gw.tenants.create(&name, now_ms()).await?;
    Ok((StatusCode::CREATED, Json(json!({"project_id": record.project_id, "api_key": api_key}))).into_response())
}

pub async fn get_tenant(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(project_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&gw, &headers)?;
    let project_id = parse_project(&project_id)?;
    let record =
        gw.tenants.get(&project_id).await?.ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no such tenant"))?;
    Ok(Json(json!({
        "project_id": record.project_id,
        "name": record.name,
        "created_at": record.created_at_ms,
        "jwt_alg": record.jwt.as_ref().map(jwt::key_alg_name),
        "limits": {
            "msgs_per_sec": record.limits.msgs_per_sec,
            "msgs_burst": record.limits.msgs_burst,
            "max_connections": record.limits.max_connections,
            "max_connections_per_user": record.limits.max_connections_per_user,
            "max_members_per_room": record.limits.max_members_per_room,
            "max_rooms_per_user": record.limits.max_rooms_per_user,
            "backend_creates_rooms": record.limits.backend_creates_rooms,
            "max_rooms": record.limits.max_rooms,
            "max_watched_per_session": record.limits.max_watched_per_session,
            "history_retention_secs": record.limits.history_retention_secs,
        },
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetJwt {
    alg: String,
    secret: Option<String>,
    public_key_pem: Option<String>,
}

pub async fn set_jwt(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(project_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    require_admin(&gw, &headers)?;
    let project_id = parse_project(&project_id)?;
    let key = parse_set_jwt(&body)?;
    gw.tenants.set_jwt(&project_id, key).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `PUT /v1/admin/tenants/{id}/jwt`, checked: a key whose material `jwt::prepare` accepts.
pub fn parse_set_jwt(body: &[u8]) -> Result<JwtKey, ApiError> {
    let request: SetJwt = parse_body(body)?;
    let key = match (request.alg.as_str(), request.secret, request.public_key_pem) {
        ("HS256", Some(secret), None) => JwtKey::HS256 { secret },
        ("RS256", None, Some(public_key_pem)) => JwtKey::RS256 { public_key_pem },
        ("ES256", None, Some(public_key_pem)) => JwtKey::ES256 { public_key_pem },
        ("HS256", _, _) => {
            return Err(ApiError::bad_request("HS256 takes {\"alg\": \"HS256\", \"secret\"} and nothing else"))
        }
        ("RS256" | "ES256", _, _) => {
            return Err(ApiError::bad_request("RS256 and ES256 take {\"alg\", \"public_key_pem\"} and nothing else"))
        }
        _ => return Err(ApiError::bad_request("alg must be HS256, RS256 or ES256")),
    };
    jwt::prepare(&key)?;
    Ok(key)
}

pub async fn rotate_key(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(project_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    require_admin(&gw, &headers)?;
    let project_id = parse_project(&project_id)?;
    let api_key = gw.tenants.rotate_key(&project_id).await?;
    Ok(Json(json!({ "api_key": api_key })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetLimits {
    msgs_per_sec: Option<u32>,
    msgs_burst: Option<u32>,
    max_connections: Option<u32>,
    max_connections_per_user: Option<u32>,
    max_members_per_room: Option<u32>,
    max_rooms_per_user: Option<u32>,
    backend_creates_rooms: Option<bool>,
    max_rooms: Option<u64>,
    max_watched_per_session: Option<u32>,
    history_retention_secs: Option<u64>,
}

pub async fn set_limits(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(project_id): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    require_admin(&gw, &headers)?;
    let project_id = parse_project(&project_id)?;
    let limits = parse_set_limits(&body)?;
    gw.tenants.set_limits(&project_id, limits).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `PUT /v1/admin/tenants/{id}/limits`, checked.
pub fn parse_set_limits(body: &[u8]) -> Result<TenantLimits, ApiError> {
    let request: SetLimits = parse_body(body)?;
    if request.msgs_burst.is_some() && request.msgs_per_sec.is_none() {
        return Err(ApiError::bad_request("msgs_burst needs msgs_per_sec"));
    }
    if request.max_members_per_room.is_some_and(|n| !(1..=limits::MAX_MEMBERS_PER_ROOM).contains(&n)) {
        return Err(ApiError::bad_request(format!(
            "max_members_per_room must be 1..={}",
            limits::MAX_MEMBERS_PER_ROOM
        )));
    }
    if request.max_rooms_per_user.is_some_and(|n| !(1..=limits::MAX_ROOMS_PER_USER).contains(&n)) {
        return Err(ApiError::bad_request(format!("max_rooms_per_user must be 1..={}", limits::MAX_ROOMS_PER_USER)));
    }
    if request.max_watched_per_session.is_some_and(|n| !(1..=limits::MAX_WATCHED_PER_SESSION).contains(&n)) {
        return Err(ApiError::bad_request(format!(
            "max_watched_per_session must be 1..={}",
            limits::MAX_WATCHED_PER_SESSION
        )));
    }
    if request.history_retention_secs.is_some_and(|n| !(1..=limits::MAX_RETENTION_SECS).contains(&n)) {
        return Err(ApiError::bad_request(format!(
            "history_retention_secs must be 1..={}",
            limits::MAX_RETENTION_SECS
        )));
    }
    Ok(TenantLimits {
        msgs_per_sec: request.msgs_per_sec,
        msgs_burst: request.msgs_burst,
        max_connections: request.max_connections,
        max_connections_per_user: request.max_connections_per_user,
        max_members_per_room: request.max_members_per_room,
        max_rooms_per_user: request.max_rooms_per_user,
        backend_creates_rooms: request.backend_creates_rooms,
        max_rooms: request.max_rooms,
        max_watched_per_session: request.max_watched_per_session,
        history_retention_secs: request.history_retention_secs,
    })
}

pub async fn delete_tenant(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(project_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    require_admin(&gw, &headers)?;
    let project_id = parse_project(&project_id)?;
    gw.tenants.disable(&project_id).await?;
    // Every gateway's tenant watch closes the tenant's sockets; the broadcast gets there first.
    if let Err(error) = revocation::broadcast(&gw, &project_id, RevocationTarget::Tenant).await {
        tracing::warn!(tenant = %project_id, %error, "tenant disabled; relying on the tenant watch");
    }
    Ok(StatusCode::NO_CONTENT)
}
