//! The CQL history store: ScyllaDB (or Apache Cassandra) through the `scylla` driver.
//!
//! Messages live in partitions of (tenant, room, bucket = seq / [`BUCKET_SIZE`]) clustered by seq; every cell is
//! written `USING TIMESTAMP` the event's `ts_us`, so the database's own last-write-wins makes apply idempotent and
//! order-insensitive. Reactions have their own table, keyed so add and remove race per (message, emoji, user), and
//! a per-room progress row holds the last seq (its write time is that event's `ts_us`, which makes the room's
//! head). No null is ever written (absent fields stay unset, a delete erases the body with an empty string), so
//! writes make no tombstones, except where events expire (an event with `expires_ms` writes its cells with the TTL
//! it has left, and one past it is not written) and where a room is deleted: its `room_deleted` removes every partition of the room
//! up to its own bucket with a deletion at its `ts_us`. A pin or unpin sets the message's `pinned` cell; history
//! shows a deleted message as not pinned.
//!
//! A per-room index, `room_buckets`, lists the buckets that hold messages (a row written with every `msg`). A
//! history page reads the index and scans only those buckets, so its cost does not grow with the stretches of
//! joins, leaves and reactions between messages: a page of `limit` messages scans at most `limit + 1` buckets
//! holding messages (plus at most the two at the ends of its range), whatever lies between them.
//!
//! The schema is versioned (`schema_version` table): [`CqlStore::migrate`] creates or upgrades it idempotently
//! (a step may add columns to existing tables, and backfill what it adds from the rows already stored), and
//! [`SchemaPolicy::Require`] refuses to run on a schema that is not current. This module never drops anything and
//! does not expire history.

use super::page::{PageWindow, StoredMessage};
use super::{
    authored_entry, check_event, check_limit, now_ms, AuthoredMessages, BoxError, HistoryPage, HistoryQuery,
    HistoryStore, RoomHead, StoreError, StoreFault,
};
use futures::{FutureExt, StreamExt, TryStreamExt};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError};
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::Statement;
use scylla::value::MaybeUnset;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use switchyard_protocol::client::Message;
use switchyard_protocol::internal::{EventBody, RoomEvent};
use switchyard_protocol::{MessageId, ProjectId, RoomId, UserId};

/// A message of a room: (tenant, room, seq).
type MessageKey = (String, String, u64);

/// The TTL in seconds an event's writes carry (0: none) at `now_ms`; `None` when it has expired already.
fn ttl_of(event: &RoomEvent, now_ms: u64) -> Option<i32> {
    match event.expires_ms {
        None => Some(0),
        Some(expires) if expires <= now_ms => None,
        Some(expires) => Some(i32::try_from((expires - now_ms).div_ceil(1000)).unwrap_or(i32::MAX)),
    }
}

/// Seqs per message partition: seq `s` of a room lives in bucket `s / BUCKET_SIZE`.
pub const BUCKET_SIZE: u64 = 1_000;

/// Most statements sent in one (single-partition, unlogged) batch.
const MAX_BATCH_STATEMENTS: usize = 100;

/// Rough cap on the bound values of one batch, in bytes; a batch is cut before it grows past this.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Buckets read from `room_buckets` per index query while a page is assembled. A dense room's page needs one or
/// two buckets, so the first index query almost always suffices; a sparse room's page reads a few more.
const INDEX_PAGE: usize = 16;

/// Rows per page while a migration reads existing rows, and writes it keeps in flight.
const BACKFILL_PAGE: i32 = 1_000;
const BACKFILL_CONCURRENCY: usize = 32;

/// Replies counted per message: a message with more shows this many (`reply_count` is at most this).
pub const MAX_REPLY_COUNT: u64 = switchyard_protocol::limits::MAX_REPLY_COUNT;
/// Reply counts of one page read at once.
const REPLY_COUNTS_IN_FLIGHT: usize = 16;

/// The bucket (partition) a seq belongs to.
pub fn bucket_of(seq: u64) -> u64 {
    seq / BUCKET_SIZE
}

/// How a newly created keyspace is replicated. An existing keyspace is used as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replication {
    /// `SimpleStrategy` (single data center, development).
    Simple {
        /// Copies of every row.
        replication_factor: u32,
    },
    /// `NetworkTopologyStrategy`.
    NetworkTopology {
        /// Data center name -> copies of every row in it.
        datacenters: BTreeMap<String, u32>,
    },
}

impl Default for Replication {
    fn default() -> Self {
        Replication::Simple { replication_factor: 1 }
    }
}

/// Everything needed to reach the cluster and shape the keyspace.
#[derive(Debug, Clone)]
pub struct CqlConfig {
    /// Contact points, `host:port`.
    pub nodes: Vec<String>,
    /// Keyspace holding the tables; `[A-Za-z][A-Za-z0-9_]{0,47}`, created when missing.
    pub keyspace: String,
    /// Replication of the keyspace when this store creates it.
    pub replication: Replication,
    /// Client-side limit for one request (including driver retries).
    pub request_timeout: Duration,
    /// Limit for opening the connections.
    pub connect_timeout: Duration,
    /// Most requests one `apply` keeps in flight.
    pub write_concurrency: usize,
    /// Whether connecting migrates the schema or requires it current.
    pub schema: SchemaPolicy,
    /// Consistency of every read and write (`LOCAL_QUORUM` by default: with replication factor 3, one node of each
    /// data center may be down and every acked write is still read back).
    pub consistency: scylla::statement::Consistency,
    /// User and password for a cluster with PasswordAuthenticator; `None` for none.
    pub credentials: Option<CqlCredentials>,
    /// TLS to every node, trusting these files' CA (else the system's roots), presenting their client certificate
    /// if any; `None` for plain connections.
    pub tls: Option<switchyard_service::tls::TlsFiles>,
}

/// A CQL user and password.
#[derive(Clone, PartialEq, Eq)]
pub struct CqlCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for CqlCredentials {
    /// The password is never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CqlCredentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

impl CqlConfig {
    /// Defaults for everything but the nodes and keyspace: replication factor 1, 10 s requests.
    pub fn new(nodes: &[String], keyspace: &str) -> Self {
        CqlConfig {
            nodes: nodes.to_vec(),
            keyspace: keyspace.to_owned(),
            replication: Replication::default(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            write_concurrency: 32,
            schema: SchemaPolicy::Migrate,
            consistency: scylla::statement::Consistency::LocalQuorum,
            credentials: None,
            tls: None,
        }
    }
}

/// What [`CqlStore::connect_with`] does about the schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaPolicy {
    /// Create or upgrade the keyspace and tables to [`SCHEMA_VERSION`] first (what `persistor migrate` does).
    Migrate,
    /// Refuse to start, with a message naming `switchyard-persistor migrate`, unless the schema is exactly at
    /// [`SCHEMA_VERSION`].
    Require,
}

/// The schema version this code reads and writes. Every change to the tables adds a step to [`migrations`] and
/// raises this number.
pub const SCHEMA_VERSION: i32 = 5;

/// The row of `schema_version` that holds the history schema's version.
const SCHEMA_COMPONENT: &str = "history";

/// One schema step: the version it brings the keyspace to, what it does, its statements, the columns it adds to
/// existing tables, then the backfill of what they added from the rows already stored, if any. Statements, column
/// additions and backfill are each idempotent, so a step interrupted half-way, or run twice by two processes, is
/// simply run again; the version is recorded only after all of them.
struct Migration {
    version: i32,
    description: &'static str,
    statements: Vec<String>,
    columns: Vec<Column>,
    backfill: Option<Backfill>,
}

/// A column a schema step adds to an existing table. CQL's `ALTER TABLE ... ADD` fails when the column exists (and
/// `ADD IF NOT EXISTS` is not understood everywhere), so the step reads the catalogue first: adding is idempotent.
#[derive(Debug, Clone, Copy)]
struct Column {
    table: &'static str,
    name: &'static str,
    cql_type: &'static str,
}

impl Column {
    async fn exists(self, session: &Session, ks: &str) -> Result<bool, StoreError> {
        let rows = session
            .query_unpaged(
                "SELECT column_name FROM system_schema.columns \
                 WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
                (ks, self.table, self.name),
            )
            .await
            .map_err(|e| unavailable("cannot read the column catalogue", e))?
            .into_rows_result()
            .map_err(|e| corrupt("column catalogue read returned no rows result", e))?;
        Ok(rows.rows_num() > 0)
    }

    /// Add the column unless the table has it; one added meanwhile by another run is as good. Returns once a
    /// statement naming the column prepares.
    async fn add(self, session: &Session, ks: &str) -> Result<(), StoreError> {
        if !self.exists(session, ks).await? {
            let statement = format!("ALTER TABLE {ks}.{} ADD {} {}", self.table, self.name, self.cql_type);
            if let Err(e) = session.query_unpaged(statement, ()).await {
                if !self.exists(session, ks).await? {
                    return Err(unavailable(&format!("cannot add column {}.{}", self.table, self.name), e));
                }
            }
        }
        self.usable(session, ks).await
    }

