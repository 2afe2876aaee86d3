//! Helpers for chat tests: ops that must succeed or fail with a given code, and waiting for events.

#![allow(dead_code)]

use serde_json::{Map, Value};
use std::time::Duration;
use switchyard_client::{Client, ClientOp, ErrorCode, Reply, ServerEvent};
use switchyard_protocol::{RoomId, UserId};

pub const WAIT: Duration = Duration::from_secs(15);
/// How long "nothing more arrives" is watched for.
pub const QUIET: Duration = Duration::from_millis(400);

pub fn room(id: &str) -> RoomId {
    RoomId::parse(id).expect("valid room id")
}

pub fn user(id: &str) -> UserId {
    UserId::parse(id).expect("valid user id")
}

/// Run an op that must succeed; returns the `ok` fields.
pub async fn ok(client: &Client, op: ClientOp) -> Map<String, Value> {
    let name = op.name();
    match client.request(op).await.expect("request") {
        Reply::Ok(fields) => fields,
        Reply::Err { code, message, .. } => panic!("{name} failed: {code}: {message}"),
    }
}

/// Run an op that must fail with `code`.
pub async fn refused(client: &Client, op: ClientOp, code: ErrorCode) {
    let name = op.name();
    match client.request(op).await.expect("request") {
        Reply::Ok(fields) => panic!("{name} should fail with {code}, got ok {fields:?}"),
        Reply::Err { code: got, message, .. } => assert_eq!(got, code, "{name}: {message}"),
    }
}

/// The next event that `pick` accepts, skipping others; panics after `WAIT`.
pub async fn next_where(client: &Client, what: &str, pick: impl Fn(&ServerEvent) -> bool) -> ServerEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match client.next_event_timeout(left).await {
            Some(event) if pick(&event) => return event,
            Some(_) => continue,
            None => panic!("no {what} arrived"),
        }
    }
}

/// Assert that no event `pick` accepts arrives for a while.
pub async fn none_where(client: &Client, what: &str, pick: impl Fn(&ServerEvent) -> bool) {
    let deadline = tokio::time::Instant::now() + QUIET;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        if let Some(event) = client.next_event_timeout(left).await {
            assert!(!pick(&event), "unexpected {what}: {event:?}");
        } else {
            return;
        }
    }
}

/// Drain whatever has arrived.
pub async fn drain(client: &Client) {
    while client.next_event_timeout(Duration::from_millis(150)).await.is_some() {}
}

pub fn seq_of(event: &ServerEvent) -> Option<u64> {
    match event {
        ServerEvent::Msg { seq, .. }
        | ServerEvent::Edit { seq, .. }
        | ServerEvent::Delete { seq, .. }
        | ServerEvent::Reaction { seq, .. }
        | ServerEvent::Pin { seq, .. }
        | ServerEvent::Joined { seq, .. }
        | ServerEvent::Left { seq, .. }
        | ServerEvent::Moderation { seq, .. }
        | ServerEvent::RoomDeleted { seq, .. }
        | ServerEvent::Erased { seq, .. } => Some(*seq),
        _ => None,
    }
}

pub fn room_of(event: &ServerEvent) -> Option<&RoomId> {
    match event {
        ServerEvent::Msg { room, .. }
        | ServerEvent::Edit { room, .. }
        | ServerEvent::Delete { room, .. }
        | ServerEvent::Reaction { room, .. }
        | ServerEvent::Pin { room, .. }
        | ServerEvent::Joined { room, .. }
        | ServerEvent::Left { room, .. }
        | ServerEvent::Moderation { room, .. }
        | ServerEvent::RoomDeleted { room, .. }
        | ServerEvent::Erased { room, .. }
        | ServerEvent::Typing { room, .. }
        | ServerEvent::Read { room, .. } => Some(room),
        ServerEvent::Presence { .. } => None,
    }
}
