//! Room reads that the HTTP API (for the tenant's backend) and the WebSocket (for a user) share: a history page,
//! read from a persistor once the room's router shard allowed it (and told the room's last seq, so the page holds
//! every acknowledged event), the members list with each member's presence, and the history page limit.
//!
//! It does not parse requests or shape answers (each edge does, in its own format), and holds no rule of who may
//! read what: the room's router shard decides that (`CanRead`, `Members`).

use crate::auth::Identity;
use crate::upstream::{self, UpstreamError};
use crate::Gateway;
use switchyard_protocol::client::{Member, Message as HistoryMessage, OkResult};
use switchyard_protocol::internal::{HistoryReply, HistoryRequest, RoomCommand, INTERNAL_VERSION};
use switchyard_protocol::{limits, ErrorCode, ProjectId, RoomId, UserId};

/// Who reads a room: the tenant's backend (any room of the tenant) or a user (as their token allows).
#[derive(Debug, Clone, Copy)]
pub enum Reader<'a> {
    Backend,
    User(&'a Identity),
}

impl Reader<'_> {
    fn user(&self) -> Option<&UserId> {
        match self {
            Reader::Backend => None,
            Reader::User(identity) => Some(&identity.user),
        }
    }

    fn grants(&self) -> Vec<String> {
        match self {
            Reader::Backend => Vec::new(),
            Reader::User(identity) => identity.grants.clone(),
        }
    }
}

/// A `limit` outside `1..=HISTORY_MAX_LIMIT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("limit must be 1 to {}", limits::HISTORY_MAX_LIMIT)]
pub struct HistoryLimitError;

/// The page size a history read asks for: the default when none is given.
pub fn history_limit(limit: Option<u32>) -> Result<u32, HistoryLimitError> {
    let limit = limit.unwrap_or(limits::HISTORY_DEFAULT_LIMIT);
    if !(1..=limits::HISTORY_MAX_LIMIT).contains(&limit) {
        return Err(HistoryLimitError);
    }
    Ok(limit)
}

/// Which page of a room's history: before or after a seq (neither: the latest), at most `limit` messages; with
/// `thread`, of the replies to that message only.
#[derive(Debug, Clone, Copy)]
pub struct HistoryPage {
    pub before: Option<u64>,
    pub after: Option<u64>,
    pub limit: u32,
    pub thread: Option<u64>,
}

/// A page of `room`'s history as `reader` may read it, with whether more messages lie beyond it.
pub async fn read_history(
    gw: &Gateway,
    tenant: &ProjectId,
    reader: Reader<'_>,
    room: &RoomId,
    page: HistoryPage,
) -> Result<(Vec<HistoryMessage>, bool), UpstreamError> {
    let command = RoomCommand::CanRead { room: room.clone(), grants: reader.grants() };
    let allowed = upstream::command(gw, tenant, reader.user(), command).await?;
    let min_seq = match allowed {
        OkResult::RoomSeq { seq, .. } => seq,
        _ => 0,
    };
    let request = HistoryRequest {
        v: INTERNAL_VERSION,
        tenant: tenant.clone(),
        room: room.clone(),
        before: page.before,
        after: page.after,
        limit: page.limit,
        min_seq,
        thread: page.thread,
    };
    match upstream::history(gw, request).await? {
        // A persistor of an earlier release knows no `thread` and answers the room's page: keep only the replies.
        HistoryReply::Ok { mut messages, more } => {
            if let Some(parent) = page.thread {
                messages.retain(|message| message.reply_to == Some(parent));
            }
            Ok((messages, more))
        }
        HistoryReply::Err { code, message } => Err(UpstreamError::new(code, message)),
    }
}

/// `room`'s members as `reader` may list them, each with `online` from the member's presence owner.
pub async fn members(
    gw: &Gateway,
    tenant: &ProjectId,
    reader: Reader<'_>,
    room: &RoomId,
) -> Result<Vec<Member>, UpstreamError> {
    let command = RoomCommand::Members { room: room.clone() };
    let OkResult::Members { mut members } = upstream::command(gw, tenant, reader.user(), command).await? else {
        return Err(UpstreamError::new(ErrorCode::Internal, "unexpected members reply"));
    };
    let users: Vec<UserId> = members.iter().map(|m| m.user.clone()).collect();
    let mut states = std::collections::BTreeMap::new();
    for chunk in users.chunks(limits::MAX_USERS_PER_OP) {
        states.extend(upstream::presence(gw, tenant, chunk).await?);
    }
    for member in &mut members {
        member.online = states.get(member.user.as_str()).is_some_and(|state| state.online);
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_history_limit_defaults_and_is_bounded_by_the_protocol() {
        assert_eq!(history_limit(None), Ok(limits::HISTORY_DEFAULT_LIMIT));
        assert_eq!(history_limit(Some(1)), Ok(1));
        assert_eq!(history_limit(Some(limits::HISTORY_MAX_LIMIT)), Ok(limits::HISTORY_MAX_LIMIT));
        assert_eq!(history_limit(Some(0)), Err(HistoryLimitError));
        assert_eq!(history_limit(Some(limits::HISTORY_MAX_LIMIT + 1)), Err(HistoryLimitError));
        assert_eq!(HistoryLimitError.to_string(), "limit must be 1 to 100");
    }
}
