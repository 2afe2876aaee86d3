//! JWT verification with the tenant's key (HS256, RS256 or ES256, exactly the one configured), the claims the
//! contract defines (`sub`, `pid`, `exp` required; `jti` and `rooms` optional), and the checks on key material a
//! tenant uploads.
//!
//! This module does no I/O: finding the tenant, and revocation, are `auth`'s job. `alg: none`, any algorithm but the
//! tenant's, a `pid` of another tenant, and an expired token are all refused.

use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use switchyard_protocol::ids::IdError;
use switchyard_protocol::internal::JwtKey;
use switchyard_protocol::{ProjectId, RoomId, UserId};

/// Shortest HS256 secret accepted, in bytes (the hash's output size, as RFC 7518 asks).
pub const MIN_HMAC_SECRET_BYTES: usize = 32;
/// Longest key material accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 16 * 1024;
/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// Most `rooms` grants one token may carry.
pub const MAX_GRANTS: usize = 256;
/// Clock skew allowed on `exp` (and `nbf` when present), in seconds.
pub const LEEWAY_SECS: u64 = 5;

/// A tenant's verification key, parsed once when the tenant record is loaded.
#[derive(Clone)]
pub struct PreparedKey {
    alg: Algorithm,
    key: DecodingKey,
}

impl std::fmt::Debug for PreparedKey {
    /// Only the algorithm: key material stays out of debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedKey").field("alg", &self.alg_name()).finish_non_exhaustive()
    }
}

impl PreparedKey {
    /// The algorithm name, as the admin API shows it.
    pub fn alg_name(&self) -> &'static str {
        alg_name(&self.alg)
    }
}

fn alg_name(alg: &Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::RS256 => "RS256",
        Algorithm::ES256 => "ES256",
        _ => "unsupported",
    }
}

/// The name of a stored key's algorithm.
pub fn key_alg_name(key: &JwtKey) -> &'static str {
    match key {
        JwtKey::HS256 { .. } => "HS256",
        JwtKey::RS256 { .. } => "RS256",
        JwtKey::ES256 { .. } => "ES256",
    }
}