    /// Wait until a statement naming the column prepares. The catalogue lists a column another run is still
    /// adding a moment before the server accepts statements naming it, and this run's statements come next.
    async fn usable(self, session: &Session, ks: &str) -> Result<(), StoreError> {
        let probe = format!("SELECT {} FROM {ks}.{} LIMIT 1", self.name, self.table);
        let mut attempts = 0;
        loop {
            match session.prepare(probe.as_str()).await {
                Ok(_) => return Ok(()),
                Err(e) if attempts >= COLUMN_WAIT_ATTEMPTS => {
                    return Err(unavailable(&format!("column {}.{} is not usable", self.table, self.name), e))
                }
                Err(_) => {
                    attempts += 1;
                    tokio::time::sleep(COLUMN_WAIT_STEP).await;
                }
            }
        }
    }
}

/// How long [`Column::usable`] waits between probes, and how many times it probes again.
const COLUMN_WAIT_STEP: Duration = Duration::from_millis(100);
const COLUMN_WAIT_ATTEMPTS: u32 = 100;

/// Work on existing rows that a schema step does after its statements.
#[derive(Debug, Clone, Copy)]
enum Backfill {
    /// Write a `room_buckets` row for every bucket of `messages` (version 2).
    RoomBuckets,
    /// Write a `thread_replies` row for every stored reply (version 4).
    ThreadReplies,
    /// Write an `authored` row for every stored message and reaction (version 5).
    Authored,
}

impl Backfill {
    async fn run(self, session: &Session, ks: &str) -> Result<(), StoreError> {
        match self {
            Backfill::RoomBuckets => backfill_room_buckets(session, ks).await,
            Backfill::ThreadReplies => backfill_thread_replies(session, ks).await,
            Backfill::Authored => backfill_authored(session, ks).await,
        }
    }
}

/// Index every bucket `messages` holds: its partition keys, read in pages, each written to `room_buckets`. A
/// bucket holding only rows of edits, deletes or reactions whose message never arrived is indexed too; that costs
/// a page one scan that finds nothing, never a wrong answer.
async fn backfill_room_buckets(session: &Session, ks: &str) -> Result<(), StoreError> {
    backfill(
        session,
        "the bucket index",
        format!("SELECT DISTINCT tenant, room, bucket FROM {ks}.messages"),
        format!("INSERT INTO {ks}.room_buckets (tenant, room, bucket) VALUES (?, ?, ?)"),
        |row: (String, String, i64)| Ok(Some(row)),
    )
    .await
}

/// Index every stored reply in its thread and mark its parent: every `messages` row is read twice, in pages (the
/// cost of this step grows with the messages stored, so on a large keyspace run `switchyard-persistor migrate`
/// before the upgrade).
async fn backfill_thread_replies(session: &Session, ks: &str) -> Result<(), StoreError> {
    let select = || format!("SELECT tenant, room, seq, reply_to FROM {ks}.messages");
    backfill(
        session,
        "the thread index",
        select(),
        format!("INSERT INTO {ks}.thread_replies (tenant, room, bucket, parent, seq) VALUES (?, ?, ?, ?, ?)"),
        |(tenant, room, seq, reply_to): (String, String, i64, Option<i64>)| match reply_to {
            Some(parent) => Ok(Some((tenant, room, bucket_of(from_bigint("reply_to", parent)?) as i64, parent, seq))),
            None => Ok(None),
        },
    )
    .await?;
    // With no timestamp of its own, the mark is older than every write since: it only ever says `true`.
    backfill(
        session,
        "the reply marks",
        select(),
        format!("UPDATE {ks}.messages SET has_replies = true WHERE tenant = ? AND room = ? AND bucket = ? AND seq = ?"),
        |(tenant, room, _, reply_to): (String, String, i64, Option<i64>)| match reply_to {
            Some(parent) => Ok(Some((tenant, room, bucket_of(from_bigint("reply_to", parent)?) as i64, parent))),
            None => Ok(None),
        },
    )
    .await
}

/// Index every stored message and reaction by its author: every `messages` and `reactions` row is read once, in
/// pages. The rows written carry no TTL: one left by an expired message costs an export a skipped read.
async fn backfill_authored(session: &Session, ks: &str) -> Result<(), StoreError> {
    let insert = format!("INSERT INTO {ks}.authored (tenant, author, room, seq, emoji) VALUES (?, ?, ?, ?, ?)");
    backfill(
        session,
        "the authorship index",
        format!("SELECT tenant, room, seq, sender FROM {ks}.messages"),
        insert.clone(),
        |(tenant, room, seq, sender): (String, String, i64, Option<String>)| {
            Ok(sender.map(|sender| (tenant, sender, room, seq, String::new())))
        },
    )
    .await?;
    backfill(
        session,
        "the authorship index of reactions",
        format!("SELECT tenant, room, target, emoji, reactor FROM {ks}.reactions"),
        insert,
        |(tenant, room, target, emoji, reactor): (String, String, i64, String, String)| {
            Ok(Some((tenant, reactor, room, target, emoji)))
        },
    )
    .await
}

/// Read `select` in pages of [`BACKFILL_PAGE`] rows and write, with `insert` ([`BACKFILL_CONCURRENCY`] in flight),
/// the values `convert` makes of each row (none for a row it skips). Idempotent when the written rows follow from
/// their key; `what` names the index in errors.
async fn backfill<R, V>(
    session: &Session,
    what: &str,
    select: String,
    insert: String,
    convert: impl Fn(R) -> Result<Option<V>, StoreError>,
) -> Result<(), StoreError>
where
    R: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata> + 'static,
    V: SerializeRow,
{
    let mut insert =
        session.prepare(insert).await.map_err(|e| unavailable(&format!("cannot prepare the backfill of {what}"), e))?;
    insert.set_is_idempotent(true);
    let mut select = Statement::new(select);
    select.set_page_size(BACKFILL_PAGE);
    select.set_is_idempotent(true);
    let read_failed = || format!("cannot read the rows to backfill {what} from");
    let pager = session.query_iter(select, ()).await.map_err(|e| unavailable(&read_failed(), e))?;
    let rows = pager.rows_stream::<R>().map_err(|e| corrupt("rows to backfill have unexpected types", e))?;
    let (insert, convert, read_failed) = (&insert, &convert, &read_failed);
    rows.map(|row| async move {
        let row = row.map_err(|e| match e {
            scylla::errors::NextRowError::NextPageError(e) => unavailable(&read_failed(), e),
            other => corrupt("undecodable row to backfill", other),
        })?;
        if let Some(values) = convert(row)? {
            session
                .execute_unpaged(insert, values)
                .await
                .map_err(|e| unavailable(&format!("cannot write {what}"), e))?;
        }
        Ok::<(), StoreError>(())
    })
    .buffer_unordered(BACKFILL_CONCURRENCY)
    .try_collect::<()>()
    .await
}

/// Every schema step, oldest first.
fn migrations(ks: &str) -> Vec<Migration> {
    vec![
        Migration {
            version: 1,
            description: "messages, reactions and room progress",
            statements: vec![
                // Messages: one partition per (tenant, room, bucket of BUCKET_SIZE seqs), so a partition stays
                // small (at most BUCKET_SIZE rows) however long a room lives; clustered by seq for range pages.
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.messages (\
                     tenant text, room text, bucket bigint, seq bigint, \
                     id text, sender text, body text, attrs text, reply_to bigint, ts_us bigint, \
                     edited_us bigint, deleted boolean, \
                     PRIMARY KEY ((tenant, room, bucket), seq)\
                     ) WITH CLUSTERING ORDER BY (seq ASC)"
                ),
                // Reactions: in the bucket of the message they target; one row per (message, emoji, user) so an
                // add and a remove of the same reaction settle by timestamp.
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.reactions (\
                     tenant text, room text, bucket bigint, target bigint, emoji text, reactor text, \
                     removed boolean, \
                     PRIMARY KEY ((tenant, room, bucket), target, emoji, reactor)\
                     )"
                ),
                // A room's highest applied seq (its write time is that event's ts_us): bounds history scans, tells
                // a history request the store caught up, and is the room's head.
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.room_progress (\
                     tenant text, room text, last_seq bigint, \
                     PRIMARY KEY ((tenant, room))\
                     )"
                ),
            ],
            columns: vec![],
            backfill: None,
        },
        Migration {
            version: 2,
            description: "room_buckets: the buckets of each room that hold messages",
            statements: vec![
                // The buckets holding messages, per room: a history page scans only these, however many buckets of
                // joins, leaves and reactions lie between them.
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.room_buckets (\
                     tenant text, room text, bucket bigint, \
                     PRIMARY KEY ((tenant, room), bucket)\
                     ) WITH CLUSTERING ORDER BY (bucket ASC)"
                ),
            ],
            columns: vec![],
            backfill: Some(Backfill::RoomBuckets),
        },
        Migration {
            version: 3,
            description: "messages.pinned: whether the last pin event of a message pinned it",
            statements: vec![],
            // Unset on every message stored before: not pinned, which is what they are, so nothing to backfill.
            columns: vec![Column { table: "messages", name: "pinned", cql_type: "boolean" }],
            backfill: None,
        },
        Migration {
            version: 4,
            description: "thread_replies: the replies to each message, in the bucket of the message replied to; \
                          messages.has_replies",
            statements: vec![
                // A thread is a clustering range of its parent's bucket: its page is one range read, and a
                // message marked `has_replies` has its replies counted by one bounded read.
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.thread_replies (\
                     tenant text, room text, bucket bigint, parent bigint, seq bigint, \
                     PRIMARY KEY ((tenant, room, bucket), parent, seq)\
                     ) WITH CLUSTERING ORDER BY (parent ASC, seq ASC)"
                ),
            ],
            columns: vec![Column { table: "messages", name: "has_replies", cql_type: "boolean" }],
            backfill: Some(Backfill::ThreadReplies),
        },
        Migration {
            version: 5,
            description: "authored: each user's messages and reactions; erasures: the users erased from each room",
            statements: vec![
                // One partition per user: erasing and exporting the user read it, a room at a time or in pages.
                // A message has the emoji ''; a reaction is at the seq of the message it targets.
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.authored (\
                     tenant text, author text, room text, seq bigint, emoji text, \
                     PRIMARY KEY ((tenant, author), room, seq, emoji)\
                     )"
                ),
                // The time of each user's latest erasure per room: a late write of theirs from before it is
                // erased after it lands. By time, as a room's deletion: a room created again may restart its seqs.
                format!(
                    "CREATE TABLE IF NOT EXISTS {ks}.erasures (\
                     tenant text, room text, user text, ts_us bigint, \
                     PRIMARY KEY ((tenant, room), user)\
                     )"
                ),
            ],
            columns: vec![],
            backfill: Some(Backfill::Authored),
        },
    ]
}

/// What a migration found and left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationOutcome {
    /// The schema version before (0: no schema, or tables from before versioning).
    pub from: i32,
    /// The schema version now ([`SCHEMA_VERSION`]).
    pub to: i32,
}

/// The keyspace's recorded schema version; 0 when the keyspace or the version table does not exist yet.
async fn schema_version(session: &Session, ks: &str) -> Result<i32, StoreError> {
    let tables = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ? AND table_name = 'schema_version'",
            (ks,),
        )
        .await
        .map_err(|e| unavailable("cannot read the schema catalogue", e))?
        .into_rows_result()
        .map_err(|e| corrupt("schema catalogue read returned no rows result", e))?;
    if tables.rows_num() == 0 {
        return Ok(0);
    }
    let rows = session
        .query_unpaged(format!("SELECT version FROM {ks}.schema_version WHERE component = ?"), (SCHEMA_COMPONENT,))
        .await
        .map_err(|e| unavailable("cannot read the schema version", e))?
        .into_rows_result()
        .map_err(|e| corrupt("schema version read returned no rows result", e))?;
    let row = rows.maybe_first_row::<(Option<i32>,)>().map_err(|e| corrupt("undecodable schema version", e))?;
    Ok(row.and_then(|(v,)| v).unwrap_or(0))
}

/// Refuse a schema that is not exactly the one this code knows, saying what to do.
fn check_current(ks: &str, found: i32) -> Result<(), StoreError> {
    if found == SCHEMA_VERSION {
        Ok(())
    } else if found < SCHEMA_VERSION {
        Err(StoreError::SchemaMismatch(format!(
            "the history schema in keyspace {ks} is at version {found}, this persistor needs {SCHEMA_VERSION}: \
             run `switchyard-persistor migrate` (or set cql_migrate_on_start = true)"
        )))
    } else {
        Err(StoreError::SchemaMismatch(format!(
            "the history schema in keyspace {ks} is at version {found}, newer than this persistor's \
             {SCHEMA_VERSION}: run a persistor release that knows it"
        )))
    }
}

