//! The embedded history store: one redb file on local disk, for running the whole fleet on a single machine with
//! no CQL server.
//!
//! It folds room events into per-message rows whose fields carry the `ts_us` of the event that wrote them, so
//! events may arrive in any order and any number of times. A `room_deleted` removes every row of its room before
//! it and leaves a floor that drops any earlier event arriving later. It does not replicate, shard, expire or compact
//! history, and it does not check who may read a room.
//!
//! A room's head (its highest seq and that event's time) is kept in `room_head`, written in the same transaction
//! as the events. `room_last_seq`, the seq alone, is still written beside it, so a file stays readable by earlier
//! releases, and is the fallback for rooms whose events were all written before `room_head` existed.

use super::page::{PageWindow, StoredMessage};
use super::{
    authored_entry, check_event, check_limit, now_ms, AuthoredMessages, HistoryPage, HistoryQuery, HistoryStore,
    RoomHead, StoreError, StoreFault,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use switchyard_protocol::client::Message;
use switchyard_protocol::internal::{EventBody, RoomEvent};
use switchyard_protocol::{MessageId, ProjectId, RoomId, UserId};

/// The file name used when `open` is given a directory.
pub const DEFAULT_FILE_NAME: &str = "history.redb";

/// (tenant, room, seq) -> an encoded [`StoredRow`].
const MESSAGES: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("messages");

/// A reaction's key: (tenant, room, target seq, emoji, user).
type ReactionKey = (&'static str, &'static str, u64, &'static str, &'static str);

/// A reaction's key -> (ts_us of the deciding event, removed).
const REACTIONS: TableDefinition<ReactionKey, (u64, bool)> = TableDefinition::new("reactions");

/// (tenant, room) -> the highest seq of any applied event.
const ROOMS: TableDefinition<(&str, &str), u64> = TableDefinition::new("room_last_seq");

/// (tenant, room) -> (the highest seq of any applied event, that event's `ts_us`).
const HEADS: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("room_head");

/// A thread's reply: (tenant, room, parent seq, reply seq) -> nothing.
const THREADS: TableDefinition<(&str, &str, u64, u64), ()> = TableDefinition::new("thread_replies");

/// (tenant, room, parent seq) -> how many replies `THREADS` holds for it.
const THREAD_COUNTS: TableDefinition<(&str, &str, u64), u64> = TableDefinition::new("thread_counts");

/// (tenant, room) -> the `ts_us` of the room's latest `room_deleted`: nothing before it is kept, and an earlier
/// event that arrives late is dropped. By time, not seq: a room created again once its `room_deleted` left the
/// events stream starts its seqs again from 1, later than the deletion.
const FLOORS: TableDefinition<(&str, &str), u64> = TableDefinition::new("room_floors");

/// (expires_ms, tenant, room, seq) of every message with an expiry, for the sweep.
const EXPIRIES: TableDefinition<(u64, &str, &str, u64), ()> = TableDefinition::new("expiries");

/// A user's authorship, for erasing and exporting the user: (tenant, user, room, seq, emoji) -> nothing. A message
/// of theirs at `seq` has the emoji ""; a reaction of theirs to message `seq` its emoji.
const AUTHORED: TableDefinition<(&str, &str, &str, u64, &str), ()> = TableDefinition::new("authored");

/// (tenant, room, user) -> the `ts_us` of the user's latest erasure from the room: a message, edit or reaction of
/// theirs from before it that arrives late is stored erased, or not at all. By time, not seq, as room deletions:
/// a room created again may start its seqs again, and its events are all later.
const ERASURES: TableDefinition<(&str, &str, &str), u64> = TableDefinition::new("erasures");

/// Messages one sweep removes at most.
const SWEEP_BATCH: usize = 1_000;

/// What this file has been brought to: `threads_indexed` (1 once the replies stored before threads existed were
/// indexed).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The first byte of every encoded row; a different byte means a format this code cannot read.
const ROW_FORMAT: u8 = 1;

/// What a `msg` event wrote: the message's fields, all stamped with that event's `ts_us`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredCreate {
    /// Write timestamp of every field below.
    ts_us: u64,
    /// The message id.
    id: MessageId,
    /// The author; `None` once erased (the body and attrs are emptied with it).
    from: Option<UserId>,
    /// The body as first sent.
    body: String,
    /// `attrs` as JSON text (kept as text so any JSON value round-trips exactly).
    attrs: Option<String>,
    /// The seq this message replies to.
    reply_to: Option<u64>,
    /// When the message leaves history (unix milliseconds); absent from rows of earlier releases.
    #[serde(default)]
    expires_ms: Option<u64>,
}

/// The latest `edit` of a message seen so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredEdit {
    /// Write timestamp of the edit: the later edit wins.
    ts_us: u64,
    /// The edited body.
    body: String,
}

/// The latest `pin` event of a message seen so far (pinned or unpinned).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct StoredPin {
    /// Write timestamp of the pin event: the later one wins.
    ts_us: u64,
    /// Whether that event pinned the message.
    pinned: bool,
}

/// Everything known about one seq of a room. A row may exist before its `msg` arrives (an edit, a delete, a pin or
/// a reaction got there first); such a row is not a message yet and history skips it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StoredRow {
    /// The creating `msg` event's fields, once it has been applied.
    create: Option<StoredCreate>,
    /// The latest edit.
    edit: Option<StoredEdit>,
    /// `ts_us` of the latest delete; the message is a tombstone when set.
    delete_ts_us: Option<u64>,
    /// The latest pin or unpin; absent from rows written before pins existed.
    #[serde(default)]
    pin: Option<StoredPin>,
}

