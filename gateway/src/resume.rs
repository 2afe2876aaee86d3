//! Resume: the events a client missed in a room, read from the events stream (the authoritative log), for
//! `join {since}`. Finds the first missed event by binary search over the room's stream subject, then reads
//! forward to the join point.
//!
//! It does not deliver anything (the session does) and never reads the history store, which may lag.

use crate::upstream::UpstreamError;
use crate::Gateway;
use async_nats::jetstream::stream::{LastRawMessageErrorKind, Stream};
use switchyard_protocol::internal::RoomEvent;
use switchyard_protocol::shard::shard_of_room;
use switchyard_protocol::{codec, subjects, ErrorCode, ProjectId, RoomId};

fn unavailable(error: impl std::fmt::Display) -> UpstreamError {
    UpstreamError { code: ErrorCode::Unavailable, message: format!("cannot read the room's events: {error}") }
}

fn gap(since: u64) -> UpstreamError {
    UpstreamError {
        code: ErrorCode::ResumeGap,
        message: format!("events after seq {since} are no longer kept; read history and join without since"),
    }
}

/// A room's event at or after a stream sequence: (stream sequence, event), or `None` past the end.
async fn event_at_or_after(
    stream: &Stream,
    subject: &str,
    sequence: u64,
) -> Result<Option<(u64, RoomEvent)>, UpstreamError> {
    match stream.raw_message_builder().sequence(sequence.max(1)).next_by_subject(subject).send().await {
        Ok(message) => {
            let event = codec::decode::<RoomEvent>(&message.payload).map_err(unavailable)?;
            Ok(Some((message.sequence, event)))
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(unavailable(e)),
    }
}

/// The room's events with `since < seq <= upto`, in order. `resume_gap` when some of them are no longer kept or
/// when more than `max_events` are asked for.
pub async fn missed_events(
    gw: &Gateway,
    tenant: &ProjectId,
    room: &RoomId,
    since: u64,
    upto: u64,
) -> Result<Vec<RoomEvent>, UpstreamError> {
    if since >= upto {
        return Ok(Vec::new());
    }
    if upto - since > gw.config.resume_max_events {
        return Err(UpstreamError {
            code: ErrorCode::ResumeGap,
            message: format!(
                "{} events since seq {since} is more than one join replays ({}); read history and join without since",
                upto - since,
                gw.config.resume_max_events
            ),
        });
    }
    let stream = gw.events_stream().await.map_err(unavailable)?;
    let subject = subjects::event_log(shard_of_room(tenant, room, gw.config.shard_count), tenant, room);
    let Some((first_sequence, first)) = event_at_or_after(&stream, &subject, 1).await? else {
        return Err(gap(since));
    };
    if first.seq > since + 1 {
        return Err(gap(since));
    }
    let last_sequence = match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => message.sequence,
        Err(e) => return Err(unavailable(e)),
    };
    // The smallest stream sequence holding an event of seq > since.
    let (mut low, mut high) = (first_sequence, last_sequence);
    while low < high {
        let middle = low + (high - low) / 2;
        match event_at_or_after(&stream, &subject, middle).await? {
            Some((_, event)) if event.seq > since => high = middle,
            Some((found, _)) => low = found + 1,
            None => return Err(unavailable("the room's log ended during the search")),
        }
    }
    let mut events = Vec::with_capacity((upto - since) as usize);
    let mut next = low;
    while let Some((found, event)) = event_at_or_after(&stream, &subject, next).await? {
        if event.seq > upto {
            break;
        }
        if event.seq > since {
            events.push(event);
        }
        next = found + 1;
    }
    let complete = events.first().is_none_or(|e| e.seq == since + 1)
        && events.windows(2).all(|pair| pair[1].seq == pair[0].seq + 1)
        && events.last().is_none_or(|e| e.seq == upto);
    if !complete {
        return Err(gap(since));
    }
    Ok(events)
}
