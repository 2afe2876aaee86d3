//! The tenant directory: tenant records in the tenants KV bucket, and the API-key check that turns a key into its
//! tenant. Keys are stored only as SHA-256 hashes.
//!
//! This module does not issue client tokens (see `tokens`) and does not cache: every lookup reads the bucket, so a
//! disabled tenant or a rotated key takes effect at once.

use crate::error::ApiError;
use async_nats::jetstream::kv;
use sha2::{Digest, Sha256};
use switchyard_protocol::ids::api_key;
use switchyard_protocol::internal::{TenantRecord, INTERNAL_VERSION};
use switchyard_protocol::{codec, subjects, ErrorCode, ProjectId};

/// Reads and writes tenant records.
#[derive(Clone)]
pub struct TenantDirectory {
    /// The tenants bucket.
    kv: kv::Store,
}

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Compare two equal-length hex digests without an early exit.
fn digests_equal(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TenantDirectory {
    pub fn new(kv: kv::Store) -> Self {
        TenantDirectory { kv }
    }

    /// Create a tenant; returns its record and its API key, which is never shown again.
    pub async fn create(&self, name: &str, now_ms: u64) -> Result<(TenantRecord, String), ApiError> {
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
        };
        let payload = codec::encode(&record).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        self.kv
            .create(subjects::tenant_key(&project_id), payload)
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot store tenant: {e}")))?;
        Ok((record, key))
    }

    /// The tenant's record, if it exists.
    pub async fn get(&self, project_id: &ProjectId) -> Result<Option<TenantRecord>, ApiError> {
        let bytes = self
            .kv
            .get(subjects::tenant_key(project_id))
            .await
            .map_err(|e| ApiError::unavailable(format!("cannot read tenant: {e}")))?;
        match bytes {
            None => Ok(None),
            Some(bytes) => codec::decode(&bytes)
                .map(Some)
                .map_err(|e| ApiError::new(ErrorCode::Internal, format!("unreadable tenant record: {e}"))),
        }
    }

    /// The enabled tenant an API key belongs to, or `unauthorized`.
    pub async fn authenticate_key(&self, key: &str) -> Result<TenantRecord, ApiError> {
        let refused = || ApiError::unauthorized("invalid API key");
        let project_id = api_key::project_of(key).ok_or_else(refused)?;
        let record = self.get(&project_id).await?.ok_or_else(refused)?;
        if !digests_equal(&record.api_key_sha256, &sha256_hex(key)) {
            return Err(refused());
        }
        if record.disabled {
            return Err(ApiError::new(ErrorCode::Forbidden, "tenant is disabled"));
        }
        Ok(record)
    }

    /// Is the tenant present and enabled?
    pub async fn is_enabled(&self, project_id: &ProjectId) -> Result<bool, ApiError> {
        Ok(self.get(project_id).await?.is_some_and(|record| !record.disabled))
    }
}