/// Create the keyspace when missing and apply every schema step above its recorded version up to `target`,
/// recording each.
async fn migrate_session(
    session: &Session,
    ks: &str,
    replication: &str,
    target: i32,
) -> Result<MigrationOutcome, StoreError> {
    let ddl = |what: &'static str| move |e| unavailable(what, e);
    session
        .query_unpaged(
            format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication} AND durable_writes = true"),
            (),
        )
        .await
        .map_err(ddl("cannot create the keyspace"))?;
    session
        .query_unpaged(
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.schema_version (\
                 component text PRIMARY KEY, version int, description text, applied_at timestamp)"
            ),
            (),
        )
        .await
        .map_err(ddl("cannot create the schema version table"))?;
    let from = schema_version(session, ks).await?;
    if from > SCHEMA_VERSION {
        check_current(ks, from)?;
    }
    for step in migrations(ks).into_iter().filter(|m| m.version > from && m.version <= target) {
        for statement in step.statements {
            session.query_unpaged(statement, ()).await.map_err(ddl("cannot apply a schema step"))?;
        }
        for column in step.columns {
            column.add(session, ks).await?;
        }
        if let Some(backfill) = step.backfill {
            backfill.run(session, ks).await?;
        }
        session
            .query_unpaged(
                format!(
                    "INSERT INTO {ks}.schema_version (component, version, description, applied_at) \
                     VALUES (?, ?, ?, toTimestamp(now()))"
                ),
                (SCHEMA_COMPONENT, step.version, step.description),
            )
            .await
            .map_err(ddl("cannot record the schema version"))?;
        tracing::info!(keyspace = ks, version = step.version, step = step.description, "history schema step applied");
    }
    Ok(MigrationOutcome { from, to: target.max(from) })
}

/// The prepared statements, one per kind of read or write.
#[derive(Debug)]
struct Statements {
    /// A `msg` event: every field of the message, stamped with its `ts_us`.
    insert_msg: PreparedStatement,
    /// An `edit`: body and edit time.
    edit: PreparedStatement,
    /// A `delete`: the tombstone flag, and the body cleared.
    delete: PreparedStatement,
    /// A reaction add or remove.
    react: PreparedStatement,
    /// A pin or unpin: the `pinned` flag.
    pin: PreparedStatement,
    /// Index the bucket of a `msg`.
    index_bucket: PreparedStatement,
    /// The room's last seq.
    progress: PreparedStatement,
    /// Read the room's last seq and its write time (the `ts_us` of that event).
    select_progress: PreparedStatement,
    /// Indexed buckets of a room between two inclusive buckets, ascending, limited.
    select_buckets_asc: PreparedStatement,
    /// The same, descending.
    select_buckets_desc: PreparedStatement,
    /// Messages of one bucket between two exclusive seqs, ascending, limited.
    select_asc: PreparedStatement,
    /// The same, descending.
    select_desc: PreparedStatement,
    /// Reactions of one bucket between two inclusive target seqs.
    select_reactions: PreparedStatement,
    /// Put a reply in its parent's thread.
    insert_reply: PreparedStatement,
    /// Reply seqs of one parent between two exclusive seqs, ascending, limited.
    select_thread_asc: PreparedStatement,
    /// The same, descending.
    select_thread_desc: PreparedStatement,
    /// Messages of one bucket with the given seqs.
    select_seqs: PreparedStatement,
    /// Mark a message as having replies.
    mark_replied: PreparedStatement,
    /// Replies of one parent, at most one past the counted bound.
    select_replies_of: PreparedStatement,
    /// A deleted room: one bucket of its messages, of its reactions, of its replies, and its index row, each
    /// removed as of the `room_deleted` event's time (later writes stay).
    drop_messages: PreparedStatement,
    drop_reactions: PreparedStatement,
    drop_replies: PreparedStatement,
    drop_bucket_index: PreparedStatement,
    /// The time a message's cells have left (null: no TTL), for the writes that change an existing message.
    select_ttl: PreparedStatement,
    /// Index a message or reaction by its author.
    insert_authored: PreparedStatement,
    /// Make a message the tombstone of an erased author: every cell the author wrote nulled.
    erase_message: PreparedStatement,
    /// Remove one reaction.
    drop_reaction: PreparedStatement,
    /// Remove a user's index rows of one room before a seq.
    drop_authored: PreparedStatement,
    /// Record a user's erasure from a room.
    insert_erasure: PreparedStatement,
    /// The erasures of a room: (user, ts_us).
    select_erasures: PreparedStatement,
    /// A user's index rows of one room before a seq: (seq, emoji).
    select_authored_in_room: PreparedStatement,
    /// The first room after a given one holding an index row of a user.
    select_authored_room_after: PreparedStatement,
    /// A user's index rows after a (room, seq), limited: (room, seq, emoji).
    select_authored_after: PreparedStatement,
}

/// The history store on a CQL cluster. Cheap to clone; clones share the session.
#[derive(Clone)]
pub struct CqlStore {
    /// The driver session: connection pools to every node, token-aware routing.
    session: Arc<Session>,
    /// Statements prepared once at connect.
    statements: Arc<Statements>,
    /// The keyspace in use.
    keyspace: String,
    /// Most requests one `apply` keeps in flight.
    write_concurrency: usize,
}

impl fmt::Debug for CqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CqlStore").field("keyspace", &self.keyspace).finish_non_exhaustive()
    }
}

fn unavailable(what: &str, err: impl Into<BoxError>) -> StoreError {
    StoreError::Unavailable(StoreFault::caused(what, err))
}

/// A failed write: refused by the server or the driver as invalid (the same write would be refused again) is
/// `Rejected`; anything else (timeouts, broken connections, overload, too few replicas) is `Unavailable`.
fn write_failed(what: &str, err: ExecutionError) -> StoreError {
    let rejected = match &err {
        ExecutionError::BadQuery(_) => true,
        ExecutionError::LastAttemptError(attempt) => matches!(
            attempt,
            RequestAttemptError::SerializationError(_)
                | RequestAttemptError::CqlRequestSerialization(_)
                | RequestAttemptError::DbError(
                    DbError::Invalid | DbError::SyntaxError | DbError::FunctionFailure { .. },
                    _
                )
        ),
        _ => false,
    };
    if rejected {
        StoreError::Rejected(StoreFault::caused(what, err))
    } else {
        unavailable(what, err)
    }
}

fn corrupt(what: &str, err: impl Into<BoxError>) -> StoreError {
    StoreError::Corrupt(StoreFault::caused(what, err))
}

/// Whether a session could not be made because the cluster refused the credentials (an authentication error from
/// the server, or none given where it requires them) or the TLS handshake failed on a certificate: found by type in
/// the error's causes, so an outage (a timeout, a node draining, `system_auth` short of replicas) is never taken
/// for one.
fn is_refusal(error: &(dyn std::error::Error + 'static)) -> bool {
    use scylla::errors::{ConnectionError, ConnectionPoolError, ConnectionSetupRequestErrorKind, DbError};
    // The pool keeps its last connection's error as a field, not as its source: looked into by hand.
    let refused_connection = |connection: &ConnectionError| match connection {
        ConnectionError::ConnectionSetupRequestError(setup) => matches!(
            &setup.error,
            ConnectionSetupRequestErrorKind::DbError(DbError::AuthenticationError, _)
                | ConnectionSetupRequestErrorKind::MissingAuthentication
        ),
        ConnectionError::IoError(io) => switchyard_service::tls::is_tls_failure(io.as_ref()),
        _ => false,
    };
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(ConnectionPoolError::Broken { last_connection_error }) =
            current.downcast_ref::<ConnectionPoolError>()
        {
            if refused_connection(last_connection_error) {
                return true;
            }
        }
        if let Some(connection) = current.downcast_ref::<ConnectionError>() {
            if refused_connection(connection) {
                return true;
            }
        }
        cause = current.source();
    }
    switchyard_service::tls::is_tls_failure(error)
}

/// A keyspace or data center name that is safe to place in DDL text (these are configuration, never user input,
/// but they are checked all the same).
fn check_name(kind: &str, name: &str, allow_dash: bool) -> Result<(), StoreError> {
    let ok = (1..=48).contains(&name.len())
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || (allow_dash && b == b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidQuery(StoreFault::new(format!("invalid {kind} name {name:?}"))))
    }
}

fn replication_clause(replication: &Replication) -> Result<String, StoreError> {
    match replication {
        Replication::Simple { replication_factor } => {
            Ok(format!("{{'class': 'SimpleStrategy', 'replication_factor': {replication_factor}}}"))
        }
        Replication::NetworkTopology { datacenters } => {
            if datacenters.is_empty() {
                return Err(StoreError::InvalidQuery(StoreFault::new(
                    "NetworkTopology replication needs at least one data center",
                )));
            }
            let mut parts = vec!["'class': 'NetworkTopologyStrategy'".to_owned()];
            for (dc, factor) in datacenters {
                check_name("data center", dc, true)?;
                parts.push(format!("'{dc}': {factor}"));
            }
            Ok(format!("{{{}}}", parts.join(", ")))
        }
    }
}

/// A u64 the store writes as a CQL bigint; larger values are refused as bad data.
fn to_bigint(what: &str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|e| {
        StoreError::Rejected(StoreFault::described(format!("{what} {value} does not fit a CQL bigint"), e))
    })
}

/// A bigint read back from the store that must be a non-negative u64.
fn from_bigint(what: &str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value)
        .map_err(|e| StoreError::Corrupt(StoreFault::described(format!("negative {what} {value} in store"), e)))
}

/// One write, with its values, bound for one partition.
struct Write {
    /// The statement to run.
    statement: PreparedStatement,
    /// Its bound values, type-erased so writes of different kinds can share a batch.
    values: Box<dyn SerializeRow + Send + Sync>,
    /// Rough size of the values, to keep batches bounded.
    bytes: usize,
}

