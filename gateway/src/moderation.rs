//! Moderation actions as the edges take them: the WebSocket ops of room admins and the HTTP API of the tenant's
//! backend both build the room's command here (a ban's or mute's duration checked), and a tenant ban's duration
//! becomes the end its Redis key expires at.
//!
//! Who may moderate, and what an action does to the room, is the room's router shard's decision (`room_core`).

use std::time::{SystemTime, UNIX_EPOCH};
use switchyard_protocol::internal::{Moderation, RoomCommand};
use switchyard_protocol::{limits, RoomId, UserId};

/// A ban's or mute's `secs` outside `1..=MAX_MODERATION_SECS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("secs must be 1 to {} (omit it for good)", limits::MAX_MODERATION_SECS)]
pub struct DurationError;

/// Refuse a ban's or mute's `secs` outside `1..=MAX_MODERATION_SECS` (none is for good).
pub fn check_secs(secs: Option<u64>) -> Result<(), DurationError> {
    match secs {
        Some(secs) if !(1..=limits::MAX_MODERATION_SECS).contains(&secs) => Err(DurationError),
        Some(_) | None => Ok(()),
    }
}

/// When a ban or mute of `secs` seconds taken now ends, in unix milliseconds; `None` (no `secs`) is for good.
pub fn until_ms(secs: Option<u64>) -> Result<Option<u64>, DurationError> {
    check_secs(secs)?;
    let Some(secs) = secs else { return Ok(None) };
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    Ok(Some(now_ms + secs * 1000))
}

/// The room command of a moderation `action`; a ban or mute lasts `secs` (checked here; the room's router shard
/// fixes its end by its own clock) or, without, until lifted.
pub fn command(room: RoomId, action: Moderation, secs: Option<u64>) -> Result<RoomCommand, DurationError> {
    check_secs(secs)?;
    Ok(RoomCommand::Moderate { room, action, secs })
}

/// A ban of `user` (`on`) or its lifting.
pub fn ban(user: UserId, on: bool) -> Moderation {
    match on {
        true => Moderation::Ban { user, until_ms: None },
        false => Moderation::Unban { user },
    }
}

/// A mute of `user` (`on`) or its lifting.
pub fn mute(user: UserId, on: bool) -> Moderation {
    match on {
        true => Moderation::Mute { user, until_ms: None },
        false => Moderation::Unmute { user },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_become_expiries_within_bounds() {
        assert_eq!(until_ms(None), Ok(None));
        assert_eq!(until_ms(Some(0)), Err(DurationError));
        assert_eq!(until_ms(Some(limits::MAX_MODERATION_SECS + 1)), Err(DurationError));
        assert_eq!(until_ms(Some(u64::MAX)), Err(DurationError));
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let until = until_ms(Some(60)).unwrap().unwrap();
        assert!((now_ms + 60_000..now_ms + 61_000).contains(&until), "{until} vs {now_ms}");
        let (bob, room) = (UserId::parse("bob").unwrap(), RoomId::parse("town").unwrap());
        assert_eq!(command(room.clone(), ban(bob.clone(), true), Some(0)), Err(DurationError));
        assert_eq!(
            command(room.clone(), mute(bob.clone(), true), Some(60)),
            Ok(RoomCommand::Moderate { room, action: Moderation::Mute { user: bob, until_ms: None }, secs: Some(60) })
        );
    }
}
