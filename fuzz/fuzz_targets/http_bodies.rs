//! JSON request bodies of the HTTP API: the admin API (create tenant, set JWT key, set limits), token minting, and
//! the tenant backend's room API (create room, post message, set member). The first byte picks the endpoint, the
//! rest is the body.
//!
//! Checks: an accepted body yields a request that meets every rule the handler relies on (ids valid, sizes within
//! the limits, a usable key, a burst only with a rate); a refused one is a `bad_request` or `too_large`, never a
//! panic or another kind of error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_gateway::{http, jwt};
use switchyard_protocol::internal::RoomCommand;
use switchyard_protocol::{limits, ErrorCode, RoomId};

fuzz_target!(|data: &[u8]| {
    let Some((&endpoint, body)) = data.split_first() else { return };
    let result = match endpoint % 8 {
        0 => http::parse_create_tenant(body).map(|name| {
            assert_eq!(name, name.trim());
            assert!((1..=200).contains(&name.len()));
        }),
        1 => http::parse_set_jwt(body).map(|key| {
            jwt::prepare(&key).expect("an accepted key prepares");
        }),
        2 => http::parse_set_limits(body).map(|limits| {
            assert!(limits.msgs_burst.is_none() || limits.msgs_per_sec.is_some());
        }),
        3 => http::parse_create_token(body).map(|(user, ttl_secs)| {
            switchyard_fuzz::check_user(&user);
            assert!((1..=limits::TOKEN_TTL_MAX_SECS).contains(&ttl_secs));
        }),
        4 => http::parse_create_room(body).map(|command| {
            let RoomCommand::Create { room, title, .. } = command else { panic!("not a create: {command:?}") };
            switchyard_fuzz::check_room(&room);
            assert!(title.is_none_or(|title| title.len() <= 200));
        }),
        5 => http::parse_set_member(body).map(|_role| ()),
        // Post a message, with the default limits and with tight ones (so `too_large` is reached too).
        n => {
            let (max_body, max_attrs) =
                if n == 6 { (limits::MAX_BODY_BYTES, limits::MAX_ATTRS_BYTES) } else { (8, 16) };
            let room = RoomId::parse("general").expect("a valid room");
            http::parse_post_message(room.clone(), body, max_body, max_attrs).map(|(from, command)| {
                switchyard_fuzz::check_user(&from);
                let RoomCommand::Send { room: to, body, attrs, reply_to, cmid } = command else {
                    panic!("not a send: {command:?}")
                };
                assert_eq!(to, room);
                assert!(body.len() <= max_body);
                assert!(reply_to.is_none() && cmid.is_none());
                if let Some(attrs) = attrs {
                    assert!(attrs.is_object());
                    assert!(serde_json::to_vec(&attrs).expect("attrs encode").len() <= max_attrs);
                }
            })
        }
    };
    if let Err(error) = result {
        assert!(matches!(error.code, ErrorCode::BadRequest | ErrorCode::TooLarge), "{error:?}");
        assert!(!error.message.is_empty());
    }
});