/// The partition a write lands in: (table, tenant, room, bucket); the bucket is 0 for tables partitioned by room.
type PartitionKey = (&'static str, String, String, u64);

impl CqlStore {
    /// Connect with default settings (replication factor 1 when the keyspace has to be created).
    pub async fn connect(nodes: &[String], keyspace: &str) -> Result<Self, StoreError> {
        Self::connect_with(CqlConfig::new(nodes, keyspace)).await
    }

    /// Create the keyspace when missing and bring its schema to [`SCHEMA_VERSION`]; idempotent, and safe to run
    /// again after an interruption. What `switchyard-persistor migrate` runs.
    pub async fn migrate(config: &CqlConfig) -> Result<MigrationOutcome, StoreError> {
        Self::migrate_to(config, SCHEMA_VERSION).await
    }

    /// [`CqlStore::migrate`], stopping at schema version `target` (1..=[`SCHEMA_VERSION`]): how the tests build a
    /// keyspace as an earlier release left it. A schema already at or beyond `target` is left as it is.
    pub async fn migrate_to(config: &CqlConfig, target: i32) -> Result<MigrationOutcome, StoreError> {
        if !(1..=SCHEMA_VERSION).contains(&target) {
            return Err(StoreError::InvalidQuery(StoreFault::new(format!(
                "schema version {target} is outside 1..={SCHEMA_VERSION}"
            ))));
        }
        let (session, ks, replication) = Self::session(config).await?;
        migrate_session(&session, &ks, &replication, target).await
    }

    /// The keyspace's recorded schema version (0 when there is none).
    pub async fn schema_version_of(config: &CqlConfig) -> Result<i32, StoreError> {
        let (session, ks, _) = Self::session(config).await?;
        schema_version(&session, &ks).await
    }

    async fn session(config: &CqlConfig) -> Result<(Session, String, String), StoreError> {
        check_name("keyspace", &config.keyspace, false)?;
        if config.nodes.is_empty() {
            return Err(StoreError::InvalidQuery(StoreFault::new("no CQL nodes configured")));
        }
        let ks = config.keyspace.to_ascii_lowercase();
        let replication = replication_clause(&config.replication)?;
        let profile = ExecutionProfile::builder()
            .request_timeout(Some(config.request_timeout))
            .consistency(config.consistency)
            .build()
            .into_handle();
        let mut builder = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(config.connect_timeout)
            .default_execution_profile_handle(profile);
        if let Some(credentials) = &config.credentials {
            builder = builder.user(credentials.username.clone(), credentials.password.clone());
        }
        if let Some(files) = &config.tls {
            let tls = switchyard_service::tls::client_config(files)
                .map_err(|e| StoreError::InvalidQuery(StoreFault::caused("the CQL TLS settings cannot be used", e)))?;
            builder = builder.tls_context(Some(std::sync::Arc::new(tls)));
        }
        let session = builder.build().await.map_err(|e| {
            // Refused credentials or a failed certificate check are configuration mistakes, not an outage: no retry.
            if is_refusal(&e) {
                StoreError::InvalidQuery(StoreFault::caused(
                    "the CQL cluster refused the connection: check cql_username, cql_password and the TLS settings",
                    e,
                ))
            } else {
                unavailable("cannot connect to the CQL cluster", e)
            }
        })?;
        Ok((session, ks, replication))
    }

    /// Connect, migrate or check the schema as `config.schema` says, and prepare every statement.
    pub async fn connect_with(config: CqlConfig) -> Result<Self, StoreError> {
        let (session, ks, replication) = Self::session(&config).await?;

        match config.schema {
            SchemaPolicy::Migrate => {
                migrate_session(&session, &ks, &replication, SCHEMA_VERSION).await?;
            }
            SchemaPolicy::Require => {
                let found = schema_version(&session, &ks).await?;
                check_current(&ks, found)?;
            }
        }

        let key = "tenant = ? AND room = ? AND bucket = ?";
        let columns = "seq, id, sender, body, attrs, reply_to, ts_us, edited_us, deleted, pinned, has_replies";
        let texts = [
            format!(
                "INSERT INTO {ks}.messages (tenant, room, bucket, seq, id, sender, body, attrs, reply_to, ts_us) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ? AND TTL ?"
            ),
            format!(
                "UPDATE {ks}.messages USING TIMESTAMP ? AND TTL ? SET body = ?, edited_us = ? WHERE {key} AND seq = ?"
            ),
            // The body is erased with an empty string, not a null: no tombstone, and the delete's later timestamp still
            // wins over the create and every earlier edit.
            format!(
                "UPDATE {ks}.messages USING TIMESTAMP ? AND TTL ? SET deleted = true, body = '' WHERE {key} AND seq = ?"
            ),
            format!(
                "UPDATE {ks}.reactions USING TIMESTAMP ? AND TTL ? SET removed = ? \
                 WHERE {key} AND target = ? AND emoji = ? AND reactor = ?"
            ),
            format!("UPDATE {ks}.messages USING TIMESTAMP ? AND TTL ? SET pinned = ? WHERE {key} AND seq = ?"),
            format!("INSERT INTO {ks}.room_buckets (tenant, room, bucket) VALUES (?, ?, ?) USING TIMESTAMP ?"),
            format!("UPDATE {ks}.room_progress USING TIMESTAMP ? SET last_seq = ? WHERE tenant = ? AND room = ?"),
            format!("SELECT last_seq, WRITETIME(last_seq) FROM {ks}.room_progress WHERE tenant = ? AND room = ?"),
            format!(
                "SELECT bucket FROM {ks}.room_buckets WHERE tenant = ? AND room = ? AND bucket >= ? AND bucket <= ? \
                 ORDER BY bucket ASC LIMIT ?"
            ),
            format!(
                "SELECT bucket FROM {ks}.room_buckets WHERE tenant = ? AND room = ? AND bucket >= ? AND bucket <= ? \
                 ORDER BY bucket DESC LIMIT ?"
            ),
            format!(
                "SELECT {columns} FROM {ks}.messages WHERE {key} AND seq > ? AND seq < ? \
                 ORDER BY seq ASC LIMIT ?"
            ),
            format!(
                "SELECT {columns} FROM {ks}.messages WHERE {key} AND seq > ? AND seq < ? \
                 ORDER BY seq DESC LIMIT ?"
            ),
            format!(
                "SELECT target, emoji, reactor, removed FROM {ks}.reactions \
                 WHERE {key} AND target >= ? AND target <= ?"
            ),
            format!(
                "INSERT INTO {ks}.thread_replies (tenant, room, bucket, parent, seq) VALUES (?, ?, ?, ?, ?) \
                 USING TIMESTAMP ? AND TTL ?"
            ),
            format!(
                "SELECT seq FROM {ks}.thread_replies WHERE {key} AND parent = ? AND seq > ? AND seq < ? \
                 ORDER BY parent ASC, seq ASC LIMIT ?"
            ),
            format!(
                "SELECT seq FROM {ks}.thread_replies WHERE {key} AND parent = ? AND seq > ? AND seq < ? \
                 ORDER BY parent DESC, seq DESC LIMIT ?"
            ),
            format!("SELECT {columns} FROM {ks}.messages WHERE {key} AND seq IN ?"),
            format!("UPDATE {ks}.messages USING TIMESTAMP ? AND TTL ? SET has_replies = true WHERE {key} AND seq = ?"),
            format!("SELECT seq FROM {ks}.thread_replies WHERE {key} AND parent = ? LIMIT ?"),
            format!("DELETE FROM {ks}.messages USING TIMESTAMP ? WHERE {key}"),
            format!("DELETE FROM {ks}.reactions USING TIMESTAMP ? WHERE {key}"),
            format!("DELETE FROM {ks}.thread_replies USING TIMESTAMP ? WHERE {key}"),
            format!("DELETE FROM {ks}.room_buckets USING TIMESTAMP ? WHERE {key}"),
            format!("SELECT TTL(sender) FROM {ks}.messages WHERE {key} AND seq = ?"),
            format!(
                "INSERT INTO {ks}.authored (tenant, author, room, seq, emoji) VALUES (?, ?, ?, ?, ?) \
                 USING TIMESTAMP ? AND TTL ?"
            ),
            format!(
                "UPDATE {ks}.messages USING TIMESTAMP ? SET sender = null, body = null, attrs = null, \
                 edited_us = null, deleted = true WHERE {key} AND seq = ?"
            ),
            format!(
                "DELETE FROM {ks}.reactions USING TIMESTAMP ? WHERE {key} AND target = ? AND emoji = ? AND reactor = ?"
            ),
            format!(
                "DELETE FROM {ks}.authored USING TIMESTAMP ? WHERE tenant = ? AND author = ? AND room = ? AND seq < ?"
            ),
            format!("UPDATE {ks}.erasures USING TIMESTAMP ? SET ts_us = ? WHERE tenant = ? AND room = ? AND user = ?"),
            format!("SELECT user, ts_us FROM {ks}.erasures WHERE tenant = ? AND room = ?"),
            format!("SELECT seq, emoji FROM {ks}.authored WHERE tenant = ? AND author = ? AND room = ? AND seq < ?"),
            format!("SELECT room FROM {ks}.authored WHERE tenant = ? AND author = ? AND room > ? LIMIT 1"),
            format!(
                "SELECT room, seq, emoji FROM {ks}.authored WHERE tenant = ? AND author = ? \
                 AND (room, seq) > (?, ?) LIMIT ?"
            ),
        ];
        let mut prepared = Vec::with_capacity(texts.len());
        for text in texts {
            let mut statement =
                session.prepare(text).await.map_err(|e| unavailable("cannot prepare a history statement", e))?;
            // Every statement is a read or a timestamped write, so a retry after a timeout is harmless.
            statement.set_is_idempotent(true);
            prepared.push(statement);
        }
        let mut it = prepared.into_iter();
        let mut next = || it.next().ok_or_else(|| StoreError::Unavailable(StoreFault::new("statement list exhausted")));
        let statements = Statements {
            insert_msg: next()?,
            edit: next()?,
            delete: next()?,
            react: next()?,
            pin: next()?,
            index_bucket: next()?,
            progress: next()?,
            select_progress: next()?,
            select_buckets_asc: next()?,
            select_buckets_desc: next()?,
            select_asc: next()?,
            select_desc: next()?,
            select_reactions: next()?,
            insert_reply: next()?,
            select_thread_asc: next()?,
            select_thread_desc: next()?,
            select_seqs: next()?,
            mark_replied: next()?,
            select_replies_of: next()?,
            drop_messages: next()?,
            drop_reactions: next()?,
            drop_replies: next()?,
            drop_bucket_index: next()?,
            select_ttl: next()?,
            insert_authored: next()?,
            erase_message: next()?,
            drop_reaction: next()?,
            drop_authored: next()?,
            insert_erasure: next()?,
            select_erasures: next()?,
            select_authored_in_room: next()?,
            select_authored_room_after: next()?,
            select_authored_after: next()?,
        };
        Ok(CqlStore {
            session: Arc::new(session),
            statements: Arc::new(statements),
            keyspace: ks,
            write_concurrency: config.write_concurrency.max(1),
        })
    }

    /// The keyspace in use.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// For the messages that `events` change (edit, delete, pin, or a reply's mark on its parent): the TTL their
    /// cells have left (0: none) at `now`. A message of this same call counts with the TTL it is written with;
    /// the others are read from the store, at most `write_concurrency` reads at once. A message not stored has no
    /// entry.
    async fn ttls_left(&self, events: &[RoomEvent], now: u64) -> Result<HashMap<MessageKey, i32>, StoreError> {
        let mut wanted: HashSet<(&str, &str, u64)> = HashSet::new();
        for event in events {
            let target = match &event.body {
                EventBody::Edit { target, .. } | EventBody::Delete { target, .. } | EventBody::Pin { target, .. } => {
                    Some(*target)
                }
                EventBody::Msg { reply_to, .. } => *reply_to,
                EventBody::Reaction { .. }
                | EventBody::Joined { .. }
                | EventBody::Left { .. }
                | EventBody::Moderation { .. }
                | EventBody::RoomDeleted {}
                | EventBody::UserErased { .. } => None,
            };
            if let Some(target) = target {
                wanted.insert((event.tenant.as_str(), event.room.as_str(), target));
            }
        }
        let owned = |(tenant, room, seq): (&str, &str, u64)| (tenant.to_owned(), room.to_owned(), seq);
        let mut left = HashMap::new();
        for event in events.iter().filter(|event| matches!(event.body, EventBody::Msg { .. })) {
            let key = (event.tenant.as_str(), event.room.as_str(), event.seq);
            if let (true, Some(ttl)) = (wanted.remove(&key), ttl_of(event, now)) {
                left.insert(owned(key), ttl);
            }
        }
        let to_read: Vec<MessageKey> = wanted.into_iter().map(owned).collect();
        let reads = to_read.into_iter().map(|key| self.ttl_left(key));
        let found: Vec<_> = futures::stream::iter(reads).buffer_unordered(self.write_concurrency).try_collect().await?;
        left.extend(found.into_iter().flatten());
        Ok(left)
    }

    /// The TTL the cells of the message at `seq` have left (0: none), or `None` when it is not stored.
    async fn ttl_left(&self, key: MessageKey) -> Result<Option<(MessageKey, i32)>, StoreError> {
        let values = (key.0.as_str(), key.1.as_str(), bucket_of(key.2) as i64, to_bigint("seq", key.2)?);
        let result = self
            .session
            .execute_unpaged(&self.statements.select_ttl, values)
            .await
            .map_err(|e| unavailable("read a message's TTL", e))?;
        let rows = result.into_rows_result().map_err(|e| corrupt("a TTL read returned no rows result", e))?;
        let row = rows.maybe_first_row::<(Option<i32>,)>().map_err(|e| corrupt("undecodable TTL", e))?;
        Ok(row.map(|(ttl,)| (key, ttl.unwrap_or(0))))
    }

    /// The writes one event makes, with the partition each lands in.
    fn writes_of(&self, event: &RoomEvent, ttl: i32) -> Result<Option<(PartitionKey, Write)>, StoreError> {
        let st = &self.statements;
        let tenant = event.tenant.to_string();
        let room = event.room.to_string();
        let ts = to_bigint("ts_us", event.ts_us)?;
        let seq = to_bigint("seq", event.seq)?;
        let key_bytes = tenant.len() + room.len() + 32;
        let write = match &event.body {
            EventBody::Msg { id, from, body, attrs, reply_to } => {
                let attrs = attrs
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(|e| corrupt("cannot encode attrs", e))?;
                let reply_to = reply_to.map(|r| to_bigint("reply_to", r)).transpose()?;
                let bytes = key_bytes
                    + id.as_str().len()
                    + from.as_str().len()
                    + body.len()
                    + attrs.as_ref().map_or(0, String::len);
                let bucket = bucket_of(event.seq);
                let values = (
                    tenant.clone(),
                    room.clone(),
                    bucket as i64,
                    seq,
                    id.to_string(),
                    from.to_string(),
                    body.clone(),
                    attrs.map_or(MaybeUnset::Unset, MaybeUnset::Set),
                    reply_to.map_or(MaybeUnset::Unset, MaybeUnset::Set),
                    ts,
                    ts,
                    ttl,
                );
                Some((
                    ("messages", tenant, room, bucket),
                    Write { statement: st.insert_msg.clone(), values: Box::new(values), bytes },
                ))
            }
            EventBody::Edit { target, body, .. } => {
                let bucket = bucket_of(*target);
                let target = to_bigint("target", *target)?;
                let values = (ts, ttl, body.clone(), ts, tenant.clone(), room.clone(), bucket as i64, target);
                Some((
                    ("messages", tenant, room, bucket),
                    Write { statement: st.edit.clone(), values: Box::new(values), bytes: key_bytes + body.len() },
                ))
            }
            EventBody::Delete { target, .. } => {
                let bucket = bucket_of(*target);
                let values = (ts, ttl, tenant.clone(), room.clone(), bucket as i64, to_bigint("target", *target)?);
                Some((
                    ("messages", tenant, room, bucket),
                    Write { statement: st.delete.clone(), values: Box::new(values), bytes: key_bytes },
                ))
            }
            EventBody::Reaction { target, user, emoji, removed } => {
                let bucket = bucket_of(*target);
                let values = (
                    ts,
                    ttl,
                    *removed,
                    tenant.clone(),
                    room.clone(),
                    bucket as i64,
                    to_bigint("target", *target)?,
                    emoji.clone(),
                    user.to_string(),
                );
                Some((
                    ("reactions", tenant, room, bucket),
                    Write {
                        statement: st.react.clone(),
                        values: Box::new(values),
                        bytes: key_bytes + emoji.len() + user.as_str().len(),
                    },
                ))
            }
            EventBody::Pin { target, pinned, .. } => {
                let bucket = bucket_of(*target);
                let target = to_bigint("target", *target)?;
                let values = (ts, ttl, *pinned, tenant.clone(), room.clone(), bucket as i64, target);
                Some((
                    ("messages", tenant, room, bucket),
                    Write { statement: st.pin.clone(), values: Box::new(values), bytes: key_bytes + 1 },
                ))
            }
            EventBody::Joined { .. }
            | EventBody::Left { .. }
            | EventBody::Moderation { .. }
            | EventBody::RoomDeleted {}
            | EventBody::UserErased { .. } => None,
        };
        Ok(write)
    }

    /// The authorship index row of a message or a reaction, living as long as the message.
    fn authored_write(&self, event: &RoomEvent, ttl: i32) -> Result<Option<(PartitionKey, Write)>, StoreError> {
        let Some((author, seq, emoji)) = authored_entry(event) else { return Ok(None) };
        let (tenant, room, author) = (event.tenant.to_string(), event.room.to_string(), author.to_string());
        let bytes = tenant.len() + room.len() + author.len() + emoji.len() + 16;
        let values = (
            tenant.clone(),
            author.clone(),
            room,
            to_bigint("seq", seq)?,
            emoji.to_owned(),
            to_bigint("ts_us", event.ts_us)?,
            ttl,
        );
        Ok(Some((
            ("authored", tenant, author, 0),
            Write { statement: self.statements.insert_authored.clone(), values: Box::new(values), bytes },
        )))
    }

    /// Run one statement on its own.
    async fn execute(&self, statement: &PreparedStatement, values: impl SerializeRow) -> Result<(), StoreError> {
        self.session.execute_unpaged(statement, values).await.map_err(|e| write_failed("history write failed", e))?;
        Ok(())
    }

    /// Apply a `user_erased`: record the erasure, make every message of the user in the room before it a tombstone
    /// and remove their reactions there (read from the authorship index, in pages), then drop those index rows;
    /// everything as of the event's time, so an older write arriving later stays shadowed.
    async fn erase_user(&self, event: &RoomEvent, user: &UserId) -> Result<(), StoreError> {
        let st = &self.statements;
        let (tenant, room, user) = (event.tenant.as_str(), event.room.as_str(), user.as_str());
        let (ts, seq) = (to_bigint("ts_us", event.ts_us)?, to_bigint("seq", event.seq)?);
        self.execute(&st.insert_erasure, (ts, ts, tenant, room, user)).await?;
        let mut select = st.select_authored_in_room.clone();
        select.set_page_size(BACKFILL_PAGE);
        let pager = self
            .session
            .execute_iter(select, (tenant, user, room, seq))
            .await
            .map_err(|e| unavailable("cannot read a user's messages to erase", e))?;
        let rows =
            pager.rows_stream::<(i64, String)>().map_err(|e| corrupt("authorship rows have unexpected types", e))?;
        let mut chunks = rows.map_err(|e| unavailable("cannot read a user's messages to erase", e)).try_chunks(256);
        while let Some(chunk) = chunks.try_next().await.map_err(|e| e.1)? {
            // Only the user's own messages (or an edit of one whose message never arrived): the index of a room
            // deleted and created again may point at a later message of another user's.
            let seqs: Vec<i64> = chunk.iter().filter(|(_, emoji)| emoji.is_empty()).map(|(at, _)| *at).collect();
            let theirs: HashSet<i64> = self
                .messages_at(tenant, room, &seqs)
                .await?
                .into_iter()
                .filter(|row| row.create.as_ref().is_none_or(|c| c.from.as_ref().map(UserId::as_str) == Some(user)))
                .map(|row| row.seq_i64)
                .collect();
            let writes = chunk.into_iter().filter_map(|(at, emoji)| {
                let bucket = bucket_of(u64::try_from(at).unwrap_or(0)) as i64;
                match emoji.is_empty() {
                    true if theirs.contains(&at) => {
                        Some(self.execute(&st.erase_message, (ts, tenant, room, bucket, at)).boxed())
                    }
                    true => None,
                    false => Some(self.execute(&st.drop_reaction, (ts, tenant, room, bucket, at, emoji, user)).boxed()),
                }
            });
            futures::stream::iter(writes).buffer_unordered(self.write_concurrency).try_collect::<()>().await?;
        }
        self.execute(&st.drop_authored, (ts, tenant, user, room, seq)).await
    }

    /// Messages, edits and reactions of this call whose author was erased from their room after them (they arrived
    /// late, or alongside the erasure): erased now, as of the erasure's time. Read after the call's writes, so an
    /// erasure that this read misses was recorded later and found their index rows.
    async fn erase_late(&self, events: &[RoomEvent]) -> Result<(), StoreError> {
        let rooms: HashSet<(String, String)> = events
            .iter()
            .filter(|event| authored_entry(event).is_some())
            .map(|event| (event.tenant.to_string(), event.room.to_string()))
            .collect();
        let reads = rooms.into_iter().map(|(tenant, room)| async move {
            let result = self
                .session
                .execute_unpaged(&self.statements.select_erasures, (tenant.as_str(), room.as_str()))
                .await
                .map_err(|e| unavailable("cannot read a room's erasures", e))?;
            let rows = result.into_rows_result().map_err(|e| corrupt("erasures read returned no rows result", e))?;
            let mut erased = Vec::new();
            for row in
                rows.rows::<(String, Option<i64>)>().map_err(|e| corrupt("erasure rows have unexpected types", e))?
            {
                let (user, ts_us) = row.map_err(|e| corrupt("undecodable erasure row", e))?;
                erased.push(((tenant.clone(), room.clone(), user), ts_us.unwrap_or(0)));
            }
            Ok::<_, StoreError>(erased)
        });
        let erased: HashMap<(String, String, String), i64> = futures::stream::iter(reads)
            .buffer_unordered(self.write_concurrency)
            .try_collect::<Vec<_>>()
            .await?
            .into_iter()
            .flatten()
            .collect();
        if erased.is_empty() {
            return Ok(());
        }
        let st = &self.statements;
        for event in events {
            let Some((author, row_seq, emoji)) = authored_entry(event) else { continue };
            let key = (event.tenant.to_string(), event.room.to_string(), author.to_string());
            let Some(&erased_at) = erased.get(&key) else { continue };
            if to_bigint("ts_us", event.ts_us)? >= erased_at {
                continue;
            }
            let (tenant, room, user) = (key.0.as_str(), key.1.as_str(), key.2.as_str());
            // As of the erasure's own time, like the erasure's writes: it shadows this write and every other
            // earlier one of the user's on the same row (an edit landing after its message, say).
            let (bucket, at) = (bucket_of(row_seq) as i64, to_bigint("seq", row_seq)?);
            if emoji.is_empty() {
                self.execute(&st.erase_message, (erased_at, tenant, room, bucket, at)).await?;
            } else {
                self.execute(&st.drop_reaction, (erased_at, tenant, room, bucket, at, emoji, user)).await?;
            }
            self.execute(&st.drop_authored, (erased_at, tenant, user, room, at.saturating_add(1))).await?;
        }
        Ok(())
    }

    /// What a `room_deleted` removes: every bucket up to its own, in each table, as of its time. A partition
    /// deletion at that timestamp shadows every earlier write, also one of an older event that arrives later, and
    /// leaves the room's later messages (written after it) alone.
    fn deletion_writes(&self, event: &RoomEvent) -> Result<Vec<Vec<Write>>, StoreError> {
        let st = &self.statements;
        let ts = to_bigint("ts_us", event.ts_us)?;
        let (tenant, room) = (event.tenant.to_string(), event.room.to_string());
        let bytes = tenant.len() + room.len() + 16;
        let mut groups = Vec::new();
        for bucket in 0..=bucket_of(event.seq) {
            for statement in [&st.drop_messages, &st.drop_reactions, &st.drop_replies, &st.drop_bucket_index] {
                let values = (ts, tenant.clone(), room.clone(), bucket as i64);
                groups.push(vec![Write { statement: statement.clone(), values: Box::new(values), bytes }]);
            }
        }
        Ok(groups)
    }

    /// The index row of a message's bucket. It is part of the message's writes (one per bucket per `apply`), and
    /// only a `msg` writes one: edits, deletes and reactions live in the bucket of their target, and one that
    /// arrives before its message is invisible to history until the message, and its index row, arrive.
    ///
    /// It carries no TTL: a bucket can hold messages that never expire beside ones that do (a room's retention
    /// changed), and a later write's TTL would take the whole row. A bucket whose messages all expired stays
    /// indexed, and a page that reaches it reads it empty.
    fn index_write(&self, event: &RoomEvent, bucket: u64, ts: i64) -> (PartitionKey, Write) {
        let (tenant, room) = (event.tenant.to_string(), event.room.to_string());
        let bytes = tenant.len() + room.len() + 16;
        let values = (tenant.clone(), room.clone(), bucket as i64, ts);
        (
            ("room_buckets", tenant, room, 0),
            Write { statement: self.statements.index_bucket.clone(), values: Box::new(values), bytes },
        )
    }

    /// The writes that put a reply in the thread of `parent`, both in the parent's bucket: its thread row, and the
    /// parent's `has_replies` mark (a row of its own when the parent has not arrived, or is no message).
    fn reply_writes(
        &self,
        event: &RoomEvent,
        parent: u64,
        ts: i64,
        (ttl, parent_ttl): (i32, i32),
    ) -> Result<Vec<(PartitionKey, Write)>, StoreError> {
        let (tenant, room) = (event.tenant.to_string(), event.room.to_string());
        let bucket = bucket_of(parent);
        let (bucket_i64, parent_i64) = (to_bigint("bucket", bucket)?, to_bigint("reply_to", parent)?);
        let values = (tenant.clone(), room.clone(), bucket_i64, parent_i64, to_bigint("seq", event.seq)?, ts, ttl);
        let bytes = tenant.len() + room.len() + 32;
        let mark = (ts, parent_ttl, tenant.clone(), room.clone(), bucket_i64, parent_i64);
        Ok(vec![
            (
                ("thread_replies", tenant.clone(), room.clone(), bucket),
                Write { statement: self.statements.insert_reply.clone(), values: Box::new(values), bytes },
            ),
            (
                ("messages", tenant, room, bucket),
                Write { statement: self.statements.mark_replied.clone(), values: Box::new(mark), bytes },
            ),
        ])
    }

    /// Run one group of writes for a single partition: alone, or as one unlogged batch.
    async fn run_group(&self, mut group: Vec<Write>) -> Result<(), StoreError> {
        if group.len() == 1 {
            if let Some(write) = group.pop() {
                self.session
                    .execute_unpaged(&write.statement, &write.values)
                    .await
                    .map_err(|e| write_failed("history write failed", e))?;
            }
            return Ok(());
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.set_is_idempotent(true);
        let mut values = Vec::with_capacity(group.len());
        for write in group {
            batch.append_statement(write.statement);
            values.push(write.values);
        }
        self.session.batch(&batch, values).await.map_err(|e| write_failed("history batch write failed", e))?;
        Ok(())
    }

    /// Run groups of writes with bounded concurrency; the first failure fails the whole call.
    async fn run_groups(&self, groups: Vec<Vec<Write>>) -> Result<(), StoreError> {
        futures::stream::iter(groups.into_iter().map(|g| self.run_group(g)))
            .buffer_unordered(self.write_concurrency)
            .try_collect::<Vec<()>>()
            .await
            .map(|_| ())
    }

    /// The room's progress row: its last seq, and the write time of that cell, which is the `ts_us` of the event
    /// that wrote it. Every event of a room is newer than those before it, so the cell that wins by timestamp is
    /// the one of the highest seq.
    async fn fetch_head(&self, tenant: &str, room: &str) -> Result<RoomHead, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.statements.select_progress, (tenant, room))
            .await
            .map_err(|e| unavailable("room head read failed", e))?;
        let rows = result.into_rows_result().map_err(|e| corrupt("room head read returned no rows result", e))?;
        let row = rows
            .maybe_first_row::<(Option<i64>, Option<i64>)>()
            .map_err(|e| corrupt("undecodable room progress row", e))?;
        match row {
            Some((Some(seq), ts)) => Ok(RoomHead {
                last_seq: from_bigint("last_seq", seq)?,
                last_ts_us: ts.map(|ts| from_bigint("last_seq write time", ts)).transpose()?.unwrap_or(0),
            }),
            _ => Ok(RoomHead::default()),
        }
    }

    /// Up to [`INDEX_PAGE`] buckets of the room's index within `[first, last]`, in the given direction.
    async fn indexed_buckets(
        &self,
        tenant: &str,
        room: &str,
        (first, last): (u64, u64),
        ascending: bool,
    ) -> Result<Vec<u64>, StoreError> {
        let statement =
            if ascending { &self.statements.select_buckets_asc } else { &self.statements.select_buckets_desc };
        let limit = INDEX_PAGE as i32;
        let result = self
            .session
            .execute_unpaged(statement, (tenant, room, to_bigint("bucket", first)?, to_bigint("bucket", last)?, limit))
            .await
            .map_err(|e| unavailable("bucket index read failed", e))?;
        let rows = result.into_rows_result().map_err(|e| corrupt("bucket index read returned no rows result", e))?;
        let iter = rows.rows::<(i64,)>().map_err(|e| corrupt("bucket index rows have unexpected types", e))?;
        let mut out = Vec::with_capacity(INDEX_PAGE);
        for row in iter {
            let (bucket,) = row.map_err(|e| corrupt("undecodable bucket index row", e))?;
            out.push(from_bigint("bucket", bucket)?);
        }
        Ok(out)
    }

    /// Up to `want` rows of one bucket strictly between the two `bounds`, in the given direction.
    async fn scan(
        &self,
        tenant: &str,
        room: &str,
        bucket: u64,
        (lo, hi): (i64, i64),
        want: usize,
        ascending: bool,
    ) -> Result<Vec<MessageRow>, StoreError> {
        let statement = if ascending { &self.statements.select_asc } else { &self.statements.select_desc };
        let limit = i32::try_from(want).unwrap_or(i32::MAX);
        let result = self
            .session
            .execute_unpaged(statement, (tenant, room, bucket as i64, lo, hi, limit))
            .await
            .map_err(|e| unavailable("history read failed", e))?;
        let rows = result.into_rows_result().map_err(|e| corrupt("history read returned no rows result", e))?;
        let iter = rows.rows::<RawMessageRow>().map_err(|e| corrupt("history rows have unexpected types", e))?;
        let mut out = Vec::with_capacity(want);
        for row in iter {
            let row = row.map_err(|e| corrupt("undecodable history row", e))?;
            out.push(MessageRow::from_raw(row)?);
        }
        Ok(out)
    }

    /// Reactions of the given messages (all in `bucket`), folded per message.
    async fn reactions(
        &self,
        tenant: &str,
        room: &str,
        bucket: u64,
        first: i64,
        last: i64,
    ) -> Result<HashMap<u64, BTreeMap<String, Vec<UserId>>>, StoreError> {
        let pager = self
            .session
            .execute_iter(self.statements.select_reactions.clone(), (tenant, room, bucket as i64, first, last))
            .await
            .map_err(|e| unavailable("reactions read failed", e))?;
        let mut stream = pager
            .rows_stream::<(i64, String, String, Option<bool>)>()
            .map_err(|e| corrupt("reaction rows have unexpected types", e))?;
        let mut out: HashMap<u64, BTreeMap<String, Vec<UserId>>> = HashMap::new();
        while let Some(row) = stream.next().await {
            let (target, emoji, reactor, removed) = row.map_err(|e| match e {
                scylla::errors::NextRowError::NextPageError(e) => unavailable("reactions read failed", e),
                other => corrupt("undecodable reaction row", other),
            })?;
            if removed.unwrap_or(true) {
                continue;
            }
            let target = from_bigint("reaction target", target)?;
            let user = UserId::parse(&reactor).map_err(|e| corrupt("reaction user", e))?;
            out.entry(target).or_default().entry(emoji).or_default().push(user);
        }
        for users in out.values_mut().flat_map(|m| m.values_mut()) {
            users.sort();
            users.dedup();
        }
        Ok(out)
    }

    async fn page(&self, query: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        let tenant = query.tenant.as_str();
        let room = query.room.as_str();
        let empty = HistoryPage { messages: Vec::new(), more: false };

        // The seqs the query covers, bounded by the room's last seq.
        let last_seq = self.fetch_head(tenant, room).await?.last_seq;
        let Some(window) = PageWindow::of(query, last_seq) else {
            return Ok(empty);
        };
        let (first, last, ascending, wanted) = (window.first, window.last, window.ascending, window.wanted());
        if first > i64::MAX as u64 {
            return Ok(empty);
        }
        // Exclusive bounds for the scans; both fit a bigint since first <= last <= last_seq <= i64::MAX.
        let lo = to_bigint("seq", first - 1)?;
        let hi = to_bigint("seq", last)?.saturating_add(1);

        // Walk the buckets that hold messages, from the end the query starts at, until one message past the page
        // is found. The index is read a few buckets at a time; `(from, to)` is the part of the range not read yet.
        let mut picked: Vec<MessageRow> = Vec::with_capacity(wanted);
        let (mut from, mut to) = (bucket_of(first), bucket_of(last));
        'index: loop {
            let buckets = self.indexed_buckets(tenant, room, (from, to), ascending).await?;
            for &bucket in &buckets {
                let (mut lo_b, mut hi_b) = (lo, hi);
                loop {
                    let want = wanted - picked.len();
                    let rows = self.scan(tenant, room, bucket, (lo_b, hi_b), want, ascending).await?;
                    let exhausted = rows.len() < want;
                    for row in rows {
                        if ascending {
                            lo_b = row.seq_i64;
                        } else {
                            hi_b = row.seq_i64;
                        }
                        if row.create.is_some() {
                            picked.push(row);
                        }
                    }
                    if picked.len() == wanted {
                        break 'index;
                    }
                    if exhausted {
                        break;
                    }
                }
            }
            // A short index page was the last one; otherwise the next starts past the last bucket read.
            match buckets.last() {
                Some(&bucket) if buckets.len() == INDEX_PAGE => {
                    if ascending && bucket < to {
                        from = bucket + 1;
                    } else if !ascending && bucket > from {
                        to = bucket - 1;
                    } else {
                        break;
                    }
                }
                _ => break,
            }
        }
        let (picked, more) = window.finish(picked);
        self.assemble(tenant, room, picked, more).await
    }

    /// The page of `picked` rows (ascending seq): reactions read once per bucket the page touches, the replies of
    /// each message marked `has_replies` counted (up to [`MAX_REPLY_COUNT`]), and folded in.
    async fn assemble(
        &self,
        tenant: &str,
        room: &str,
        picked: Vec<MessageRow>,
        more: bool,
    ) -> Result<HistoryPage, StoreError> {
        let mut reactions: HashMap<u64, BTreeMap<String, Vec<UserId>>> = HashMap::new();
        let mut counts: HashMap<u64, u64> = HashMap::new();
        let mut i = 0;
        while i < picked.len() {
            let bucket = bucket_of(picked[i].seq);
            let mut j = i;
            while j + 1 < picked.len() && bucket_of(picked[j + 1].seq) == bucket {
                j += 1;
            }
            let (first, last) = (picked[i].seq_i64, picked[j].seq_i64);
            reactions.extend(self.reactions(tenant, room, bucket, first, last).await?);
            i = j + 1;
        }
        let replied: Vec<i64> = picked.iter().filter(|row| row.has_replies).map(|row| row.seq_i64).collect();
        let counted: Vec<(i64, u64)> = futures::stream::iter(replied)
            .map(|parent| async move { Ok::<_, StoreError>((parent, self.reply_count(tenant, room, parent).await?)) })
            .buffer_unordered(REPLY_COUNTS_IN_FLIGHT)
            .try_collect()
            .await?;
        for (parent, count) in counted {
            counts.insert(from_bigint("parent", parent)?, count);
        }

        let mut messages = Vec::with_capacity(picked.len());
        for row in picked {
            let folded = reactions.remove(&row.seq).unwrap_or_default();
            let replies = counts.remove(&row.seq).unwrap_or(0);
            if let Some(mut message) = row.into_message(folded)? {
                message.reply_count = replies;
                messages.push(message);
            }
        }
        Ok(HistoryPage { messages, more })
    }

    /// How many replies message `parent` has, up to [`MAX_REPLY_COUNT`]: one read of at most that many rows.
    async fn reply_count(&self, tenant: &str, room: &str, parent: i64) -> Result<u64, StoreError> {
        let bucket = to_bigint("bucket", bucket_of(from_bigint("parent", parent)?))?;
        let limit = MAX_REPLY_COUNT as i32;
        let result = self
            .session
            .execute_unpaged(&self.statements.select_replies_of, (tenant, room, bucket, parent, limit))
            .await
            .map_err(|e| unavailable("reply count read failed", e))?;
        let rows = result.into_rows_result().map_err(|e| corrupt("reply count read returned no rows result", e))?;
        Ok(rows.rows_num() as u64)
    }

    /// One page of the replies to `parent`: the thread's seqs read in the window's direction from the parent's
    /// bucket, then their messages. A reply whose `msg` row is not written yet (its thread row came first) is
    /// skipped, and the walk goes on past it.
    async fn thread_page(&self, query: &HistoryQuery, parent: u64) -> Result<HistoryPage, StoreError> {
        let tenant = query.tenant.as_str();
        let room = query.room.as_str();
        let empty = HistoryPage { messages: Vec::new(), more: false };
        let last_seq = self.fetch_head(tenant, room).await?.last_seq;
        let Some(window) = PageWindow::of(query, last_seq) else {
            return Ok(empty);
        };
        if window.first > i64::MAX as u64 || parent > i64::MAX as u64 {
            return Ok(empty);
        }
        let (ascending, wanted) = (window.ascending, window.wanted());
        let (mut lo, mut hi) = (to_bigint("seq", window.first - 1)?, to_bigint("seq", window.last)?.saturating_add(1));
        let parent_bucket = to_bigint("bucket", bucket_of(parent))?;
        let parent = to_bigint("parent", parent)?;
        let statement =
            if ascending { &self.statements.select_thread_asc } else { &self.statements.select_thread_desc };
        let mut picked: Vec<MessageRow> = Vec::with_capacity(wanted);
        loop {
            let want = wanted - picked.len();
            let limit = i32::try_from(want).unwrap_or(i32::MAX);
            let result = self
                .session
                .execute_unpaged(statement, (tenant, room, parent_bucket, parent, lo, hi, limit))
                .await
                .map_err(|e| unavailable("thread read failed", e))?;
            let rows = result.into_rows_result().map_err(|e| corrupt("thread read returned no rows result", e))?;
            let mut seqs = Vec::with_capacity(want);
            for row in rows.rows::<(i64,)>().map_err(|e| corrupt("thread rows have unexpected types", e))? {
                seqs.push(row.map_err(|e| corrupt("undecodable thread row", e))?.0);
            }
            let exhausted = seqs.len() < want;
            match (seqs.last(), ascending) {
                (Some(&seq), true) => lo = seq,
                (Some(&seq), false) => hi = seq,
                (None, _) => {}
            }
            picked.extend(self.messages_at(tenant, room, &seqs).await?.into_iter().filter(|row| row.create.is_some()));
            if exhausted || picked.len() >= wanted {
                break;
            }
        }
        picked.truncate(wanted);
        let (picked, more) = window.finish(picked);
        self.assemble(tenant, room, picked, more).await
    }

    /// The `messages` rows at `seqs` (in the order given; seqs without a row are left out): one read per bucket.
    async fn messages_at(&self, tenant: &str, room: &str, seqs: &[i64]) -> Result<Vec<MessageRow>, StoreError> {
        let mut by_seq: HashMap<i64, MessageRow> = HashMap::with_capacity(seqs.len());
        let mut buckets: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
        for &seq in seqs {
            buckets.entry(bucket_of(from_bigint("seq", seq)?)).or_default().push(seq);
        }
        for (bucket, in_bucket) in buckets {
            let result = self
                .session
                .execute_unpaged(&self.statements.select_seqs, (tenant, room, bucket as i64, in_bucket))
                .await
                .map_err(|e| unavailable("history read failed", e))?;
            let rows = result.into_rows_result().map_err(|e| corrupt("history read returned no rows result", e))?;
            for row in rows.rows::<RawMessageRow>().map_err(|e| corrupt("history rows have unexpected types", e))? {
                let row = MessageRow::from_raw(row.map_err(|e| corrupt("undecodable history row", e))?)?;
                by_seq.insert(row.seq_i64, row);
            }
        }
        Ok(seqs.iter().filter_map(|seq| by_seq.remove(seq)).collect())
    }
}

