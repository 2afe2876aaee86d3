//! JWT key material a tenant's operator uploads (`PUT /v1/admin/tenants/{id}/jwt`): HS256 secrets and RS256/ES256
//! public keys in PEM. The first byte picks the algorithm, the rest is the secret or the PEM.
//!
//! Checks: parsing never panics; an accepted key has the algorithm asked for, an HS256 secret is accepted exactly
//! when its length is within bounds, and no private key or non-PEM text is ever accepted as a public key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_gateway::jwt;
use switchyard_protocol::internal::JwtKey;

fuzz_target!(|data: &[u8]| {
    let Some((&alg, rest)) = data.split_first() else { return };
    let Ok(material) = std::str::from_utf8(rest) else { return };
    let material = material.to_owned();
    let key = match alg % 3 {
        0 => JwtKey::HS256 { secret: material.clone() },
        1 => JwtKey::RS256 { public_key_pem: material.clone() },
        _ => JwtKey::ES256 { public_key_pem: material.clone() },
    };
    let prepared = jwt::prepare(&key);
    if let JwtKey::HS256 { .. } = key {
        let fits = (jwt::MIN_HMAC_SECRET_BYTES..=jwt::MAX_KEY_BYTES).contains(&material.len());
        assert_eq!(prepared.is_ok(), fits, "HS256 secret of {} bytes", material.len());
    }
    match prepared {
        Ok(prepared) => {
            assert_eq!(prepared.alg_name(), jwt::key_alg_name(&key));
            if !matches!(key, JwtKey::HS256 { .. }) {
                assert!(material.contains("-----BEGIN") && !material.contains("PRIVATE KEY"));
                assert!(material.len() <= jwt::MAX_KEY_BYTES);
            }
        }
        Err(error) => assert!(!error.to_string().is_empty()),
    }
});
