//! NATS subject names, the JetStream stream and consumer names, and KV bucket and key names. The only place in
//! Switchyard that formats a subject.
//!
//! Every token that comes from outside is an already validated id (see `ids`), so no subject built here can hold a
//! wildcard or an extra token. This module does not publish or subscribe.

use crate::ids::{ClientMessageId, ProjectId, RoomId, UserId};
use crate::shard::ShardId;

/// The stream that holds every sequenced room event.
pub const EVENTS_STREAM: &str = "SY_EVENTS";
/// The subjects the events stream captures.
pub const EVENTS_STREAM_SUBJECTS: &str = "sy.log.>";
/// How long the events stream recognises a repeated `Nats-Msg-Id` by default (the `cmid` promise: a repeated send
/// within 10 minutes is recognised). Router shards make it configurable; it may not exceed the stream's retention.
pub const EVENTS_DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);
/// JetStream's direct-get API for the events stream: batched reads of a room's subject without a consumer.
pub const EVENTS_DIRECT_GET: &str = "$JS.API.DIRECT.GET.SY_EVENTS";
/// The persistors' durable consumer on the events stream, shared by every persistor.
pub const PERSISTOR_CONSUMER: &str = "persistor";
/// Where persistors send events the store rejected on every attempt, or that could not be decoded.
pub const DEAD_LETTER_SUBJECT: &str = "sy.dead.events";
/// The stream that keeps dead letters until an operator looks at them.
pub const DEAD_LETTER_STREAM: &str = "SY_DEAD";
/// How long dead letters are kept.
pub const DEAD_LETTER_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// History requests, answered by any persistor (queue group `HISTORY_QUEUE`).
pub const HISTORY_SUBJECT: &str = "sy.hist";
pub const HISTORY_QUEUE: &str = "persistors";
/// A user's authorship across a tenant (rooms and messages, for erasure and export), asked of the persistors in
/// [`HISTORY_QUEUE`].
pub const AUTHORED_SUBJECT: &str = "sy.authored";
/// Room-head requests (a room's last seq and time as the history store holds them), answered by any persistor in the
/// same queue group. A router shard asks when the events stream no longer holds any of a room's events.
pub const ROOM_HEAD_SUBJECT: &str = "sy.head";

/// Revocations (a token, a user's sessions, a whole tenant), broadcast on core NATS to every gateway.
pub fn revocations(tenant: &ProjectId) -> String {
    format!("sy.revoke.{tenant}")
}
/// What every gateway subscribes to, to hear every tenant's revocations.
pub const REVOCATIONS_ALL: &str = "sy.revoke.*";

/// KV bucket of tenants, keyed by project id.
pub const TENANTS_BUCKET: &str = "sy_tenants";
/// KV bucket of shard leases and router-shard liveness.
pub const LEASES_BUCKET: &str = "sy_leases";
/// KV bucket of rooms and memberships.
pub const ROOMS_BUCKET: &str = "sy_rooms";
/// KV bucket of short-lived operational locks (entries expire on their own if a holder dies).
pub const LOCKS_BUCKET: &str = "sy_locks";
/// Lock key held while one persistor migrates the history schema, so pods starting together never race on DDL.
pub const SCHEMA_MIGRATION_LOCK: &str = "history-schema-migration";

/// Where the router shard that owns `shard` takes commands.
pub fn command(shard: ShardId) -> String {
    format!("sy.cmd.{}", shard.0)
}

/// The subject a room's sequenced events are appended to in the events stream.
pub fn event_log(shard: ShardId, tenant: &ProjectId, room: &RoomId) -> String {
    format!("sy.log.{}.{}.{}", shard.0, tenant, room.token())
}

/// The subject a room's events are published live on, after the stream has acknowledged them.
pub fn room_live(tenant: &ProjectId, room: &RoomId) -> String {
    format!("sy.live.{}.{}", tenant, room.token())
}

/// The `Nats-Msg-Id` of a send with a client message id: a repeat within the duplicate window is the same append.
pub fn cmid_dedupe_id(tenant: &ProjectId, user: &UserId, cmid: &ClientMessageId) -> String {
    format!("{tenant}:{user}:{cmid}")
}