/// A `messages` row as the driver returns it.
type RawMessageRow = (
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<bool>,
    Option<bool>,
    Option<bool>,
);

/// The fields the creating `msg` wrote.
#[derive(Debug)]
struct CreateFields {
    /// The message id.
    id: MessageId,
    /// The author; `None` once erased.
    from: Option<UserId>,
    /// Create time, microseconds.
    ts_us: u64,
    /// `attrs` as JSON text.
    attrs: Option<String>,
    /// The seq replied to.
    reply_to: Option<u64>,
}

/// One decoded `messages` row.
#[derive(Debug)]
struct MessageRow {
    /// The row's seq.
    seq: u64,
    /// The same seq as stored, for scan bounds.
    seq_i64: i64,
    /// What the `msg` wrote; `None` while only edits, deletes or reactions have arrived.
    create: Option<CreateFields>,
    /// The current body: the latest of create and edits, cleared by a delete.
    body: Option<String>,
    /// Time of the latest edit, microseconds.
    edited_us: Option<u64>,
    /// Whether the message was deleted.
    deleted: bool,
    /// Whether a reply to it was stored (unset: none, or a keyspace before threads, backfilled by schema 4).
    has_replies: bool,
    /// Whether the last pin event pinned it (unset: never pinned, or stored before pins existed).
    pinned: bool,
}