impl StoredRow {
    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match bytes.split_first() {
            Some((&ROW_FORMAT, rest)) => rmp_serde::from_slice(rest)
                .map_err(|e| StoreError::Corrupt(StoreFault::caused("undecodable message row", e))),
            Some((other, _)) => {
                Err(StoreError::Corrupt(StoreFault::new(format!("message row in unknown format {other}"))))
            }
            None => Err(StoreError::Corrupt(StoreFault::new("empty message row"))),
        }
    }

    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut out = vec![ROW_FORMAT];
        rmp_serde::encode::write_named(&mut out, self)
            .map_err(|e| StoreError::Corrupt(StoreFault::caused("cannot encode message row", e)))?;
        Ok(out)
    }

    /// Fold in one event aimed at this row. Every field keeps the value of the event with the highest `ts_us`.
    fn absorb(&mut self, event: &RoomEvent) -> Result<bool, StoreError> {
        let ts = event.ts_us;
        match &event.body {
            EventBody::Msg { id, from, body, attrs, reply_to } => {
                if self.create.as_ref().is_some_and(|c| c.ts_us >= ts) {
                    return Ok(false);
                }
                let attrs = attrs
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(|e| StoreError::Corrupt(StoreFault::caused("cannot encode attrs", e)))?;
                self.create = Some(StoredCreate {
                    ts_us: ts,
                    id: id.clone(),
                    from: Some(from.clone()),
                    body: body.clone(),
                    attrs,
                    reply_to: *reply_to,
                    expires_ms: event.expires_ms,
                });
                Ok(true)
            }
            EventBody::Edit { body, .. } => {
                if self.edit.as_ref().is_some_and(|e| e.ts_us >= ts) {
                    return Ok(false);
                }
                self.edit = Some(StoredEdit { ts_us: ts, body: body.clone() });
                Ok(true)
            }
            EventBody::Delete { .. } => {
                if self.delete_ts_us.is_some_and(|d| d >= ts) {
                    return Ok(false);
                }
                self.delete_ts_us = Some(ts);
                Ok(true)
            }
            EventBody::Pin { pinned, .. } => {
                // Later event wins; on an equal timestamp (the same event again) pinned wins, which keeps the
                // outcome independent of order and matches Cassandra's tie-break on the larger value.
                let wins = match self.pin {
                    None => true,
                    Some(pin) => ts > pin.ts_us || (ts == pin.ts_us && *pinned && !pin.pinned),
                };
                if wins {
                    self.pin = Some(StoredPin { ts_us: ts, pinned: *pinned });
                }
                Ok(wins)
            }
            EventBody::Reaction { .. }
            | EventBody::Joined { .. }
            | EventBody::Left { .. }
            | EventBody::Moderation { .. }
            | EventBody::RoomDeleted {}
            | EventBody::UserErased { .. } => Ok(false),
        }
    }

    /// Make the message a tombstone of an erased author: nothing the author wrote stays in the row.
    fn erase(&mut self) {
        if let Some(create) = self.create.as_mut() {
            create.from = None;
            create.body.clear();
            create.attrs = None;
        }
        self.edit = None;
    }

    /// Whether the row is a message history shows at `now_ms`: its `msg` arrived and it has not expired.
    fn is_message(&self, now_ms: u64) -> bool {
        self.create.as_ref().is_some_and(|create| create.expires_ms.is_none_or(|expires| expires > now_ms))
    }

    /// The message as history shows it, or `None` while the creating `msg` is missing.
    fn to_message(&self, seq: u64, reactions: BTreeMap<String, Vec<UserId>>) -> Result<Option<Message>, StoreError> {
        let Some(create) = &self.create else {
            return Ok(None);
        };
        if create.expires_ms.is_some_and(|expires| expires <= now_ms()) {
            // Past its expiry: as good as swept.
            return Ok(None);
        }
        let deleted = self.delete_ts_us.is_some();
        let body = (!deleted).then(|| match &self.edit {
            Some(edit) if edit.ts_us > create.ts_us => edit.body.clone(),
            _ => create.body.clone(),
        });
        let stored = StoredMessage {
            seq,
            id: create.id.clone(),
            from: create.from.clone(),
            ts_us: create.ts_us,
            attrs: create.attrs.clone(),
            reply_to: create.reply_to,
            body,
            edited_us: self.edit.as_ref().map(|edit| edit.ts_us),
            deleted,
            pinned: self.pin.is_some_and(|pin| pin.pinned),
        };
        stored.into_message(reactions).map(Some)
    }
}

/// Map any redb failure: a damaged file is `Corrupt`, anything else (I/O, locks, a closed database) `Unavailable`.
fn db_err(err: impl Into<redb::Error>) -> StoreError {
    let error = err.into();
    match &error {
        redb::Error::Corrupted(msg) => StoreError::Corrupt(StoreFault::described(msg.clone(), error)),
        redb::Error::UpgradeRequired(v) => {
            let message = format!("database file format {v} needs an upgrade");
            StoreError::Corrupt(StoreFault::described(message, error))
        }
        _ => StoreError::Unavailable(StoreFault::described(error.to_string(), error)),
    }
}

/// The history store on a local redb file. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct EmbeddedStore {
    /// The open database. redb serialises write transactions itself and lets reads run beside them.
    db: Arc<Database>,
    /// Where the database file lives.
    path: PathBuf,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl EmbeddedStore {
    /// Open (creating when missing) the database at `path`. When `path` is an existing directory, the file
    /// [`DEFAULT_FILE_NAME`] inside it is used. Blocks while redb opens (and, after a crash, repairs) the file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file = if path.is_dir() { path.join(DEFAULT_FILE_NAME) } else { path.to_path_buf() };
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(StoreFault::caused(&format!("cannot create {}", parent.display()), e))
            })?;
        }
        let db = Database::create(&file).map_err(db_err)?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(MESSAGES).map_err(db_err)?;
        txn.open_table(REACTIONS).map_err(db_err)?;
        txn.open_table(ROOMS).map_err(db_err)?;
        txn.open_table(HEADS).map_err(db_err)?;
        txn.open_table(THREADS).map_err(db_err)?;
        txn.open_table(THREAD_COUNTS).map_err(db_err)?;
        txn.open_table(META).map_err(db_err)?;
        txn.open_table(FLOORS).map_err(db_err)?;
        txn.open_table(EXPIRIES).map_err(db_err)?;
        txn.open_table(AUTHORED).map_err(db_err)?;
        txn.open_table(ERASURES).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        index_threads(&db)?;
        index_authors(&db)?;
        Ok(EmbeddedStore { db: Arc::new(db), path: file })
    }

    /// The database file in use.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || work(&db))
            .await
            .map_err(|e| StoreError::Unavailable(StoreFault::caused("store task failed", e)))?
    }
}

