//! Revocation at the edge: the registry of this gateway's live sessions (by tenant, by user and by credential), the
//! close signal each session selects on, the local cache of revoked credentials, and the revocation broadcast on
//! core NATS that carries a revocation taken on any gateway to every gateway.
//!
//! A revocation closes matching sessions with 4003 (after `bye`) and is remembered for a few seconds, so a session
//! whose authentication was in flight when it arrived is closed as soon as it registers. This module does not decide
//! who may revoke what (the HTTP API does) and does not store revocations durably (Redis does, see `tokens`).

use crate::auth::Identity;
use crate::Gateway;
use futures::StreamExt;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use switchyard_protocol::internal::{Revocation, RevocationTarget, INTERNAL_VERSION};
use switchyard_protocol::{codec, subjects, CloseCode, ProjectId, UserId};
use tokio_util::sync::CancellationToken;

/// How long a revocation is remembered for sessions that were authenticating while it happened.
const RECENT_WINDOW: Duration = Duration::from_secs(10);
/// Bound of one tenant's entries in the local revoked-credential cache (JWTs only: opaque tokens are checked in
/// Redis). Expired entries are pruned first, then the soonest-expiring, so a tenant can only crowd out its own.
const MAX_REVOKED_PER_TENANT: usize = 10_000;
/// Bound of the recent-revocations window, whatever the rate of revocations.
const MAX_RECENT: usize = 10_000;

/// Tells one session to close, with the code and reason to close with.
#[derive(Clone, Default)]
pub struct CloseSignal {
    token: CancellationToken,
    why: Arc<OnceLock<(CloseCode, &'static str)>>,
}

impl CloseSignal {
    /// Ask the session to close; the first reason given wins.
    pub fn fire(&self, code: CloseCode, reason: &'static str) {
        let _ = self.why.set((code, reason));
        self.token.cancel();
    }

    /// Resolves once fired, with the code and reason. Can be awaited again after it resolved.
    pub async fn fired(&self) -> (CloseCode, &'static str) {
        self.token.cancelled().await;
        self.why.get().copied().unwrap_or((CloseCode::Revoked, "revoked"))
    }

    pub fn is_fired(&self) -> bool {
        self.token.is_cancelled()
    }
}

struct Entry {
    tenant: ProjectId,
    user: UserId,
    credential: String,
    signal: CloseSignal,
}

struct Recent {
    at: Instant,
    tenant: ProjectId,
    target: RevocationTarget,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<u64, Entry>,
    by_tenant: HashMap<ProjectId, HashSet<u64>>,
    by_user: HashMap<(ProjectId, UserId), HashSet<u64>>,
    by_credential: HashMap<(ProjectId, String), HashSet<u64>>,
    recent: VecDeque<Recent>,
    /// Revoked JWT credentials per tenant, and when they expire anyway (unix ms).
    revoked: HashMap<ProjectId, HashMap<String, u64>>,
    /// Users banned from their tenant, and when the ban ends (unix ms; `u64::MAX` for a ban until lifted). Bounded
    /// per tenant like `revoked`; Redis holds every ban, this only answers while Redis cannot.
    banned: HashMap<ProjectId, HashMap<UserId, u64>>,
}

fn remove_from<K: std::hash::Hash + Eq>(map: &mut HashMap<K, HashSet<u64>>, key: K, id: u64) {
    if let Some(set) = map.get_mut(&key) {
        set.remove(&id);
        if set.is_empty() {
            map.remove(&key);
        }
    }
}

impl Inner {
    fn matching(&self, tenant: &ProjectId, target: &RevocationTarget) -> Vec<u64> {
        let set = match target {
            RevocationTarget::Tenant => self.by_tenant.get(tenant),
            RevocationTarget::User { user } | RevocationTarget::Ban { user, .. } => {
                self.by_user.get(&(tenant.clone(), user.clone()))
            }
            RevocationTarget::Token { id, .. } => self.by_credential.get(&(tenant.clone(), id.clone())),
            RevocationTarget::Unban { .. } => None,
        };
        set.map(|s| s.iter().copied().collect()).unwrap_or_default()
    }

    fn prune_recent(&mut self) {
        while self.recent.front().is_some_and(|r| r.at.elapsed() > RECENT_WINDOW) {
            self.recent.pop_front();
        }
    }