impl MessageRow {
    fn from_raw(raw: RawMessageRow) -> Result<Self, StoreError> {
        let (seq_i64, id, sender, body, attrs, reply_to, ts_us, edited_us, deleted, pinned, has_replies) = raw;
        let seq = from_bigint("seq", seq_i64)?;
        let create = match (id, sender, ts_us) {
            (None, _, _) => None,
            // An erased author's tombstone: the sender nulled with the rest of what they wrote.
            (Some(id), sender, Some(ts_us)) if sender.is_some() || deleted == Some(true) => Some(CreateFields {
                id: MessageId::parse(&id).map_err(|e| corrupt("message id", e))?,
                from: sender
                    .map(|sender| UserId::parse(&sender))
                    .transpose()
                    .map_err(|e| corrupt("message sender", e))?,
                ts_us: from_bigint("ts_us", ts_us)?,
                attrs,
                reply_to: reply_to.map(|r| from_bigint("reply_to", r)).transpose()?,
            }),
            (Some(_), _, _) => {
                return Err(StoreError::Corrupt(StoreFault::new(format!(
                    "message at seq {seq} has an id but no sender or time"
                ))))
            }
        };
        Ok(MessageRow {
            seq,
            seq_i64,
            create,
            body,
            edited_us: edited_us.map(|e| from_bigint("edited_us", e)).transpose()?,
            deleted: deleted.unwrap_or(false),
            pinned: pinned.unwrap_or(false),
            has_replies: has_replies.unwrap_or(false),
        })
    }