/// Index the replies of a file written before threads existed (once; a marker in `META` says it was done).
fn index_threads(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(db_err)?;
    {
        let mut meta = txn.open_table(META).map_err(db_err)?;
        if meta.get("threads_indexed").map_err(db_err)?.is_some() {
            return Ok(());
        }
        let messages = txn.open_table(MESSAGES).map_err(db_err)?;
        let mut threads = txn.open_table(THREADS).map_err(db_err)?;
        let mut counts = txn.open_table(THREAD_COUNTS).map_err(db_err)?;
        for entry in messages.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            let (tenant, room, seq) = key.value();
            // A row this code cannot read breaks only the page that holds it, as in `history`: it is not indexed.
            let parent = match StoredRow::decode(value.value()) {
                Ok(row) => row.create.and_then(|create| create.reply_to),
                Err(error) => {
                    tracing::warn!(tenant, room, seq, %error, "an unreadable message was not indexed in its thread");
                    None
                }
            };
            if let Some(parent) = parent {
                add_reply(&mut threads, &mut counts, (tenant, room, parent, seq))?;
            }
        }
        meta.insert("threads_indexed", 1).map_err(db_err)?;
    }
    txn.commit().map_err(db_err)
}

/// Index the messages and reactions of a file written before authorship was indexed (once; a marker in `META`).
fn index_authors(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(db_err)?;
    {
        let mut meta = txn.open_table(META).map_err(db_err)?;
        if meta.get("authors_indexed").map_err(db_err)?.is_some() {
            return Ok(());
        }
        let messages = txn.open_table(MESSAGES).map_err(db_err)?;
        let reactions = txn.open_table(REACTIONS).map_err(db_err)?;
        let mut authored = txn.open_table(AUTHORED).map_err(db_err)?;
        for entry in messages.iter().map_err(db_err)? {
            let (key, value) = entry.map_err(db_err)?;
            let (tenant, room, seq) = key.value();
            let author = match StoredRow::decode(value.value()) {
                Ok(row) => row.create.and_then(|create| create.from),
                Err(error) => {
                    tracing::warn!(tenant, room, seq, %error, "an unreadable message was not indexed by its author");
                    None
                }
            };
            if let Some(author) = author {
                authored.insert((tenant, author.as_str(), room, seq, ""), ()).map_err(db_err)?;
            }
        }
        for entry in reactions.iter().map_err(db_err)? {
            let (key, _) = entry.map_err(db_err)?;
            let (tenant, room, target, emoji, user) = key.value();
            authored.insert((tenant, user, room, target, emoji), ()).map_err(db_err)?;
        }
        meta.insert("authors_indexed", 1).map_err(db_err)?;
    }
    txn.commit().map_err(db_err)
}

/// Put a reply in its thread, counting it once however often it is applied.
fn add_reply(
    threads: &mut redb::Table<'_, (&'static str, &'static str, u64, u64), ()>,
    counts: &mut redb::Table<'_, (&'static str, &'static str, u64), u64>,
    (tenant, room, parent, seq): (&str, &str, u64, u64),
) -> Result<(), StoreError> {
    if threads.insert((tenant, room, parent, seq), ()).map_err(db_err)?.is_none() {
        let count = counts.get((tenant, room, parent)).map_err(db_err)?.map_or(0, |g| g.value());
        counts.insert((tenant, room, parent), count + 1).map_err(db_err)?;
    }
    Ok(())
}

