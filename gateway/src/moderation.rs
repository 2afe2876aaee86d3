//! Moderation actions as the edges take them: the WebSocket ops of room admins and the HTTP API of the tenant's
//! backend both turn a ban's or mute's duration into the expiry the room records.
//!
//! Who may moderate, and what an action does to the room, is the room's router shard's decision (`room_core`); this
//! module only reads the clock.

use std::time::{SystemTime, UNIX_EPOCH};
use switchyard_protocol::internal::Moderation;
use switchyard_protocol::{limits, UserId};

/// A ban's or mute's `secs` outside `1..=MAX_MODERATION_SECS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("secs must be 1 to {} (omit it for good)", limits::MAX_MODERATION_SECS)]
pub struct DurationError;

/// When a ban or mute of `secs` seconds taken now ends, in unix milliseconds; `None` (no `secs`) is for good.
pub fn until_ms(secs: Option<u64>) -> Result<Option<u64>, DurationError> {
    let Some(secs) = secs else { return Ok(None) };
    if !(1..=limits::MAX_MODERATION_SECS).contains(&secs) {
        return Err(DurationError);
    }
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    Ok(Some(now_ms + secs * 1000))
}

/// A ban (`banned`) or its lifting, for `secs` seconds or for good.
pub fn ban(user: UserId, banned: bool, secs: Option<u64>) -> Result<Moderation, DurationError> {
    Ok(match banned {
        true => Moderation::Ban { user, until_ms: until_ms(secs)? },
        false => Moderation::Unban { user },
    })
}

/// A mute (`muted`) or its lifting, for `secs` seconds or for good.
pub fn mute(user: UserId, muted: bool, secs: Option<u64>) -> Result<Moderation, DurationError> {
    Ok(match muted {
        true => Moderation::Mute { user, until_ms: until_ms(secs)? },
        false => Moderation::Unmute { user },
    })
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
        let bob = UserId::parse("bob").unwrap();
        assert_eq!(ban(bob.clone(), false, Some(0)), Ok(Moderation::Unban { user: bob.clone() }));
        assert!(matches!(mute(bob, true, None), Ok(Moderation::Mute { until_ms: None, .. })));
    }
}
