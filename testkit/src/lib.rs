//! Test support shared by Switchyard's integration tests, its fault suite and `cargo xtask`; never released.
//!
//! Always built, and light (no Switchyard crate, no async runtime), so `xtask` can use it before the rest of the
//! workspace is built: [`process`] (child processes stopped on drop, free ports, waiting for a port), [`tls`]
//! (certificates for tests of TLS connections), [`nats`] (the
//! configuration of a NATS server or cluster node on loopback) and [`ledger`] (the bookkeeping of counted traffic
//! and its checks). With the default `fleet` feature, also the in-process fleet and its helpers (`fleet.rs`,
//! re-exported here): it depends on the gateway, router shard and persistor.

pub mod ledger;
pub mod nats;
pub mod process;

pub mod tls;

#[cfg(feature = "fleet")]
mod fleet;
#[cfg(feature = "fleet")]
pub use fleet::*;