fn apply_blocking(db: &Database, events: &[RoomEvent]) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(db_err)?;
    {
        let mut messages = txn.open_table(MESSAGES).map_err(db_err)?;
        let mut reactions = txn.open_table(REACTIONS).map_err(db_err)?;
        let mut rooms = txn.open_table(ROOMS).map_err(db_err)?;
        let mut heads = txn.open_table(HEADS).map_err(db_err)?;
        let mut threads = txn.open_table(THREADS).map_err(db_err)?;
        let mut counts = txn.open_table(THREAD_COUNTS).map_err(db_err)?;
        let mut floors = txn.open_table(FLOORS).map_err(db_err)?;
        let mut expiries = txn.open_table(EXPIRIES).map_err(db_err)?;
        let mut authored = txn.open_table(AUTHORED).map_err(db_err)?;
        let mut erasures = txn.open_table(ERASURES).map_err(db_err)?;
        let now = now_ms();
        // Per room, the newest event of this batch: (seq, ts_us).
        let mut newest: HashMap<(&str, &str), (u64, u64)> = HashMap::new();
        for event in events {
            let tenant = event.tenant.as_str();
            let room = event.room.as_str();
            let floor = floors.get((tenant, room)).map_err(db_err)?.map_or(0, |g| g.value());
            if event.ts_us < floor {
                // Its room was deleted after it: it is gone with the rest.
                continue;
            }
            if let EventBody::RoomDeleted {} = event.body {
                let end = event.seq;
                messages.retain_in((tenant, room, 0)..(tenant, room, end), |_, _| false).map_err(db_err)?;
                reactions
                    .retain_in((tenant, room, 0, "", "")..(tenant, room, end, "", ""), |_, _| false)
                    .map_err(db_err)?;
                threads.retain_in((tenant, room, 0, 0)..(tenant, room, end, 0), |_, _| false).map_err(db_err)?;
                counts.retain_in((tenant, room, 0)..(tenant, room, end), |_, _| false).map_err(db_err)?;
                floors.insert((tenant, room), event.ts_us.max(floor)).map_err(db_err)?;
                // A direct-message room's authors are its two participants: their index goes with it.
                if let Some((a, b)) = event.room.dm_participants() {
                    for user in [a.as_str(), b.as_str()] {
                        let range = (tenant, user, room, 0, "")..(tenant, user, room, end, "");
                        authored.retain_in(range, |_, _| false).map_err(db_err)?;
                    }
                }
            }
            if let EventBody::UserErased { user } = &event.body {
                let user = user.as_str();
                let before = erasures.get((tenant, room, user)).map_err(db_err)?.map_or(0, |g| g.value());
                erasures.insert((tenant, room, user), before.max(event.ts_us)).map_err(db_err)?;
                let range = (tenant, user, room, 0, "")..(tenant, user, room, event.seq, "");
                let mut entries = Vec::new();
                for entry in authored.range(range.clone()).map_err(db_err)? {
                    let (key, _) = entry.map_err(db_err)?;
                    let (_, _, _, seq, emoji) = key.value();
                    entries.push((seq, emoji.to_owned()));
                }
                for (seq, emoji) in entries {
                    if !emoji.is_empty() {
                        reactions.remove((tenant, room, seq, emoji.as_str(), user)).map_err(db_err)?;
                        continue;
                    }
                    let row = match messages.get((tenant, room, seq)).map_err(db_err)? {
                        Some(bytes) => Some(StoredRow::decode(bytes.value())?),
                        None => None,
                    };
                    // Only the user's own message (or an edit of it whose message never arrived): the index of a
                    // room deleted and created again may point at a later message of another user's.
                    let theirs = |row: &StoredRow| {
                        row.create.as_ref().is_none_or(|create| create.from.as_ref().map(UserId::as_str) == Some(user))
                    };
                    if let Some(mut row) = row.filter(theirs) {
                        row.erase();
                        messages.insert((tenant, room, seq), row.encode()?.as_slice()).map_err(db_err)?;
                    }
                }
                authored.retain_in(range, |_, _| false).map_err(db_err)?;
            }
            // The user whose message, edit or reaction this is, when they were erased from the room after it.
            let erased_author = match authored_entry(event).map(|(user, _, _)| user) {
                Some(user) => {
                    let erased = erasures.get((tenant, room, user.as_str())).map_err(db_err)?.map_or(0, |g| g.value());
                    (event.ts_us < erased).then_some(user)
                }
                None => None,
            };
            if erased_author.is_some() && !matches!(event.body, EventBody::Msg { .. }) {
                // Late, and of an erased user: nothing of it is kept (its seq still moves the head).
                let top = newest.entry((tenant, room)).or_insert((event.seq, event.ts_us));
                if event.ts_us > top.1 {
                    *top = (event.seq, event.ts_us);
                }
                continue;
            }

            let top = newest.entry((tenant, room)).or_insert((event.seq, event.ts_us));
            if event.ts_us > top.1 {
                *top = (event.seq, event.ts_us);
            }

            if matches!(event.body, EventBody::Msg { .. }) && event.expires_ms.is_some_and(|expires| expires <= now) {
                // A message past its expiry already is not written (it only moves the head). A change to a message
                // is folded into its row whatever its own expiry, and leaves with the row.
                continue;
            }
            if let (EventBody::Msg { .. }, Some(expires)) = (&event.body, event.expires_ms) {
                expiries.insert((expires, tenant, room, event.seq), ()).map_err(db_err)?;
            }
            if let EventBody::Msg { reply_to: Some(parent), .. } = &event.body {
                add_reply(&mut threads, &mut counts, (tenant, room, *parent, event.seq))?;
            }
            let row_seq = match &event.body {
                EventBody::Msg { .. } => Some(event.seq),
                EventBody::Edit { target, .. } | EventBody::Delete { target, .. } | EventBody::Pin { target, .. } => {
                    Some(*target)
                }
                EventBody::Reaction { target, user, emoji, removed } => {
                    let key = (tenant, room, *target, emoji.as_str(), user.as_str());
                    let current = reactions.get(key).map_err(db_err)?.map(|g| g.value());
                    // Later event wins; on an equal timestamp (the same event again) removal wins, which keeps the
                    // outcome independent of order and matches Cassandra's tie-break on the larger value.
                    let wins = match current {
                        None => true,
                        Some((ts, was_removed)) => event.ts_us > ts || (event.ts_us == ts && *removed && !was_removed),
                    };
                    if wins {
                        reactions.insert(key, (event.ts_us, *removed)).map_err(db_err)?;
                    }
                    None
                }
                EventBody::Joined { .. }
                | EventBody::Left { .. }
                | EventBody::Moderation { .. }
                | EventBody::RoomDeleted {}
                | EventBody::UserErased { .. } => None,
            };
            if let (Some((author, seq, emoji)), None) = (authored_entry(event), erased_author) {
                authored.insert((tenant, author.as_str(), room, seq, emoji), ()).map_err(db_err)?;
            }

            if let Some(seq) = row_seq {
                let key = (tenant, room, seq);
                let mut row = match messages.get(key).map_err(db_err)? {
                    Some(bytes) => StoredRow::decode(bytes.value())?,
                    None => StoredRow::default(),
                };
                if row.absorb(event)? {
                    if erased_author.is_some() {
                        row.erase();
                    }
                    let bytes = row.encode()?;
                    messages.insert(key, bytes.as_slice()).map_err(db_err)?;
                }
            }
        }
        for ((tenant, room), (seq, ts_us)) in newest {
            // The latest event by time, as in CQL: a room created again after its deletion left the stream may
            // start its seqs again. A head of the seq-only table has no time: by seq then.
            let head = head_of(&rooms, &heads, &messages, tenant, room)?;
            let newer = match head.last_ts_us {
                0 => seq > head.last_seq,
                known => (ts_us, seq) > (known, head.last_seq),
            };
            if newer {
                heads.insert((tenant, room), (seq, ts_us)).map_err(db_err)?;
                rooms.insert((tenant, room), seq).map_err(db_err)?;
            }
        }
    }
    txn.commit().map_err(db_err)
}

