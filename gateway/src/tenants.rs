//! The tenant directory: tenant records in the tenants KV bucket, an in-memory cache of them kept current by a KV
//! watch (so a change made on any gateway reaches every gateway within milliseconds), the admin operations on
//! tenants (create, set the JWT key, rotate the API key, disable, set limits), and the API-key check.
//!
//! API keys are stored only as SHA-256 hashes and compared in constant time; the API-key check reads the bucket
//! itself, so a rotated key stops working at once on every gateway. This module does not issue client tokens (see
//! `tokens`); when the watch sees a tenant disabled it asks the session registry to close its sockets.

use crate::jwt::{self, PreparedKey};
use crate::revocation::SessionRegistry;
use async_nats::jetstream::kv;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;
use switchyard_protocol::hooks::{PreSendHook, SigningSecret, TenantHooks};
use switchyard_protocol::ids::api_key;
use switchyard_protocol::internal::{JwtKey, RevocationTarget, TenantLimits, TenantRecord, INTERNAL_VERSION};
use switchyard_protocol::{codec, subjects, ProjectId};
use switchyard_service::nats::{compare_and_set, latest_entry, CasError, LeaderReadError};
use tokio_util::sync::CancellationToken;

/// How long "no such tenant" is remembered, so made-up project ids do not each cost a bucket read.
const NEGATIVE_TTL: Duration = Duration::from_secs(1);
/// Bound of the negative cache; it is emptied when full.
const NEGATIVE_MAX: usize = 10_000;
/// Compare-and-set attempts for one admin change before giving up with `unavailable`.
const CAS_ATTEMPTS: usize = 8;

/// A tenant as the gateway uses it: the record, its KV revision and its parsed JWT key.
pub struct TenantEntry {
    pub record: TenantRecord,
    pub revision: u64,
    /// `None` when no key is configured (or the stored one cannot be parsed; logged).
    pub jwt: Option<PreparedKey>,
}

impl TenantEntry {
    fn new(record: TenantRecord, revision: u64) -> Self {
        let jwt = record.jwt.as_ref().and_then(|key| match jwt::prepare(key) {
            Ok(prepared) => Some(prepared),
            Err(error) => {
                tracing::warn!(tenant = %record.project_id, %error, "stored JWT key is unusable; JWTs refused");
                None
            }
        });
        TenantEntry { record, revision, jwt }
    }
}

#[derive(Default)]
struct Cache {
    tenants: HashMap<ProjectId, Arc<TenantEntry>>,
    missing: HashMap<ProjectId, Instant>,
}

/// Reads and writes tenant records; caches them.
#[derive(Clone)]
pub struct TenantDirectory {
    /// The tenants bucket.
    kv: kv::Store,
    /// Never held across an await.
    cache: Arc<RwLock<Cache>>,
}

pub(crate) fn sha256_hex(text: &str) -> String {
    crate::auth::sha256_hex(text)
}

