//! The names of every Redis key Switchyard uses: tokens, revocation markers, the tenant message rate and the
//! fleet-wide socket counts. Ids cannot contain `:`, so no two keys of different meaning can collide.
//!
//! This module only names keys; what a key holds is described where it is read and written (the gateway).

use crate::{ProjectId, UserId};

/// The prefix of an opaque token's record; the rest of the key is the token's SHA-256.
pub const TOKEN_PREFIX: &str = "sy:tok:";

/// An opaque token's record, by the hash of the token.
pub fn token(hash: &str) -> String {
    format!("{TOKEN_PREFIX}{hash}")
}

/// The set of a user's opaque token hashes.
pub fn user_tokens(tenant: &ProjectId, user: &UserId) -> String {
    format!("sy:utok:{tenant}:{user}")
}

/// The marker of a revoked credential, kept until the credential would have expired.
pub fn revoked(tenant: &ProjectId, credential_id: &str) -> String {
    format!("sy:rev:{tenant}:{credential_id}")
}

/// A user's ban from the whole tenant: holds the ban's end (unix ms, 0 for good) and expires then.
pub fn user_ban(tenant: &ProjectId, user: &UserId) -> String {
    format!("sy:ban:{tenant}:{user}")
}

/// The tenant's fleet-wide message token bucket.
pub fn tenant_rate(tenant: &ProjectId) -> String {
    format!("sy:rate:{tenant}")
}

/// The live gateways: a sorted set of gateway ids scored by when their lease ends (Redis's clock, ms).
pub const GATEWAYS: &str = "sy:gateways";

/// A tenant's live sockets: a hash from gateway id to that gateway's count.
pub fn tenant_sockets(tenant: &ProjectId) -> String {
    format!("sy:sock:t:{tenant}")
}

/// A user's live sockets: a hash from gateway id to that gateway's count.
pub fn user_sockets(tenant: &ProjectId, user: &UserId) -> String {
    format!("sy:sock:u:{tenant}:{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_different_meaning_differ() {
        let tenant = ProjectId::parse("pj_00000000000000000000").unwrap();
        let user = UserId::parse("t").unwrap();
        let keys = [
            token("h"),
            user_tokens(&tenant, &user),
            revoked(&tenant, "h"),
            tenant_rate(&tenant),
            tenant_sockets(&tenant),
            user_sockets(&tenant, &user),
            GATEWAYS.to_owned(),
        ];
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
        assert_eq!(user_sockets(&tenant, &user), "sy:sock:u:pj_00000000000000000000:t");
    }
}
