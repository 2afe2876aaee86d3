//! A user's memberships as the rooms bucket keeps them: one key per user and room (role and read marker), written
//! only by that room's actor, so joins in many rooms at once never contend on one value and no value grows with the
//! user's room count. Listed a page at a time and counted with batched direct gets on the bucket's stream.
//!
//! An ended membership is purged from the stream (not deleted with a marker), so nothing accumulates for rooms a
//! user has left. The one-record-per-user layout of earlier releases is read as a fallback and migrated to per-room
//! keys when the user's rooms are listed. This module decides nothing about who may join what.

use crate::context::RouterContext;
use crate::direct::{self, Ask, DirectGetError};
use async_nats::jetstream::kv;
use switchyard_protocol::client::RoomSummary;
use switchyard_protocol::internal::{RoomEvent, UserRoom, UserRooms};
use switchyard_protocol::shard::shard_of_room;
use switchyard_protocol::{codec, subjects, ProjectId, RoomId, UserId};
use switchyard_service::nats::{compare_and_set, latest_entry, CasError};

/// Why a membership could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MembershipError {
    #[error("read {what}: {source}")]
    Read { what: &'static str, source: switchyard_service::nats::LeaderReadError },
    #[error("{what}: {source}")]
    Codec { what: &'static str, source: codec::CodecError },
    #[error("write a membership: {0}")]
    Write(#[source] kv::PutError),
    #[error("{what}: {source}")]
    Purge { what: &'static str, source: async_nats::jetstream::stream::PurgeError },
    #[error("migrate a membership: {0}")]
    Migrate(#[source] kv::CreateError),
    #[error(transparent)]
    DirectGet(#[from] DirectGetError),
    #[error("write user rooms: {0}")]
    Cas(#[source] CasError),
    #[error("the user's earlier rooms record is too contended; retry")]
    Contended,
}

/// Memberships per page of a user's rooms: one page is one NATS message (a room summary is at most about 180 bytes).
pub(crate) const ROOMS_PAGE: usize = 1_000;
/// Rooms whose last event one request reads.
const LAST_EVENTS_PER_REQUEST: usize = 64;

/// The user's membership in `room`: `None` when they are not a member.
pub(crate) async fn get(
    ctx: &RouterContext,
    tenant: &ProjectId,
    user: &UserId,
    room: &RoomId,
) -> Result<Option<UserRoom>, MembershipError> {
    let key = subjects::user_room_key(tenant, user, room);
    match latest_entry(&ctx.rooms, &key)
        .await
        .map_err(|source| MembershipError::Read { what: "a membership", source })?
    {
        Some(entry) if entry.operation == kv::Operation::Put => codec::decode::<UserRoom>(&entry.value)
            .map(Some)
            .map_err(|source| MembershipError::Codec { what: "a membership", source }),
        _ => Ok(legacy(ctx, tenant, user).await?.and_then(|(rooms, _)| rooms.rooms.get(room).copied())),
    }
}

/// Record the user's membership in `room` (its role and read marker).
pub(crate) async fn put(
    ctx: &RouterContext,
    tenant: &ProjectId,
    user: &UserId,
    room: &RoomId,
    entry: UserRoom,
) -> Result<(), MembershipError> {
    let payload =
        codec::encode(&entry).map_err(|source| MembershipError::Codec { what: "encode a membership", source })?;
    ctx.rooms
        .put(subjects::user_room_key(tenant, user, room), payload)
        .await
        .map(|_| ())
        .map_err(MembershipError::Write)
}

/// End the user's membership in `room`: its key leaves the stream, and the room leaves an earlier release's record.
pub(crate) async fn remove(
    ctx: &RouterContext,
    tenant: &ProjectId,
    user: &UserId,
    room: &RoomId,
) -> Result<(), MembershipError> {
    let subject = subjects::rooms_bucket_subject(&subjects::user_room_key(tenant, user, room));
    ctx.rooms
        .stream
        .purge()
        .filter(subject)
        .await
        .map_err(|source| MembershipError::Purge { what: "remove a membership", source })?;
    for _ in 0..16 {
        let Some((mut rooms, revision)) = legacy(ctx, tenant, user).await? else { return Ok(()) };
        if rooms.rooms.remove(room).is_none() {
            return Ok(());
        }
        let payload =
            codec::encode(&rooms).map_err(|source| MembershipError::Codec { what: "encode user rooms", source })?;
        match compare_and_set(&ctx.rooms, &subjects::user_rooms_key(tenant, user), payload, Some(revision)).await {
            Ok(_) => return Ok(()),
            Err(CasError::Conflict) => continue,
            Err(error) => return Err(MembershipError::Cas(error)),
        }
    }
    Err(MembershipError::Contended)
}

/// How many rooms the user is a member of, in one request (and, once, the migration of an earlier record).
pub(crate) async fn count(ctx: &RouterContext, tenant: &ProjectId, user: &UserId) -> Result<u64, MembershipError> {
    migrate(ctx, tenant, user).await?;
    count_matching(ctx, &subjects::user_room_subjects(tenant, user)).await
}

/// How many rooms the tenant has, in one request.
pub(crate) async fn tenant_rooms(ctx: &RouterContext, tenant: &ProjectId) -> Result<u64, MembershipError> {
    count_matching(ctx, &subjects::tenant_room_subjects(tenant)).await
}

/// How many keys of the rooms bucket match `filter`: the first match and the server's count of those after it.
async fn count_matching(ctx: &RouterContext, filter: &str) -> Result<u64, MembershipError> {
    let ask = Ask::Matching { filter, from: 1, batch: 1 };
    let first = direct::batch(&ctx.nats, subjects::ROOMS_DIRECT_GET, ask).await?;
    Ok(first.first().map_or(0, |got| got.pending + 1))
}

/// A page of the user's rooms from the cursor `after` (0 first), each with the room's last seq; with the cursor of
/// the next page when there is one.
pub(crate) async fn page(
    ctx: &RouterContext,
    tenant: &ProjectId,
    user: &UserId,
    after: u64,
) -> Result<(Vec<RoomSummary>, Option<u64>), MembershipError> {
    if after == 0 {
        migrate(ctx, tenant, user).await?;
    }
    let filter = subjects::user_room_subjects(tenant, user);
    let ask = Ask::Matching { filter: &filter, from: after.saturating_add(1), batch: ROOMS_PAGE };
    let got = direct::batch(&ctx.nats, subjects::ROOMS_DIRECT_GET, ask).await?;
    let next = got.last().filter(|last| last.pending > 0).map(|last| last.sequence);
    let mut memberships = Vec::with_capacity(got.len());
    for got in got.into_iter().filter(|got| !got.removed) {
        let (Some(room), Ok(entry)) =
            (subjects::room_of_user_room_subject(&got.subject), codec::decode::<UserRoom>(&got.payload))
        else {
            tracing::warn!(subject = %got.subject, "an unreadable membership key skipped");
            continue;
        };
        memberships.push((room, entry));
    }
    // The rooms' last events, one request at a time, so one user's listing costs the NATS server and the shard one
    // request's worth of work at a time (requests in parallel made other tenants' acks slower on a loaded server).
    let mut rooms = Vec::with_capacity(memberships.len());
    for chunk in memberships.chunks(LAST_EVENTS_PER_REQUEST) {
        rooms.extend(last_seqs(ctx, tenant, chunk).await?);
    }
    Ok((rooms, next))
}

/// Summaries of `chunk`'s memberships, each with its room's last seq, unread count and latest message, all from
/// the room's last event (0 and none for a room whose events all aged out).
async fn last_seqs(
    ctx: &RouterContext,
    tenant: &ProjectId,
    chunk: &[(RoomId, UserRoom)],
) -> Result<Vec<RoomSummary>, MembershipError> {
    let logs: Vec<String> = chunk
        .iter()
        .map(|(room, _)| subjects::event_log(shard_of_room(tenant, room, ctx.config.shard_count), tenant, room))
        .collect();
    let last = direct::batch(&ctx.nats, subjects::EVENTS_DIRECT_GET, Ask::LastOf { subjects: &logs }).await?;
    let mut lasts: std::collections::HashMap<String, RoomEvent> = last
        .into_iter()
        .filter_map(|got| codec::decode::<RoomEvent>(&got.payload).ok().map(|event| (got.subject, event)))
        .collect();
    let now_ms = crate::room::now_us() / 1000;
    Ok(chunk
        .iter()
        .zip(&logs)
        .map(|((room, entry), log)| {
            let (seq, tally) = lasts.remove(log).map(|event| (event.seq, event.tally_through())).unwrap_or_default();
            // A latest message past its retention is gone from history: no preview, and nothing counted unread.
            let expired = tally.last_message_expires_ms.is_some_and(|at| at <= now_ms);
            RoomSummary {
                room: room.clone(),
                role: entry.role,
                seq,
                read: entry.read,
                unread: if expired { 0 } else { entry.unread(seq, tally.msgs) },
                last_message: tally.last_message.filter(|_| !expired),
            }
        })
        .collect())
}

/// The record of an earlier release, with its revision, when the user has one.
async fn legacy(
    ctx: &RouterContext,
    tenant: &ProjectId,
    user: &UserId,
) -> Result<Option<(UserRooms, u64)>, MembershipError> {
    let key = subjects::user_rooms_key(tenant, user);
    match latest_entry(&ctx.rooms, &key).await.map_err(|source| MembershipError::Read { what: "user rooms", source })? {
        Some(entry) if entry.operation == kv::Operation::Put => codec::decode::<UserRooms>(&entry.value)
            .map(|rooms| Some((rooms, entry.revision)))
            .map_err(|source| MembershipError::Codec { what: "user rooms", source }),
        _ => Ok(None),
    }
}

/// Move an earlier release's record to per-room keys. A per-room key that exists is newer and is kept.
async fn migrate(ctx: &RouterContext, tenant: &ProjectId, user: &UserId) -> Result<(), MembershipError> {
    let Some((rooms, _)) = legacy(ctx, tenant, user).await? else { return Ok(()) };
    for (room, entry) in &rooms.rooms {
        let payload =
            codec::encode(entry).map_err(|source| MembershipError::Codec { what: "encode a membership", source })?;
        if let Err(error) = ctx.rooms.create(subjects::user_room_key(tenant, user, room), payload).await {
            if error.kind() != kv::CreateErrorKind::AlreadyExists {
                return Err(MembershipError::Migrate(error));
            }
        }
    }
    let subject = subjects::rooms_bucket_subject(&subjects::user_rooms_key(tenant, user));
    ctx.rooms
        .stream
        .purge()
        .filter(subject)
        .await
        .map_err(|source| MembershipError::Purge { what: "remove user rooms", source })?;
    tracing::info!(%tenant, %user, rooms = rooms.rooms.len(), "a user's rooms moved to per-room keys");
    Ok(())
}