    fn remember_revoked(&mut self, tenant: &ProjectId, id: &str, until_ms: u64, now_ms: u64) {
        let revoked = self.revoked.entry(tenant.clone()).or_default();
        if revoked.len() >= MAX_REVOKED_PER_TENANT {
            revoked.retain(|_, until| *until > now_ms);
        }
        if revoked.len() >= MAX_REVOKED_PER_TENANT {
            if let Some(soonest) = revoked.iter().min_by_key(|(_, until)| **until).map(|(k, _)| k.clone()) {
                revoked.remove(&soonest);
            }
        }
        revoked.insert(id.to_owned(), until_ms);
    }

    fn is_revoked(&self, tenant: &ProjectId, id: &str, now_ms: u64) -> bool {
        self.revoked.get(tenant).and_then(|revoked| revoked.get(id)).is_some_and(|until| *until > now_ms)
    }

    fn remember_ban(&mut self, tenant: &ProjectId, user: &UserId, until_ms: u64, now_ms: u64) {
        let banned = self.banned.entry(tenant.clone()).or_default();
        if banned.len() >= MAX_REVOKED_PER_TENANT && !banned.contains_key(user) {
            banned.retain(|_, until| *until > now_ms);
            if banned.len() >= MAX_REVOKED_PER_TENANT {
                if let Some(soonest) = banned.iter().min_by_key(|(_, until)| **until).map(|(k, _)| k.clone()) {
                    banned.remove(&soonest);
                }
            }
        }
        banned.insert(user.clone(), until_ms);
    }

    fn forget_ban(&mut self, tenant: &ProjectId, user: &UserId) {
        if let Some(banned) = self.banned.get_mut(tenant) {
            banned.remove(user);
            if banned.is_empty() {
                self.banned.remove(tenant);
            }
        }
    }

