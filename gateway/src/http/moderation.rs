//! The tenant backend's moderation API (`Authorization: Bearer <api_key>`): ban and mute users in a room, set a
//! room's slow mode and freeze, and ban a user from the whole tenant.
//!
//! Room actions become `moderation` events in the room's sequence through its router shard, which holds the rules;
//! a tenant ban is stored in Redis (refused at every authentication until lifted or expired) and broadcast to every
//! gateway, which close the user's sockets with 4003. Nothing here reaches another tenant: every action is scoped
//! by the API key's tenant.

use super::{now_ms, parse_body, parse_room, tenant_of_request, ApiError};
use crate::moderation;
use crate::revocation;
use crate::upstream;
use crate::Gateway;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use switchyard_protocol::client::OkResult;
use switchyard_protocol::internal::{Moderation, RevocationTarget};
use switchyard_protocol::{ErrorCode, ProjectId, RoomId, UserId};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Restriction {
    /// For how long; absent: until lifted.
    secs: Option<u64>,
}

/// The body of a ban or mute (`PUT .../bans/{user}`, `.../mutes/{user}`, `/v1/users/{user}/ban`): an optional
/// `{"secs": n}`; an empty body is a restriction until lifted.
pub fn parse_restriction(body: &[u8]) -> Result<Option<u64>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let request: Restriction = parse_body(body)?;
    moderation::check_secs(request.secs).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(request.secs)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomSettings {
    slow_mode_secs: Option<u32>,
    frozen: Option<bool>,
}

/// The body of `PUT /v1/rooms/{room}/moderation`: the settings to change, at least one.
pub fn parse_room_settings(body: &[u8]) -> Result<Vec<Moderation>, ApiError> {
    let settings: RoomSettings = parse_body(body)?;
    let actions: Vec<Moderation> = [
        settings.slow_mode_secs.map(|secs| Moderation::SlowMode { secs }),
        settings.frozen.map(|frozen| Moderation::Freeze { frozen }),
    ]
    .into_iter()
    .flatten()
    .collect();
    if actions.is_empty() {
        return Err(ApiError::bad_request("give slow_mode_secs, frozen or both"));
    }
    Ok(actions)
}

fn parse_user(user: &str) -> Result<UserId, ApiError> {
    UserId::parse(user).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Run one moderation action (lasting `secs`, for a ban or mute) in `room` as the tenant's backend; the room's last
/// seq after it.
async fn moderate(
    gw: &Gateway,
    tenant: &ProjectId,
    room: RoomId,
    action: Moderation,
    secs: Option<u64>,
) -> Result<u64, ApiError> {
    let command = moderation::command(room, action, secs).map_err(|e| ApiError::bad_request(e.to_string()))?;
    match upstream::command(gw, tenant, None, command).await? {
        OkResult::RoomSeq { seq, .. } => Ok(seq),
        _ => Err(ApiError::new(ErrorCode::Internal, "unexpected router reply")),
    }
}

/// `PUT /v1/rooms/{room}/bans/{user}` (set) and `DELETE` (lift).
pub async fn set_room_ban(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path((room, user)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    restrict(&gw, &headers, &room, &user, Some(&body), moderation::ban).await
}

pub async fn lift_room_ban(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path((room, user)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    restrict(&gw, &headers, &room, &user, None, moderation::ban).await
}

/// `PUT /v1/rooms/{room}/mutes/{user}` (set) and `DELETE` (lift).
pub async fn set_room_mute(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path((room, user)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    restrict(&gw, &headers, &room, &user, Some(&body), moderation::mute).await
}

pub async fn lift_room_mute(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path((room, user)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    restrict(&gw, &headers, &room, &user, None, moderation::mute).await
}

/// A ban or mute (`body` given: set it as the body says) or its lifting (`None`).
async fn restrict(
    gw: &Gateway,
    headers: &HeaderMap,
    room: &str,
    user: &str,
    body: Option<&[u8]>,
    action: fn(UserId, bool) -> Moderation,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of_request(gw, headers).await?;
    let (room, user) = (parse_room(room)?, parse_user(user)?);
    let secs = body.map(parse_restriction).transpose()?.flatten();
    let seq = moderate(gw, &tenant.project_id, room.clone(), action(user, body.is_some()), secs).await?;
    Ok(Json(json!({"room": room, "seq": seq})))
}

/// `PUT /v1/rooms/{room}/moderation`: slow mode and freeze, each as its own `moderation` event, in that order (not
/// atomic: when the second fails the first stays, and the request answers the failure; repeating it is safe).
pub async fn set_room_settings(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(room): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let room = parse_room(&room)?;
    let mut seq = 0;
    for action in parse_room_settings(&body)? {
        seq = moderate(&gw, &tenant.project_id, room.clone(), action, None).await?;
    }
    Ok(Json(json!({"room": room, "seq": seq})))
}

/// `PUT /v1/users/{user}/ban`: ban the user from the whole tenant, for `secs` or until lifted. Stored first, then
/// broadcast: every socket of the user closes with 4003, and every authentication is refused while it lasts.
pub async fn ban_user(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(user): Path<String>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let user = parse_user(&user)?;
    let secs = parse_restriction(&body)?;
    let until_ms = moderation::until_ms(secs).map_err(|e| ApiError::bad_request(e.to_string()))?;
    gw.tokens.ban(&tenant.project_id, &user, until_ms, now_ms()).await?;
    // Gateways of earlier releases know no `Ban`: the `User` revocation closes the user's sockets there too.
    for target in [RevocationTarget::Ban { user: user.clone(), until_ms }, RevocationTarget::User { user }] {
        revocation::broadcast(&gw, &tenant.project_id, target)
            .await
            .map_err(|e| ApiError::unavailable(e.to_string()))?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /v1/users/{user}/ban`: lift a tenant ban; 404 when there is none.
pub async fn unban_user(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<StatusCode, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?;
    let user = parse_user(&user)?;
    let lifted = gw.tokens.unban(&tenant.project_id, &user).await?;
    // Gateways that miss this keep refusing the user only while Redis cannot be asked (it decides otherwise).
    if let Err(error) =
        revocation::broadcast(&gw, &tenant.project_id, RevocationTarget::Unban { user: user.clone() }).await
    {
        tracing::warn!(%error, "the lifted ban was not broadcast");
    }
    match lifted {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(ApiError::new(ErrorCode::NotFound, format!("{user} is not banned"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_checked() {
        assert_eq!(parse_restriction(b"").unwrap(), None);
        assert_eq!(parse_restriction(b" \n").unwrap(), None);
        assert_eq!(parse_restriction(br#"{"secs": 60}"#).unwrap(), Some(60));
        assert_eq!(parse_restriction(br#"{}"#).unwrap(), None);
        for bad in [&br#"{"secs": 0}"#[..], br#"{"secs": -5}"#, br#"{"secs": 1e40}"#, br#"{"until": 5}"#, b"[]"] {
            assert_eq!(parse_restriction(bad).unwrap_err().code, ErrorCode::BadRequest, "{bad:?}");
        }
        assert_eq!(
            parse_room_settings(br#"{"slow_mode_secs": 10, "frozen": true}"#).unwrap(),
            vec![Moderation::SlowMode { secs: 10 }, Moderation::Freeze { frozen: true }]
        );
        assert!(parse_room_settings(b"{}").is_err());
        assert!(parse_room_settings(br#"{"slow_mode_secs": 4294967296}"#).is_err());
    }
}
