//! The history store: the trait every backend implements, the query and page types, and the backends themselves
//! (`cql` for ScyllaDB/Cassandra, `embedded` for single-machine mode on redb).
//!
//! A store applies sequenced room events idempotently, answers history pages and tells a room's head (its highest
//! seq and that event's time). It does not consume JetStream, decide what is acknowledged, or check who may read a
//! room.

pub mod conformance;
pub mod cql;
pub mod embedded;
mod page;

use std::future::Future;
use switchyard_protocol::client::Message;
use switchyard_protocol::internal::{EventBody, RoomEvent};
use switchyard_protocol::{ProjectId, RoomId, UserId};

/// A store failure. `Unavailable` is worth retrying (the backend is down, timing out or overloaded, and the same
/// write may succeed later); `Rejected` is the event's own fault (the store refused a value it cannot hold, and
/// will refuse it on every attempt); `Corrupt` means stored data cannot be read. Each carries a [`StoreFault`]: what
/// the store was doing, with the backend's own error as its source when one failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend did not answer or failed in a way that may pass (I/O, timeouts, overload, a lost task).
    #[error("history store unavailable: {0}")]
    Unavailable(#[source] StoreFault),
    /// The store refused the write as invalid: the same write would be refused again.
    #[error("history store rejected the write: {0}")]
    Rejected(#[source] StoreFault),
    /// Stored data cannot be read (undecodable rows, a damaged file), or a value cannot be encoded.
    #[error("history store holds data it cannot read: {0}")]
    Corrupt(#[source] StoreFault),
    /// A query or a configuration the store refuses before any backend work (a page size, a keyspace name).
    #[error("invalid history query: {0}")]
    InvalidQuery(#[source] StoreFault),
    /// The keyspace's schema is not the one this release reads and writes; only a migration (or another release)
    /// changes that, so a starting persistor does not wait for it. The message names the versions and the fix.
    #[error("history store schema: {0}")]
    SchemaMismatch(String),
}

/// The error of a backend call under a store failure; its type varies with the backend and the call.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a [`StoreError`] is about: a message saying what the store was doing or found and, when a backend call
/// failed, that call's error as the source. Shows as its message, which already quotes the source's text.
#[derive(Debug)]
pub struct StoreFault {
    message: String,
    source: Option<BoxError>,
}

impl StoreFault {
    /// A fault the store found itself (bad data, a bad argument): no backend error under it.
    pub fn new(message: impl Into<String>) -> Self {
        StoreFault { message: message.into(), source: None }
    }

    /// A backend call that failed while the store did `what`: shows as `what: source`.
    pub fn caused(what: &str, source: impl Into<BoxError>) -> Self {
        let source = source.into();
        StoreFault { message: format!("{what}: {source}"), source: Some(source) }
    }

    /// A backend call that failed, shown as `message` (which says what the source says, in other words).
    pub fn described(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        StoreFault { message: message.into(), source: Some(source.into()) }
    }
}

impl std::fmt::Display for StoreFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StoreFault {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|source| source as &(dyn std::error::Error + 'static))
    }
}

/// One page request. Pages are always returned in ascending seq.
///
/// - only `after`: the first `limit` messages with seq > after; `more` when later ones exist.
/// - only `before`: the last `limit` messages with seq < before; `more` when earlier ones exist.
/// - both: the first `limit` messages with after < seq < before; `more` when later ones exist in that range.
/// - neither: the latest `limit` messages; `more` when earlier ones exist.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryQuery {
    pub tenant: ProjectId,
    pub room: RoomId,
    pub before: Option<u64>,
    pub after: Option<u64>,
    /// 1..=100.
    pub limit: u32,
}

/// The newest event a store holds for a room: the highest seq of any event applied for it, and that event's
/// `ts_us`. Both 0 when the store has nothing for the room. Router shards continue a room's seq (and keep its
/// timestamps increasing) from it once the room's events have left the events stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoomHead {
    pub last_seq: u64,
    pub last_ts_us: u64,
}

/// One page of messages, ascending by seq.
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryPage {
    pub messages: Vec<Message>,
    pub more: bool,
}

/// One page of a user's messages: what [`HistoryStore::authored_messages`] answers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuthoredMessages {
    pub messages: Vec<(RoomId, Message)>,
    /// Where the next page starts (after this room and seq); `None` when this page was the last.
    pub next: Option<(RoomId, u64)>,
}

