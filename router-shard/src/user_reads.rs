//! The user requests that only read (`rooms`, the `last_seen` part of `presence`), each served by a task of its own
//! so a user with many rooms never holds up the shard's loop, its room commands or other users' requests. Every
//! read is batched: one request per page of memberships, per 64 rooms' last events, per 100 presence records.
//!
//! A user has one read in flight at a time (`ReadQueue`): however many sockets loop `rooms`, one user costs the
//! shard one read's worth of work, and the rest of the fleet keeps the other cores. Presence itself (who is
//! online) is the shard loop's, and is handed in.

use crate::context::RouterContext;
use crate::direct::{self, Ask};
use crate::memberships;
use futures::future::BoxFuture;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use switchyard_protocol::client::{OkResult, PresenceState, RoomSummary};
use switchyard_protocol::internal::{CommandReply, PresenceRecord};
use switchyard_protocol::{codec, subjects, ErrorCode, ProjectId, UserId};
use tokio::task::{Id, JoinSet};

/// Presence records one request reads.
const RECORDS_PER_REQUEST: usize = 100;
/// Users whose reads run at once on one shard.
const USERS_IN_FLIGHT: usize = 32;
/// Reads of one user waiting behind the one in flight.
const WAITING_PER_USER: usize = 8;

/// A read to run: it answers its requester itself.
pub(crate) type Read = BoxFuture<'static, ()>;

/// Why a read was not taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `USERS_IN_FLIGHT` other users are being read.
    ShardBusy,
    /// The user already has `WAITING_PER_USER` reads waiting.
    UserBusy,
}

/// The shard's reads: one task per user at a time, the user's next reads waiting in order behind it.
///
/// Bounded twice: at most `USERS_IN_FLIGHT` users have an entry, each with at most `WAITING_PER_USER` waiting.
#[derive(Default)]
pub(crate) struct ReadQueue {
    /// The read in flight of each user that has one.
    running: JoinSet<()>,
    /// Whose read each running task is.
    owner: HashMap<Id, (ProjectId, UserId)>,
    /// Per user with a read in flight, the reads waiting behind it.
    waiting: HashMap<(ProjectId, UserId), VecDeque<Read>>,
}

impl ReadQueue {
    /// Run `read` now, or after the user's reads before it.
    pub(crate) fn offer(&mut self, tenant: ProjectId, user: UserId, read: Read) -> Result<(), Refused> {
        let key = (tenant, user);
        if let Some(queue) = self.waiting.get_mut(&key) {
            if queue.len() >= WAITING_PER_USER {
                return Err(Refused::UserBusy);
            }
            queue.push_back(read);
            return Ok(());
        }
        if self.waiting.len() >= USERS_IN_FLIGHT {
            return Err(Refused::ShardBusy);
        }
        let id = self.running.spawn(read).id();
        self.owner.insert(id, key.clone());
        self.waiting.insert(key, VecDeque::new());
        Ok(())
    }

    /// Wait for a read to finish and start its user's next; pending forever when nothing runs (for `select!`).
    pub(crate) async fn reap(&mut self) {
        let Some(finished) = self.running.join_next_with_id().await else {
            return std::future::pending().await;
        };
        let id = match finished {
            Ok((id, ())) => id,
            Err(error) => error.id(),
        };
        let Some(key) = self.owner.remove(&id) else { return };
        match self.waiting.get_mut(&key).and_then(VecDeque::pop_front) {
            Some(next) => {
                let id = self.running.spawn(next).id();
                self.owner.insert(id, key);
            }
            None => {
                self.waiting.remove(&key);
            }
        }
    }

    /// Stop every read (their requesters time out and retry elsewhere).
    pub(crate) fn abort_all(&mut self) {
        self.running.abort_all();
        self.waiting.clear();
        self.owner.clear();
    }
}

/// `rooms` of earlier gateways: every page, in one reply.
pub(crate) async fn all_rooms(ctx: Arc<RouterContext>, tenant: ProjectId, user: UserId) -> CommandReply {
    let mut rooms: Vec<RoomSummary> = Vec::new();
    let mut after = 0;
    loop {
        match memberships::page(&ctx, &tenant, &user, after).await {
            Ok((page, next)) => {
                rooms.extend(page);
                match next {
                    Some(next) if next > after => after = next,
                    _ => break,
                }
            }
            Err(error) => return CommandReply::err(ErrorCode::Unavailable, error.to_string()),
        }
    }
    CommandReply::Ok { result: OkResult::Rooms { rooms } }
}

/// One page of the user's rooms.
pub(crate) async fn rooms_page(ctx: Arc<RouterContext>, tenant: ProjectId, user: UserId, after: u64) -> CommandReply {
    match memberships::page(&ctx, &tenant, &user, after).await {
        Ok((rooms, next)) => CommandReply::RoomsPage { rooms, next },
        Err(error) => CommandReply::err(ErrorCode::Unavailable, error.to_string()),
    }
}

/// Presence of users whose online state the shard loop already knows: `last_seen` is read for the offline ones.
pub(crate) async fn presence(ctx: Arc<RouterContext>, tenant: ProjectId, online: Vec<(UserId, bool)>) -> CommandReply {
    let offline: Vec<&UserId> = online.iter().filter(|(_, online)| !online).map(|(user, _)| user).collect();
    let mut last_seen: BTreeMap<String, u64> = BTreeMap::new();
    for chunk in offline.chunks(RECORDS_PER_REQUEST) {
        let keys: Vec<String> =
            chunk.iter().map(|user| subjects::rooms_bucket_subject(&subjects::presence_key(&tenant, user))).collect();
        let got = match direct::batch(&ctx.nats, subjects::ROOMS_DIRECT_GET, Ask::LastOf { subjects: &keys }).await {
            Ok(got) => got,
            Err(message) => return CommandReply::err(ErrorCode::Unavailable, format!("presence records: {message}")),
        };
        let by_subject: BTreeMap<String, u64> = got
            .into_iter()
            .filter(|got| !got.removed)
            .filter_map(|got| {
                let record = codec::decode::<PresenceRecord>(&got.payload).ok()?;
                Some((got.subject, record.last_seen?))
            })
            .collect();
        for (user, key) in chunk.iter().zip(&keys) {
            if let Some(at) = by_subject.get(key) {
                last_seen.insert(user.to_string(), *at);
            }
        }
    }
    let users = online
        .into_iter()
        .map(|(user, online)| {
            let last_seen = if online { None } else { last_seen.get(user.as_str()).copied() };
            (user.to_string(), PresenceState { online, last_seen })
        })
        .collect();
    CommandReply::Ok { result: OkResult::Presence { users } }
}