/// A room's head: from `room_head`, unless `room_last_seq` is ahead of it (the room's newest events were written
/// by a release before `room_head`); then its seq, with the time of the message at that seq when it is one, else 0.
fn head_of(
    rooms: &impl ReadableTable<(&'static str, &'static str), u64>,
    heads: &impl ReadableTable<(&'static str, &'static str), (u64, u64)>,
    messages: &impl ReadableTable<(&'static str, &'static str, u64), &'static [u8]>,
    tenant: &str,
    room: &str,
) -> Result<RoomHead, StoreError> {
    let last_seq = rooms.get((tenant, room)).map_err(db_err)?.map(|g| g.value()).unwrap_or(0);
    if let Some((seq, ts_us)) = heads.get((tenant, room)).map_err(db_err)?.map(|g| g.value()) {
        if seq >= last_seq {
            return Ok(RoomHead { last_seq: seq, last_ts_us: ts_us });
        }
    }
    let last_ts_us = match messages.get((tenant, room, last_seq)).map_err(db_err)? {
        Some(bytes) if last_seq > 0 => StoredRow::decode(bytes.value())?.create.map_or(0, |c| c.ts_us),
        _ => 0,
    };
    Ok(RoomHead { last_seq, last_ts_us })
}

fn history_blocking(db: &Database, query: &HistoryQuery) -> Result<HistoryPage, StoreError> {
    let tenant = query.tenant.as_str();
    let room = query.room.as_str();
    let now = now_ms();
    let Some(window) = PageWindow::of(query, u64::MAX) else {
        return Ok(empty_page());
    };
    let bounds = (Bound::Included((tenant, room, window.first)), Bound::Included((tenant, room, window.last)));

    let txn = db.begin_read().map_err(db_err)?;
    let messages = txn.open_table(MESSAGES).map_err(db_err)?;
    let range = messages.range(bounds).map_err(db_err)?;

    // Walk from the end the query starts at, skipping rows that are not messages yet, until one past the page.
    let rows: Box<dyn Iterator<Item = _>> = if window.ascending { Box::new(range) } else { Box::new(range.rev()) };
    let mut picked: Vec<(u64, StoredRow)> = Vec::with_capacity(window.wanted());
    for entry in rows {
        let (key, value) = entry.map_err(db_err)?;
        let row = StoredRow::decode(value.value())?;
        if !row.is_message(now) {
            continue;
        }
        picked.push((key.value().2, row));
        if picked.len() == window.wanted() {
            break;
        }
    }
    let (picked, more) = window.finish(picked);
    page_of(&txn, tenant, room, picked, more)
}

/// The messages of `picked` as history shows them: reactions and reply counts folded in.
fn page_of(
    txn: &redb::ReadTransaction,
    tenant: &str,
    room: &str,
    picked: Vec<(u64, StoredRow)>,
    more: bool,
) -> Result<HistoryPage, StoreError> {
    let reactions = txn.open_table(REACTIONS).map_err(db_err)?;
    let counts = txn.open_table(THREAD_COUNTS).map_err(db_err)?;
    let mut out = Vec::with_capacity(picked.len());
    for (seq, row) in picked {
        let folded = reactions_of(&reactions, tenant, room, seq)?;
        if let Some(mut message) = row.to_message(seq, folded)? {
            let count = counts.get((tenant, room, seq)).map_err(db_err)?.map_or(0, |g| g.value());
            message.reply_count = count.min(switchyard_protocol::limits::MAX_REPLY_COUNT);
            out.push(message);
        }
    }
    Ok(HistoryPage { messages: out, more })
}

/// One page of the replies to message `parent`, in the window of `query` (over the replies' seqs).
fn thread_blocking(db: &Database, query: &HistoryQuery, parent: u64) -> Result<HistoryPage, StoreError> {
    let tenant = query.tenant.as_str();
    let room = query.room.as_str();
    let now = now_ms();
    let Some(window) = PageWindow::of(query, u64::MAX) else {
        return Ok(empty_page());
    };
    let bounds =
        (Bound::Included((tenant, room, parent, window.first)), Bound::Included((tenant, room, parent, window.last)));
    let txn = db.begin_read().map_err(db_err)?;
    let threads = txn.open_table(THREADS).map_err(db_err)?;
    let messages = txn.open_table(MESSAGES).map_err(db_err)?;
    let range = threads.range(bounds).map_err(db_err)?;
    let replies: Box<dyn Iterator<Item = _>> = if window.ascending { Box::new(range) } else { Box::new(range.rev()) };
    let mut picked: Vec<(u64, StoredRow)> = Vec::with_capacity(window.wanted());
    for entry in replies {
        let (key, _) = entry.map_err(db_err)?;
        let seq = key.value().3;
        // A reply is indexed with its own `msg`, so its row exists; a row without one is skipped as history does.
        let Some(bytes) = messages.get((tenant, room, seq)).map_err(db_err)? else { continue };
        let row = StoredRow::decode(bytes.value())?;
        if !row.is_message(now) {
            continue;
        }
        picked.push((seq, row));
        if picked.len() == window.wanted() {
            break;
        }
    }
    let (picked, more) = window.finish(picked);
    page_of(&txn, tenant, room, picked, more)
}