    fn is_banned(&self, tenant: &ProjectId, user: &UserId, now_ms: u64) -> bool {
        self.banned.get(tenant).and_then(|banned| banned.get(user)).is_some_and(|until| *until > now_ms)
    }
}

/// This gateway's live sessions, indexed for revocation. A plain mutex, held only for map updates.
#[derive(Default)]
pub struct SessionRegistry {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
}

/// A registered session; deregisters itself when dropped.
pub struct Registration {
    registry: Arc<SessionRegistry>,
    id: u64,
    signal: CloseSignal,
}

impl Registration {
    /// The signal the session closes on.
    pub fn signal(&self) -> CloseSignal {
        self.signal.clone()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.deregister(self.id);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl SessionRegistry {
    pub fn new() -> Arc<Self> {
        Arc::new(SessionRegistry::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(inner) => inner,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Register a session. A session whose credential, user or tenant was revoked after its verification began is
    /// registered already fired.
    pub fn register(self: &Arc<Self>, identity: &Identity) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let signal = CloseSignal::default();
        let tenant = identity.tenant.clone();
        let credential = identity.credential.id.clone();
        let mut inner = self.lock();
        inner.prune_recent();
        let revoked_meanwhile = inner.recent.iter().any(|r| {
            r.at >= identity.credential.verified_at
                && r.tenant == tenant
                && match &r.target {
                    RevocationTarget::Tenant => true,
                    RevocationTarget::User { user } | RevocationTarget::Ban { user, .. } => *user == identity.user,
                    RevocationTarget::Token { id, .. } => *id == credential,
                    RevocationTarget::Unban { .. } => false,
                }
        });
        if revoked_meanwhile || inner.is_revoked(&tenant, &credential, now_ms()) {
            signal.fire(CloseCode::Revoked, "credentials revoked");
        }
        inner.by_tenant.entry(tenant.clone()).or_default().insert(id);
        inner.by_user.entry((tenant.clone(), identity.user.clone())).or_default().insert(id);
        inner.by_credential.entry((tenant.clone(), credential.clone())).or_default().insert(id);
        inner.sessions.insert(id, Entry { tenant, user: identity.user.clone(), credential, signal: signal.clone() });
        drop(inner);
        Registration { registry: self.clone(), id, signal }
    }

    fn deregister(&self, id: u64) {
        let mut inner = self.lock();
        if let Some(entry) = inner.sessions.remove(&id) {
            remove_from(&mut inner.by_tenant, entry.tenant.clone(), id);
            remove_from(&mut inner.by_user, (entry.tenant.clone(), entry.user), id);
            remove_from(&mut inner.by_credential, (entry.tenant, entry.credential), id);
        }
    }

    /// Apply a revocation on this gateway: close the matching sessions with 4003 and remember it. Returns how many
    /// sessions were told to close.
    pub fn revoke(&self, tenant: &ProjectId, target: &RevocationTarget, _at_ms: u64) -> usize {
        let reason = match target {
            RevocationTarget::Tenant => "tenant disabled",
            RevocationTarget::User { .. } => "user sessions revoked",
            RevocationTarget::Token { .. } => "token revoked",
            RevocationTarget::Ban { .. } => "user banned",
            RevocationTarget::Unban { .. } => "",
        };
        let mut inner = self.lock();
        let ids = inner.matching(tenant, target);
        let mut closed = 0;
        for id in &ids {
            if let Some(entry) = inner.sessions.get(id).filter(|entry| !entry.signal.is_fired()) {
                entry.signal.fire(CloseCode::Revoked, reason);
                closed += 1;
            }
        }
        match target {
            RevocationTarget::Ban { user, until_ms } => {
                let now = now_ms();
                if until_ms.is_none_or(|until| until > now) {
                    inner.remember_ban(tenant, user, until_ms.unwrap_or(u64::MAX), now);
                }
            }
            RevocationTarget::Unban { user } => {
                inner.forget_ban(tenant, user);
                return 0;
            }
            RevocationTarget::Tenant | RevocationTarget::User { .. } | RevocationTarget::Token { .. } => {}
        }
        inner.prune_recent();
        if inner.recent.len() >= MAX_RECENT {
            inner.recent.pop_front();
        }
        inner.recent.push_back(Recent { at: Instant::now(), tenant: tenant.clone(), target: target.clone() });
        // Opaque tokens need no local entry: a deleted token is refused by Redis, and Redis is needed to accept one.
        if let RevocationTarget::Token { id, until_ms } = target {
            let now = now_ms();
            if *until_ms > now && !id.starts_with("t:") {
                inner.remember_revoked(tenant, id, *until_ms, now);
            }
        }
        drop(inner);
        if closed > 0 {
            metrics::counter!("switchyard_gateway_revoked_sessions_total").increment(closed as u64);
        }
        closed
    }

    /// Is this credential in the local revocation cache?
    pub fn is_token_revoked(&self, tenant: &ProjectId, id: &str) -> bool {
        self.lock().is_revoked(tenant, id, now_ms())
    }

    /// Is this user banned from the tenant, as far as the bans this gateway heard of say?
    pub fn is_user_banned(&self, tenant: &ProjectId, user: &UserId) -> bool {
        self.lock().is_banned(tenant, user, now_ms())
    }
}

/// Why a revocation could not be broadcast.
#[derive(Debug, thiserror::Error)]
pub enum BroadcastError {
    /// The revocation message could not be encoded.
    #[error("cannot broadcast the revocation: {0}")]
    Encode(#[source] codec::CodecError),
    /// NATS refused the publish.
    #[error("cannot broadcast the revocation: {0}")]
    Publish(#[source] async_nats::PublishError),
    /// The publish could not be flushed to the server.
    #[error("cannot broadcast the revocation: {0}")]
    Flush(#[source] async_nats::client::FlushError),
}

/// Apply a revocation here and broadcast it to every gateway (this one hears it too; applying twice is harmless).
pub async fn broadcast(gw: &Gateway, tenant: &ProjectId, target: RevocationTarget) -> Result<(), BroadcastError> {
    let at_ms = now_ms();
    gw.sessions.revoke(tenant, &target, at_ms);
    let message = Revocation { v: INTERNAL_VERSION, tenant: tenant.clone(), target, at_ms };
    let payload = codec::encode(&message).map_err(BroadcastError::Encode)?;
    gw.nats.publish(subjects::revocations(tenant), payload).await.map_err(BroadcastError::Publish)?;
    gw.nats.flush().await.map_err(BroadcastError::Flush)
}

/// Subscribe to every tenant's revocations (before the gateway serves) and apply them until `shutdown`.
pub async fn listen(
    nats: async_nats::Client,
    sessions: Arc<SessionRegistry>,
    shutdown: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let mut subscription = nats.subscribe(subjects::REVOCATIONS_ALL).await?;
    tokio::spawn(async move {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => break,
                message = subscription.next() => match message {
                    Some(message) => message,
                    None => break,
                },
            };
            let revocation: Revocation = match codec::decode(&message.payload) {
                Ok(revocation) => revocation,
                Err(error) => {
                    tracing::warn!(%error, "undecodable revocation dropped");
                    continue;
                }
            };
            // A revocation only ever applies within the tenant its subject names.
            if message.subject.as_str() != subjects::revocations(&revocation.tenant) {
                tracing::warn!(subject = %message.subject, "revocation on the wrong subject dropped");
                continue;
            }
            sessions.revoke(&revocation.tenant, &revocation.target, revocation.at_ms);
        }
        let _ = subscription.unsubscribe().await;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Credential;

    fn identity(tenant: &ProjectId, user: &str, credential: &str) -> Identity {
        Identity {
            tenant: tenant.clone(),
            user: UserId::parse(user).unwrap(),
            grants: Vec::new(),
            credential: Credential { id: credential.into(), expires_at_ms: u64::MAX, verified_at: Instant::now() },
        }
    }

    #[test]
    fn revocations_hit_only_their_targets() {
        let registry = SessionRegistry::new();
        let a = ProjectId::generate();
        let b = ProjectId::generate();
        let a_alice = registry.register(&identity(&a, "alice", "t:1"));
        let a_bob = registry.register(&identity(&a, "bob", "t:2"));
        let b_alice = registry.register(&identity(&b, "alice", "t:1"));

        let token = RevocationTarget::Token { id: "t:1".into(), until_ms: u64::MAX };
        assert_eq!(registry.revoke(&a, &token, 0), 1);
        assert!(a_alice.signal().is_fired());
        assert!(!a_bob.signal().is_fired() && !b_alice.signal().is_fired());
        // Only JWT credentials are cached (opaque tokens are refused by Redis once deleted).
        assert!(!registry.is_token_revoked(&a, "t:1"));
        let jwt = RevocationTarget::Token { id: "j:x".into(), until_ms: u64::MAX };
        registry.revoke(&a, &jwt, 0);
        assert!(registry.is_token_revoked(&a, "j:x"));
        assert!(!registry.is_token_revoked(&b, "j:x"));

        let user = RevocationTarget::User { user: UserId::parse("bob").unwrap() };
        assert_eq!(registry.revoke(&a, &user, 0), 1);
        assert!(a_bob.signal().is_fired() && !b_alice.signal().is_fired());
        assert_eq!(registry.revoke(&b, &RevocationTarget::Tenant, 0), 1);
        assert!(b_alice.signal().is_fired());

        drop((a_alice, a_bob, b_alice));
        assert!(registry.lock().by_tenant.is_empty());
        assert!(registry.lock().by_credential.is_empty());
    }

    #[test]
    fn a_ban_closes_the_users_sessions_and_is_remembered_until_lifted_or_over() {
        let registry = SessionRegistry::new();
        let (a, b) = (ProjectId::generate(), ProjectId::generate());
        let bob = UserId::parse("bob").unwrap();
        let a_bob = registry.register(&identity(&a, "bob", "t:1"));
        let b_bob = registry.register(&identity(&b, "bob", "t:2"));
        let ban = RevocationTarget::Ban { user: bob.clone(), until_ms: None };
        assert_eq!(registry.revoke(&a, &ban, 0), 1);
        assert!(a_bob.signal().is_fired() && !b_bob.signal().is_fired());
        assert_eq!(registry.revoke(&a, &RevocationTarget::User { user: bob.clone() }, 0), 0, "closed once");
        assert!(registry.is_user_banned(&a, &bob) && !registry.is_user_banned(&b, &bob));
        assert_eq!(registry.revoke(&a, &RevocationTarget::Unban { user: bob.clone() }, 0), 0);
        assert!(!registry.is_user_banned(&a, &bob));
        let over = RevocationTarget::Ban { user: bob.clone(), until_ms: Some(1) };
        registry.revoke(&a, &over, 0);
        assert!(!registry.is_user_banned(&a, &bob), "a ban that is over is no ban");
        for i in 0..=MAX_REVOKED_PER_TENANT {
            let user = UserId::parse(&format!("u{i}")).unwrap();
            registry.revoke(&a, &RevocationTarget::Ban { user, until_ms: Some(u64::MAX - i as u64) }, 0);
        }
        assert_eq!(registry.lock().banned.get(&a).map(HashMap::len), Some(MAX_REVOKED_PER_TENANT));
        assert!(registry.is_user_banned(&a, &UserId::parse("u0").unwrap()), "the soonest to end went first");
    }

    #[test]
    fn a_revocation_during_authentication_still_closes() {
        let registry = SessionRegistry::new();
        let a = ProjectId::generate();
        let early = identity(&a, "carol", "t:9");
        registry.revoke(&a, &RevocationTarget::User { user: UserId::parse("carol").unwrap() }, 0);
        assert!(registry.register(&early).signal().is_fired());
        // Verified after the revocation: not affected.
        let later = identity(&a, "carol", "t:10");
        let kept = registry.register(&later);
        assert!(!kept.signal().is_fired());
    }
}