    fn into_message(self, reactions: BTreeMap<String, Vec<UserId>>) -> Result<Option<Message>, StoreError> {
        let Some(create) = self.create else {
            return Ok(None);
        };
        let stored = StoredMessage {
            seq: self.seq,
            id: create.id,
            from: create.from,
            ts_us: create.ts_us,
            attrs: create.attrs,
            reply_to: create.reply_to,
            body: self.body,
            edited_us: self.edited_us,
            deleted: self.deleted,
            pinned: self.pinned,
        };
        stored.into_message(reactions).map(Some)
    }
}

impl HistoryStore for CqlStore {
    async fn apply(&self, events: &[RoomEvent]) -> Result<(), StoreError> {
        events.iter().try_for_each(check_event)?;
        // Group the writes by partition, keeping arrival order inside each group.
        let mut order: Vec<PartitionKey> = Vec::new();
        let mut by_partition: HashMap<PartitionKey, Vec<Write>> = HashMap::new();
        // Per room, the (seq, ts_us) of its newest event in this call.
        let mut progress: HashMap<(String, String), (i64, i64)> = HashMap::new();
        // The buckets of this call's messages already given an index write.
        let mut indexed: HashSet<(&str, &str, u64)> = HashSet::new();
        let now = now_ms();
        let left = self.ttls_left(events, now).await?;
        for event in events {
            let seq = to_bigint("seq", event.seq)?;
            let ts = to_bigint("ts_us", event.ts_us)?;
            let newest = progress.entry((event.tenant.to_string(), event.room.to_string())).or_insert((seq, ts));
            if seq > newest.0 {
                *newest = (seq, ts);
            }
            // A message lives as long as it has left, and one past its expiry is not written. A change to a message
            // lives as long as the message (as long as it has left itself when the message is not stored yet).
            let own = ttl_of(event, now);
            let of_message = |seq: u64| left.get(&(event.tenant.to_string(), event.room.to_string(), seq)).copied();
            let target = match &event.body {
                EventBody::Edit { target, .. } | EventBody::Delete { target, .. } | EventBody::Pin { target, .. } => {
                    Some(*target)
                }
                EventBody::Msg { .. }
                | EventBody::Reaction { .. }
                | EventBody::Joined { .. }
                | EventBody::Left { .. }
                | EventBody::Moderation { .. }
                | EventBody::RoomDeleted {}
                | EventBody::UserErased { .. } => None,
            };
            let Some(ttl) = target.and_then(of_message).or(own) else { continue };
            let index = match &event.body {
                EventBody::Msg { .. } => {
                    let bucket = bucket_of(event.seq);
                    let first_of_bucket = indexed.insert((event.tenant.as_str(), event.room.as_str(), bucket));
                    first_of_bucket.then(|| self.index_write(event, bucket, ts))
                }
                EventBody::Edit { .. }
                | EventBody::Delete { .. }
                | EventBody::Reaction { .. }
                | EventBody::Pin { .. }
                | EventBody::Joined { .. }
                | EventBody::Left { .. }
                | EventBody::Moderation { .. }
                | EventBody::RoomDeleted {}
                | EventBody::UserErased { .. } => None,
            };
            let reply = match &event.body {
                EventBody::Msg { reply_to: Some(parent), .. } => {
                    self.reply_writes(event, *parent, ts, (ttl, of_message(*parent).unwrap_or(ttl)))?
                }
                EventBody::Msg { reply_to: None, .. }
                | EventBody::Edit { .. }
                | EventBody::Delete { .. }
                | EventBody::Reaction { .. }
                | EventBody::Pin { .. }
                | EventBody::Joined { .. }
                | EventBody::Left { .. }
                | EventBody::Moderation { .. }
                | EventBody::RoomDeleted {}
                | EventBody::UserErased { .. } => Vec::new(),
            };
            let authored = self.authored_write(event, ttl)?;
            for (key, write) in self.writes_of(event, ttl)?.into_iter().chain(index).chain(reply).chain(authored) {
                let group = by_partition.entry(key.clone()).or_default();
                if group.is_empty() {
                    order.push(key);
                }
                group.push(write);
            }
        }

        // Cut each partition's writes into bounded batches.
        let mut groups: Vec<Vec<Write>> = Vec::new();
        for key in order {
            let Some(writes) = by_partition.remove(&key) else {
                continue;
            };
            let mut current: Vec<Write> = Vec::new();
            let mut bytes = 0;
            for write in writes {
                if !current.is_empty()
                    && (current.len() >= MAX_BATCH_STATEMENTS || bytes + write.bytes > MAX_BATCH_BYTES)
                {
                    groups.push(std::mem::take(&mut current));
                    bytes = 0;
                }
                bytes += write.bytes;
                current.push(write);
            }
            if !current.is_empty() {
                groups.push(current);
            }
        }
        self.run_groups(groups).await?;

        // Deleted rooms: after this call's own writes, though their order does not matter (timestamps decide).
        let mut deletions = Vec::new();
        for event in events.iter().filter(|event| matches!(event.body, EventBody::RoomDeleted {})) {
            deletions.extend(self.deletion_writes(event)?);
        }
        self.run_groups(deletions).await?;
        for event in events {
            if let EventBody::UserErased { user } = &event.body {
                self.erase_user(event, user).await?;
            }
            // A direct-message room's authors are its two participants: their index of it goes with it.
            if let (EventBody::RoomDeleted {}, Some((a, b))) = (&event.body, event.room.dm_participants()) {
                let (ts, seq) = (to_bigint("ts_us", event.ts_us)?, to_bigint("seq", event.seq)?);
                for user in [a, b] {
                    let values = (ts, event.tenant.as_str(), user.as_str(), event.room.as_str(), seq);
                    self.execute(&self.statements.drop_authored, values).await?;
                }
            }
        }
        self.erase_late(events).await?;

        // The progress rows go last, so a room's last seq never runs ahead of its stored messages.
        let progress_writes = progress
            .into_iter()
            .map(|((tenant, room), (seq, ts))| {
                vec![Write {
                    statement: self.statements.progress.clone(),
                    values: Box::new((ts, seq, tenant, room)),
                    bytes: 0,
                }]
            })
            .collect();
        self.run_groups(progress_writes).await
    }