/// The users currently reacting to one message, by emoji, users sorted; emojis with nobody left are omitted.
fn reactions_of(
    table: &impl ReadableTable<ReactionKey, (u64, bool)>,
    tenant: &str,
    room: &str,
    seq: u64,
) -> Result<BTreeMap<String, Vec<UserId>>, StoreError> {
    let mut out: BTreeMap<String, Vec<UserId>> = BTreeMap::new();
    let start = (tenant, room, seq, "", "");
    for entry in table.range(start..).map_err(db_err)? {
        let (key, value) = entry.map_err(db_err)?;
        let (k_tenant, k_room, k_seq, emoji, user) = key.value();
        if k_tenant != tenant || k_room != room || k_seq != seq {
            break;
        }
        let (_, removed) = value.value();
        if removed {
            continue;
        }
        let user = UserId::parse(user)
            .map_err(|e| StoreError::Corrupt(StoreFault::caused(&format!("reaction user at seq {seq}"), e)))?;
        out.entry(emoji.to_owned()).or_default().push(user);
    }
    // Keys are ordered by (emoji, user) within a message, so every user list is already sorted.
    Ok(out)
}

fn empty_page() -> HistoryPage {
    HistoryPage { messages: Vec::new(), more: false }
}

fn head_blocking(db: &Database, tenant: &str, room: &str) -> Result<RoomHead, StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let rooms = txn.open_table(ROOMS).map_err(db_err)?;
    let heads = txn.open_table(HEADS).map_err(db_err)?;
    let messages = txn.open_table(MESSAGES).map_err(db_err)?;
    head_of(&rooms, &heads, &messages, tenant, room)
}

impl HistoryStore for EmbeddedStore {
    async fn apply(&self, events: &[RoomEvent]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        events.iter().try_for_each(check_event)?;
        let events = events.to_vec();
        self.blocking(move |db| apply_blocking(db, &events)).await
    }

    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        check_limit(query.limit)?;
        let query = query.clone();
        self.blocking(move |db| history_blocking(db, &query)).await
    }

    async fn head(&self, tenant: &ProjectId, room: &RoomId) -> Result<RoomHead, StoreError> {
        let tenant = tenant.to_string();
        let room = room.to_string();
        self.blocking(move |db| head_blocking(db, &tenant, &room)).await
    }

    async fn thread(&self, query: &HistoryQuery, parent: u64) -> Result<HistoryPage, StoreError> {
        check_limit(query.limit)?;
        let query = query.clone();
        self.blocking(move |db| thread_blocking(db, &query, parent)).await
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        let now = now_ms();
        self.blocking(move |db| sweep_blocking(db, now)).await
    }

    async fn authored_rooms(
        &self,
        tenant: &ProjectId,
        user: &UserId,
        after: Option<&RoomId>,
        limit: u32,
    ) -> Result<(Vec<RoomId>, Option<RoomId>), StoreError> {
        let (tenant, user, after) = (tenant.to_string(), user.to_string(), after.map(RoomId::to_string));
        self.blocking(move |db| authored_rooms_blocking(db, (&tenant, &user), after, limit as usize)).await
    }

    async fn authored_messages(
        &self,
        tenant: &ProjectId,
        user: &UserId,
        after: Option<(&RoomId, u64)>,
        limit: u32,
    ) -> Result<AuthoredMessages, StoreError> {
        let (tenant, user) = (tenant.to_string(), user.to_string());
        let after = after.map(|(room, seq)| (room.to_string(), seq));
        self.blocking(move |db| authored_messages_blocking(db, (&tenant, &user), after, limit as usize)).await
    }
}

fn stored_room(room: &str) -> Result<RoomId, StoreError> {
    RoomId::parse(room).map_err(|e| StoreError::Corrupt(StoreFault::caused("a room id in the authorship index", e)))
}

/// The rooms of `user`'s index entries after room `after`: one range read per room, each starting past the
/// previous room's entries.
fn authored_rooms_blocking(
    db: &Database,
    (tenant, user): (&str, &str),
    mut after: Option<String>,
    limit: usize,
) -> Result<(Vec<RoomId>, Option<RoomId>), StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let authored = txn.open_table(AUTHORED).map_err(db_err)?;
    let mut rooms = Vec::new();
    while rooms.len() < limit {
        // Past every seq a store holds (at most i64::MAX): the first entry of a later room.
        let start = match &after {
            Some(room) => (tenant, user, room.as_str(), u64::MAX, ""),
            None => (tenant, user, "", 0, ""),
        };
        let Some(entry) = authored.range(start..).map_err(db_err)?.next() else { return Ok((rooms, None)) };
        let (key, _) = entry.map_err(db_err)?;
        let (k_tenant, k_user, room, _, _) = key.value();
        if k_tenant != tenant || k_user != user {
            return Ok((rooms, None));
        }
        rooms.push(stored_room(room)?);
        after = Some(room.to_owned());
    }
    let next = rooms.last().cloned();
    Ok((rooms, next))
}

/// Up to `limit` of `user`'s index entries after (room, seq), and the messages among them.
fn authored_messages_blocking(
    db: &Database,
    (tenant, user): (&str, &str),
    after: Option<(String, u64)>,
    limit: usize,
) -> Result<AuthoredMessages, StoreError> {
    let txn = db.begin_read().map_err(db_err)?;
    let authored = txn.open_table(AUTHORED).map_err(db_err)?;
    let messages = txn.open_table(MESSAGES).map_err(db_err)?;
    let start = match &after {
        Some((room, seq)) => (tenant, user, room.as_str(), seq.saturating_add(1), ""),
        None => (tenant, user, "", 0, ""),
    };
    let now = now_ms();
    let mut out = AuthoredMessages::default();
    for (read, entry) in authored.range(start..).map_err(db_err)?.enumerate() {
        let (key, _) = entry.map_err(db_err)?;
        let (k_tenant, k_user, room, seq, emoji) = key.value();
        if k_tenant != tenant || k_user != user {
            break;
        }
        if read == limit {
            return Ok(out);
        }
        let room_id = stored_room(room)?;
        out.next = Some((room_id.clone(), seq));
        if !emoji.is_empty() {
            continue;
        }
        let Some(bytes) = messages.get((tenant, room, seq)).map_err(db_err)? else { continue };
        let row = StoredRow::decode(bytes.value())?;
        if !row.is_message(now) || row.delete_ts_us.is_some() {
            continue;
        }
        let own = |message: &Message| message.from.as_ref().map(UserId::as_str) == Some(user);
        if let Some(message) = row.to_message(seq, BTreeMap::new())?.filter(own) {
            out.messages.push((room_id, message));
        }
    }
    out.next = None;
    Ok(out)
}