/// The `Nats-Msg-Id` of the `left` event that ends `user`'s membership as the roster stood at `roster_revision`: a
/// kick or leave repeated after a half-done attempt appends the same event once. A send's id starts with its
/// tenant id (`pj_`), so this never equals one.
pub fn left_dedupe_id(tenant: &ProjectId, room: &RoomId, user: &UserId, roster_revision: u64) -> String {
    format!("left|{tenant}|{}|{user}|{roster_revision}", room.token())
}

/// The `Nats-Msg-Id` of the `room_deleted` event of the room created at `created_at_ms`: a deletion repeated after
/// a half-done attempt finds the first event.
pub fn room_deleted_dedupe_id(tenant: &ProjectId, room: &RoomId, created_at_ms: u64) -> String {
    format!("deleted|{tenant}|{}|{created_at_ms}", room.token())
}

/// The `Nats-Msg-Id` of the event that records a moderation `action` (lasting `secs`, when given) asked on the
/// roster at `roster_revision`: an action repeated after a half-done attempt (sequenced, then the roster write
/// failed) finds the first event.
pub fn moderation_dedupe_id(
    tenant: &ProjectId,
    room: &RoomId,
    roster_revision: u64,
    action: &crate::internal::Moderation,
    secs: Option<u64>,
) -> String {
    use crate::internal::Moderation;
    let lasting = |until_ms: &Option<u64>| match secs {
        Some(secs) => format!("s{secs}"),
        None => format!("u{}", until_ms.unwrap_or(0)),
    };
    let what = match action {
        Moderation::Ban { user, until_ms } => format!("ban|{user}|{}", lasting(until_ms)),
        Moderation::Unban { user } => format!("unban|{user}"),
        Moderation::Mute { user, until_ms } => format!("mute|{user}|{}", lasting(until_ms)),
        Moderation::Unmute { user } => format!("unmute|{user}"),
        Moderation::SlowMode { secs } => format!("slow|{secs}"),
        Moderation::Freeze { frozen } => format!("freeze|{frozen}"),
    };
    format!("mod|{tenant}|{}|{roster_revision}|{what}", room.token())
}

/// KV key of a tenant record.
pub fn tenant_key(tenant: &ProjectId) -> String {
    tenant.as_str().to_owned()
}

/// KV key of a shard's lease.
pub fn lease_key(shard: ShardId) -> String {
    format!("shard.{}", shard.0)
}

/// KV key a router shard refreshes while it lives.
pub fn router_alive_key(router_id: &str) -> String {
    format!("router.{router_id}")
}

/// Prefix of every router-liveness key, for counting live router shards.
pub const ROUTER_ALIVE_PREFIX: &str = "router.";

/// KV key of a room's record (existence, privacy, title).
pub fn room_key(tenant: &ProjectId, room: &RoomId) -> String {
    format!("room.{}.{}", tenant, room.token())
}

/// KV key of a room's roster (members and roles).
pub fn roster_key(tenant: &ProjectId, room: &RoomId) -> String {
    format!("roster.{}.{}", tenant, room.token())
}

/// KV key of a user's rooms and read markers as one record, as releases before per-room membership keys wrote it.
/// Read to migrate it, never written.
pub fn user_rooms_key(tenant: &ProjectId, user: &UserId) -> String {
    format!("urooms.{tenant}.{user}")
}

/// The stream behind the rooms bucket.
pub const ROOMS_BUCKET_STREAM: &str = "KV_sy_rooms";
/// The stream behind the leases bucket.
pub const LEASES_BUCKET_STREAM: &str = "KV_sy_leases";
/// JetStream's direct-get API for the rooms bucket's stream: batched reads of many keys in one request.
pub const ROOMS_DIRECT_GET: &str = "$JS.API.DIRECT.GET.KV_sy_rooms";

/// KV key of one membership of a user (role and read marker in one room). Each room's actor writes only its own
/// rooms' keys, so a user's memberships in many rooms change at once without contending.
pub fn user_room_key(tenant: &ProjectId, user: &UserId, room: &RoomId) -> String {
    format!("uroom.{tenant}.{user}.{}", room.token())
}

/// The rooms bucket's stream subject of a KV key.
pub fn rooms_bucket_subject(key: &str) -> String {
    format!("$KV.{ROOMS_BUCKET}.{key}")
}

