//! JWTs that carry a valid signature: the fuzzer writes the claims (and, when the first byte's low bit is set, the
//! header too), the target signs them with the tenant's HS256 key, so everything after the signature check is
//! reached: claim types, `exp`/`nbf`, `pid`, `sub`, `jti` and `rooms` grants, and the revocation bookkeeping.
//!
//! Checks: an accepted token's claims are exactly what its payload says (`pid` is the tenant, `sub` a valid user id,
//! at most 256 valid grants, a printable `jti`), it is unexpired when expiry is checked, and the revocation deadline
//! computed from it neither overflows nor ends before the token does; a refused one is a plain `unauthorized`.
#![no_main]

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;
use switchyard_gateway::http::ApiError;
use switchyard_gateway::jwt;
use switchyard_protocol::{ErrorCode, RoomId};

#[derive(serde::Deserialize)]
struct Expected {
    pid: String,
    sub: String,
    exp: u64,
}

const HEADER: &[u8] = br#"{"alg":"HS256","typ":"JWT"}"#;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let (header, payload) = match flags & 1 {
        0 => (HEADER, rest),
        _ => match rest.iter().position(|b| *b == b'\n') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => return,
        },
    };
    let check_exp = flags & 2 == 0;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let message = format!("{}.{}", b64.encode(header), b64.encode(payload));
    let key = EncodingKey::from_secret(switchyard_fuzz::HS256_SECRET.as_bytes());
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).expect("HMAC signs");
    let token = format!("{message}.{signature}");
    assert!(jwt::looks_like_jwt(&token));

    let tenant = switchyard_fuzz::tenant();
    let claims = match jwt::verify(&token, &switchyard_fuzz::hs256_key(), &tenant, check_exp) {
        Ok(claims) => claims,
        Err(error) => {
            let error = ApiError::from(error);
            assert_eq!(error.code, ErrorCode::Unauthorized, "{error:?}");
            return;
        }
    };
    // Read the claims again on their own (unknown claims are skipped, as verification skips them).
    let raw: Expected = serde_json::from_slice(payload).expect("accepted claims hold pid, sub and exp");
    assert_eq!(raw.pid, tenant.as_str());
    assert_eq!(jwt::unverified_project(&token).ok().as_ref(), Some(&tenant));
    assert_eq!(raw.sub, claims.sub.as_str());
    switchyard_fuzz::check_user(&claims.sub);
    assert_eq!(raw.exp, claims.exp);
    if check_exp {
        let now = jsonwebtoken::get_current_timestamp();
        assert!(claims.exp.saturating_add(jwt::LEEWAY_SECS) >= now, "an expired token was accepted: {claims:?}");
    }
    assert!(claims.rooms.len() <= jwt::MAX_GRANTS);
    for grant in &claims.rooms {
        match grant.strip_suffix('*') {
            None => switchyard_fuzz::check_room(&RoomId::parse(grant).expect("a grant without * is a room id")),
            Some(prefix) => assert!(prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-:".contains(&b))),
        }
    }
    if let Some(jti) = &claims.jti {
        assert!((1..=128).contains(&jti.len()) && jti.bytes().all(|b| b.is_ascii_graphic()), "{jti:?}");
    }
    let id = jwt::credential_id(&token, claims.jti.as_deref());
    assert!(id.starts_with(if claims.jti.is_some() { "j:" } else { "s:" }));
    if claims.jti.is_none() {
        // Without a jti the id covers the signed part only: another signature of the same token has the same id.
        let signed = token.rsplit_once('.').map_or(token.as_str(), |(signed, _)| signed);
        assert_eq!(jwt::credential_id(&format!("{signed}.AAAA"), None), id);
    }
    let until_ms = jwt::revocation_until_ms(&claims);
    assert!(until_ms >= claims.exp.saturating_mul(1000), "revocation ends before the token: {until_ms}");
});