/// A history backend.
///
/// `apply` must be idempotent and order-insensitive: applying any multiset of events, in any order, any number of
/// times, leaves the same state as applying each once in seq order. Effects are keyed by (tenant, room, seq) and an
/// event's `ts_us` decides between conflicting writes (the later event wins), so a create replayed after an edit
/// or a delete never undoes it.
pub trait HistoryStore: Send + Sync + 'static {
    /// Apply a batch of events. On error nothing is assumed applied; the caller retries the whole batch.
    fn apply(&self, events: &[RoomEvent]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// One page of a room's messages (events of kind `msg`, with their edits, deletes and reactions folded in, and
    /// the number of replies each has in `reply_count`).
    fn history(&self, query: &HistoryQuery) -> impl Future<Output = Result<HistoryPage, StoreError>> + Send;

    /// One page of the replies to message `parent` (the messages whose `reply_to` is `parent`), in the window of
    /// `query` over the replies' seqs, folded as in `history`. A parent that does not exist has no replies.
    fn thread(&self, query: &HistoryQuery, parent: u64)
        -> impl Future<Output = Result<HistoryPage, StoreError>> + Send;

    /// The room's head: the highest seq of any event applied for the room (of any kind: a join, a leave or a
    /// reaction counts as much as a message) and that event's `ts_us`; both 0 when none.
    fn head(&self, tenant: &ProjectId, room: &RoomId) -> impl Future<Output = Result<RoomHead, StoreError>> + Send;

    /// Remove messages past their expiry (with their reactions and thread entries), at most a bounded number per
    /// call; how many went. A store whose backend expires rows itself (CQL's TTL) has nothing to do. Reads never
    /// show an expired message either way.
    fn sweep(&self) -> impl Future<Output = Result<u64, StoreError>> + Send {
        async { Ok(0) }
    }

    /// One page of the rooms holding a message or reaction of `user` (by the authorship index), in room order
    /// after `after`, and the cursor of the next page (`None`: no more). A room whose messages were all erased or
    /// deleted with the room may still be listed.
    fn authored_rooms(
        &self,
        tenant: &ProjectId,
        user: &UserId,
        after: Option<&RoomId>,
        limit: u32,
    ) -> impl Future<Output = Result<(Vec<RoomId>, Option<RoomId>), StoreError>> + Send;

    /// One page of `user`'s messages, in (room, seq) order after `after`: at most `limit` index entries are read,
    /// and the messages among them that are neither deleted, erased nor expired are returned (without reactions,
    /// which are other users' data), with the cursor of the next page (`None`: no more).
    fn authored_messages(
        &self,
        tenant: &ProjectId,
        user: &UserId,
        after: Option<(&RoomId, u64)>,
        limit: u32,
    ) -> impl Future<Output = Result<AuthoredMessages, StoreError>> + Send;

    /// The highest seq of any event applied for the room, 0 when none.
    fn last_seq(&self, tenant: &ProjectId, room: &RoomId) -> impl Future<Output = Result<u64, StoreError>> + Send {
        async move { Ok(self.head(tenant, room).await?.last_seq) }
    }
}

/// Where an event stands in its author's authorship index, the one place both stores take it from: (author, seq,
/// emoji). A message under its seq and an edit under its message's (it may arrive before the message), both with
/// the emoji ""; a reaction under the seq of the message it targets, with its emoji. Nothing else is the user's own
/// words, which an erasure of the user takes out of history.
pub(crate) fn authored_entry(event: &RoomEvent) -> Option<(&UserId, u64, &str)> {
    match &event.body {
        EventBody::Msg { from, .. } => Some((from, event.seq, "")),
        EventBody::Edit { from, target, .. } => Some((from, *target, "")),
        EventBody::Reaction { target, user, emoji, .. } => Some((user, *target, emoji.as_str())),
        EventBody::Delete { .. }
        | EventBody::Pin { .. }
        | EventBody::Joined { .. }
        | EventBody::Left { .. }
        | EventBody::Moderation { .. }
        | EventBody::RoomDeleted {}
        | EventBody::UserErased { .. } => None,
    }
}

/// Refuse an event carrying a number no store holds: every stored seq, target, reply and time must fit a signed
/// 64-bit integer (CQL's `bigint`), so both backends reject exactly the same events, before writing any of a batch.
pub(crate) fn check_event(event: &RoomEvent) -> Result<(), StoreError> {
    let fits = |what: &str, value: u64| {
        if value <= i64::MAX as u64 {
            Ok(())
        } else {
            Err(StoreError::Rejected(StoreFault::new(format!(
                "{what} {value} of the event at seq {} in room {} is beyond what the store holds",
                event.seq, event.room
            ))))
        }
    };
    fits("seq", event.seq)?;
    fits("ts_us", event.ts_us)?;
    match &event.body {
        EventBody::Msg { reply_to: Some(reply_to), .. } => fits("reply_to", *reply_to),
        EventBody::Edit { target, .. }
        | EventBody::Delete { target, .. }
        | EventBody::Reaction { target, .. }
        | EventBody::Pin { target, .. } => fits("target", *target),
        EventBody::Msg { reply_to: None, .. }
        | EventBody::Joined { .. }
        | EventBody::Left { .. }
        | EventBody::Moderation { .. }
        | EventBody::RoomDeleted {}
        | EventBody::UserErased { .. } => Ok(()),
    }
}

/// Unix time in milliseconds: what an event's `expires_ms` is compared with.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Refuse a page size outside 1..=`HISTORY_MAX_LIMIT`, before any backend work.
pub(crate) fn check_limit(limit: u32) -> Result<(), StoreError> {
    let allowed = 1..=switchyard_protocol::limits::HISTORY_MAX_LIMIT;
    if allowed.contains(&limit) {
        Ok(())
    } else {
        Err(StoreError::InvalidQuery(StoreFault::new(format!("limit {limit} is outside {allowed:?}"))))
    }
}