/// Why key material a tenant uploads is refused. The message says what is wrong with it, never echoing it.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The HS256 secret is shorter than the hash's output.
    #[error("an HS256 secret must be at least {} bytes", MIN_HMAC_SECRET_BYTES)]
    SecretTooShort,
    /// The HS256 secret is longer than any key accepted.
    #[error("an HS256 secret must be at most {} bytes", MAX_KEY_BYTES)]
    SecretTooLong,
    /// The PEM text is longer than any key accepted.
    #[error("the PEM must be at most {} bytes", MAX_KEY_BYTES)]
    PemTooLong,
    /// The PEM holds a private key.
    #[error("this is a private key: upload only the public key, and treat this one as leaked")]
    PrivateKey,
    /// The text is not a PEM block.
    #[error("public_key_pem must be a PEM block")]
    NotPem,
    /// The PEM is not an RSA public key (neither SubjectPublicKeyInfo nor PKCS#1).
    #[error("not an RSA public key in PEM")]
    NotRsa(#[source] rsa::pkcs1::Error),
    /// The RSA modulus is too small.
    #[error("the RSA key has {bits} bits; at least {} are required", MIN_RSA_BITS)]
    RsaTooSmall {
        /// The modulus size found.
        bits: usize,
    },
    /// The RSA key parsed but cannot verify.
    #[error("not a usable RSA public key: {0}")]
    RsaUnusable(#[source] jsonwebtoken::errors::Error),
    /// The PEM is not a P-256 public key.
    #[error("not a P-256 (ES256) public key in PEM (SubjectPublicKeyInfo)")]
    NotP256(#[source] p256::pkcs8::spki::Error),
    /// The EC key parsed but cannot verify.
    #[error("not a usable EC public key: {0}")]
    EcUnusable(#[source] jsonwebtoken::errors::Error),
}

/// Why a JWT is refused (always as `unauthorized`). The message says which check failed.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The unverified payload has no `pid` that is a project id.
    #[error("JWT has no valid pid claim")]
    NoProject(#[source] Option<Box<dyn std::error::Error + Send + Sync>>),
    /// The header does not parse, or names an algorithm not supported at all.
    #[error("JWT header is invalid or its alg is not supported")]
    InvalidHeader(#[source] jsonwebtoken::errors::Error),
    /// The header's algorithm is not the tenant key's.
    #[error("JWT alg {alg} is not this project's ({expected})")]
    WrongAlg {
        /// The token's algorithm.
        alg: &'static str,
        /// The tenant key's algorithm.
        expected: &'static str,
    },
    /// Verification failed: signature, expiry, `nbf` or the claims' shape.
    #[error("{}", rejection(.0))]
    Rejected(#[source] jsonwebtoken::errors::Error),
    /// The `pid` is not the project whose key verified the token.
    #[error("JWT pid is not the signing project")]
    WrongProject,
    /// `sub` is not a user id.
    #[error("JWT sub is not a valid user id (^[A-Za-z0-9_-]{{1,64}}$)")]
    InvalidSub(#[source] IdError),
    /// `jti` is empty, too long or not printable ASCII.
    #[error("JWT jti must be 1 to 128 printable ASCII characters")]
    InvalidJti,
    /// More `rooms` grants than one token may carry.
    #[error("JWT carries more than {} rooms grants", MAX_GRANTS)]
    TooManyGrants,
    /// A `rooms` grant is neither a room id nor a prefix ending in `*`.
    #[error("JWT rooms grant {grant:?} is neither a room id nor a prefix ending in *")]
    InvalidGrant {
        /// The grant as the token carries it.
        grant: String,
    },
}

/// What a failed verification tells the client: the check that failed, without the library's details.
fn rejection(error: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => "JWT is expired",
        ErrorKind::ImmatureSignature => "JWT is not valid yet (nbf)",
        ErrorKind::InvalidSignature => "JWT signature does not verify",
        ErrorKind::InvalidAlgorithm => "JWT alg is not this project's",
        ErrorKind::MissingRequiredClaim(_) => "JWT lacks a required claim (sub, pid, exp)",
        ErrorKind::Json(_) => "JWT claims are malformed (sub, pid, exp are required)",
        _ => "JWT is invalid",
    }
}

/// Check key material and parse it for verification. The message of an error says what is wrong with it (never
/// echoing it).
pub fn prepare(key: &JwtKey) -> Result<PreparedKey, KeyError> {
    match key {
        JwtKey::HS256 { secret } => {
            if secret.len() < MIN_HMAC_SECRET_BYTES {
                return Err(KeyError::SecretTooShort);
            }
            if secret.len() > MAX_KEY_BYTES {
                return Err(KeyError::SecretTooLong);
            }
            Ok(PreparedKey { alg: Algorithm::HS256, key: DecodingKey::from_secret(secret.as_bytes()) })
        }
        JwtKey::RS256 { public_key_pem } => {
            check_public_pem(public_key_pem)?;
            let bits = rsa_bits(public_key_pem)?;
            if bits < MIN_RSA_BITS {
                return Err(KeyError::RsaTooSmall { bits });
            }
            let key = DecodingKey::from_rsa_pem(public_key_pem.as_bytes()).map_err(KeyError::RsaUnusable)?;
            Ok(PreparedKey { alg: Algorithm::RS256, key })
        }
        JwtKey::ES256 { public_key_pem } => {
            check_public_pem(public_key_pem)?;
            use p256::pkcs8::DecodePublicKey;
            p256::PublicKey::from_public_key_pem(public_key_pem.trim()).map_err(KeyError::NotP256)?;
            let key = DecodingKey::from_ec_pem(public_key_pem.as_bytes()).map_err(KeyError::EcUnusable)?;
            Ok(PreparedKey { alg: Algorithm::ES256, key })
        }
    }
}

fn check_public_pem(pem: &str) -> Result<(), KeyError> {
    if pem.len() > MAX_KEY_BYTES {
        return Err(KeyError::PemTooLong);
    }
    if pem.contains("PRIVATE KEY") {
        return Err(KeyError::PrivateKey);
    }
    if !pem.contains("-----BEGIN") {
        return Err(KeyError::NotPem);
    }
    Ok(())
}

fn rsa_bits(pem: &str) -> Result<usize, KeyError> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    use rsa::pkcs8::DecodePublicKey;
    use rsa::traits::PublicKeyParts;
    let pem = pem.trim();
    let key = rsa::RsaPublicKey::from_public_key_pem(pem)
        .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem))
        .map_err(KeyError::NotRsa)?;
    Ok(key.size() * 8)
}

/// Is `token` shaped like a JWT (three base64url segments)? Says nothing about its validity.
pub fn looks_like_jwt(token: &str) -> bool {
    token.bytes().filter(|b| *b == b'.').count() == 2
        && token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

/// The `pid` claim, read without verification, to find the tenant whose key verifies the token.
pub fn unverified_project(token: &str) -> Result<ProjectId, JwtError> {
    #[derive(Deserialize)]
    struct Pid {
        pid: String,
    }
    let refused = |error: Box<dyn std::error::Error + Send + Sync>| JwtError::NoProject(Some(error));
    let payload = token.split('.').nth(1).ok_or(JwtError::NoProject(None))?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| refused(e.into()))?;
    let pid: Pid = serde_json::from_slice(&bytes).map_err(|e| refused(e.into()))?;
    ProjectId::parse(&pid.pid).map_err(|e| refused(e.into()))
}

/// The verified claims of a token.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    pub sub: UserId,
    /// Unix seconds.
    pub exp: u64,
    pub jti: Option<String>,
    pub rooms: Vec<String>,
}

#[derive(Deserialize)]
struct RawClaims {
    sub: String,
    pid: String,
    exp: u64,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

/// Verify `token` with the tenant's key: the header's `alg` must be the key's, the signature must hold, `exp` must
/// be in the future (unless `check_exp` is false, for revoking an expired token), and `pid` must be `tenant`.
pub fn verify(token: &str, key: &PreparedKey, tenant: &ProjectId, check_exp: bool) -> Result<Claims, JwtError> {
    let header = jsonwebtoken::decode_header(token).map_err(JwtError::InvalidHeader)?;
    if header.alg != key.alg {
        return Err(JwtError::WrongAlg { alg: alg_name(&header.alg), expected: key.alg_name() });
    }
    let mut validation = Validation::new(key.alg);
    validation.algorithms = vec![key.alg];
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.leeway = LEEWAY_SECS;
    validation.validate_exp = check_exp;
    validation.validate_nbf = true;
    validation.validate_aud = false;
    let data = jsonwebtoken::decode::<RawClaims>(token, &key.key, &validation).map_err(JwtError::Rejected)?;
    let raw = data.claims;
    if raw.pid != tenant.as_str() {
        return Err(JwtError::WrongProject);
    }
    let sub = UserId::parse(&raw.sub).map_err(JwtError::InvalidSub)?;
    if let Some(jti) = &raw.jti {
        if !valid_jti(jti) {
            return Err(JwtError::InvalidJti);
        }
    }
    let rooms = raw.rooms.unwrap_or_default();
    if rooms.len() > MAX_GRANTS {
        return Err(JwtError::TooManyGrants);
    }
    if let Some(bad) = rooms.iter().find(|grant| !valid_grant(grant)) {
        return Err(JwtError::InvalidGrant { grant: bad.clone() });
    }
    Ok(Claims { sub, exp: raw.exp, jti: raw.jti, rooms })
}

fn valid_jti(jti: &str) -> bool {
    (1..=128).contains(&jti.len()) && jti.bytes().all(|b| b.is_ascii_graphic())
}

/// A grant is a room id, or a prefix of one followed by `*`.
fn valid_grant(grant: &str) -> bool {
    match grant.strip_suffix('*') {
        None => RoomId::parse(grant).is_ok(),
        Some(prefix) => {
            prefix.len() <= 130 && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':'))
        }
    }
}

