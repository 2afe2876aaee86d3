//! Ids as they arrive in frames, URL paths and API keys: project, user, room (named and direct-message) and message
//! ids, opaque tokens, API keys and router ids.
//!
//! Checks: whatever a constructor accepts maps to safe NATS subject tokens (no `.`, `*`, `>` or whitespace), parses
//! to itself again, and (for rooms) maps one to one onto its token; direct-message rooms name their two participants
//! in order; and deserialising an id from JSON applies exactly the same rule as parsing it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_fuzz::{assert_subject_token, check_message_id, check_project, check_room, check_user};
use switchyard_protocol::ids::{api_key, opaque_token, MessageId, ProjectId, RoomId, UserId};
use switchyard_protocol::{shard, subjects};

/// Deserialising `text` as a JSON string gives the same answer as `parse`.
fn same_from_json<T: serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(text: &str, parsed: &Option<T>) {
    let json = serde_json::to_string(text).expect("a string encodes as JSON");
    assert_eq!(&serde_json::from_str::<T>(&json).ok(), parsed, "JSON and parse disagree on {text:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };

    let project = ProjectId::parse(text).ok();
    if let Some(project) = &project {
        assert_eq!(project.as_str(), text);
        check_project(project);
    }
    same_from_json(text, &project);

    let user = UserId::parse(text).ok();
    if let Some(user) = &user {
        assert_eq!(user.as_str(), text);
        check_user(user);
        let shard = shard::shard_of_user(&switchyard_fuzz::tenant(), user, 7);
        assert!(shard.0 < 7);
    }
    same_from_json(text, &user);

    let room = RoomId::parse(text).ok();
    if let Some(room) = &room {
        assert_eq!(room.as_str(), text);
        check_room(room);
        for count in [1, 64, u16::MAX] {
            assert!(shard::shard_of_room(&switchyard_fuzz::tenant(), room, count).0 < count);
        }
    }
    same_from_json(text, &room);

    let message = MessageId::parse(text).ok();
    if let Some(message) = &message {
        check_message_id(message);
    }
    same_from_json(text, &message);

    // Two user ids separated by a newline: their direct-message room, when they differ.
    if let Some((a, b)) = text.split_once('\n') {
        if let (Ok(a), Ok(b)) = (UserId::parse(a), UserId::parse(b)) {
            match RoomId::dm(&a, &b) {
                Some(room) => {
                    check_room(&room);
                    let (first, second) = room.dm_participants().expect("a dm room has participants");
                    assert!(first.as_str().as_bytes() < second.as_str().as_bytes());
                    assert!((first == a && second == b) || (first == b && second == a));
                }
                None => assert_eq!(a, b),
            }
        }
    }

    if opaque_token::is_well_formed(text) {
        assert_eq!(text.len(), opaque_token::PREFIX.len() + 32);
        assert_subject_token(text);
    }
    if let Some(project) = api_key::project_of(text) {
        check_project(&project);
        let secret = text.strip_prefix(&format!("sk_{project}_")).expect("a key starts with its project");
        assert!(secret.len() == 32 && secret.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
    if subjects::valid_router_id(text) {
        assert_subject_token(text);
    }
});