/// Why a tenant could not be found, read, changed or authenticated.
#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    /// No such tenant, or (for admin changes) it is disabled.
    #[error("no such tenant")]
    NotFound,
    /// The API key is malformed, unknown, or not the tenant's current key.
    #[error("invalid API key")]
    InvalidApiKey,
    /// The tenant of a valid API key is disabled.
    #[error("tenant is disabled")]
    Disabled,
    /// A stored tenant record does not decode.
    #[error("unreadable tenant record: {0}")]
    Unreadable(#[source] codec::CodecError),
    /// A tenant record could not be encoded.
    #[error("{0}")]
    Encode(#[source] codec::CodecError),
    /// The tenants bucket could not be read.
    #[error("cannot read tenant: {0}")]
    Read(#[source] LeaderReadError),
    /// A new tenant record could not be stored.
    #[error("cannot store tenant: {0}")]
    Create(#[source] kv::CreateError),
    /// A changed tenant record could not be stored.
    #[error("cannot store tenant: {0}")]
    Write(#[source] CasError),
    /// Every compare-and-set attempt lost to another change of the record.
    #[error("the tenant record kept changing; retry")]
    Contended,
}

impl TenantError {
    /// Is this an outage of the tenants bucket (worth retrying) rather than a verdict on the tenant or its data?
    pub fn is_unavailable(&self) -> bool {
        match self {
            TenantError::Read(_) | TenantError::Create(_) | TenantError::Write(_) | TenantError::Contended => true,
            TenantError::NotFound
            | TenantError::InvalidApiKey
            | TenantError::Disabled
            | TenantError::Unreadable(_)
            | TenantError::Encode(_) => false,
        }
    }
}

/// Why the tenant watch stopped; it is restarted.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    /// The watch could not be started.
    #[error("{0}")]
    Start(#[source] kv::WatchError),
    /// The watch failed while running.
    #[error("{0}")]
    Entry(#[source] kv::WatcherError),
    /// The watch ended without an error.
    #[error("watch ended")]
    Ended,
}

fn decode_record(bytes: &[u8]) -> Result<TenantRecord, TenantError> {
    codec::decode(bytes).map_err(TenantError::Unreadable)
}

impl TenantDirectory {
    pub fn new(kv: kv::Store) -> Self {
        TenantDirectory { kv, cache: Arc::new(RwLock::new(Cache::default())) }
    }

    /// Keep the cache current from a watch of the whole bucket, and close the sockets of tenants that get disabled,
    /// until `shutdown`. Restarts the watch (replaying the current values) whenever it ends.
    pub fn spawn_watch(&self, sessions: Arc<SessionRegistry>, shutdown: CancellationToken) {
        let directory = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    result = directory.watch_once(&sessions) => {
                        if let Err(error) = result {
                            tracing::warn!(%error, "tenant watch failed; restarting");
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        });
    }

    async fn watch_once(&self, sessions: &SessionRegistry) -> Result<(), WatchError> {
        let mut watch = self.kv.watch_with_history(">").await.map_err(WatchError::Start)?;
        while let Some(entry) = watch.next().await {
            let entry = entry.map_err(WatchError::Entry)?;
            let Ok(project_id) = ProjectId::parse(&entry.key) else {
                continue;
            };
            match entry.operation {
                kv::Operation::Put => match decode_record(&entry.value) {
                    Ok(record) => {
                        let disabled = record.disabled;
                        self.remember(record, entry.revision);
                        if disabled {
                            sessions.revoke(&project_id, &RevocationTarget::Tenant, 0);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(tenant = %project_id, %error, "ignoring tenant record")
                    }
                },
                kv::Operation::Delete | kv::Operation::Purge => {
                    if let Ok(mut cache) = self.cache.write() {
                        cache.tenants.remove(&project_id);
                    }
                    sessions.revoke(&project_id, &RevocationTarget::Tenant, 0);
                }
            }
        }
        Err(WatchError::Ended)
    }

    /// Put a record in the cache unless a newer revision is there already.
    fn remember(&self, record: TenantRecord, revision: u64) -> Arc<TenantEntry> {
        let project_id = record.project_id.clone();
        let fresh = Arc::new(TenantEntry::new(record, revision));
        let mut cache = match self.cache.write() {
            Ok(cache) => cache,
            Err(poisoned) => poisoned.into_inner(),
        };
        cache.missing.remove(&project_id);
        match cache.tenants.get(&project_id) {
            Some(current) if current.revision >= revision => current.clone(),
            _ => {
                cache.tenants.insert(project_id, fresh.clone());
                fresh
            }
        }
    }

    /// The cached tenant, without reading the bucket.
    pub fn cached(&self, project_id: &ProjectId) -> Option<Arc<TenantEntry>> {
        self.cache.read().ok()?.tenants.get(project_id).cloned()
    }

    /// The tenant (enabled or not) from the cache, or from the bucket on a miss.
    pub async fn lookup(&self, project_id: &ProjectId) -> Result<Option<Arc<TenantEntry>>, TenantError> {
        if let Ok(cache) = self.cache.read() {
            if let Some(entry) = cache.tenants.get(project_id) {
                return Ok(Some(entry.clone()));
            }
            if cache.missing.get(project_id).is_some_and(|at| at.elapsed() < NEGATIVE_TTL) {
                return Ok(None);
            }
        }
        match self.read(project_id).await? {
            Some((record, revision)) => Ok(Some(self.remember(record, revision))),
            None => {
                if let Ok(mut cache) = self.cache.write() {
                    if cache.missing.len() >= NEGATIVE_MAX {
                        cache.missing.clear();
                    }
                    cache.missing.insert(project_id.clone(), Instant::now());
                }
                Ok(None)
            }
        }
    }

    /// The record and its revision, read from the bucket.
    async fn read(&self, project_id: &ProjectId) -> Result<Option<(TenantRecord, u64)>, TenantError> {
        let entry = latest_entry(&self.kv, &subjects::tenant_key(project_id)).await.map_err(TenantError::Read)?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                Ok(Some((decode_record(&entry.value)?, entry.revision)))
            }
            _ => Ok(None),
        }
    }

    /// Create a tenant; returns its record and its API key, which is never shown again.
    pub async fn create(&self, name: &str, now_ms: u64) -> Result<(TenantRecord, String), TenantError> {
        let project_id = ProjectId::generate();
        let key = api_key::generate(&project_id);
        let record = TenantRecord {
            v: INTERNAL_VERSION,
            project_id: project_id.clone(),
            name: name.to_owned(),
            created_at_ms: now_ms,
            api_key_sha256: sha256_hex(&key),
            jwt: None,
            disabled: false,
            limits: TenantLimits::default(),
            hooks: None,
        };
        let payload = codec::encode(&record).map_err(TenantError::Encode)?;
        let revision = self.kv.create(subjects::tenant_key(&project_id), payload).await.map_err(TenantError::Create)?;
        self.remember(record.clone(), revision);
        Ok((record, key))
    }

    /// The tenant's record, if it exists and is enabled (a disabled tenant is gone as far as the API is concerned).
    pub async fn get(&self, project_id: &ProjectId) -> Result<Option<TenantRecord>, TenantError> {
        Ok(self.read(project_id).await?.map(|(record, _)| record).filter(|record| !record.disabled))
    }

    /// Change an enabled tenant's record with compare-and-set on its revision, retrying on conflict.
    async fn update(
        &self,
        project_id: &ProjectId,
        change: impl Fn(&mut TenantRecord),
    ) -> Result<TenantRecord, TenantError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut record, revision) = self.read(project_id).await?.ok_or(TenantError::NotFound)?;
            if record.disabled {
                return Err(TenantError::NotFound);
            }
            change(&mut record);
            let payload = codec::encode(&record).map_err(TenantError::Encode)?;
            match compare_and_set(&self.kv, &subjects::tenant_key(project_id), payload, Some(revision)).await {
                Ok(new_revision) => {
                    self.remember(record.clone(), new_revision);
                    return Ok(record);
                }
                Err(CasError::Conflict) => continue,
                Err(error) => return Err(TenantError::Write(error)),
            }
        }
        Err(TenantError::Contended)
    }

    /// Set the tenant's JWT verification key (already checked by `jwt::prepare`).
    pub async fn set_jwt(&self, project_id: &ProjectId, key: JwtKey) -> Result<(), TenantError> {
        self.update(project_id, |record| record.jwt = Some(key.clone())).await.map(drop)
    }

    /// Replace the tenant's API key; the old one stops working at once. Returns the new key.
    pub async fn rotate_key(&self, project_id: &ProjectId) -> Result<String, TenantError> {
        let key = api_key::generate(project_id);
        let hash = sha256_hex(&key);
        self.update(project_id, |record| record.api_key_sha256 = hash.clone()).await?;
        Ok(key)
    }

    /// Set (replace) the tenant's limits.
    pub async fn set_limits(&self, project_id: &ProjectId, limits: TenantLimits) -> Result<(), TenantError> {
        self.update(project_id, |record| record.limits = limits.clone()).await.map(drop)
    }

    /// Set (replace) the tenant's pre-send hook, or remove it with `None`. A tenant's first hook creates its signing
    /// secret. Returns the hooks as stored.
    pub async fn set_pre_send(
        &self,
        project_id: &ProjectId,
        hook: Option<PreSendHook>,
    ) -> Result<Option<TenantHooks>, TenantError> {
        let fresh_secret = SigningSecret::generate();
        let record = self
            .update(project_id, |record| match (&mut record.hooks, &hook) {
                (Some(hooks), _) => hooks.pre_send = hook.clone(),
                (None, None) => {}
                (None, Some(_)) => {
                    record.hooks =
                        Some(TenantHooks { pre_send: hook.clone(), ..TenantHooks::new(fresh_secret.clone()) })
                }
            })
            .await?;
        Ok(record.hooks)
    }

    /// Replace the tenant's signing secret (creating it when the tenant has none); the old one still signs beside it
    /// for a grace period. Returns the new one.
    pub async fn rotate_signing_secret(&self, project_id: &ProjectId) -> Result<SigningSecret, TenantError> {
        let secret = SigningSecret::generate();
        self.update(project_id, |record| match &mut record.hooks {
            Some(hooks) => hooks.rotate(secret.clone(), crate::http::now_ms()),
            None => record.hooks = Some(TenantHooks::new(secret.clone())),
        })
        .await?;
        Ok(secret)
    }

    /// Disable the tenant. Idempotent: disabling a disabled tenant succeeds; an unknown one is `not_found`.
    pub async fn disable(&self, project_id: &ProjectId) -> Result<(), TenantError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut record, revision) = self.read(project_id).await?.ok_or(TenantError::NotFound)?;
            if record.disabled {
                return Ok(());
            }
            record.disabled = true;
            let payload = codec::encode(&record).map_err(TenantError::Encode)?;
            match compare_and_set(&self.kv, &subjects::tenant_key(project_id), payload, Some(revision)).await {
                Ok(new_revision) => {
                    self.remember(record, new_revision);
                    return Ok(());
                }
                Err(CasError::Conflict) => continue,
                Err(error) => return Err(TenantError::Write(error)),
            }
        }
        Err(TenantError::Contended)
    }

    /// The enabled tenant an API key belongs to, or `unauthorized`. Reads the bucket, so a rotated key or a disabled
    /// tenant is refused at once on every gateway.
    pub async fn authenticate_key(&self, key: &str) -> Result<TenantRecord, TenantError> {
        let refused = || TenantError::InvalidApiKey;
        let project_id = api_key::project_of(key).ok_or_else(refused)?;
        let (record, revision) = self.read(&project_id).await?.ok_or_else(refused)?;
        let presented = sha256_hex(key);
        let same: bool = record.api_key_sha256.as_bytes().ct_eq(presented.as_bytes()).into();
        if !same {
            return Err(refused());
        }
        if record.disabled {
            return Err(TenantError::Disabled);
        }
        self.remember(record.clone(), revision);
        Ok(record)
    }
}