/// How long a revocation of a token with these claims is kept (unix ms): until the token would have expired anyway,
/// leeway included. Saturates: a token whose `exp` is near `u64::MAX` is revoked for good.
pub fn revocation_until_ms(claims: &Claims) -> u64 {
    claims.exp.saturating_add(LEEWAY_SECS).saturating_mul(1000)
}

/// The id a JWT is revoked under: its `jti` when it has one (revoking every token with that jti), otherwise the
/// hash of its signed part (`header.claims`). Never the signature: a signature is not unique to what it signs (an
/// ECDSA signature (r, s) verifies as (r, n - s) too, and any holder of the key can sign again), so an id that
/// includes it could be dodged by re-encoding a revoked token.
pub fn credential_id(token: &str, jti: Option<&str>) -> String {
    match jti {
        Some(jti) => format!("j:{jti}"),
        None => {
            let signed = token.rsplit_once('.').map_or(token, |(signed, _signature)| signed);
            format!("s:{}", crate::auth::sha256_hex(signed))
        }
    }
}

/// The id earlier releases revoked a JWT without `jti` under: the hash of the whole token. Checked and written
/// beside [`credential_id`] so revocations hold across a rolling upgrade in both directions.
pub fn legacy_credential_id(token: &str, jti: Option<&str>) -> Option<String> {
    jti.is_none().then(|| format!("h:{}", crate::auth::sha256_hex(token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_material_is_checked() {
        assert!(prepare(&JwtKey::HS256 { secret: "short".into() }).is_err());
        assert!(prepare(&JwtKey::HS256 { secret: "x".repeat(32) }).is_ok());
        let not_pem = JwtKey::RS256 { public_key_pem: "hello".into() };
        assert!(prepare(&not_pem).is_err());
        let private =
            JwtKey::ES256 { public_key_pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----".into() };
        assert!(prepare(&private).unwrap_err().to_string().contains("private key"));
    }

    /// `exp` is any u64 the tenant signs. `(exp + leeway) * 1000` overflowed for `exp` near `u64::MAX`: a panic in
    /// a debug build, and in a release build a deadline wrapped into the past, so revoking such a token did not hold.
    #[test]
    fn revocation_deadline_saturates() {
        let claims = |exp| Claims { sub: UserId::parse("alice").unwrap(), exp, jti: None, rooms: Vec::new() };
        assert_eq!(revocation_until_ms(&claims(1_700_000_000)), 1_700_000_005_000);
        for exp in [u64::MAX, u64::MAX - LEEWAY_SECS, u64::MAX / 1000, u64::MAX / 1000 - LEEWAY_SECS + 1] {
            assert_eq!(revocation_until_ms(&claims(exp)), u64::MAX, "exp {exp}");
        }
    }

    #[test]
    fn shapes_and_grants() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(!looks_like_jwt("sytok_abc"));
        assert!(!looks_like_jwt("a.b.c.d"));
        assert!(valid_grant("general"));
        assert!(valid_grant("team-*"));
        assert!(valid_grant("*"));
        assert!(!valid_grant("a.b"));
        assert!(!valid_grant("a>*"));
        assert!(unverified_project("a.b.c").is_err());
    }
}
