//! A user's data across the tenant, for the tenant's backend: erase the user (`DELETE /v1/users/{user}`) and export
//! what the user wrote and where they are a member (`GET /v1/users/{user}/export`).
//!
//! Both only orchestrate: the rooms' router shards erase what each room holds (its roster, the user's membership,
//! the user's events in the stream), the persistors make the user's messages tombstones when they apply each room's
//! `user_erased`, and the user's presence owner forgets it. Nothing here holds state between requests.

use super::{now_ms, tenant_of_request, ApiError};
use crate::revocation;
use crate::upstream;
use crate::Gateway;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Arc;
use switchyard_protocol::internal::{AuthoredPage, AuthoredReply, RevocationTarget, RoomCommand, UserCommand};
use switchyard_protocol::{ErrorCode, ProjectId, RoomId, UserId};

/// How long an erased user's tokens stay refused: the longest an opaque token lives. A JWT the tenant issued before
/// the erasure must expire within it (or be revoked by `jti`), or it signs in a new user of the same id afterwards.
const ERASURE_BAN_MS: u64 = 86_400_000;

/// Rooms erased at once.
const ERASE_CONCURRENCY: usize = 8;

/// Pages of a user's authored rooms read at most: more than the rooms any tenant holds, a stop for a persistor
/// that would answer the same page forever.
const MAX_AUTHORED_PAGES: usize = 100_000;

fn parse_user(user: &str) -> Result<UserId, ApiError> {
    UserId::parse(user).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// `DELETE /v1/users/{user}`: erase the user from the tenant. Their sockets close (4003), their opaque tokens go,
/// and every token of theirs is refused for [`ERASURE_BAN_MS`]; in every room they are a member of or wrote in,
/// their membership, read marker, roster entry and moderation records go, their events leave the events stream,
/// and their messages become tombstones with no author in both stores (a direct-message room with them is deleted
/// whole); their presence is forgotten. Idempotent: when it fails or times out, calling it again finishes it.
pub async fn erase_user(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?.project_id;
    let user = parse_user(&user)?;
    // Cut off first, so that nothing new of theirs is sequenced while the rooms are erased.
    let until_ms = now_ms() + ERASURE_BAN_MS;
    gw.tokens.ban(&tenant, &user, Some(until_ms), now_ms()).await?;
    gw.tokens.revoke_user(&tenant, &user).await?;
    for target in [
        RevocationTarget::Ban { user: user.clone(), until_ms: Some(until_ms) },
        RevocationTarget::User { user: user.clone() },
    ] {
        revocation::broadcast(&gw, &tenant, target).await.map_err(|e| ApiError::unavailable(e.to_string()))?;
    }
    // The rooms they are a member of (as many as the per-user room quota allows), then the rooms they wrote in, a
    // page at a time: nothing grows with all the rooms a user ever wrote in.
    let members_of: BTreeSet<RoomId> =
        upstream::rooms(&gw, &tenant, &user).await?.into_iter().map(|summary| summary.room).collect();
    let mut erased = erase_in(&gw, &tenant, &user, members_of.iter().cloned().collect()).await?;
    let mut after = None;
    let mut finished = false;
    for _ in 0..MAX_AUTHORED_PAGES {
        let (page, next) = authored_rooms(&gw, &tenant, &user, after.clone()).await?;
        let page: Vec<RoomId> = page.into_iter().filter(|room| !members_of.contains(room)).collect();
        erased += erase_in(&gw, &tenant, &user, page).await?;
        match next {
            Some(next) if after.as_ref().is_none_or(|after| &next > after) => after = Some(next),
            _ => {
                finished = true;
                break;
            }
        }
    }
    if !finished {
        return Err(ApiError::unavailable("the user's rooms did not end; retry"));
    }
    upstream::user_request(&gw, &tenant, &user, UserCommand::ForgetPresence).await?;
    Ok(Json(json!({"user": user, "rooms": erased})))
}

/// Erase `user` from each of `rooms`, [`ERASE_CONCURRENCY`] at a time; how many of them still existed.
async fn erase_in(gw: &Gateway, tenant: &ProjectId, user: &UserId, rooms: Vec<RoomId>) -> Result<usize, ApiError> {
    let mut results = futures::stream::iter(rooms)
        .map(|room| async move {
            let command = RoomCommand::EraseUser { room, user: user.clone() };
            match upstream::command(gw, tenant, None, command).await {
                Ok(_) => Ok(true),
                // Deleted with its history meanwhile, or never more than an index entry: nothing left to erase.
                Err(error) if error.code == ErrorCode::NotFound => Ok(false),
                Err(error) => Err(error),
            }
        })
        .buffer_unordered(ERASE_CONCURRENCY);
    let mut erased = 0;
    while let Some(result) = results.next().await {
        erased += usize::from(result?);
    }
    Ok(erased)
}

/// One page of the rooms the persistors' authorship index has for the user, after `after`, and the next cursor.
async fn authored_rooms(
    gw: &Gateway,
    tenant: &ProjectId,
    user: &UserId,
    after: Option<RoomId>,
) -> Result<(Vec<RoomId>, Option<RoomId>), ApiError> {
    match upstream::authored(gw, tenant, user, AuthoredPage::Rooms { after }).await? {
        AuthoredReply::Rooms { rooms, next } => Ok((rooms, next)),
        AuthoredReply::Err { code, message } => Err(ApiError::new(code, message)),
        AuthoredReply::Messages { .. } => Err(ApiError::new(ErrorCode::Internal, "unexpected persistor reply")),
    }
}

/// Where a page of an export starts: after message `after_seq` of room `after_room`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportCursor {
    after_room: Option<String>,
    after_seq: Option<u64>,
}