/// Remove up to [`SWEEP_BATCH`] messages whose expiry is before `now`: each row, its reactions, its own thread
/// and its place in its parent's; how many went.
fn sweep_blocking(db: &Database, now: u64) -> Result<u64, StoreError> {
    let txn = db.begin_write().map_err(db_err)?;
    let mut swept = 0;
    {
        let mut expiries = txn.open_table(EXPIRIES).map_err(db_err)?;
        let mut messages = txn.open_table(MESSAGES).map_err(db_err)?;
        let mut reactions = txn.open_table(REACTIONS).map_err(db_err)?;
        let mut threads = txn.open_table(THREADS).map_err(db_err)?;
        let mut counts = txn.open_table(THREAD_COUNTS).map_err(db_err)?;
        let mut due: Vec<(u64, String, String, u64)> = Vec::new();
        for entry in expiries.range((0, "", "", 0)..(now, "", "", 0)).map_err(db_err)?.take(SWEEP_BATCH) {
            let (key, _) = entry.map_err(db_err)?;
            let (expires, tenant, room, seq) = key.value();
            due.push((expires, tenant.to_owned(), room.to_owned(), seq));
        }
        for (expires, tenant, room, seq) in &due {
            let (tenant, room, seq) = (tenant.as_str(), room.as_str(), *seq);
            expiries.remove((*expires, tenant, room, seq)).map_err(db_err)?;
            let row = match messages.get((tenant, room, seq)).map_err(db_err)? {
                Some(bytes) => StoredRow::decode(bytes.value()).ok(),
                None => None,
            };
            // Only the message this entry was written for goes: a row at the same seq of a room created again after
            // a deletion (with another expiry, or none) stays.
            if row.as_ref().is_some_and(|row| row.create.as_ref().map(|c| c.expires_ms) != Some(Some(*expires))) {
                continue;
            }
            messages.remove((tenant, room, seq)).map_err(db_err)?;
            reactions
                .retain_in((tenant, room, seq, "", "")..(tenant, room, seq + 1, "", ""), |_, _| false)
                .map_err(db_err)?;
            threads.retain_in((tenant, room, seq, 0)..(tenant, room, seq + 1, 0), |_, _| false).map_err(db_err)?;
            counts.remove((tenant, room, seq)).map_err(db_err)?;
            if let Some(parent) = row.and_then(|row| row.create).and_then(|create| create.reply_to) {
                if threads.remove((tenant, room, parent, seq)).map_err(db_err)?.is_some() {
                    let count = counts.get((tenant, room, parent)).map_err(db_err)?.map_or(0, |g| g.value());
                    match count {
                        0 | 1 => counts.remove((tenant, room, parent)).map_err(db_err).map(|_| ())?,
                        more => counts.insert((tenant, room, parent), more - 1).map_err(db_err).map(|_| ())?,
                    }
                }
            }
            swept += 1;
        }
    }
    txn.commit().map_err(db_err)?;
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_protocol::internal::INTERNAL_VERSION;

    fn event(tenant: &ProjectId, room: &RoomId, seq: u64, body: EventBody) -> RoomEvent {
        RoomEvent {
            v: INTERNAL_VERSION,
            tenant: tenant.clone(),
            room: room.clone(),
            seq,
            ts_us: 1_000_000 + seq,
            tally: Default::default(),
            expires_ms: None,
            body,
        }
    }

    /// A file written before threads existed (no thread tables, no marker) has its replies indexed once when it is
    /// opened, and counted once however often it is opened.
    #[test]
    fn replies_stored_before_threads_are_indexed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (tenant, room) = (ProjectId::generate(), RoomId::parse("old").unwrap());
        let user = UserId::parse("alice").unwrap();
        let msg = |seq, reply_to| {
            let id = MessageId::generate(seq);
            event(
                &tenant,
                &room,
                seq,
                EventBody::Msg { id, from: user.clone(), body: "b".into(), attrs: None, reply_to },
            )
        };
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            apply_blocking(&store.db, &[msg(1, None), msg(2, Some(1)), msg(3, Some(1))]).unwrap();
            let txn = store.db.begin_write().unwrap();
            assert!(txn.delete_table(THREADS).unwrap() && txn.delete_table(THREAD_COUNTS).unwrap());
            assert!(txn.delete_table(META).unwrap());
            txn.commit().unwrap();
        }
        for _ in 0..2 {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let query =
                HistoryQuery { tenant: tenant.clone(), room: room.clone(), before: None, after: None, limit: 10 };
            let page = history_blocking(&store.db, &query).unwrap();
            assert_eq!(page.messages.iter().map(|m| m.reply_count).collect::<Vec<_>>(), [2, 0, 0]);
            let thread = thread_blocking(&store.db, &query, 1).unwrap();
            assert_eq!(thread.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), [2, 3]);
        }
    }

    /// A file written before authorship was indexed (no `authored` table, no marker) has its messages and reactions
    /// indexed by author once when it is opened, so an export and an erasure find them.
    #[test]
    fn messages_and_reactions_stored_before_authorship_are_indexed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (tenant, room) = (ProjectId::generate(), RoomId::parse("old").unwrap());
        let (alice, bob) = (UserId::parse("alice").unwrap(), UserId::parse("bob").unwrap());
        let msg = |seq, from: &UserId| {
            let body = EventBody::Msg {
                id: MessageId::generate(seq),
                from: from.clone(),
                body: format!("m{seq}"),
                attrs: None,
                reply_to: None,
            };
            event(&tenant, &room, seq, body)
        };
        let react = event(
            &tenant,
            &room,
            3,
            EventBody::Reaction { target: 1, user: bob.clone(), emoji: "👍".into(), removed: false },
        );
        {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            apply_blocking(&store.db, &[msg(1, &alice), msg(2, &bob), react]).unwrap();
            let txn = store.db.begin_write().unwrap();
            assert!(txn.delete_table(AUTHORED).unwrap());
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.remove("authors_indexed").unwrap();
            }
            txn.commit().unwrap();
        }
        for _ in 0..2 {
            let store = EmbeddedStore::open(dir.path()).unwrap();
            let mine = authored_messages_blocking(&store.db, (tenant.as_str(), "alice"), None, 10).unwrap();
            let bodies: Vec<_> = mine.messages.iter().map(|(_, m)| m.body.clone().unwrap_or_default()).collect();
            assert_eq!(bodies, ["m1"]);
            let (rooms, _) = authored_rooms_blocking(&store.db, (tenant.as_str(), "bob"), None, 10).unwrap();
            assert_eq!(rooms, std::slice::from_ref(&room), "bob wrote a message and a reaction there");
            let txn = store.db.begin_read().unwrap();
            let authored = txn.open_table(AUTHORED).unwrap();
            assert!(authored.get((tenant.as_str(), "bob", "old", 1, "👍")).unwrap().is_some(), "the reaction too");
        }
    }

    /// The sweep takes expired messages out of the file: their rows, reactions and thread entries, and the
    /// parent's count; nothing else.
    #[test]
    fn the_sweep_removes_expired_rows_from_the_file() {
        use redb::ReadableTableMetadata;
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let (tenant, room) = (ProjectId::generate(), RoomId::parse("brief").unwrap());
        let user = UserId::parse("alice").unwrap();
        let msg = |seq, reply_to, expires_ms| RoomEvent {
            expires_ms,
            ..event(
                &tenant,
                &room,
                seq,
                EventBody::Msg {
                    id: MessageId::generate(seq),
                    from: user.clone(),
                    body: "b".into(),
                    attrs: None,
                    reply_to,
                },
            )
        };
        let now = now_ms();
        let reaction = RoomEvent {
            expires_ms: Some(now + 1_000),
            ..event(
                &tenant,
                &room,
                4,
                EventBody::Reaction { target: 2, user: user.clone(), emoji: "x".into(), removed: false },
            )
        };
        let events = [msg(1, None, None), msg(2, Some(1), Some(now + 1_000)), msg(3, Some(1), None), reaction];
        apply_blocking(&store.db, &events).unwrap();
        assert_eq!(sweep_blocking(&store.db, now).unwrap(), 0, "nothing is due yet");
        assert_eq!(sweep_blocking(&store.db, now + 1_001).unwrap(), 1);
        let txn = store.db.begin_read().unwrap();
        assert_eq!(txn.open_table(MESSAGES).unwrap().len().unwrap(), 2, "the expired row is gone");
        assert_eq!(txn.open_table(REACTIONS).unwrap().len().unwrap(), 0, "with its reaction");
        assert_eq!(txn.open_table(THREADS).unwrap().len().unwrap(), 1, "and its place in its parent's thread");
        let count = txn.open_table(THREAD_COUNTS).unwrap().get((tenant.as_str(), room.as_str(), 1)).unwrap();
        assert_eq!(count.map(|count| count.value()), Some(1));
        assert_eq!(txn.open_table(EXPIRIES).unwrap().len().unwrap(), 0);
    }

    /// A file written before `room_head` existed holds only `room_last_seq`: the head falls back to it (with the
    /// time of the message at that seq, when it is one), and the next newer event records the head in full.
    #[test]
    fn head_falls_back_to_the_seq_only_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let (tenant, room) = (ProjectId::generate(), RoomId::parse("old").unwrap());
        let user = UserId::parse("alice").unwrap();
        let msg = |seq| {
            let id = MessageId::generate(seq);
            event(
                &tenant,
                &room,
                seq,
                EventBody::Msg { id, from: user.clone(), body: "b".into(), attrs: None, reply_to: None },
            )
        };
        let joined = |seq| event(&tenant, &room, seq, EventBody::Joined { user: user.clone() });
        let forget_heads = || {
            let txn = store.db.begin_write().unwrap();
            txn.open_table(HEADS).unwrap().remove((tenant.as_str(), room.as_str())).unwrap();
            txn.commit().unwrap();
        };
        let head = || head_blocking(&store.db, tenant.as_str(), room.as_str()).unwrap();

        apply_blocking(&store.db, &[joined(1), msg(2)]).unwrap();
        forget_heads();
        assert_eq!(head(), RoomHead { last_seq: 2, last_ts_us: 1_000_002 }, "a message's own time");

        apply_blocking(&store.db, &[joined(3)]).unwrap();
        forget_heads();
        assert_eq!(head(), RoomHead { last_seq: 3, last_ts_us: 0 }, "a join's time is not kept in the old table");
        apply_blocking(&store.db, &[msg(2), joined(1)]).unwrap();
        assert_eq!(head(), RoomHead { last_seq: 3, last_ts_us: 0 }, "older events do not move the head back");
        apply_blocking(&store.db, &[joined(4)]).unwrap();
        assert_eq!(head(), RoomHead { last_seq: 4, last_ts_us: 1_000_004 }, "a newer event records the head");
    }
}
