//! Default limits of the wire contract. Every one is configurable in the services; these are the defaults.
//!
//! This module holds numbers only; enforcing them is the gateway's job.

/// Largest accepted client frame, in bytes.
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Largest message `body`, in bytes of UTF-8.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Largest `attrs`, in bytes of JSON.
pub const MAX_ATTRS_BYTES: usize = 4 * 1024;
/// Longest `cmid`, in characters.
pub const MAX_CMID_CHARS: usize = 64;
/// Emoji length bounds, in bytes.
pub const EMOJI_BYTES: std::ops::RangeInclusive<usize> = 1..=32;
/// Longest room title, in bytes.
pub const MAX_TITLE_BYTES: usize = 200;
/// Most users one `presence`, `watch` or `unwatch` names.
pub const MAX_USERS_PER_OP: usize = 100;
/// Default and largest `history` page.
pub const HISTORY_DEFAULT_LIMIT: u32 = 50;
pub const HISTORY_MAX_LIMIT: u32 = 100;
/// Heartbeat interval announced in `hello`.
pub const HEARTBEAT_MS: u64 = 25_000;
/// Outbound queue bound per session.
pub const OUTBOUND_QUEUE_FRAMES: usize = 1024;
pub const OUTBOUND_QUEUE_BYTES: usize = 1024 * 1024;
/// Token lifetime bounds, in seconds.
pub const TOKEN_TTL_DEFAULT_SECS: u64 = 600;
pub const TOKEN_TTL_MAX_SECS: u64 = 86_400;
/// Number of virtual shards when a cluster does not configure its own.
pub const DEFAULT_SHARD_COUNT: u16 = 64;

/// Members one room may have at most, whatever a tenant's quota says: the roster is one KV value, and this many
/// members of the longest user ids fit one NATS message (1 MiB) with room to spare.
pub const MAX_MEMBERS_PER_ROOM: u32 = 10_000;
/// Rooms one user may be a member of at most, whatever a tenant's quota says: the user's `rooms` reply lists them all.
pub const MAX_ROOMS_PER_USER: u32 = 10_000;
/// Users one session may watch when neither the tenant nor the gateway says otherwise, and the most any quota allows:
/// each watched user is a NATS subscription of the gateway.
pub const WATCHED_PER_SESSION: u32 = 1_000;
pub const MAX_WATCHED_PER_SESSION: u32 = 10_000;
/// Live sockets one user may have across the fleet when neither the tenant nor the gateway sets a quota: enough for
/// every device and tab a person uses, far below what one stolen token could open.
pub const MAX_CONNECTIONS_PER_USER: u32 = 100;
/// Users one room may ban, and mute, at a time (expired entries do not count): both lists live in the roster's KV
/// value beside its members, and with this many of the longest user ids it still fits one NATS message.
pub const MAX_BANS_PER_ROOM: usize = 1_000;
pub const MAX_MUTES_PER_ROOM: usize = 1_000;
/// Longest slow-mode interval, in seconds.
pub const MAX_SLOW_MODE_SECS: u32 = 86_400;
/// Longest ban or mute with an expiry, in seconds (ten years); longer ones are given without `secs`, for good.
pub const MAX_MODERATION_SECS: u64 = 315_360_000;
/// The most replies `reply_count` counts: a message with more shows this many, so reading a count stays bounded
/// however large its thread grows.
pub const MAX_REPLY_COUNT: u64 = 1_000;
/// The longest history retention, in seconds (ten years).
pub const MAX_RETENTION_SECS: u64 = 315_360_000;
/// The most bytes of a message's body its preview in `rooms` shows (cut at a character boundary).
pub const PREVIEW_BYTES: usize = 200;