    async fn history(&self, query: &HistoryQuery) -> Result<HistoryPage, StoreError> {
        check_limit(query.limit)?;
        self.page(query).await
    }

    async fn head(&self, tenant: &ProjectId, room: &RoomId) -> Result<RoomHead, StoreError> {
        self.fetch_head(tenant.as_str(), room.as_str()).await
    }

    async fn thread(&self, query: &HistoryQuery, parent: u64) -> Result<HistoryPage, StoreError> {
        check_limit(query.limit)?;
        self.thread_page(query, parent).await
    }

    async fn authored_rooms(
        &self,
        tenant: &ProjectId,
        user: &UserId,
        after: Option<&RoomId>,
        limit: u32,
    ) -> Result<(Vec<RoomId>, Option<RoomId>), StoreError> {
        // One read per room, each starting past the previous room's rows.
        let mut after = after.map(RoomId::to_string).unwrap_or_default();
        let mut rooms = Vec::new();
        while rooms.len() < limit as usize {
            let values = (tenant.as_str(), user.as_str(), after.as_str());
            let result = self
                .session
                .execute_unpaged(&self.statements.select_authored_room_after, values)
                .await
                .map_err(|e| unavailable("authorship read failed", e))?;
            let rows = result.into_rows_result().map_err(|e| corrupt("authorship read returned no rows result", e))?;
            let Some((room,)) = rows.maybe_first_row::<(String,)>().map_err(|e| corrupt("undecodable room", e))? else {
                return Ok((rooms, None));
            };
            rooms.push(RoomId::parse(&room).map_err(|e| corrupt("a room id in the authorship index", e))?);
            after = room;
        }
        let next = rooms.last().cloned();
        Ok((rooms, next))
    }

    async fn authored_messages(
        &self,
        tenant: &ProjectId,
        user: &UserId,
        after: Option<(&RoomId, u64)>,
        limit: u32,
    ) -> Result<AuthoredMessages, StoreError> {
        let (room, seq) = match after {
            Some((room, seq)) => (room.to_string(), to_bigint("seq", seq)?),
            None => (String::new(), -1),
        };
        let values = (tenant.as_str(), user.as_str(), room, seq, i32::try_from(limit).unwrap_or(i32::MAX));
        let result = self
            .session
            .execute_unpaged(&self.statements.select_authored_after, values)
            .await
            .map_err(|e| unavailable("authorship read failed", e))?;
        let rows = result.into_rows_result().map_err(|e| corrupt("authorship read returned no rows result", e))?;
        let mut entries: Vec<(String, i64, String)> = Vec::new();
        for row in
            rows.rows::<(String, i64, String)>().map_err(|e| corrupt("authorship rows have unexpected types", e))?
        {
            entries.push(row.map_err(|e| corrupt("undecodable authorship row", e))?);
        }
        let next = match entries.last() {
            Some((room, seq, _)) if entries.len() >= limit as usize => Some((
                RoomId::parse(room).map_err(|e| corrupt("a room id in the authorship index", e))?,
                from_bigint("seq", *seq)?,
            )),
            _ => None,
        };
        // The messages among the entries, read a room at a time.
        let mut by_room: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for (room, seq, emoji) in &entries {
            if emoji.is_empty() {
                by_room.entry(room.as_str()).or_default().push(*seq);
            }
        }
        let mut messages = Vec::new();
        for (room, seqs) in by_room {
            let room_id = RoomId::parse(room).map_err(|e| corrupt("a room id in the authorship index", e))?;
            for row in self.messages_at(tenant.as_str(), room, &seqs).await? {
                if row.deleted {
                    continue;
                }
                let own = |message: &Message| message.from.as_ref() == Some(user);
                if let Some(message) = row.into_message(BTreeMap::new())?.filter(own) {
                    messages.push((room_id.clone(), message));
                }
            }
        }
        Ok(AuthoredMessages { messages, next })
    }
}