/// `GET /v1/users/{user}/export[?after_room=&after_seq=]`: the user's data as JSON, a page at a time. The first
/// page has `memberships` (every room the user is a member of, with role and read marker); every page has
/// `messages` (the user's messages that are neither deleted nor erased, in room and seq order, without other
/// users' reactions) and `next`, the cursor of the following page, `null` on the last.
pub async fn export_user(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(user): Path<String>,
    Query(cursor): Query<ExportCursor>,
) -> Result<Json<Value>, ApiError> {
    let tenant = tenant_of_request(&gw, &headers).await?.project_id;
    let user = parse_user(&user)?;
    let after = match (cursor.after_room, cursor.after_seq) {
        (None, None) => None,
        (Some(room), Some(seq)) if seq <= i64::MAX as u64 => Some((super::parse_room(&room)?, seq)),
        (Some(_), Some(_)) => return Err(ApiError::bad_request("after_seq is beyond any seq")),
        _ => return Err(ApiError::bad_request("after_room and after_seq go together")),
    };
    let mut page = json!({"user": user});
    if after.is_none() {
        let memberships: Vec<Value> = upstream::rooms(&gw, &tenant, &user)
            .await?
            .into_iter()
            .map(|summary| json!({"room": summary.room, "role": summary.role, "read": summary.read}))
            .collect();
        page["memberships"] = json!(memberships);
    }
    match upstream::authored(&gw, &tenant, &user, AuthoredPage::Messages { after }).await? {
        AuthoredReply::Messages { messages, next } => {
            let messages: Vec<Value> = messages
                .into_iter()
                .map(|(room, message)| {
                    let mut value = json!(message);
                    value["room"] = json!(room);
                    value
                })
                .collect();
            page["messages"] = json!(messages);
            page["next"] = match next {
                Some((room, seq)) => json!({"after_room": room, "after_seq": seq}),
                None => Value::Null,
            };
        }
        AuthoredReply::Err { code, message } => return Err(ApiError::new(code, message)),
        AuthoredReply::Rooms { .. } => return Err(ApiError::new(ErrorCode::Internal, "unexpected persistor reply")),
    }
    Ok(Json(page))
}
