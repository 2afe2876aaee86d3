//! The WebSocket side of the gateway: the upgrade handler, the per-socket session actor and the room fan-out hub.
//!
//! Nothing here formats subjects or parses frames by hand; `switchyard_protocol` does both.

pub mod hub;
pub mod session;
pub mod upgrade;