/// The stream subjects of every membership key of a user, for listing and counting them.
pub fn user_room_subjects(tenant: &ProjectId, user: &UserId) -> String {
    format!("$KV.{ROOMS_BUCKET}.uroom.{tenant}.{user}.*")
}

/// The stream subjects of every room record of a tenant, for counting its rooms.
pub fn tenant_room_subjects(tenant: &ProjectId) -> String {
    format!("$KV.{ROOMS_BUCKET}.room.{tenant}.*")
}

/// The room of a membership key's stream subject (see [`user_room_subjects`]); `None` for any other subject.
pub fn room_of_user_room_subject(subject: &str) -> Option<RoomId> {
    let rest = subject.strip_prefix("$KV.")?.strip_prefix(ROOMS_BUCKET)?.strip_prefix(".uroom.")?;
    let mut tokens = rest.split('.');
    let (_tenant, _user, room, extra) = (tokens.next()?, tokens.next()?, tokens.next()?, tokens.next());
    if extra.is_some() {
        return None;
    }
    RoomId::from_token(room)
}

/// KV key of a user's presence record (online, last seen).
pub fn presence_key(tenant: &ProjectId, user: &UserId) -> String {
    format!("presence.{tenant}.{user}")
}

/// Where the router shard that owns a user's shard takes requests about that user.
pub fn user_command(shard: ShardId) -> String {
    format!("sy.ucmd.{}", shard.0)
}

/// Where gateways send presence snapshots for the users of one shard.
pub fn presence_snapshot(shard: ShardId) -> String {
    format!("sy.psnap.{}", shard.0)
}

/// Where a new owner of a shard asks every gateway for that shard's presence snapshot at once.
pub const PRESENCE_RESYNC: &str = "sy.psync";

/// A user's inbox: direct-message room events for every session of the user, on every gateway.
pub fn user_inbox(tenant: &ProjectId, user: &UserId) -> String {
    format!("sy.user.{tenant}.{user}")
}

/// A user's presence changes, for the sessions that watch the user.
pub fn presence_events(tenant: &ProjectId, user: &UserId) -> String {
    format!("sy.presence.{tenant}.{user}")
}

/// Is `router_id` usable in a KV key and a subject? Router ids come from configuration.
pub fn valid_router_id(router_id: &str) -> bool {
    !router_id.is_empty()
        && router_id.len() <= 64
        && router_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_have_fixed_token_counts() {
        let tenant = ProjectId::parse("pj_abcdefghij0123456789").unwrap();
        let room = RoomId::parse("dm:alice:bob").unwrap();
        assert_eq!(event_log(ShardId(3), &tenant, &room), "sy.log.3.pj_abcdefghij0123456789.dm=alice=bob");
        assert_eq!(room_live(&tenant, &room).split('.').count(), 4);
        assert_eq!(command(ShardId(63)), "sy.cmd.63");
        assert!(!valid_router_id("a.b"));
        assert!(valid_router_id("router-1"));
        assert_eq!(revocations(&tenant), "sy.revoke.pj_abcdefghij0123456789");
    }

    #[test]
    fn a_membership_subject_names_its_room_and_nothing_else_does() {
        let tenant = ProjectId::parse("pj_abcdefghij0123456789").unwrap();
        let user = UserId::parse("alice").unwrap();
        for room in ["general", "dm:alice:bob", "a-b_c"] {
            let room = RoomId::parse(room).unwrap();
            let subject = rooms_bucket_subject(&user_room_key(&tenant, &user, &room));
            assert_eq!(room_of_user_room_subject(&subject), Some(room));
            let filter = user_room_subjects(&tenant, &user);
            assert_eq!(subject.rsplit_once('.').unwrap().0, filter.rsplit_once('.').unwrap().0);
        }
        for other in [
            "$KV.sy_rooms.room.pj_abcdefghij0123456789.general",
            "$KV.sy_rooms.uroom.pj_abcdefghij0123456789.alice.general.x",
            "$KV.sy_rooms.uroom.pj_abcdefghij0123456789.alice.dm=bob=alice",
            "$KV.sy_rooms.uroom.pj_abcdefghij0123456789.alice",
            "$KV.sy_other.uroom.pj_abcdefghij0123456789.alice.general",
        ] {
            assert_eq!(room_of_user_room_subject(other), None, "{other}");
        }
    }
}
