//! Switchyard's contract: identifiers, the client wire format (JSON and MessagePack), the internal messages that
//! travel on NATS, the subject and key names, and the shard function.
//!
//! Nothing outside this crate formats a subject string, parses a client frame or decides whether an id is valid.
//! This crate does no I/O: it only describes and converts.

pub mod client;
pub mod codec;
pub mod error;
pub mod hooks;
pub mod ids;
pub mod internal;
pub mod limits;
pub mod redis_keys;
pub mod shard;
pub mod subjects;

pub use error::{CloseCode, ErrorCode};
pub use ids::{ClientMessageId, ClientMessageIdError, IdError, MessageId, ProjectId, RoomId, UserId};
pub use shard::ShardId;
