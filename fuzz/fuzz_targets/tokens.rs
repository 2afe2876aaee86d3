//! Presented credentials: `Authorization` header values, `token` query parameters and `auth` frame tokens (opaque
//! `sytok_` tokens or JWTs), and the token path segment of `DELETE /v1/tokens/{token}`.
//!
//! Checks: the shape tests never both match, an opaque token's storage id is a fixed-size hash, the unverified `pid`
//! of a JWT is a valid project id, and a token never verifies with a key it was not signed with (the refusal is a plain `unauthorized`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_gateway::http::ApiError;
use switchyard_gateway::{auth, jwt};
use switchyard_protocol::ids::opaque_token;
use switchyard_protocol::internal::JwtKey;
use switchyard_protocol::ErrorCode;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some(token) = auth::bearer(text) {
        assert_eq!(token, token.trim());
    }
    let token = text.trim();
    let opaque = opaque_token::is_well_formed(token);
    let looks_like_jwt = jwt::looks_like_jwt(token);
    assert!(!(opaque && looks_like_jwt), "{token:?} is both an opaque token and a JWT");
    if opaque {
        let id = auth::opaque_token_id(token);
        assert!(id.starts_with("t:") && id.len() == 2 + 64, "{id:?}");
    }
    match jwt::unverified_project(token) {
        Ok(project) => switchyard_fuzz::check_project(&project),
        Err(error) => assert_eq!(ApiError::from(error).code, ErrorCode::Unauthorized),
    }
    // The seeds (and `jwt_claims`) sign with `HS256_SECRET`; no input is signed with this one.
    let secret = "a-secret-no-input-is-signed-with-0123456789".to_owned();
    let key = jwt::prepare(&JwtKey::HS256 { secret }).expect("a valid key");
    for check_exp in [true, false] {
        match jwt::verify(token, &key, &switchyard_fuzz::tenant(), check_exp) {
            Ok(claims) => panic!("a token verified with a key it was not signed with: {claims:?}"),
            Err(error) => assert_eq!(ApiError::from(error).code, ErrorCode::Unauthorized),
        }
    }
});
