//! A Rust client for Switchyard's WebSocket API: connects and authenticates (header, query or first frame), speaks
//! JSON or MessagePack, matches requests to replies by `rid`, and delivers room and presence events in order.
//!
//! A [`Client`] is one socket: it does not reconnect. [`ReconnectingClient`] is a session over as many sockets as it
//! takes: it reconnects with full-jitter exponential backoff (or after the server's `bye.reconnect_after_ms`),
//! resumes every room it tracks with `join {since}`, delivers each event once, and retries unanswered sends with the
//! same `cmid` (see `examples/resilient_chat.rs`). Neither speaks TLS (`ws://` only) or covers the HTTP API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), switchyard_client::ClientError> {
//! use switchyard_client::{Auth, Client, ConnectOptions};
//!
//! let client = Client::connect(ConnectOptions::new(
//!     "ws://127.0.0.1:8080/v1/ws",
//!     Auth::Header("sytok_...".into()),
//! ))
//! .await?;
//! let seq = client.join("general", None).await?;
//! client.send("general", "hello").await?;
//! while let Some(event) = client.next_event().await {
//!     println!("{event:?} (joined at {seq})");
//! }
//! println!("closed: {:?}", client.close_info());
//! # Ok(())
//! # }
//! ```

mod client;
mod error;
pub mod frame;
mod reconnect;
mod task;

pub use client::{Auth, Client, ConnectOptions, Sent, DEFAULT_TIMEOUT, EVENT_QUEUE, OUTGOING_QUEUE, UNMATCHED_QUEUE};
pub use error::{BoxError, ClientError, CloseInfo, Detail};
pub use frame::{Bye, Hello, Incoming, Reply, UnmatchedReply};
pub use reconnect::{
    backoff_delay, new_cmid, AuthSource, ReconnectOptions, ReconnectingClient, SessionEvent, SESSION_EVENT_QUEUE,
};
pub use switchyard_protocol::client::{
    ClientOp, Format, Message, MessagePreview, ModerationAction, RoomSummary, ServerEvent,
};
pub use switchyard_protocol::ErrorCode;
